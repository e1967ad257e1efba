"""Baselines: group mean, RLOO, and the off-policy optimal baseline (OPOB) with its gradient-norm helpers."""

from __future__ import annotations

import math

import pytest
import torch

import stable_async as sa
from stable_async.baselines import (
    group_mean_baseline,
    length_grad_sq_norms,
    logit_grad_sq_norms,
    min_variance_baseline,
    per_sequence_grad_sq_norms,
    rloo_baseline,
)

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------------- group mean / RLOO
def test_group_mean_and_rloo_hand_values():
    r = t([1.0, 0.0, 3.0, 5.0, 2.0])
    gid = torch.tensor([7, 7, 7, 3, 9])  # groups of 3, 1, 1
    assert torch.allclose(group_mean_baseline(r, gid), t([4 / 3, 4 / 3, 4 / 3, 5.0, 2.0]))
    assert torch.allclose(rloo_baseline(r, gid), t([1.5, 2.0, 0.5, 0.0, 0.0]))
    assert torch.allclose(group_mean_baseline(r), torch.full((5,), 11 / 5, dtype=F64))
    assert torch.allclose(rloo_baseline(r), (11 - r) / 4)
    assert sa.baselines.group_mean_baseline is group_mean_baseline


# ---------------------------------------------------------------------- OPOB forms
def test_paper_form_hand_computed_per_group():
    r = t([1.0, 0.0, 2.0, 4.0])
    gid = torch.tensor([0, 0, 1, 1])
    rho = t([2.0, 0.5, 1.0, 3.0])
    sq = t([1.0, 4.0, 2.0, 0.5])
    b = min_variance_baseline(r, gid, is_weights=rho, grad_sq_norms=sq)
    w = rho**2 * sq  # [4, 1, 2, 4.5]
    g0 = (w[0] * 1 + w[1] * 0) / (w[0] + w[1])
    g1 = (w[2] * 2 + w[3] * 4) / (w[2] + w[3])
    assert torch.allclose(b, t([g0, g0, g1, g1]), rtol=1e-14)
    # log-space input gives the same
    assert torch.allclose(min_variance_baseline(r, gid, log_is_weights=rho.log(), grad_sq_norms=sq), b, rtol=1e-14)
    # length normalization divides W by L²
    lengths = t([1.0, 2.0, 3.0, 1.0])
    bl = min_variance_baseline(r, gid, is_weights=rho, grad_sq_norms=sq, lengths=lengths, length_normalized=True)
    wl = w / lengths**2
    expected = t([wl[0] / (wl[0] + wl[1])] * 2 + [(wl[2] * 2 + wl[3] * 4) / (wl[2] + wl[3])] * 2)
    assert torch.allclose(bl, expected, rtol=1e-14)
    # ratio_cap truncates ρ inside W
    bc = min_variance_baseline(r, gid, is_weights=rho, grad_sq_norms=sq, ratio_cap=1.0)
    wc = rho.clamp(max=1.0) ** 2 * sq
    assert torch.allclose(bc[2], (wc[2] * 2 + wc[3] * 4) / (wc[2] + wc[3]), rtol=1e-14)


def test_equal_norm_reduces_to_rho_squared_form():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(12, generator=g, dtype=F64)
    log_rho = 2.0 * torch.randn(12, generator=g, dtype=F64)
    rho2 = torch.exp(2 * log_rho)
    expected = (rho2 * r).sum() / rho2.sum()
    b = min_variance_baseline(r, log_is_weights=log_rho, mode="equal_norm")
    assert torch.allclose(b, expected.expand(12), rtol=1e-12)
    same = min_variance_baseline(r, log_is_weights=log_rho, grad_sq_norms=torch.full((12,), 3.7, dtype=F64))
    assert torch.allclose(same, b, rtol=1e-12)


def test_reference_code_form_counts_the_truncated_weight_twice():
    r = t([1.0, 0.0, 2.0])
    log_rho = t([math.log(10.0), math.log(0.5), math.log(2.0)])
    sq = t([1.0, 2.0, 3.0])
    b = min_variance_baseline(r, log_is_weights=log_rho, grad_sq_norms=sq, mode="reference_code")
    rho = log_rho.exp()
    w = rho.clamp(max=8.0) ** 2 * rho**2 * sq  # ρ̄²·ρ²·‖g‖², ρ̄ = min(ρ, 8)
    assert torch.allclose(b, ((w * r).sum() / w.sum()).expand(3), rtol=1e-13)
    # equals the paper form when every ρ is the same
    flat = t([0.3, 0.3, 0.3])
    ref = min_variance_baseline(r, log_is_weights=flat, grad_sq_norms=sq, mode="reference_code")
    paper = min_variance_baseline(r, log_is_weights=flat, grad_sq_norms=sq)
    assert torch.allclose(ref, paper, rtol=1e-13)
    # "grad_norm" ignores the IS weights
    gn = min_variance_baseline(r, log_is_weights=log_rho, grad_sq_norms=sq, mode="grad_norm")
    assert torch.allclose(gn, ((sq * r).sum() / sq.sum()).expand(3), rtol=1e-13)


