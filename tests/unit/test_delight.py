"""Delightful policy gradient: the gate's limits, its detachment, and the loss gradient.

The rare-failure bound, derived here and in docs/losses/delight.md: for A < 0 and π = π_θ(a),
    g = σ(A·(−log π)/η) = 1 / (1 + π^{−|A|/η}) ≤ 1 / (2·π^{−|A|/(2η)}) = ½·π^{|A|/(2η)}
(AM–GM: 1 + x ≥ 2√x), hence g ≤ π^{1/(2η)} whenever |A| ≥ 1.
"""

import math

import pytest
import torch

import stable_async as sa
from sa_testing import random_tensors
from stable_async.losses.delight import DelightConfig

ETAS = [0.25, 0.5, 1.0, 2.0, 4.0]
PROBS = torch.logspace(-12, -0.05, 60, dtype=torch.float64)  # π from 1e-12 to ≈ 0.89


@pytest.mark.parametrize("eta", ETAS)
def test_rare_success_gate_near_one(eta):
    lp = torch.tensor([math.log(1e-9), math.log(1e-6)], dtype=torch.float64)
    gate = sa.delight_gate(torch.ones(2, dtype=torch.float64), lp, eta=eta)
    # A = 1: g = σ(ℓ/η) = 1 − σ(−ℓ/η) ≥ 1 − e^{−ℓ/η} = 1 − π^{1/η}
    assert (gate >= 1 - torch.exp(lp / eta) - 1e-15).all()
    assert gate[0] > 0.99


@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("adv", [-0.3, -1.0, -2.0, -5.0])
def test_rare_failure_is_suppressed(eta, adv):
    gate = sa.delight_gate(torch.full_like(PROBS, adv), PROBS.log(), eta=eta)
    assert (gate <= 0.5 * PROBS ** (abs(adv) / (2 * eta)) * (1 + 1e-12)).all()
    if abs(adv) >= 1:
        assert (gate <= PROBS ** (1 / (2 * eta))).all()
    # and the exact value
    assert torch.allclose(gate, 1 / (1 + PROBS ** (-abs(adv) / eta)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("eta", ETAS)
def test_common_actions_gate_one_half(eta):
    adv = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    gate = sa.delight_gate(adv, torch.full_like(adv, math.log1p(-1e-7)), eta=eta)
    assert torch.allclose(gate, torch.full_like(gate, 0.5), atol=1e-6)
    # and A = 0 gives exactly ½ whatever π
    assert sa.delight_gate(torch.zeros(3), torch.tensor([-20.0, -1.0, 0.0])).eq(0.5).all()


def test_gate_is_detached_and_shaped_like_logprobs(gen):
    t = random_tensors(gen)
    gate = sa.delight_gate(t["advantages"], t["logprobs"])
    assert not gate.requires_grad and gate.shape == t["logprobs"].shape and gate.dtype == torch.float64
    per_seq = sa.delight_gate(t["advantages"][:, 0], t["logprobs"])  # (B,) advantages broadcast over T
    assert torch.equal(per_seq, sa.delight_gate(t["advantages"][:, :1].expand_as(t["logprobs"]), t["logprobs"]))
    masked = sa.delight_gate(t["advantages"], t["logprobs"], mask=t["mask"])
    assert (masked[~t["mask"]] == 0).all() and torch.equal(masked[t["mask"]], gate[t["mask"]])


def test_sequence_level_and_surprisal_clip(gen):
    t = random_tensors(gen)
    lp, adv, mask = t["logprobs"].detach(), t["advantages"], t["mask"]
    gate = sa.delight_gate(adv, lp, eta=2.0, level="sequence", mask=mask)
    total = (-lp * mask).sum(-1, keepdim=True)
    expected = torch.sigmoid(adv * total / 2.0) * mask
    assert torch.allclose(gate, expected, atol=1e-15)
    clipped = sa.delight_gate(adv, lp, level="sequence", surprisal_clip=1.5, mask=mask)
    assert torch.allclose(clipped, torch.sigmoid(adv * total.clamp(max=1.5)) * mask, atol=1e-15)
    tiny = torch.tensor([math.log(1e-30)], dtype=torch.float64)
    assert sa.delight_gate(torch.tensor([-1.0]), tiny, surprisal_clip=10.0).item() == pytest.approx(
        1 / (1 + math.e**10)
    )


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_loss_gradient_is_gate_times_advantage(gen, level, aggregation):
    t = random_tensors(gen)
    batch = sa.PolicyBatch(**t)
    out = sa.get_loss("delight", eta=0.7, level=level, aggregation=aggregation)(batch)
    (grad,) = torch.autograd.grad(out.loss, t["logprobs"])
    gate = sa.delight_gate(t["advantages"], t["logprobs"], eta=0.7, level=level, mask=t["mask"])
    m = t["mask"].double()
    weight = m / m.sum() if aggregation == "token-mean" else m / m.sum(-1, keepdim=True) / m.shape[0]
    assert torch.allclose(grad, -gate * t["advantages"] * weight, atol=1e-15)
    assert out.metrics["delight/gate_mean"] == pytest.approx(gate[t["mask"]].mean().item())
    assert "actor/pg_loss" in out.metrics


def test_gate_composes_as_a_multiplier(gen):
    """Gate × REINFORCE per-token loss is the delight loss (the gate is a plain per-token multiplier)."""
    t = random_tensors(gen)
    batch = sa.PolicyBatch(**t)
    gate = sa.delight_gate(batch.advantages, batch.logprobs, mask=batch.mask)
    reinforce = sa.get_loss("reinforce", aggregation="token-sum")(batch).per_token_loss
    delight = sa.get_loss("delight", aggregation="token-sum")(batch).per_token_loss
    assert torch.allclose((gate * reinforce)[batch.mask], delight[batch.mask], atol=1e-15)


def test_needs_no_behavior_logprobs(gen):
    t = random_tensors(gen)
    batch = sa.PolicyBatch(logprobs=t["logprobs"], advantages=t["advantages"], mask=t["mask"])
    assert sa.get_loss("delight")(batch).loss.isfinite()


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"eta": 0.0}, "eta"),
        ({"eta": -1.0}, "eta"),
        ({"eta": float("inf")}, "eta"),
        ({"level": "seq"}, "level"),
        ({"surprisal_clip": 0.0}, "surprisal_clip"),
    ],
)
def test_invalid_settings_are_named(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        sa.get_loss("delight", **kwargs)
    with pytest.raises(ValueError, match=argument):
        sa.delight_gate(torch.ones(2), torch.zeros(2), **kwargs)


def test_sequence_level_needs_mask():
    with pytest.raises(ValueError, match="mask"):
        sa.delight_gate(torch.ones(2, 3), torch.zeros(2, 3), level="sequence")
    assert DelightConfig().eta == 1.0 and DelightConfig().level == "token" and DelightConfig().surprisal_clip is None
