"""Top-K divergence: `gather_topk_logprobs` + `topk_kl` against a naive full ``log_softmax``.

Both variants start from the same (tokens, V) fp32 logits (a leaf with a gradient, as the LM
head's output is) and the rollout's top-K ids and log-probs, and compute log π_θ at the ids, the
top-K KL and a backward pass of the gathered log-probs into the logits:

* naive: ``torch.log_softmax(logits, -1).gather(-1, ids)``: a second (tokens, V) tensor in the
  forward, kept for the backward.
* ours: ``stable_async.divergence.gather_topk_logprobs(logits, ids)`` (row-chunked logsumexp,
  chunked backward written straight into the logits' gradient).

Memory is the peak of PyTorch's CPU allocator above the level before the call (the logits and
ids already exist). A backward pass must allocate the logits' gradient (tokens × V × 4 bytes),
so the *extra* memory reported is ``peak − that gradient``: what the method costs beyond what any
method with a gradient to the logits needs. For ours it should be O(tokens × K) plus one chunk.
"""

from __future__ import annotations

import torch
from common import interleaved, peak_memory

from stable_async.divergence import gather_topk_logprobs, topk_kl

# (tokens, V): the largest is 2048 × 152064 fp32 logits = 1.16 GiB; naive peaks near 3 × that.
SIZES = [(1024, 32768), (2048, 152064)]
QUICK_SIZES = [(512, 32768)]
KS = [8, 20, 64]


def make(tokens: int, vocab: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, vocab, generator=g).mul_(2.0).requires_grad_(True)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(min(tokens, 64))])
    ids = ids.repeat((tokens + ids.shape[0] - 1) // ids.shape[0], 1)[:tokens]
    rollout = torch.log_softmax(torch.randn(tokens, k + 1, generator=g), -1)[:, :k]
    return logits, ids, rollout


def _variants(logits, ids, rollout):
    """naive / ours, forward+backward and forward-only."""

    def naive():
        logits.grad = None
        cur = torch.log_softmax(logits, dim=-1).gather(-1, ids)
        topk_kl(cur, rollout)
        cur.sum().backward()

    def ours():
        logits.grad = None
        cur = gather_topk_logprobs(logits, ids)
        topk_kl(cur, rollout)
        cur.sum().backward()

    def naive_fwd():
        with torch.no_grad():
            topk_kl(torch.log_softmax(logits, dim=-1).gather(-1, ids), rollout)

    def ours_fwd():
        with torch.no_grad():
            topk_kl(gather_topk_logprobs(logits, ids), rollout)

    return naive, ours, naive_fwd, ours_fwd


def run(sizes=None, ks=None, repeats: int = 5, memory: bool = True) -> list[dict]:
    rows = []
    for tokens, vocab in sizes or SIZES:
        for k in ks or KS:
            logits, ids, rollout = make(tokens, vocab, k)

            naive, ours, naive_fwd, ours_fwd = _variants(logits, ids, rollout)
            ref = torch.log_softmax(logits.detach(), -1).gather(-1, ids)
            torch.testing.assert_close(gather_topk_logprobs(logits.detach(), ids), ref, rtol=1e-5, atol=1e-5)
            timing = interleaved({"naive": naive, "ours": ours}, "naive", repeats=repeats, warmup=1)
            row = {
                "tokens": tokens,
                "V": vocab,
                "K": k,
                "naive_ms": timing.seconds["naive"] * 1e3,
                "ratio": timing.ratios["ours"],
                "logits_bytes": logits.numel() * logits.element_size(),
                "tk_bytes": tokens * k * 4,
            }
            logits.grad = None
            if memory:
                grad_bytes = logits.numel() * logits.element_size()
                row["naive_extra"] = peak_memory(naive) - grad_bytes
                logits.grad = None
                row["ours_extra"] = peak_memory(ours) - grad_bytes
                logits.grad = None
                row["naive_fwd"] = peak_memory(naive_fwd)
                row["ours_fwd"] = peak_memory(ours_fwd)
            rows.append(row)
    return rows
