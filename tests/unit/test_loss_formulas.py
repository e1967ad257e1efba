"""Each classical loss against an independent elementwise reference: values and autograd gradients.

The references are written from the formulas in the losses' docs pages (docs/losses/), element by element in Python
floats, with the gradient derived by hand (not by autograd).
"""

import math

import pytest
import torch

import stable_async as sa
from sa_testing import random_tensors


def _flat(t):
    return [float(x) for x in t.detach().reshape(-1)]


def _grad(loss, leaf):
    (g,) = torch.autograd.grad(loss, leaf)
    return g


def _check(loss_name, tensors, ref, **config):
    """ref(lp, old, adv) -> (per-token loss, d loss / d lp); compared under token-sum aggregation."""
    batch = sa.PolicyBatch(**tensors)
    out = sa.get_loss(loss_name, aggregation="token-sum", **config)(batch)
    grad = _grad(out.loss, tensors["logprobs"])
    exp_loss, exp_grad = 0.0, []
    for lp, old, adv, m in zip(
        _flat(tensors["logprobs"]), _flat(tensors["old_logprobs"]), _flat(batch.advantages), _flat(batch.mask)
    ):
        value, derivative = ref(lp, old, adv)
        exp_loss += value * m
        exp_grad.append(derivative * m)
    assert out.loss.item() == pytest.approx(exp_loss, rel=1e-12, abs=1e-12)
    assert torch.allclose(grad.reshape(-1), torch.tensor(exp_grad, dtype=grad.dtype), rtol=1e-12, atol=1e-12)
    return out


@pytest.mark.parametrize("eps_low, eps_high, dual_clip", [(0.2, 0.2, None), (0.1, 0.28, None), (0.2, 0.28, 3.0)])
def test_ppo(gen, eps_low, eps_high, dual_clip):
    def ref(lp, old, adv):
        r = math.exp(lp - old)
        unclipped, clipped = -adv * r, -adv * min(max(r, 1 - eps_low), 1 + eps_high)
        if unclipped >= clipped:
            value, grad = unclipped, -adv * r
        else:
            value, grad = clipped, 0.0
        if dual_clip is not None and adv < 0 and value > -dual_clip * adv:
            value, grad = -dual_clip * adv, 0.0
        return value, grad

    tensors = random_tensors(gen, B=8, T=12, spread=0.4)
    _check("ppo", tensors, ref, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip)


def test_ppo_ratio_cap_bounds_the_unclipped_term(gen):
    cap = 1.1

    def ref(lp, old, adv):
        r = math.exp(lp - old)
        unclipped, clipped = -adv * min(r, cap), -adv * min(max(r, 0.8), 1.2)
        if unclipped >= clipped:
            return unclipped, (-adv * r if r < cap else 0.0)
        return clipped, (-adv * r if 0.8 < r < 1.2 else 0.0)  # the cap can make an unclamped clip term win

    _check("ppo", random_tensors(gen, spread=0.5), ref, ratio_cap=cap)


def test_reinforce(gen):
    _check("reinforce", random_tensors(gen), lambda lp, old, adv: (-adv * lp, -adv))


def test_cispo_keeps_every_gradient_with_a_clipped_weight(gen):
    def ref(lp, old, adv):
        w = min(max(math.exp(lp - old), 1 - 0.5), 1 + 0.2)
        return -w * adv * lp, -w * adv

    _check("cispo", random_tensors(gen, spread=0.5), ref, eps_low=0.5, eps_high=0.2)


def test_sapo_gate(gen):
    tau_pos, tau_neg = 1.0, 1.05

    def ref(lp, old, adv):
        r = math.exp(lp - old)
        tau = tau_pos if adv > 0 else tau_neg
        s = 1 / (1 + math.exp(-tau * (r - 1)))
        return -adv * s * 4 / tau, -adv * 4 * s * (1 - s) * r

    _check("sapo", random_tensors(gen, spread=0.5), ref, tau_pos=tau_pos, tau_neg=tau_neg)


