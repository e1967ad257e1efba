"""Decoupled PPO (AReaL): hand-computed values and gradients, reduction to PPO, normalization, log-linear α."""

from __future__ import annotations

import math

import pytest
import torch

import stable_async as sa
from stable_async.losses.decoupled_ppo import DecoupledPPOConfig, loglinear_alpha

F64 = torch.float64


def _grad(out, lp):
    (g,) = torch.autograd.grad(out.loss, lp)
    return g


def _hand_batch():
    # Three tokens, one sequence. d = log π_θ − log π_old, b = log π_old − log μ.
    old = torch.tensor([[-1.0, -1.0, -1.0]], dtype=F64)
    d = torch.tensor([[0.1, -0.3, 0.5]], dtype=F64)
    b = torch.tensor([[0.2, 0.0, -0.1]], dtype=F64)
    lp = (old + d).requires_grad_(True)
    batch = sa.PolicyBatch(
        logprobs=lp,
        advantages=torch.tensor([[1.0, -1.0, 1.0]], dtype=F64),
        mask=torch.ones(1, 3, dtype=torch.bool),
        old_logprobs=old,
        rollout_logprobs=old - b,
    )
    return batch, lp


def test_hand_computed_value_and_gradient():
    batch, lp = _hand_batch()
    out = sa.get_loss("decoupled_ppo")(batch)
    w = [math.exp(0.2), 1.0, math.exp(-0.1)]
    u = [math.exp(0.1), math.exp(-0.3), math.exp(0.5)]
    # token 0: A=+1, u=1.105 inside [0.8, 1.2] -> −w·u, gradient −w·u
    # token 1: A=−1, u=0.741 < 0.8 -> clipped term 0.8 wins (loss +w·0.8), no gradient
    # token 2: A=+1, u=1.649 > 1.2 -> clipped term −1.2 wins (loss −w·1.2), no gradient
    expected = (-w[0] * u[0] + w[1] * 0.8 - w[2] * 1.2) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert _grad(out, lp)[0].tolist() == pytest.approx([-w[0] * u[0] / 3, 0.0, 0.0], rel=1e-12)
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(2 / 3)
    assert out.metrics["actor/behav_imp_weight_max"] == pytest.approx(w[0])
    assert out.metrics["actor/behav_kl"] == pytest.approx((0.2 + 0.0 - 0.1) / 3)
    assert out.metrics["actor/ppo_kl"] == pytest.approx(-(0.1 - 0.3 + 0.5) / 3)
    assert out.metrics["actor/behav_capped_fraction"] == 0.0


def test_dual_clip_and_asymmetric_eps():
    batch, _ = _hand_batch()
    # eps_high = 0.6: token 2 (u = 1.6487 > 1.6) clips at 1.6; the dual clip c = 1.5 does not bind
    # token 1 (its loss 0.8 < 1.5·|A|).
    out = sa.get_loss("decoupled_ppo", eps_high=0.6, dual_clip=1.5)(batch)
    w = [math.exp(0.2), 1.0, math.exp(-0.1)]
    expected = (-w[0] * math.exp(0.1) + w[1] * 0.8 - w[2] * 1.6) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["actor/pg_clipfrac_lower"] == 0.0


def test_equals_ppo_when_behavior_equals_proximal(tensors):
    t = dict(tensors)
    t["rollout_logprobs"] = t["old_logprobs"].clone()
    for kwargs in ({}, {"eps_low": 0.1, "eps_high": 0.28}, {"dual_clip": 3.0}):
        for aggregation in ("token-mean", "seq-mean-token-mean"):
            batch = sa.PolicyBatch(**t)
            ours = sa.get_loss("decoupled_ppo", aggregation=aggregation, behavior_cap=2.0, **kwargs)(batch)
            ref = sa.get_loss("ppo", aggregation=aggregation, **kwargs)(batch)
            torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(_grad(ours, t["logprobs"]), _grad(ref, t["logprobs"]), rtol=1e-13, atol=1e-15)
            for key in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
                assert ours.metrics[key] == pytest.approx(ref.metrics[key])


