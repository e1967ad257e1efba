"""The registered ``vcpo`` loss: −sg(min(ρ_i, 8))·A·log π with ρ_i = exp(clamp(Σ_t log π_θ/μ, ±20))."""

from __future__ import annotations

import math

import pytest
import torch

import stable_async as sa
from stable_async.losses.vcpo import VCPOConfig

F64 = torch.float64


def hand_batch(**overrides):
    """Three sequences, T = 3, with sequence log-ratios 0.5 (ρ < 8), log 20 (truncated) and −30 (clamped)."""
    logprobs = torch.tensor([[-0.5, -1.0, -2.0], [-0.2, -0.3, -9.0], [-31.0, -31.5, -30.7]], dtype=F64)
    rollout = logprobs.clone()
    rollout[0, 0] -= 0.2
    rollout[0, 1] -= 0.3  # Σ = 0.5
    rollout[1, 0] -= math.log(20.0)  # Σ = log 20 > log 8
    rollout[2, 0] += 10.0
    rollout[2, 1] += 20.0  # Σ = −30 < −20
    rollout[1, 2] = -50.0  # masked: must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0], [0.5, 0.5, 0.5]], dtype=F64)
    fields = {
        "logprobs": logprobs.clone().requires_grad_(True),
        "advantages": advantages,
        "mask": mask,
        "rollout_logprobs": rollout,
    }
    fields.update(overrides)
    return fields


def test_registered_with_reference_defaults():
    assert "vcpo" in sa.available_losses()
    cfg = sa.get_loss("vcpo").config
    assert isinstance(cfg, VCPOConfig)
    assert (cfg.aggregation, cfg.ratio_cap, cfg.anchor) == ("seq-mean-token-mean", 8.0, "rollout")


def test_gradient_is_minus_truncated_rho_times_advantage_per_token():
    fields = hand_batch()
    out = sa.get_loss("vcpo", aggregation="token-sum")(sa.PolicyBatch(**fields))
    out.loss.backward()
    rho_bar = torch.tensor([math.exp(0.5), 8.0, math.exp(-20.0)], dtype=F64)
    expected = -rho_bar.unsqueeze(-1) * fields["advantages"] * fields["mask"]
    assert torch.allclose(fields["logprobs"].grad, expected, rtol=1e-13, atol=0)
    assert out.metrics["vcpo/truncated_fraction"] == pytest.approx(1 / 3)
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(1 / 3)
    assert out.metrics["vcpo/seq_is_max"] == pytest.approx(20.0)
    assert out.metrics["vcpo/seq_is_mean"] == pytest.approx(float(rho_bar.mean()))
    assert out.metrics["vcpo/anchor_fallback"] == 0.0


def test_default_aggregation_seq_mean_token_mean():
    fields = hand_batch()
    out = sa.get_loss("vcpo")(sa.PolicyBatch(**fields))
    out.loss.backward()
    rho_bar = torch.tensor([math.exp(0.5), 8.0, math.exp(-20.0)], dtype=F64)
    lengths = fields["mask"].sum(-1, keepdim=True).to(F64)
    expected = -rho_bar.unsqueeze(-1) * fields["advantages"] * fields["mask"] / (lengths * 3)
    assert torch.allclose(fields["logprobs"].grad, expected, rtol=1e-13, atol=0)
    per_seq = -(rho_bar.unsqueeze(-1) * fields["advantages"] * fields["logprobs"].detach() * fields["mask"]).sum(-1)
    assert out.loss.item() == pytest.approx(float((per_seq / lengths.squeeze(-1)).mean()), rel=1e-13)


def test_clamp_at_plus_minus_20_without_truncation():
    fields = hand_batch()
    fields["rollout_logprobs"][1, 0] -= 40.0  # Σ = log 20 + 40 > 20
    out = sa.get_loss("vcpo", aggregation="token-sum", ratio_cap=None)(sa.PolicyBatch(**fields))
    out.loss.backward()
    rho = torch.tensor([math.exp(0.5), math.exp(20.0), math.exp(-20.0)], dtype=F64)
    expected = -rho.unsqueeze(-1) * fields["advantages"] * fields["mask"]
    assert torch.allclose(fields["logprobs"].grad, expected, rtol=1e-13, atol=0)
    assert out.metrics["vcpo/truncated_fraction"] == 0.0


def test_autograd_matches_formula_on_random_batch(tensors):
    out = sa.get_loss("vcpo", aggregation="token-sum", ratio_cap=1.5)(sa.PolicyBatch(**tensors))
    out.loss.backward()
    log_ratio = ((tensors["logprobs"].detach() - tensors["rollout_logprobs"]) * tensors["mask"]).sum(-1)
    rho_bar = log_ratio.clamp(-20, 20).exp().clamp(max=1.5)
    expected = -rho_bar.unsqueeze(-1) * tensors["advantages"] * tensors["mask"]
    assert torch.allclose(tensors["logprobs"].grad, expected, rtol=1e-12, atol=1e-15)


def test_anchor_fallback_and_old():
    fields = hand_batch()
    rollout = fields.pop("rollout_logprobs")
    out = sa.get_loss("vcpo")(sa.PolicyBatch(**fields, old_logprobs=rollout))  # no rollout: falls back to old
    assert out.metrics["vcpo/anchor_fallback"] == 1.0
    assert out.metrics["vcpo/truncated_fraction"] == pytest.approx(1 / 3)
    same = hand_batch()
    ref = sa.get_loss("vcpo")(sa.PolicyBatch(**same))
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-14)
    # anchor="old" ignores the rollout log-probs; with old = sg(log π) the weight is 1 (plain REINFORCE)
    plain = hand_batch()
    vo = sa.get_loss("vcpo", anchor="old", aggregation="token-sum")(sa.PolicyBatch(**plain))
    vo.loss.backward()
    assert torch.allclose(plain["logprobs"].grad, -plain["advantages"] * plain["mask"])


@pytest.mark.parametrize(("kwargs", "name"), [({"ratio_cap": 0.0}, "ratio_cap"), ({"anchor": "mu"}, "anchor")])
def test_bad_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sa.get_loss("vcpo", **kwargs)


def test_low_precision_input_is_computed_in_fp32():
    fields = hand_batch()
    batch = sa.PolicyBatch(
        logprobs=fields["logprobs"].detach().to(torch.bfloat16).requires_grad_(True),
        advantages=fields["advantages"].to(torch.bfloat16),
        mask=fields["mask"],
        rollout_logprobs=fields["rollout_logprobs"].to(torch.bfloat16),
    )
    out = sa.get_loss("vcpo")(batch)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
