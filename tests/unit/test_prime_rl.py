"""``prime_rl`` (prime-rl's default loss): hand-computed values, the documented gradient, validation.

prime-rl is not a dependency, so its ``default_loss_fn`` cannot run here; the formula is checked
term by term instead, and the mask against `dppo_binary_tv`'s (the same trust region).
"""

import math

import pytest
import torch

import stable_async as sa


def _batch(lp, mu, adv, mask=None):
    lp = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(lp.shape, dtype=torch.bool) if mask is None else torch.tensor(mask)
    mu, adv = torch.tensor(mu, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64)
    return sa.PolicyBatch(logprobs=lp, rollout_logprobs=mu, advantages=adv, mask=mask)


def test_hand_computed():
    # p = 0.5, q = 0.2: p − q = 0.3 > 0.2, A > 0 → masked; the KL term stays.
    # p = 0.3, q = 0.4: p − q = −0.1, A < 0 → kept.   p = 0.1, q = 0.5, A = 0 → masked (A ≤ 0 rule).
    lp = [[math.log(0.5), math.log(0.3), math.log(0.1)]]
    mu = [[math.log(0.2), math.log(0.4), math.log(0.5)]]
    batch = _batch(lp, mu, [[1.0, -2.0, 0.0]])
    out = sa.get_loss("prime_rl", kl_tau=0.1)(batch)
    log_r = [math.log(2.5), math.log(0.75), math.log(0.2)]
    expected = (2.0 * 0.75 + 0.1 * sum(x * x for x in log_r)) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(2 / 3)
    # ∂ℓ/∂log π = −M·τ_A·A·r + 2·τ_KL·log r, over N = 3.
    (grad,) = torch.autograd.grad(out.loss, batch.logprobs)
    documented = [0.2 * log_r[0], 2.0 * 0.75 + 0.2 * log_r[1], 0.2 * log_r[2]]
    torch.testing.assert_close(grad, torch.tensor([documented], dtype=torch.float64) / 3)


def test_mask_is_dppo_binary_tv_and_gradient_by_autograd():
    gen = torch.Generator().manual_seed(0)
    lp = (-1.5 * torch.rand(6, 8, generator=gen, dtype=torch.float64)).requires_grad_()
    mu = (lp.detach() + 0.6 * torch.randn(6, 8, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    adv = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    mask = torch.rand(6, 8, generator=gen) > 0.2
    batch = sa.PolicyBatch(logprobs=lp, rollout_logprobs=mu, advantages=adv, mask=mask)
    ours = sa.get_loss("prime_rl", delta_low=0.1, delta_high=0.15, adv_tau=0.5, kl_tau=0.0)(batch)
    dppo = sa.get_loss("dppo_binary_tv", delta_low=0.1, delta_high=0.15, ratio_cap=None)(batch)
    assert ours.metrics["actor/pg_clipfrac"] == dppo.metrics["actor/pg_clipfrac"] > 0
    # Without the KL term the gradient is DPPO's, scaled by τ_A (values differ: r vs r·log π).
    g_ours = torch.autograd.grad(ours.loss, lp)[0]
    g_dppo = torch.autograd.grad(dppo.loss, lp)[0]
    torch.testing.assert_close(g_ours, 0.5 * g_dppo, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(
        lambda x: (
            sa.get_loss("prime_rl")(sa.PolicyBatch(logprobs=x, rollout_logprobs=mu, advantages=adv, mask=mask)).loss
        ),
        (lp.detach().clone().requires_grad_(),),
    )


def test_edge_cases_and_validation():
    lp = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16, requires_grad=True)
    batch = sa.PolicyBatch(
        logprobs=lp, rollout_logprobs=torch.tensor([[1e4, -1e4]]), advantages=torch.ones(1), mask=torch.ones(1, 2)
    )
    out = sa.get_loss("prime_rl")(batch)
    out.loss.backward()
    assert math.isfinite(out.loss.item()) and torch.isfinite(lp.grad).all()
    with pytest.raises(ValueError, match="rollout_logprobs"):
        sa.get_loss("prime_rl")(
            sa.PolicyBatch(logprobs=torch.zeros(1, 2), advantages=torch.ones(1), mask=torch.ones(1, 2))
        )
    for field in ("delta_low", "delta_high", "adv_tau", "kl_tau"):
        for bad in (True, "0.1", math.nan, -1.0):
            with pytest.raises(ValueError, match=field):
                sa.get_loss("prime_rl", **{field: bad})
    spec = sa.loss_spec("prime_rl")
    assert spec.flag("weights_by_rollout", spec.config()) and spec.required_fields(spec.config()) == {
        "rollout_logprobs"
    }
