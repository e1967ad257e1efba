"""D4 (issue 12): a second derivative of every registered loss is correct or a clear error, never silent.

The fused first-derivative paths of ``ppo`` / ``gspo_token`` returned, under
``create_graph=True``, a gradient with ``requires_grad=False``: the Hessian was dropped without
a word. For every loss, with θ-dependent log-probs (and top-K), the Hessian-vector product H·v
from double backward (reverse over reverse) must equal an independent reference:

* forward over reverse (``torch.autograd.forward_ad`` tangents through the backward pass), a
  different AD mechanism with the same stop-gradient semantics;
* where the loss runs a custom autograd Function without a forward derivative (the fused paths),
  double backward of the loss written out from its formula here (CleanRL style).

Or the double backward raises an error that says so. A gradient without a graph (H·v = None) is
right only where the reference is 0 too (a loss linear in log π with detached weights, here
with log π linear in θ: ``reinforce``, ``cispo``, ``vcpo``...).
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import stable_async as sa
from gloo_workers import LOSS_B, loss_batch, loss_data

ERROR_WORDS = ("second", "double", "twice", "create_graph")
V = torch.tensor([0.6, -0.3, 0.74], dtype=torch.float64)
TIS = sa.token_tis()


def _rows():
    data, theta0 = loss_data()
    return {k: v[slice(0, LOSS_B)] for k, v in data.items()}, theta0


def _hvp_reverse_over_reverse(loss_of, theta0):
    theta = theta0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_of(theta), theta, create_graph=True)
    if not grad.requires_grad:
        return torch.zeros_like(theta0)  # claimed: the gradient does not depend on θ
    (hvp,) = torch.autograd.grad(grad @ V, theta, allow_unused=True)
    return torch.zeros_like(theta0) if hvp is None else hvp


def _hvp_forward_over_reverse(loss_of, theta0):
    with fwAD.dual_level():
        theta = fwAD.make_dual(theta0.clone().requires_grad_(True), V)
        (grad,) = torch.autograd.grad(loss_of(theta), theta, create_graph=True)
        tangent = fwAD.unpack_dual(grad).tangent
    return torch.zeros_like(theta0) if tangent is None else tangent.detach()


def _tis_weights(rows):
    return torch.exp(rows["old"] - rows["rollout"]).clamp(max=2.0) * rows["mask"]


def _token_mean(loss_mat, mask):
    return (loss_mat * mask).sum() / mask.sum()


def _ppo_formula(rows, theta, eps=0.2):
    """PPO-clip (Schulman et al. 2017) with token TIS, token-mean: the formula, plain autograd."""
    logprobs = rows["base"] + rows["features"] @ theta
    ratio = torch.exp(logprobs - rows["old"])
    adv = rows["advantages"][:, None]
    loss_mat = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    return _token_mean(loss_mat * _tis_weights(rows), rows["mask"])


def _gspo_token_formula(rows, theta, eps_low=3e-4, eps_high=4e-4):
    """GSPO-token (arXiv 2507.18071): s_it = sg(s_i)·π/sg(π), s_i the geometric-mean sequence ratio."""
    logprobs = rows["base"] + rows["features"] @ theta
    m = rows["mask"].to(logprobs.dtype)
    log_s = ((logprobs - rows["old"]) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    ratio = torch.exp(log_s.detach()[:, None] + logprobs - logprobs.detach())
    adv = rows["advantages"][:, None]
    loss_mat = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps_low, 1 + eps_high))
    return _token_mean(loss_mat * _tis_weights(rows), rows["mask"])


FORMULAS = {"ppo": _ppo_formula, "gspo_token": _gspo_token_formula}


@pytest.mark.parametrize("name", sa.available_losses())
def test_d4_hessian_vector_product_matches_an_independent_reference_or_raises(name):
    rows, theta0 = _rows()
    loss_fn = sa.get_loss(name, aggregation="token-mean", correction=TIS)

    def loss_of(theta):
        return loss_fn(loss_batch(rows, theta)).loss

    try:
        hvp = _hvp_reverse_over_reverse(loss_of, theta0)
    except RuntimeError as exc:
        assert any(word in str(exc).lower() for word in ERROR_WORDS), f"{name}: unclear error: {exc}"
        return
    try:
        reference = _hvp_forward_over_reverse(loss_of, theta0)
    except NotImplementedError:  # a custom autograd Function: compare with the written-out formula
        assert name in FORMULAS, f"{name}: no independent reference for its custom autograd Function"
        torch.testing.assert_close(loss_of(theta0), FORMULAS[name](rows, theta0), rtol=1e-12, atol=1e-14)
        reference = _hvp_reverse_over_reverse(lambda theta: FORMULAS[name](rows, theta), theta0)
    torch.testing.assert_close(hvp, reference, rtol=1e-10, atol=1e-13, msg=f"{name}: H·v differs from the reference")


@pytest.mark.parametrize("name", sorted(FORMULAS))
def test_d4_the_written_out_references_are_curved(name):
    """Control: the PPO and GSPO-token references have curvature, so a dropped Hessian cannot pass."""
    rows, theta0 = _rows()
    reference = _hvp_reverse_over_reverse(lambda theta: FORMULAS[name](rows, theta), theta0)
    assert reference.abs().max() > 1e-6
