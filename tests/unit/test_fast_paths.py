"""The lean paths agree with the plain PyTorch formulation they replace.

Each fast primitive is checked against the obvious implementation (``torch.where``, a float
mask, autograd through ``exp``/``clamp``/``maximum``) on inputs chosen to hit its edge cases:
NaN/inf at masked positions, ties, exact clip boundaries, log-ratios beyond the ±20 clamp.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import stable_async as sa
from stable_async._known_gradient import with_known_gradient
from stable_async._numerics import count_true, float_mask, select_bool, weighted_sum, zero_where_false
from stable_async.aggregate import AGGREGATION_MODES, aggregate, aggregate_finite
from stable_async.losses.base import LossConfig, finish
from stable_async.losses.fused_surrogate import fused_clipped_surrogate
from stable_async.losses.ppo import clipped_surrogate


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transpose", [False, True])
def test_zero_where_false_is_bitwise_where(dtype, transpose):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(7, 11, generator=g, dtype=dtype)
    values[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    mask = torch.rand(7, 11, generator=g) < 0.5
    mask[0, 3] = True  # a kept −0.0
    if transpose:
        values, mask = values.t(), mask.t()
    expected = torch.where(mask, values, torch.zeros((), dtype=dtype))
    assert torch.equal(_bits(zero_where_false(values, mask)), _bits(expected.contiguous()))


def test_zero_where_false_keeps_the_graph_when_values_need_grad():
    values = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    zero_where_false(values, mask).sum().backward()
    assert values.grad.tolist() == [[1.0, 0.0, 1.0]]


def test_count_float_mask_select_bool_match_the_plain_ops():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.rand(5, 13, generator=g) < p for p in (0.3, 0.5, 0.7))
    assert int(count_true(a)) == int(a.sum())
    assert count_true(a, dim=-1).tolist() == a.sum(-1).tolist()
    assert torch.equal(float_mask(a, torch.float64), a.to(torch.float64))
    assert torch.equal(float_mask(a.t(), torch.float32), a.t().float())
    assert torch.equal(select_bool(a, b, c), torch.where(a, b, c))
    x = torch.randn(5, 13, generator=g, dtype=torch.float64)
    assert torch.allclose(weighted_sum(x, a.double()), torch.where(a, x, 0.0).sum(), rtol=1e-15)
    assert torch.allclose(weighted_sum(x.t(), a.t().double(), dim=-1), torch.where(a.t(), x.t(), 0.0).sum(-1))


def _composed_surrogate(log_ratio, advantages, eps_low, eps_high, dual_clip, ratio_cap):
    """The surrogate through autograd: exp(clamp(log r, ±20)) then `clipped_surrogate`."""
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    return clipped_surrogate(ratio, advantages, eps_low, eps_high, dual_clip, ratio_cap)


SETTINGS = [
    (0.2, 0.2, None, None),
    (0.2, 0.28, 3.0, None),
    (0.0, 0.0, None, None),  # every on-policy token is a tie
    (0.2, 0.28, None, 1.1),  # cap inside the clip range: the clipped branch can carry the gradient
    (0.2, 0.28, 3.0, 5.0),
    (1.0, 4.0, 2.0, 0.5),
]


@pytest.mark.parametrize(("eps_low", "eps_high", "dual_clip", "ratio_cap"), SETTINGS)
def test_fused_surrogate_matches_autograd(eps_low, eps_high, dual_clip, ratio_cap):
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

    lp_ref = log_ratio.clone().requires_grad_(True)
    ref_loss, ref_clipped, ref_dual = _composed_surrogate(lp_ref, advantages, eps_low, eps_high, dual_clip, ratio_cap)
    weights = torch.rand(B, T, generator=g, dtype=torch.float64)
    (ref_grad,) = torch.autograd.grad((ref_loss * weights).sum(), lp_ref)

    mask = torch.rand(B, T, generator=g) < 0.7
    lp = log_ratio.clone().requires_grad_(True)
    loss, clipped, dual = fused_clipped_surrogate(
        lp.detach(), lp, advantages, mask, eps_low, eps_high, dual_clip, ratio_cap
    )  # fmt: skip
    (grad,) = torch.autograd.grad((loss * weights).sum(), lp)
    assert torch.equal(loss, ref_loss.detach())
    assert int(clipped) == int((ref_clipped & mask).sum())
    assert dual is None if dual_clip is None else int(dual) == int((ref_dual & mask).sum())
    torch.testing.assert_close(grad, ref_grad, rtol=1e-14, atol=0.0)


def test_fused_surrogate_broadcasts_a_sequence_log_ratio():
    """gspo_token's form: one (B, 1) log-ratio per sequence, gradient one for one with log π."""
    g = torch.Generator().manual_seed(3)
    log_s = 0.01 * torch.randn(4, 1, generator=g, dtype=torch.float64)
    lp = torch.randn(4, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    adv = torch.randn(4, 6, generator=g, dtype=torch.float64)
    loss, _, _ = fused_clipped_surrogate(log_s, lp, adv, torch.ones(4, 6, dtype=torch.bool), 3e-4, 4e-4)
    (grad,) = torch.autograd.grad(loss.sum(), lp)
    lp2 = lp.detach().clone().requires_grad_(True)
    ref, _, _ = _composed_surrogate(log_s + lp2 - lp2.detach(), adv, 3e-4, 4e-4, None, None)
    (ref_grad,) = torch.autograd.grad(ref.sum(), lp2)
    # (log s + log π) − log π rounds: the composed form is within an ulp of log s, the fused one exact.
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-14, atol=0.0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-14, atol=0.0)


