"""The readable PPO surrogate (``ppo``, ``gspo``, ``gspo_token``) through autograd, and its compiled form.

The loss code is the formula; the tests hold it against independent statements of it: the
derivative the paper's formula implies, written out case by case; second derivatives; and
``torch.compile`` of the same function (values and gradients), with its eager fallback.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import stable_async as sa
from stable_async.aggregate import aggregate
from stable_async.losses.base import LossConfig, finish
from stable_async.losses.ppo import clipped_surrogate, surrogate_of_log_ratio

SETTINGS = [
    (0.2, 0.2, None, None),
    (0.2, 0.28, 3.0, None),
    (0.0, 0.0, None, None),  # every on-policy token is a tie between the two branches
    (0.2, 0.28, None, 1.1),  # a cap inside the clip range: the clipped branch can carry the gradient
    (0.2, 0.28, 3.0, 5.0),
    (1.0, 4.0, 2.0, 0.5),
]


def _edge_case_inputs(eps_low, eps_high):
    g = torch.Generator().manual_seed(2)
    B, T = 16, 40
    log_ratio = 1.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    log_ratio[0, :6] = torch.tensor([0.0, 25.0, -25.0, 20.0, -20.0, math.log1p(eps_high)], dtype=torch.float64)
    log_ratio[1, :2] = torch.tensor([math.log(1.1), math.log1p(-eps_low) if eps_low < 1 else -30.0])
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    advantages[2] = 0.0
    advantages[0, ::2] *= -1
    # Beyond the ±20 clamp (no gradient) and on it (gradient), with both signs of the advantage.
    log_ratio[3, :8] = torch.tensor([25.0, 25.0, -25.0, -25.0, 20.0, 20.0, -20.0, -20.0], dtype=torch.float64)
    advantages[3, :8] = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    return log_ratio, advantages


def _documented_derivative(log_ratio, advantages, eps_low, eps_high, dual_clip, ratio_cap):
    """∂ℓ/∂log π, one token at a time, from the formula (r = exp(clamp(log r, ±20)), r̃ = min(r, cap)):

    −A·r where the unclipped branch −r̃·A is the larger one and r ≤ cap, or where the clipped
    branch wins but r lies inside [1 − ε_low, 1 + ε_high]; 0 beyond the ±20 clamp, where r > cap
    on the unclipped side, and where the dual-clip bound −c·A (A < 0) is the loss.
    """
    out = torch.zeros_like(log_ratio)
    for idx in range(log_ratio.numel()):
        x, a = log_ratio.view(-1)[idx].item(), advantages.view(-1)[idx].item()
        if abs(x) > 20:
            continue
        r = math.exp(x)
        capped = r if ratio_cap is None else min(r, ratio_cap)
        unclipped, clipped = -a * capped, -a * min(max(r, 1 - eps_low), 1 + eps_high)
        loss = max(unclipped, clipped)
        if dual_clip is not None and a < 0 and loss > -a * dual_clip:
            continue
        if unclipped >= clipped:
            open_gradient = ratio_cap is None or r <= ratio_cap
        else:
            open_gradient = 1 - eps_low <= r <= 1 + eps_high
        out.view(-1)[idx] = -a * r if open_gradient else 0.0
    return out


@pytest.mark.parametrize(("eps_low", "eps_high", "dual_clip", "ratio_cap"), SETTINGS)
def test_autograd_gradient_is_the_documented_derivative(eps_low, eps_high, dual_clip, ratio_cap):
    log_ratio, advantages = _edge_case_inputs(eps_low, eps_high)
    x = log_ratio.clone().requires_grad_(True)
    loss, clipped, dual = surrogate_of_log_ratio(x, advantages, eps_low, eps_high, dual_clip, ratio_cap)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    expected = _documented_derivative(log_ratio, advantages, eps_low, eps_high, dual_clip, ratio_cap)
    # Ties (unclipped == clipped, or the loss == the dual bound) are where autograd splits a
    # max/min gradient in halves; the hand-written derivative picks one side. Compare elsewhere.
    r = torch.exp(log_ratio.clamp(-20, 20))
    capped = r if ratio_cap is None else r.clamp(max=ratio_cap)
    tie = (-advantages * capped) == (-advantages * r.clamp(1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        tie |= (advantages < 0) & (loss.detach() == -advantages * dual_clip)
    tie &= expected != 0
    assert (~tie).sum() > 300
    torch.testing.assert_close(grad[~tie], expected[~tie], rtol=1e-14, atol=0.0)
    assert torch.equal(clipped, -advantages * r.clamp(1 - eps_low, 1 + eps_high) > -advantages * capped)
    assert dual.dtype == torch.bool and (dual_clip is not None or not dual.any())


def _ppo_batch(seed=6, dtype=torch.float64, B=12, T=50):
    g = torch.Generator().manual_seed(seed)
    lp = (-3.0 * torch.rand(B, T, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
    old = (lp.detach() + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64).to(dtype)).clamp(max=-1e-3)
    mask = torch.rand(B, T, generator=g) < 0.8
    adv = torch.randn(B, generator=g, dtype=torch.float64).to(dtype)
    return lp, sa.PolicyBatch(logprobs=lp, advantages=adv, mask=mask, old_logprobs=old)


@pytest.mark.parametrize(("name", "kwargs"), [("ppo", {"dual_clip": 3.0, "eps_high": 0.28}), ("gspo_token", {})])
def test_second_derivatives_through_autograd(name, kwargs):
    """Double backward: the Hessian of the aggregated loss in log π is diagonal with entries
    −A·r/N where the gradient is open (exp's second derivative is exp), 0 elsewhere; for
    gspo_token r is the detached sequence ratio s_i times exp(log π − sg(log π)) = s_i."""
    lp, batch = _ppo_batch()
    out = sa.get_loss(name, aggregation="token-sum", **kwargs)(batch)
    (grad,) = torch.autograd.grad(out.loss, lp, create_graph=True)
    (diag,) = torch.autograd.grad(grad.sum(), lp)  # Σ_j ∂²ℓ/∂x_i∂x_j = ∂²ℓ_i/∂x_i² (diagonal)
    # First derivative −A·r·open ⇒ second derivative −A·r·open: the two agree token by token.
    assert torch.allclose(diag, grad.detach(), rtol=1e-12, atol=1e-15)
    assert (grad.detach() != 0).sum() > 100


def test_gspo_token_value_and_gradient_per_token():
    lp, batch = _ppo_batch(seed=8)
    out = sa.get_loss("gspo_token", aggregation="token-sum", eps_low=0.05, eps_high=0.05)(batch)
    (grad,) = torch.autograd.grad(out.loss, lp)
    m = batch.mask.double()
    s = torch.exp(((lp.detach() - batch.old_logprobs) * m).sum(-1) / m.sum(-1)).unsqueeze(-1)
    adv = batch.advantages
    inside = (s >= 0.95) & (s <= 1.05)
    unclipped_wins = -adv * s >= -adv * s.clamp(0.95, 1.05)
    expected = torch.where(unclipped_wins | inside, -adv * s, torch.zeros_like(adv)) * m
    torch.testing.assert_close(grad, expected, rtol=1e-14, atol=1e-16)
    value = (torch.maximum(-adv * s, -adv * s.clamp(0.95, 1.05)) * m).sum()
    assert out.loss.item() == pytest.approx(value.item(), rel=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("ppo", {"dual_clip": 3.0, "eps_high": 0.28}), ("ppo", {"ratio_cap": 2.0}), ("gspo_token", {}), ("gspo", {})],
)
def test_compiled_equals_eager_values_and_gradients(name, kwargs):
    """torch.compile of the same readable function: values and gradients within a few ulp of eager."""
    from stable_async.losses.ppo import _compiled_surrogate

    outs = []
    for compile in (False, True):
        lp, batch = _ppo_batch(dtype=torch.float32)
        out = sa.get_loss(name, compile=compile, **kwargs)(batch)
        (grad,) = torch.autograd.grad(out.loss, lp)
        outs.append((out, grad))
    if _compiled_surrogate.failed is not None:
        pytest.skip(f"torch.compile unavailable here: {_compiled_surrogate.failed!r}")
    (eager, g_eager), (compiled, g_compiled) = outs
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-8)
    assert compiled.metrics == pytest.approx(eager.metrics, rel=1e-5, abs=1e-7)


def test_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    from stable_async import _compile

    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    wrapped = _compile.compiled_or_eager(lambda x: x * 2)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*eager implementation"):
        assert wrapped(torch.tensor(3.0)).item() == 6.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wrapped(torch.tensor(4.0)).item() == 8.0  # eager for good, no second warning
    assert isinstance(wrapped.failed, RuntimeError)


def test_compile_setting_is_validated():
    with pytest.raises(TypeError, match="compile: expected True or False"):
        sa.get_loss("ppo", compile="yes")
    with pytest.raises(TypeError, match="compile: expected True or False"):
        sa.get_loss("gspo_token", compile=1)


def test_clipped_surrogate_masks_are_bool_and_match_the_branches():
    ratio = torch.tensor([0.5, 0.9, 1.0, 1.3, 1.3, 0.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    loss, clipped, dual = clipped_surrogate(ratio, adv, 0.2, 0.2, dual_clip=3.0)
    # (r, A) → max(−r·A, −clip(r, 0.8, 1.2)·A): the clipped branch wins only at (1.3, +1) and (0.5, −1).
    assert clipped.tolist() == [False, False, False, True, False, True]
    assert loss.tolist() == pytest.approx([-0.5, -0.9, 1.0, -1.2, 1.3, 0.8])
    assert not dual.any()
    loss, _, dual = clipped_surrogate(torch.tensor([5.0]), torch.tensor([-1.0]), 0.2, 0.2, dual_clip=3.0)
    assert loss.tolist() == [3.0] and dual.tolist() == [True]


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_finish_ignores_non_finite_loss_at_masked_positions(bad, mode):
    g = torch.Generator().manual_seed(5)
    lp = -torch.rand(3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    batch = sa.PolicyBatch(logprobs=lp, advantages=torch.ones(3), mask=mask)
    loss_mat = torch.where(mask, lp * 2.0, torch.full((), bad, dtype=torch.float64))
    out = finish(batch, LossConfig(aggregation=mode), loss_mat, {})
    assert math.isfinite(out.metrics["actor/pg_loss"])
    torch.testing.assert_close(out.loss, aggregate(lp * 2.0, mask, mode))
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()


@pytest.mark.slow
def test_compiled_ppo_equals_eager_at_a_trainer_size_with_grad():
    """64×2048 tokens, a grad-carrying input, ragged masks, a first call at another shape (see _compile.py)."""
    B, T = 64, 2048
    g = torch.Generator().manual_seed(0)
    lp = (-4.0 + 3.99 * torch.rand(B, T, generator=g)).requires_grad_()
    old = (lp.detach() + 0.3 * torch.randn(B, T, generator=g)).clamp(max=-1e-3)
    adv = torch.randn(B, generator=g).unsqueeze(-1).expand(B, T).contiguous()
    mask = torch.arange(T).unsqueeze(0) < torch.randint(T // 2, T + 1, (B, 1), generator=g)
    batch = sa.PolicyBatch(logprobs=lp, advantages=adv, mask=mask, old_logprobs=old)
    for b, t in ((8, 512), (B, T)):  # a first call at another shape, as in training
        part = {"logprobs": lp[:b, :t], "advantages": adv[:b, :t], "mask": mask[:b, :t], "old_logprobs": old[:b, :t]}
        sa.get_loss("ppo", eps_high=0.28, compile=True)(sa.PolicyBatch(**part))
    eager = sa.get_loss("ppo", eps_high=0.28)(batch)
    compiled = sa.get_loss("ppo", eps_high=0.28, compile=True)(batch)
    (g_eager,) = torch.autograd.grad(eager.loss, lp)
    (g_compiled,) = torch.autograd.grad(compiled.loss, lp)
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-10)
    assert compiled.metrics["actor/pg_clipfrac"] == pytest.approx(eager.metrics["actor/pg_clipfrac"], abs=1e-6)
