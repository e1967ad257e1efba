"""Kondo gate: backward passes skipped, and the backward time saved, against the full step in the same run.

The model: a small causal transformer (``nn.TransformerEncoderLayer`` with a causal mask; 2 layers,
d = 128, 4 heads, FFN 512, vocabulary 2048), a batch of B = 64 sequences of T = 64 response
tokens, group advantages (8 groups of 8, reward − group mean of a random reward).

Per repetition, in rotating order, each variant runs one training step:

* ``full`` (DG, every backward pass): forward with gradient on all B sequences, the ``delight``
  loss, backward.
* ``kondo …`` (DG-K): a forward pass without gradient on all B (the screening pass), `kondo_gate`,
  then forward with gradient, the ``reinforce`` loss and backward on the kept sequences only.

Reported per gated variant: the fraction of sequences skipped (mean over repetitions), the median
over repetitions of the paired ratio backward time (gated / full) and the same for the whole step
(screening forward included). Run: ``python benchmarks/kondo/run.py [--repeats N] [--quick]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import stable_async as sa


class CausalLM(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int, length: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(length, width))
        layer = nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        return self.head(self.blocks(self.embed(tokens) + self.position[:L], mask=causal, is_causal=True))


def logprobs_of(model: nn.Module, sequences: torch.Tensor) -> torch.Tensor:
    logits = model(sequences[:, :-1])
    return torch.log_softmax(logits, -1).gather(-1, sequences[:, 1:, None])[..., 0]


def make_batch(vocab: int, B: int, T: int, groups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sequences = torch.randint(vocab, (B, T + 1), generator=gen)
    rewards = torch.rand(B, generator=gen)
    group_ids = torch.arange(B) // (B // groups)
    return sequences, rewards - sa.baselines.group_mean_baseline(rewards, group_ids)


def full_step(model, sequences, advantages, mask) -> dict[str, float]:
    start = time.perf_counter()
    batch = sa.PolicyBatch(logprobs=logprobs_of(model, sequences), advantages=advantages, mask=mask)
    loss = sa.get_loss("delight")(batch).loss
    mid = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return {"step": end - start, "backward": end - mid, "skipped": 0.0}


def gated_step(model, sequences, advantages, mask, gate: dict) -> dict[str, float]:
    start = time.perf_counter()
    with torch.no_grad():
        screen = logprobs_of(model, sequences)
    selection = sa.kondo_gate(advantages, screen, mask, **gate)
    rows = selection.indices
    backward = 0.0
    if len(rows):
        batch = sa.PolicyBatch(
            logprobs=logprobs_of(model, sequences[rows]), advantages=advantages[rows], mask=mask[rows]
        )
        loss = sa.get_loss("reinforce")(batch).loss
        mid = time.perf_counter()
        loss.backward()
        backward = time.perf_counter() - mid
    end = time.perf_counter()
    model.zero_grad(set_to_none=True)
    return {"step": end - start, "backward": backward, "skipped": selection.skipped_fraction}


def run(repeats: int, quick: bool) -> list[dict[str, float | str]]:
    torch.manual_seed(0)
    vocab, width, layers, B, T = (256, 32, 1, 16, 16) if quick else (2048, 128, 2, 64, 64)
    model = CausalLM(vocab, width, layers, T)
    sequences, advantages = make_batch(vocab, B, T, groups=B // 8, seed=1)
    mask = torch.ones(B, T, dtype=torch.bool)
    gen = torch.Generator().manual_seed(2)
    gates = {
        "kondo price 0": {"price": 0.0, "generator": gen},
        "kondo rate 0.25": {"rate": 0.25, "stochastic": False},
        "kondo rate 0.05": {"rate": 0.05, "stochastic": False},
    }
    variants = {"full": lambda: full_step(model, sequences, advantages, mask)}
    for name, gate in gates.items():
        variants[name] = lambda gate=gate: gated_step(model, sequences, advantages, mask, gate)
    names = list(variants)
    for name in names:  # warm-up
        variants[name]()
    results: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            results[name].append(variants[name]())
    rows = []
    for name in names[1:]:
        paired = list(zip(results[name], results["full"], strict=True))
        rows.append(
            {
                "variant": name,
                "skipped": statistics.mean(g["skipped"] for g, _ in paired),
                "backward_ratio": statistics.median(g["backward"] / f["backward"] for g, f in paired),
                "step_ratio": statistics.median(g["step"] / f["step"] for g, f in paired),
            }
        )
    full_ms = 1e3 * statistics.median(f["backward"] for f in results["full"])
    setup = f"model {layers} layers d={width} V={vocab}; batch {B}×{T}; {repeats} repetitions"
    print(f"{setup}; full backward {full_ms:.1f} ms")
    print("| variant | backward passes skipped | backward time (gated / full) | step time (gated / full) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['skipped']:.1%} | {row['backward_ratio']:.3f} | {row['step_ratio']:.3f} |")
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a tiny model, for a smoke test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    run(args.repeats, args.quick)