def _sequence_reference(tensors, per_sequence):
    """Run per_sequence(lps, olds, advs) -> (loss_i, grads_i) over valid tokens of each row."""
    lp, old, mask = tensors["logprobs"].detach(), tensors["old_logprobs"], tensors["mask"]
    adv = sa.PolicyBatch(**tensors).advantages
    total, grad = 0.0, torch.zeros_like(lp)
    rows = 0
    for i in range(lp.shape[0]):
        idx = [t for t in range(lp.shape[1]) if mask[i, t]]
        if not idx:
            continue
        rows += 1
        value, grads = per_sequence(
            [float(lp[i, t]) for t in idx], [float(old[i, t]) for t in idx], [float(adv[i, t]) for t in idx]
        )
        total += value
        for t, g in zip(idx, grads):
            grad[i, t] = g
    return total / rows, grad / rows


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_sequence_ratio_with_sequence_advantages(gen, name):
    eps_low, eps_high = 0.01, 0.02
    tensors = random_tensors(gen, spread=0.02)
    tensors["advantages"] = torch.randn(6, generator=gen, dtype=torch.float64)

    def per_sequence(lps, olds, advs):
        n, a = len(lps), advs[0]
        s = math.exp(sum(x - y for x, y in zip(lps, olds)) / n)
        unclipped, clipped = -a * s, -a * min(max(s, 1 - eps_low), 1 + eps_high)
        if unclipped >= clipped:
            return unclipped, [-a * s / n] * n
        return clipped, [0.0] * n

    exp_loss, exp_grad = _sequence_reference(tensors, per_sequence)
    out = sa.get_loss(name, eps_low=eps_low, eps_high=eps_high)(sa.PolicyBatch(**tensors))
    assert out.loss.item() == pytest.approx(exp_loss, rel=1e-12)
    assert torch.allclose(_grad(out.loss, tensors["logprobs"]), exp_grad, rtol=1e-12, atol=1e-14)


def test_gspo_token_allows_per_token_advantages(gen):
    tensors = random_tensors(gen, spread=1e-4)  # inside the trust region: no clipping
    batch = sa.PolicyBatch(**tensors)
    out = sa.get_loss("gspo_token", eps_low=0.1, eps_high=0.1)(batch)
    s = torch.exp(((batch.logprobs - batch.old_logprobs) * batch.maskf).sum(-1) / batch.maskf.sum(-1))
    lengths = batch.maskf.sum(-1, keepdim=True)
    expected = -(batch.advantages * s[:, None] / lengths * batch.maskf) / batch.mask.any(-1).sum()
    assert torch.allclose(_grad(out.loss, tensors["logprobs"]), expected.detach(), rtol=1e-10)


def test_geo_mean(gen):
    eps = 0.05
    tensors = random_tensors(gen, spread=0.05)
    tensors["advantages"] = torch.randn(6, generator=gen, dtype=torch.float64)

    def per_sequence(lps, olds, advs):
        n, a = len(lps), advs[0]
        sign = (a > 0) - (a < 0)
        kept, active = [], []
        for x, y in zip(lps, olds):
            lam = x - y
            lam_c = min(max(lam, -eps), eps)
            kept.append(sign * min(sign * lam, sign * lam_c))
            active.append(kept[-1] == lam)
        ratio = math.exp(sum(kept) / n)
        return -a * ratio, [(-a * ratio / n if act else 0.0) for act in active]

    exp_loss, exp_grad = _sequence_reference(tensors, per_sequence)
    out = sa.get_loss("geo_mean", eps_low=eps, eps_high=eps)(sa.PolicyBatch(**tensors))
    assert out.loss.item() == pytest.approx(exp_loss, rel=1e-12)
    assert torch.allclose(_grad(out.loss, tensors["logprobs"]), exp_grad, rtol=1e-12, atol=1e-14)


def test_ppo_metrics_hand_computed():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)).requires_grad_(True)
    old = torch.log(torch.tensor([[0.25, 0.5, 1.0, 0.05]], dtype=torch.float64))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    # ratios 2.0 (A>0: clipped), 1.0 (inside), 0.5 (A<0: clipped), 10 (A<0: dual clip at c=3 active)
    out = sa.get_loss("ppo", dual_clip=3.0)(
        sa.PolicyBatch(logprobs=lp, advantages=adv, mask=torch.ones(1, 4), old_logprobs=old)
    )
    assert out.metrics["actor/pg_clipfrac"] == pytest.approx(2 / 4)
    assert out.metrics["actor/pg_clipfrac_lower"] == pytest.approx(1 / 4)
    assert out.metrics["actor/ppo_kl"] == pytest.approx(-(math.log(2) + 0 - math.log(2) + math.log(10)) / 4)
    assert out.loss.item() == pytest.approx((-1.2 - 1.0 + 0.8 + 3.0) / 4)