def test_extreme_log_ratios_stay_finite():
    r = t([1.0, 2.0, 3.0, -1.0, 0.5])
    gid = torch.tensor([0, 0, 0, 1, 1])
    log_rho = t([1e4, 1e4 - 1.0, -1e4, -1e4, -1e4 + 0.5])
    sq = t([1.0, 1.0, 1.0, 2.0, 1.0])
    for mode in ("paper", "reference_code"):
        b = min_variance_baseline(r, gid, log_is_weights=log_rho, grad_sq_norms=sq, mode=mode)
        assert torch.isfinite(b).all()
    b = min_variance_baseline(r, gid, log_is_weights=log_rho, grad_sq_norms=sq)
    w0 = t([1.0, math.exp(-2.0)])  # the −1e4 member has weight exp(−4e4) = 0
    assert torch.allclose(b[:3], ((w0 * r[:2]).sum() / w0.sum()).expand(3), rtol=1e-13)
    w1 = t([2.0, math.exp(1.0)])
    assert torch.allclose(b[3:], ((w1 * r[3:]).sum() / w1.sum()).expand(2), rtol=1e-13)
    bm = min_variance_baseline(r, gid, log_is_weights=log_rho, grad_sq_norms=sq, scope="minibatch")
    assert torch.allclose(bm, b[0].expand(5), rtol=1e-13)


def test_fallbacks_singleton_and_zero_weights():
    r = t([1.0, 3.0, 5.0, 7.0])
    gid = torch.tensor([0, 0, 1, 2])
    sq = t([0.0, 0.0, 2.0, 0.0])  # group 0: all-zero weights -> plain mean; group 2: singleton, zero weight
    b = min_variance_baseline(r, gid, is_weights=t([1.0, 2.0, 0.5, 1.0]), grad_sq_norms=sq)
    assert torch.equal(b, t([2.0, 2.0, 5.0, 7.0]))
    b0 = min_variance_baseline(r, gid, is_weights=torch.zeros(4, dtype=F64), mode="equal_norm")
    assert torch.equal(b0, t([2.0, 2.0, 5.0, 7.0]))
    bm = min_variance_baseline(r, is_weights=torch.zeros(4, dtype=F64), mode="equal_norm", scope="minibatch")
    assert torch.allclose(bm, torch.full((4,), 4.0, dtype=F64))
    assert min_variance_baseline(t([]), mode="equal_norm").numel() == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "popular"}, "mode"),
        ({"scope": "batch"}, "scope"),
        ({"mode": "paper"}, "grad_sq_norms"),
        ({"mode": "equal_norm", "grad_sq_norms": t([1.0, 1.0])}, "grad_sq_norms"),
        ({"mode": "equal_norm", "is_weights": t([1.0, -1.0])}, "is_weights"),
        ({"mode": "equal_norm", "is_weights": t([1.0, 1.0]), "log_is_weights": t([0.0, 0.0])}, "log_is_weights"),
        ({"mode": "equal_norm", "log_is_weights": t([0.0, float("nan")])}, "log_is_weights"),
        ({"mode": "equal_norm", "log_is_weights": t([0.0, 0.0, 0.0])}, "log_is_weights"),
        ({"mode": "equal_norm", "length_normalized": True}, "lengths"),
        ({"mode": "equal_norm", "length_normalized": True, "lengths": t([1.0, 0.0])}, "lengths"),
        ({"grad_sq_norms": t([1.0, -2.0])}, "grad_sq_norms"),
        ({"mode": "equal_norm", "ratio_cap": 0.0}, "ratio_cap"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        min_variance_baseline(t([1.0, 2.0]), **kwargs)


def test_bad_rewards_and_group_ids():
    with pytest.raises(TypeError, match="rewards"):
        min_variance_baseline(torch.ones(2, 2), mode="equal_norm")
    with pytest.raises(TypeError, match="group_ids"):
        group_mean_baseline(t([1.0, 2.0]), t([0.0, 1.0]))
    with pytest.raises(ValueError, match="group_ids"):
        rloo_baseline(t([1.0, 2.0]), torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------- Monte-Carlo: which b minimizes variance
def _bandit():
    """A softmax bandit: π = softmax(θ), behaviour μ, score g(a) = e_a − π, so E_μ[ρ g] = 0."""
    theta = t([1.5, 0.2, -0.5, 0.0, -1.0, 0.8])
    pi = torch.softmax(theta, 0)
    mu = torch.softmax(t([0.0, 0.5, 0.3, -0.2, 0.6, -0.4]), 0)
    rewards = t([1.0, 0.0, 3.0, 0.5, 2.0, -1.0])
    return theta, pi, mu, rewards


def test_paper_form_minimizes_empirical_variance():
    _, pi, mu, rewards = _bandit()
    scores = torch.eye(6, dtype=F64) - pi  # g(a)
    rho_of = pi / mu
    gen = torch.Generator().manual_seed(0)

    # b from one batch of rollouts, with the exact per-sequence gradient norms ‖g(a)‖².
    a = torch.multinomial(mu, 20_000, replacement=True, generator=gen)
    log_rho = torch.log(pi[a]) - torch.log(mu[a])
    sq = (scores[a] ** 2).sum(-1)
    r = rewards[a]
    rho = log_rho.exp()
    b_paper = float(min_variance_baseline(r, log_is_weights=log_rho, grad_sq_norms=sq)[0])
    candidates = {
        "zero": 0.0,
        "mean_reward": float(r.mean()),
        "popular_sum_rho_R_over_sum_rho": float((rho * r).sum() / rho.sum()),
        "equal_norm_sum_rho2_R_over_sum_rho2": float(
            min_variance_baseline(r, log_is_weights=log_rho, mode="equal_norm")[0]
        ),
        "reference_code": float(
            min_variance_baseline(r, log_is_weights=log_rho, grad_sq_norms=sq, mode="reference_code")[0]
        ),
    }
    for delta in (-0.6, -0.3, -0.15, 0.15, 0.3, 0.6):
        candidates[f"paper{delta:+}"] = b_paper + delta

    # Empirical variance (trace of covariance) of ĝ(b) = ρ (R − b) g over independent draws,
    # with common random numbers for every b.
    draws = torch.multinomial(mu, 200_000, replacement=True, generator=gen)
    u = (rho_of[draws] * rewards[draws]).unsqueeze(-1) * scores[draws]  # ρ R g
    v = rho_of[draws].unsqueeze(-1) * scores[draws]  # ρ g

    def variance(b: float) -> float:
        x = u - b * v
        return float(((x - x.mean(0)) ** 2).sum(-1).mean())

    best = variance(b_paper)
    for name, b in candidates.items():
        assert best < variance(b), name
    # Population value b* = E_μ[ρ²‖g‖²R] / E_μ[ρ²‖g‖²], against the estimate
    w = mu * rho_of**2 * (scores**2).sum(-1)
    assert b_paper == pytest.approx(float((w * rewards).sum() / w.sum()), abs=0.05)


# ---------------------------------------------------------------------- gradient squared norms
class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 7, dim: int = 5):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.proj = torch.nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.embed(tokens)))  # logits of the next token


