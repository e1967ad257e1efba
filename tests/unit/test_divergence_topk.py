"""Top-K divergences and `gather_topk_logprobs`.

- top-K with K = V equals the exact full-vocabulary TV / KL (brute force from the distributions);
- binary ≤ top-K ≤ exact (hypothesis), with the sampled token forced into the top-K set;
- `gather_topk_logprobs` equals ``log_softmax(logits).gather`` (values and gradients) and
  allocates no (tokens, V) tensor besides the caller's logits (checked with torch.profiler).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from stable_async import divergence as D


def _exact(logp, logq):
    """Full-vocabulary TV(q, p) and KL(q ‖ p) by brute force (last dimension = vocabulary)."""
    p, q = logp.exp(), logq.exp()
    return 0.5 * (q - p).abs().sum(-1), (q * (logq - logp)).sum(-1)


def _distributions(gen, shape, V, scale=2.0, dtype=torch.float64):
    logp = torch.log_softmax(scale * torch.randn(*shape, V, generator=gen, dtype=torch.float64), -1)
    logq = torch.log_softmax(scale * torch.randn(*shape, V, generator=gen, dtype=torch.float64), -1)
    return logp.to(dtype), logq.to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_topk_with_k_equal_v_is_the_exact_divergence(gen, dtype, tol):
    V = 11
    logp, logq = _distributions(gen, (5, 7), V, dtype=dtype)
    ids = torch.argsort(torch.rand(5, 7, V, generator=gen), dim=-1)  # every id, in a random order
    tv = D.topk_tv(logp.gather(-1, ids), logq.gather(-1, ids))
    kl = D.topk_kl(logp.gather(-1, ids), logq.gather(-1, ids))
    exact_tv, exact_kl = _exact(logp.double(), logq.double())
    assert tv.dtype == dtype and tv.shape == (5, 7)
    assert torch.allclose(tv.double(), exact_tv, atol=tol, rtol=0)
    assert torch.allclose(kl.double(), exact_kl, atol=tol, rtol=0)


def test_topk_by_hand():
    # q on S = {a, b}: 0.5, 0.3 (rest 0.2);  p: 0.6, 0.1 (rest 0.3)
    lq = torch.tensor([0.5, 0.3], dtype=torch.float64).log()
    lp = torch.tensor([0.6, 0.1], dtype=torch.float64).log()
    assert D.topk_tv(lp, lq).item() == pytest.approx(0.5 * (0.1 + 0.2 + 0.1), abs=1e-15)
    kl = 0.5 * math.log(0.5 / 0.6) + 0.3 * math.log(0.3 / 0.1) + 0.2 * math.log(0.2 / 0.3)
    assert D.topk_kl(lp, lq).item() == pytest.approx(kl, abs=1e-12)
    # The binary divergences of a = the first entry are smaller (coarser partition).
    assert D.binary_tv(lp[0], lq[0]).item() == pytest.approx(0.1, abs=1e-15)
    assert D.binary_kl(lp[0], lq[0]).item() < D.topk_kl(lp, lq).item()


def test_topk_outputs_are_detached_and_rest_mass_is_clamped():
    lp = torch.log(torch.tensor([[0.7, 0.3], [0.5, 0.25]], dtype=torch.float64)).requires_grad_(True)
    lq = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.25]], dtype=torch.float64))
    for fn in (D.topk_tv, D.topk_kl):
        out = fn(lp, lq)
        assert not out.requires_grad and torch.isfinite(out).all()
    # Row 0 has no rest mass on either side (both clamp to 1e-12): only the two entries count.
    assert D.topk_tv(lp, lq)[0].item() == pytest.approx(0.2, abs=1e-12)
    # Padding entries at -inf with q_k = 0 contribute nothing.
    pad_p = torch.tensor([[0.6, 0.4, 0.0]], dtype=torch.float64).log()
    pad_q = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64).log()
    assert D.topk_kl(pad_p, pad_q).item() == pytest.approx(D.topk_kl(pad_p[:, :2], pad_q[:, :2]).item(), abs=1e-15)
    with pytest.raises(ValueError, match="rollout_topk_logprobs"):
        D.topk_tv(lp, lq[:, :1])


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    V=st.integers(2, 40),
    k_frac=st.floats(0.0, 1.0),
    scale=st.floats(0.1, 6.0),
)
def test_binary_le_topk_le_exact(seed, V, k_frac, scale):
    gen = torch.Generator().manual_seed(seed)
    logp, logq = _distributions(gen, (3,), V, scale=scale)
    K = max(1, round(k_frac * V))
    sampled = torch.multinomial(logq.exp(), 1, generator=gen)  # (3, 1), a token drawn from q
    ids = torch.topk(logq, K, dim=-1).indices
    in_set = (ids == sampled).any(-1, keepdim=True)
    ids = torch.where(in_set, ids, torch.cat([ids[:, :-1], sampled], dim=-1))  # force the sampled token in
    cur, ref = logp.gather(-1, ids), logq.gather(-1, ids)
    lp_a, lq_a = logp.gather(-1, sampled)[:, 0], logq.gather(-1, sampled)[:, 0]
    exact_tv, exact_kl = _exact(logp, logq)
    tol = 1e-9
    assert (D.binary_tv(lp_a, lq_a) <= D.topk_tv(cur, ref) + tol).all()
    assert (D.topk_tv(cur, ref) <= exact_tv + tol).all()
    # log p within ~1e-16 of 0 pins 1 − p only to ~1e-16 / (1 − p) relative, and the binary KL
    # reads 1 − p from log p while the top-K KL reads it from the other entries' log-probs.
    kl_slack = tol + 1e-15 / (-torch.expm1(lp_a)).clamp(min=1e-300)
    assert (D.binary_kl(lp_a, lq_a) <= D.topk_kl(cur, ref) + kl_slack).all()
    assert (D.topk_kl(cur, ref) <= exact_kl + tol).all()


@pytest.mark.parametrize("chunk_rows", [None, 1, 3, 100])
@pytest.mark.parametrize("layout", ["contiguous", "sliced", "flat", "single"])
def test_gather_topk_logprobs_matches_log_softmax_gather(gen, chunk_rows, layout):
    leaf = (3.0 * torch.randn(4, 6, 37, generator=gen, dtype=torch.float64)).requires_grad_(True)
    logits = {"contiguous": leaf[:, :5], "sliced": leaf[:, 1:], "flat": leaf[0], "single": leaf[0, 0]}[layout]
    ids = torch.randint(0, 37, (*logits.shape[:-1], 6), generator=gen)
    ids[..., 1] = ids[..., 0]  # a repeated id must still get the right gradient
    out = D.gather_topk_logprobs(logits, ids, chunk_rows=chunk_rows)
    ref = torch.log_softmax(logits, -1).gather(-1, ids)
    assert out.shape == ids.shape and out.dtype == torch.float64
    assert torch.allclose(out, ref, atol=1e-13, rtol=0)
    upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (g_out,) = torch.autograd.grad(out, leaf, upstream)
    (g_ref,) = torch.autograd.grad(ref, leaf, upstream)
    assert torch.allclose(g_out, g_ref, atol=1e-13, rtol=0)


def test_gather_topk_logprobs_gradcheck_and_low_precision(gen):
    logits = torch.randn(3, 9, generator=gen, dtype=torch.float64).requires_grad_(True)
    ids = torch.randint(0, 9, (3, 4), generator=gen)
    assert torch.autograd.gradcheck(lambda x: D.gather_topk_logprobs(x, ids, chunk_rows=2), (logits,))
    # bf16 logits: the logsumexp runs in fp32 and the result is fp32, not bf16.
    big = (4.0 * torch.randn(8, 5000, generator=gen)).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, 5000, (8, 3), generator=gen)
    out = D.gather_topk_logprobs(big, ids)
    ref = torch.log_softmax(big.float(), -1).gather(-1, ids)
    assert out.dtype == torch.float32 and torch.allclose(out, ref, atol=1e-5, rtol=0)
    out.sum().backward()
    assert big.grad.dtype == torch.bfloat16 and big.grad.shape == big.shape


def test_gather_topk_logprobs_bad_input():
    with pytest.raises(ValueError, match="topk_ids"):
        D.gather_topk_logprobs(torch.randn(2, 5), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="topk_ids"):
        D.gather_topk_logprobs(torch.randn(2, 5), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="chunk_rows"):
        D.gather_topk_logprobs(torch.randn(2, 5), torch.zeros(2, 1, dtype=torch.long), chunk_rows=0)


def _allocations(fn):
    """Bytes each op allocated itself while running ``fn`` (torch.profiler, nested ops not double counted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


def test_gather_topk_logprobs_allocates_no_tokens_by_vocab_tensor(gen, monkeypatch):
    """Forward: no allocation of (tokens, V) size; backward: exactly one, the logits' gradient.

    The probe is meaningful: the naive ``log_softmax(logits).gather`` and a plain
    ``logits.logsumexp(-1)`` (which materialises ``logits - max`` internally) are both caught.
    """
    tokens, vocab, K = 1024, 2048, 8
    logits = torch.randn(tokens, vocab, generator=gen).requires_grad_(True)
    full = logits.numel() * logits.element_size()  # 8 MiB
    monkeypatch.setattr(D, "_CHUNK_ELEMENTS", 1 << 18)  # the default chunk: 1 MiB of fp32 here
    ids = torch.randint(0, vocab, (tokens, K), generator=gen)

    naive = _allocations(lambda: torch.log_softmax(logits, -1).gather(-1, ids))
    assert max(naive) >= full
    plain = _allocations(lambda: logits.gather(-1, ids) - logits.logsumexp(-1, keepdim=True))
    assert max(plain) >= full

    # A non-contiguous (4, 256, V) slice of a (4, 257, V) tensor, as in logits[:, :-1]: no copy either.
    padded = torch.randn(4, tokens // 4 + 1, vocab, generator=gen).requires_grad_(True)
    cases = [(logits, ids, 128), (logits, ids, None), (padded[:, :-1], ids.view(4, -1, K), 128)]
    for x, x_ids, chunk_rows in cases:
        bound = (chunk_rows or D._CHUNK_ELEMENTS // vocab) * vocab * 4
        holder = {}
        sizes = _allocations(lambda: holder.setdefault("out", D.gather_topk_logprobs(x, x_ids, chunk_rows)))  # noqa: B023
        assert max(sizes) <= bound < full, (chunk_rows, max(sizes))
        back = _allocations(lambda: torch.autograd.grad(holder["out"].sum(), x))  # noqa: B023
        assert sum(s >= full for s in back) == 1  # the gradient of the logits, nothing else
        assert sorted(back)[-2] <= bound
