"""``vespo`` and ``luspo``: hand-computed weights, the length weighting, validation, edge cases."""

import math

import pytest
import torch

import stable_async as sa
from stable_async.losses.vespo import gamma_weight


def _batch(lp, old, adv, mask=None, **kw):
    lp = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(lp.shape, dtype=torch.bool) if mask is None else torch.tensor(mask)
    old, adv = torch.tensor(old, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    return sa.PolicyBatch(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask, **kw)


def test_gamma_weight_shape():
    log_w = torch.log(torch.tensor([1.0, 2.0 / 3.0, 1e-3, 50.0], dtype=torch.float64))
    phi = gamma_weight(log_w, torch.tensor(2.0), torch.tensor(3.0))
    assert phi[0] == pytest.approx(1.0)  # φ(1) = 1
    assert phi[1] == pytest.approx(math.exp(3.0) * (2 / 3) ** 2 * math.exp(-2.0))  # the mode, w = k/λ
    assert phi[1] > phi[0] and phi[2] < 1e-4 and phi[3] < 1e-50


def test_vespo_hand_computed():
    # Sequence 0: Σ log r = 0.2 + 0.1 = 0.3 (A > 0: k = 2, λ = 3); sequence 1: Σ log r = −0.5 (A < 0: k = 3, λ = 2).
    batch = _batch([[-1.0, -2.0], [-1.0, -1.0]], [[-1.2, -2.1], [-0.7, -0.8]], [1.0, -2.0])
    out = sa.get_loss("vespo")(batch)
    phi0 = math.exp(3.0 + 2 * 0.3 - 3 * math.exp(0.3))
    phi1 = math.exp(2.0 + 3 * -0.5 - 2 * math.exp(-0.5))
    expected = (-phi0 * 1.0 * (-3.0) - phi1 * (-2.0) * (-2.0)) / 4
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    (grad,) = torch.autograd.grad(out.loss, batch.logprobs)  # φ is detached: ∂ℓ/∂log π = −φ·A / N
    torch.testing.assert_close(grad, torch.tensor([[-phi0, -phi0], [2 * phi1, 2 * phi1]], dtype=torch.float64) / 4)


def test_luspo_weights_each_sequence_by_its_length():
    # Two sequences, ratio 1, A = 1: ℓ_i = −1 per token; LUSPO sums tokens (3 and 1) and averages sequences.
    mask = [[True, True, True], [True, False, False]]
    batch = _batch([[-1.0] * 3, [-1.0] * 3], [[-1.0] * 3, [-1.0] * 3], [1.0, 1.0], mask=mask)
    luspo = sa.get_loss("luspo")(batch).loss
    gspo = sa.get_loss("gspo", eps_low=0.2, eps_high=0.2)(batch).loss
    assert luspo.item() == pytest.approx(-(3 + 1) / 2) and gspo.item() == pytest.approx(-1.0)
    (grad,) = torch.autograd.grad(luspo, batch.logprobs)  # through s_i = exp(mean log r): |o_i|·A/|o_i| / B
    torch.testing.assert_close(grad, torch.tensor([[-0.5] * 3, [-0.5, 0.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("name", ["vespo", "luspo"])
def test_edge_cases(name):
    lp = torch.tensor([[-1.0, -2.0], [-3.0, -1.0]], dtype=torch.bfloat16, requires_grad=True)
    old = torch.tensor([[1e4, -1e4], [-3.0, -1.0]], dtype=torch.bfloat16)
    batch = sa.PolicyBatch(logprobs=lp, old_logprobs=old, advantages=torch.tensor([-1.0, 1.0]), mask=torch.ones(2, 2))
    out = sa.get_loss(name)(batch)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and torch.isfinite(lp.grad).all()
    assert all(math.isfinite(v) for v in out.metrics.values())
    empty = torch.zeros(2, 3, requires_grad=True)
    out = sa.get_loss(name)(sa.PolicyBatch(logprobs=empty, advantages=torch.ones(2), mask=torch.zeros(2, 3)))
    out.loss.backward()
    assert out.loss.item() == 0.0 and (empty.grad == 0).all()


@pytest.mark.parametrize(
    ("name", "field"),
    [("vespo", "k_pos"), ("vespo", "lambda_neg"), ("luspo", "eps_low"), ("luspo", "ratio_cap")],
)
@pytest.mark.parametrize("bad", [True, "1.0", math.nan, math.inf, -1.0])
def test_hyperparameters_are_validated(name, field, bad):
    with pytest.raises(ValueError, match=field):
        sa.get_loss(name, **{field: bad})


def test_vespo_folds_a_sequence_weight_once():
    # Σ log r = 0 per sequence, A = 1; sequence TIS weight W = exp(Σ (old − μ)) = e^0.2 enters w once.
    batch = _batch(
        [[-1.0, -1.0]], [[-1.0, -1.0]], [1.0], rollout_logprobs=torch.tensor([[-1.1, -1.1]], dtype=torch.float64)
    )
    seq = sa.get_loss("vespo", correction=sa.RolloutCorrection(level="sequence", high=10.0))(batch).loss
    tok = sa.get_loss("vespo", correction=sa.RolloutCorrection(level="token", high=10.0))(batch).loss
    phi = math.exp(3.0 + 2 * 0.2 - 3 * math.exp(0.2))  # both fold log w = 0.2 (two tokens × 0.1, or W once)
    assert seq.item() == pytest.approx(phi * 1.0) and tok.item() == pytest.approx(phi * 1.0)
    geo = sa.get_loss("vespo", correction=sa.RolloutCorrection(level="geometric", high=10.0))(batch).loss
    assert geo.item() == pytest.approx(math.exp(3.0 + 2 * 0.1 - 3 * math.exp(0.1)))


def test_vespo_lambda_zero():
    with pytest.raises(ValueError, match="lambda_pos"):
        sa.get_loss("vespo", lambda_pos=0.0)
    assert sa.get_loss("vespo", k_pos=0.0).config.k_pos == 0.0
    for name in ("vespo", "luspo"):
        spec = sa.loss_spec(name)
        config = spec.config()
        assert spec.required_fields(config) == {"old_logprobs"} and not spec.flag("weights_by_rollout", config)