def _token_logprobs(model, context, targets):
    logp = torch.log_softmax(model(context), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def test_exact_grad_sq_norms_match_per_sample_autograd():
    torch.manual_seed(0)
    model = TinyLM().double()
    gen = torch.Generator().manual_seed(1)
    context = torch.randint(0, 7, (4, 6), generator=gen)
    targets = torch.randint(0, 7, (4, 6), generator=gen)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([[6], [3], [1], [5]])
    got = per_sequence_grad_sq_norms(_token_logprobs(model, context, targets), model.parameters(), mask=mask)

    params = {k: v.detach() for k, v in model.named_parameters()}

    def seq_logprob(p, ctx, tgt, m):
        logits = torch.func.functional_call(model, p, (ctx.unsqueeze(0),))
        lp = torch.log_softmax(logits, -1).gather(-1, tgt.view(1, -1, 1)).view(-1)
        return (lp * m).sum()

    grads = torch.func.vmap(torch.func.grad(seq_logprob), in_dims=(None, 0, 0, 0))(
        params, context, targets, mask.to(F64)
    )
    expected = sum(g.pow(2).flatten(1).sum(-1) for g in grads.values())
    assert torch.allclose(got, expected, rtol=1e-12)
    # (B,) sequence log-probs give the same
    seq = (_token_logprobs(model, context, targets) * mask).sum(-1)
    assert torch.allclose(per_sequence_grad_sq_norms(seq, model.parameters()), expected, rtol=1e-12)


def test_exact_grad_sq_norms_on_the_bandit_closed_form():
    theta, pi, _, _ = _bandit()
    theta = theta.clone().requires_grad_(True)
    actions = torch.tensor([0, 3, 5, 2])
    lp = torch.log_softmax(theta, 0)[actions]
    got = per_sequence_grad_sq_norms(lp, [theta])
    expected = ((torch.eye(6, dtype=F64) - pi)[actions] ** 2).sum(-1)
    assert torch.allclose(got, expected, rtol=1e-13)


def test_logit_proxy_equals_gradient_wrt_logits():
    gen = torch.Generator().manual_seed(2)
    logits = (3.0 * torch.randn(3, 5, 11, generator=gen, dtype=F64)).requires_grad_(True)
    ids = torch.randint(0, 11, (3, 5), generator=gen)
    mask = torch.arange(5).unsqueeze(0) < torch.tensor([[5], [2], [4]])
    proxy = logit_grad_sq_norms(logits, ids, mask)
    seq = (torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    expected = torch.stack([torch.autograd.grad(seq[i], logits, retain_graph=True)[0].pow(2).sum() for i in range(3)])
    assert torch.allclose(proxy, expected, rtol=1e-12)
    assert torch.equal(length_grad_sq_norms(mask), torch.tensor([5.0, 2.0, 4.0]))
    with pytest.raises(ValueError, match="logits"):
        logit_grad_sq_norms(logits[0], ids)