def test_without_rollout_logprobs_is_ppo(tensors):
    t = {k: v for k, v in tensors.items() if k != "rollout_logprobs"}
    batch = sa.PolicyBatch(**t)
    ours = sa.get_loss("decoupled_ppo")(batch)
    ref = sa.get_loss("ppo")(batch)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("mode", ["mask", "truncate"])
def test_cap_changes_numerator_not_denominator(mode):
    batch, lp = _hand_batch()
    # w0 = e^0.2 = 1.2214 > cap 1.1; the other weights (1.0, 0.905) are below it.
    out = sa.get_loss("decoupled_ppo", behavior_cap=1.1, behavior_cap_mode=mode)(batch)
    w0 = 0.0 if mode == "mask" else 1.1
    w = [w0, 1.0, math.exp(-0.1)]
    expected = (-w[0] * math.exp(0.1) + w[1] * 0.8 - w[2] * 1.2) / 3  # still / 3: the capped token counts
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert _grad(out, lp)[0].tolist() == pytest.approx([-w0 * math.exp(0.1) / 3, 0.0, 0.0], rel=1e-12, abs=1e-15)
    assert out.metrics["actor/behav_capped_fraction"] == pytest.approx(1 / 3)
    assert out.metrics["actor/behav_imp_weight_max"] == pytest.approx(math.exp(0.2))  # raw weights reported


def test_cap_boundary_is_inclusive():
    # AReaL keeps w ≤ cap: a weight exactly at the cap is not masked.
    old = torch.zeros(1, 1, dtype=F64)
    batch = sa.PolicyBatch(
        logprobs=old.clone().requires_grad_(True),
        advantages=torch.ones(1, 1, dtype=F64),
        mask=torch.ones(1, 1, dtype=torch.bool),
        old_logprobs=old,
        rollout_logprobs=old - math.log(2.0),
    )
    out = sa.get_loss("decoupled_ppo", behavior_cap=2.0)(batch)
    assert out.loss.item() == pytest.approx(-2.0, rel=1e-12)
    assert out.metrics["actor/behav_capped_fraction"] == 0.0


def test_extreme_behavior_log_ratio_is_finite():
    old = torch.zeros(1, 2, dtype=F64)
    lp = old.clone().requires_grad_(True)
    batch = sa.PolicyBatch(
        logprobs=lp,
        advantages=torch.ones(1, 2, dtype=F64),
        mask=torch.ones(1, 2, dtype=torch.bool),
        old_logprobs=old,
        rollout_logprobs=torch.tensor([[-1e4, 0.0]], dtype=F64),
    )
    for cap in (None, 5.0):
        out = sa.get_loss("decoupled_ppo", behavior_cap=cap)(batch)
        assert torch.isfinite(out.loss) and torch.isfinite(_grad(out, lp)).all()


def test_loglinear_alpha_hand_picked_versions():
    v = 10
    versions = torch.tensor([[9, 8, 7, 10, 11, -1, 0]])
    alpha = loglinear_alpha(versions, v, F64)
    # v_μ = v−1 → 0 (the proximal policy sampled it); v−2 → 1/2; v−3 → 2/3; v_μ = v → 0 (AReaL's guard);
    # v_μ > v → 0 (guard; the bare formula would clamp 2 to 1); v_μ < 0 → 0; v_μ = 0 → 9/10.
    assert alpha[0].tolist() == pytest.approx([0.0, 0.5, 2 / 3, 0.0, 0.0, 0.0, 0.9])