def test_known_gradient_refuses_second_derivatives():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = with_known_gradient(x, (x * x).detach(), (2 * x).detach())
    (gx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    assert gx.tolist() == [2.0, 4.0]
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|does not require grad"):
        gx.sum().backward()


def test_known_gradient_without_grad_returns_the_value():
    x = torch.tensor([1.0, 2.0])
    value = x * 3
    assert with_known_gradient(x, value, torch.ones(2)) is value


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_finite_equals_aggregate(mode):
    g = torch.Generator().manual_seed(4)
    loss_mat = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(6, 9, generator=g) < 0.6
    mask[3] = False
    counts = {"global_num_tokens": 70.0, "global_num_seqs": 9.0, "dp_size": 2}
    for kwargs in ({}, counts):
        ref = aggregate(loss_mat, mask, mode, **kwargs)
        (ref_grad,) = torch.autograd.grad(ref, loss_mat)
        fast = aggregate_finite(loss_mat, mask, mask.double(), mode, **kwargs)
        (fast_grad,) = torch.autograd.grad(fast, loss_mat)
        torch.testing.assert_close(fast, ref, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_finish_ignores_non_finite_loss_at_masked_positions(bad, mode):
    """The weighted sum would give NaN; finish notices it with the metrics and recomputes by selection."""
    g = torch.Generator().manual_seed(5)
    lp = -torch.rand(3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    batch = sa.PolicyBatch(logprobs=lp, advantages=torch.ones(3), mask=mask)
    loss_mat = lp * 2.0
    loss_mat = torch.where(mask, loss_mat, torch.full((), bad, dtype=torch.float64))
    out = finish(batch, LossConfig(aggregation=mode), loss_mat, {})
    expected = aggregate(lp * 2.0, mask, mode)
    assert math.isfinite(out.metrics["actor/pg_loss"])
    torch.testing.assert_close(out.loss, expected)
    (grad,) = torch.autograd.grad(out.loss, lp)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()


def test_batch_token_helpers():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    batch = sa.PolicyBatch(logprobs=lp, advantages=torch.ones(2), mask=mask)
    assert int(batch.num_valid) == 3
    assert torch.equal(batch.maskf, mask.float())
    assert batch.token_mean(lp).item() == pytest.approx((-1 - 2 - 4) / 3)
    assert batch.token_fraction(lp < -1.5).item() == pytest.approx(2 / 3)
    empty = sa.PolicyBatch(logprobs=lp, advantages=torch.ones(2), mask=torch.zeros(2, 3))
    assert empty.token_mean(lp).item() == 0.0 and empty.token_fraction(lp < 0).item() == 0.0


def _ppo_case(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    B, T = 12, 50
    lp = (-3.0 * torch.rand(B, T, generator=g)).to(dtype).requires_grad_(True)
    old = (lp.detach() + 0.3 * torch.randn(B, T, generator=g).to(dtype)).clamp(max=-1e-3)
    mask = torch.rand(B, T, generator=g) < 0.8
    return lp, dict(advantages=torch.randn(B, generator=g).to(dtype), mask=mask, old_logprobs=old)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "kwargs"), [("ppo", {"dual_clip": 3.0, "eps_high": 0.28}), ("gspo_token", {})])
def test_compiled_core_matches_eager(name, kwargs):
    """torch.compile of the surrogate core: same formulas, values within a few ulp (vectorized exp)."""
    outs = []
    for compile in (False, True):
        lp, fields = _ppo_case(6)
        out = sa.get_loss(name, compile=compile, **kwargs)(sa.PolicyBatch(logprobs=lp, **fields))
        (grad,) = torch.autograd.grad(out.loss, lp)
        outs.append((out, grad))
    from stable_async.losses.fused_surrogate import _compiled_value_and_derivative

    if _compiled_value_and_derivative.failed is not None:
        pytest.skip(f"torch.compile unavailable here: {_compiled_value_and_derivative.failed!r}")
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
    lp, fields = _ppo_case(7)
    with pytest.raises(ValueError, match="compile: only gspo_token"):
        sa.get_loss("gspo", compile=True)(sa.PolicyBatch(logprobs=lp, **fields))
