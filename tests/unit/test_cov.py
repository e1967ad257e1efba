"""``clip_cov`` / ``kl_cov``: hand-computed selections, validation, edge cases."""

import math

import pytest
import torch

import stable_async as sa
from stable_async.losses.cov import token_covariance


def _batch(lp, old, adv, mask=None):
    lp = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(lp.shape, dtype=torch.bool) if mask is None else torch.tensor(mask)
    old, adv = torch.tensor(old, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    return sa.PolicyBatch(logprobs=lp, old_logprobs=old, advantages=adv, mask=mask)


# Four valid tokens: log π = (−1, −3, −2, −2), A = (2, −2, 0, 0): means −2 and 0, so
# Cov = (1·2, −1·−2, 0, 0) = (2, 2, 0, 0); the padding token does not count.
LP = [[-1.0, -3.0, -2.0], [-2.0, -5.0, -5.0]]
ADV = [[2.0, -2.0, 0.0], [0.0, 9.0, 9.0]]
MASK = [[True, True, True], [True, False, False]]


def test_token_covariance_by_hand():
    batch = _batch(LP, LP, ADV, MASK)
    cov = token_covariance(batch.logprobs, batch.advantages, batch.mask)
    torch.testing.assert_close(cov[batch.mask], torch.tensor([2.0, 2.0, 0.0, 0.0], dtype=torch.float64))


def test_kl_cov_penalizes_the_top_covariance_tokens():
    old = [[-1.5, -3.0, -2.0], [-2.0, -5.0, -5.0]]  # token 0: log r = 0.5
    batch = _batch(LP, old, [[2.0, -2.0, 0.0], [0.0, 9.0, 9.0]], MASK)
    # ρ = 0.5: n = 2 of 4 tokens, the two with Cov = 2; β|log r| adds 0.5β at token 0 only.
    out = sa.get_loss("kl_cov", kl_cov_ratio=0.5, ppo_kl_coef=0.3, aggregation="token-sum")(batch)
    plain = -(2.0 * math.exp(0.5)) - (-2.0) * 1.0
    assert out.loss.item() == pytest.approx(plain + 0.3 * 0.5)
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(out.loss, batch.logprobs)
    assert grad[0, 0].item() == pytest.approx(-2.0 * math.exp(0.5) + 0.3)


def test_clip_cov_never_draws_a_clipped_token_or_one_outside_the_band():
    # Token 0 has Cov = 2 but its ratio e^0.5 is clipped (A > 0): not a candidate; token 1 (Cov = 2,
    # ratio 1) is the only one inside (1, 5), so it is drawn whatever the seed.
    old = [[-1.5, -3.0, -2.0], [-2.0, -5.0, -5.0]]
    for seed in range(5):
        torch.manual_seed(seed)
        out = sa.get_loss("clip_cov", clip_cov_ratio=0.5, aggregation="token-sum")(_batch(LP, old, ADV, MASK))
        assert out.per_token_loss[0].tolist() == [-2.0 * 1.2, 0.0, 0.0]
    out = sa.get_loss("clip_cov", clip_cov_lb=2.5, clip_cov_ub=3.0)(_batch(LP, old, ADV, MASK))
    assert out.metrics["actor/pg_clipfrac"] == 0.0  # no candidate: plain PPO


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_edge_cases(name):
    lp = torch.tensor([[-1e4, -2.0], [-3.0, -1.0]], dtype=torch.bfloat16, requires_grad=True)  # log-ratios ∓1e4
    old = torch.tensor([[0.0, -1e4], [-3.0, -1.0]], dtype=torch.bfloat16)
    batch = sa.PolicyBatch(logprobs=lp, old_logprobs=old, advantages=torch.tensor([-1.0, 1.0]), mask=torch.ones(2, 2))
    out = sa.get_loss(name, **{f"{name}_ratio": 0.5})(batch)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and torch.isfinite(lp.grad).all()
    empty = torch.zeros(2, 3, requires_grad=True)
    out = sa.get_loss(name)(sa.PolicyBatch(logprobs=empty, advantages=torch.ones(2), mask=torch.zeros(2, 3)))
    out.loss.backward()
    assert out.loss.item() == 0.0 and (empty.grad == 0).all()


@pytest.mark.parametrize(
    ("name", "field", "bad"),
    [
        ("clip_cov", "clip_cov_ratio", 0.0),
        ("clip_cov", "clip_cov_ratio", True),
        ("clip_cov", "clip_cov_lb", "1"),
        ("clip_cov", "clip_cov_ub", math.inf),
        ("clip_cov", "eps_high", -0.1),
        ("kl_cov", "kl_cov_ratio", 1.5),
        ("kl_cov", "ppo_kl_coef", math.nan),
        ("kl_cov", "ppo_kl_coef", False),
    ],
)
def test_hyperparameters_are_validated(name, field, bad):
    with pytest.raises(ValueError, match=field):
        sa.get_loss(name, **{field: bad})
    with pytest.raises(ValueError, match="lb < ub"):
        sa.get_loss("clip_cov", clip_cov_lb=5.0, clip_cov_ub=1.0)
    with pytest.raises(TypeError, match="generator"):
        sa.get_loss("clip_cov", generator=0)