def test_loglinear_proximal_used_in_loss():
    mu = torch.tensor([[-2.0, -2.0, -2.0]], dtype=F64)
    lp = torch.tensor([[-1.0, -1.6, -2.0]], dtype=F64, requires_grad=True)
    kwargs = dict(
        logprobs=lp,
        advantages=torch.tensor([[1.0, 1.0, -1.0]], dtype=F64),
        mask=torch.ones(1, 3, dtype=torch.bool),
        rollout_logprobs=mu,
        versions=torch.tensor([[4, 3, 5]]),  # per token; current version 5 → α = [0, 1/2, 0]
        current_version=5,
    )
    batch = sa.PolicyBatch(**kwargs)
    out = sa.get_loss("decoupled_ppo", proximal="loglinear")(batch)
    alpha = [0.0, 0.5, 0.0]
    delta = [1.0, 0.4, 0.0]  # log π_θ − log μ
    # log π_old = log μ + α·Δ; u = exp((1−α)Δ); w = exp(αΔ)
    u = [math.exp((1 - a) * d) for a, d in zip(alpha, delta, strict=True)]
    w = [math.exp(a * d) for a, d in zip(alpha, delta, strict=True)]
    # token 0: u = e^1 > 1.2 → clipped, −1.2; token 1: u = e^0.2 = 1.2214 > 1.2 → clipped −1.2·w;
    # token 2: u = 1, A = −1 → +1
    expected = (-1.2 * w[0] - 1.2 * w[1] + u[2] * w[2]) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    # Only token 2 keeps a gradient: d/dlp of (−A·u) with the proximal detached is −A·u = +1, / 3.
    assert _grad(out, lp)[0].tolist() == pytest.approx([0.0, 0.0, 1 / 3], abs=1e-15)
    assert out.metrics["actor/prox_alpha_mean"] == pytest.approx(0.5 / 3)
    assert out.metrics["actor/behav_kl"] == pytest.approx(0.5 * 0.4 / 3)


def test_loglinear_ignores_old_logprobs_and_same_version_is_ppo_against_mu(tensors):
    t = dict(tensors)
    t["versions"] = torch.full((t["logprobs"].shape[0],), 3)
    t["current_version"] = 3  # v == v_μ → α = 0 → π_old := μ
    batch = sa.PolicyBatch(**t)
    ours = sa.get_loss("decoupled_ppo", proximal="loglinear")(batch)
    ref = sa.get_loss("ppo")(batch.replace(old_logprobs=t["rollout_logprobs"]))
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-13, atol=1e-15)


def test_loglinear_requires_inputs(tensors):
    batch = sa.PolicyBatch(**tensors)
    with pytest.raises(ValueError, match="versions"):
        sa.get_loss("decoupled_ppo", proximal="loglinear")(batch)
    t = {k: v for k, v in tensors.items() if k != "rollout_logprobs"}
    t.update(versions=torch.zeros(t["logprobs"].shape[0], dtype=torch.long), current_version=1)
    with pytest.raises(ValueError, match="rollout_logprobs"):
        sa.get_loss("decoupled_ppo", proximal="loglinear")(sa.PolicyBatch(**t))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"eps_low": -0.1}, "eps_low"),
        ({"eps_high": float("nan")}, "eps_high"),
        ({"dual_clip": 1.0}, "dual_clip"),
        ({"behavior_cap": 0.5}, "behavior_cap"),
        ({"behavior_cap": -1.0}, "behavior_cap"),
        ({"behavior_cap_mode": "clip"}, "behavior_cap_mode"),
        ({"proximal": "linear"}, "proximal"),
        ({"aggregation": "mean"}, "aggregation"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sa.get_loss("decoupled_ppo", **kwargs)
    with pytest.raises(ValueError, match=name):
        DecoupledPPOConfig(**kwargs)


def test_fp32_input_runs(gen):
    from sa_testing import random_tensors

    t = random_tensors(gen, dtype=torch.float32)
    out = sa.get_loss("decoupled_ppo", behavior_cap=1.2)(sa.PolicyBatch(**t))
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(_grad(out, t["logprobs"])).all()
