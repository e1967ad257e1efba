"""Parity with the installed AReaL's actor loss ``grpo_loss_fn`` (``areal/trainer/ppo/actor.py``).

Both functions get the same arguments, AReaL's own: ``grpo_loss_fn(logprobs, entropy,
input_data, eps_clip=..., ...)`` and `stable_async.integrations.areal.make_loss_fn(name)` with
that signature, on fp64 random inputs (``input_data``: ``logprobs`` = behavior μ, ``prox_logp``,
``advantages``, ``loss_mask``, ``versions``). We compare the loss value and its gradient w.r.t.
π_θ's log-probs.

Settings (read from AReaL's ``grpo_loss_fn``, ``ppo_actor_loss_fn``, ``sapo_loss_fn``,
``apply_rejection_sampling``, ``_resolve_proximal_logp``, ``_apply_m2po_masking``):

* plain PPO (``use_decoupled_loss=False``: AReaL's ``prox_logp`` is the behavior log-prob) ↔ ``ppo``,
  with and without ``c_clip`` (dual clip);
* decoupled PPO with ``rejection_sampling`` (token level, ratio, ``mask`` / ``clamp``) ↔
  ``decoupled_ppo`` with ``behavior_cap`` / ``behavior_cap_mode``, for each proximal method:
  ``recompute`` and ``metrics`` (``prox_logp`` given), ``loglinear`` (``prox_logp=None``,
  versions: our own ``proximal="loglinear"`` against AReaL's approximation);
* SAPO (``use_sapo_loss``) ↔ ``sapo`` (AReaL's token mean);
* ``m2_threshold`` ↔ ``m2po``, which follows the paper where AReaL differs (see
  `stable_async.losses.m2po`): AReaL divides by the tokens its mask keeps, we by all valid
  tokens, and AReaL still applies its PPO clip. With the clip made inactive (ε = 10⁶) AReaL's
  loss and gradient equal ours times N_valid / N_kept, N_kept from our ``m2po_masked_fraction``;
* packed micro-batches (1-D tensors with ``cu_seqlens``, what AReaL's FSDP engine passes).

AReaL's ``stats_tracker`` accepts float32 tensors only, so ``grpo_loss_fn`` itself runs in
float32 (rtol 1e-5). In fp64 (rtol 1e-10) the reference is AReaL's loss functions composed
exactly as ``grpo_loss_fn`` composes them (`areal_reference`: ``_resolve_proximal_logp``, then
``_apply_m2po_masking``, then ``sapo_loss_fn`` or ``ppo_actor_loss_fn``), without its logging.
AReaL's log-linear α (``versions.float()``) and its rejection-sampling weight
(``apply_rejection_sampling`` upcasts the log-ratio to float32) are float32: rtol 1e-6 there.

AReaL's decoupled PPO without ``rejection_sampling`` applies no behavior weight; ours always
does (the paper's loss): that setting matches our ``ppo`` on the proximal policy instead, also
checked. The clip fraction (AReaL's ``clip_ratio``) is compared for plain PPO; with rejection
sampling AReaL leaves rejected tokens out of its clipped-token count.
"""

from __future__ import annotations

import pytest
import torch

from sa_testing import random_logprobs, random_mask
from skyrl_areal_loaders import load_areal_actor, load_areal_adapter

pytestmark = pytest.mark.trainers

areal_actor = load_areal_actor()
areal_adapter = load_areal_adapter()
from areal.api.cli_args import RejectionSamplingConfig  # noqa: E402
from areal.utils import stats_tracker  # noqa: E402

LAST_STATS: dict[str, float] = {}

B, T, VERSION = 6, 8, 5


def make_input(seed: int) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(seed)
    lp = random_logprobs((B, T), gen, low=-2.5, high=-0.05)
    prox = (lp + 0.15 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    behavior = (prox + 0.25 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=-1e-3)
    versions = torch.randint(VERSION - 3, VERSION + 1, (B, T), generator=gen)
    versions[:, :1] = -1  # a prompt token: AReaL marks them with version −1
    data = {
        "logprobs": behavior,
        "prox_logp": prox,
        "advantages": torch.randn(B, T, generator=gen, dtype=torch.float64),
        "loss_mask": random_mask(B, T, gen),
        "versions": versions,
    }
    return lp, data


def areal_reference(logprobs, entropy, input_data, **kw):
    """``grpo_loss_fn``'s loss computation (areal/trainer/ppo/actor.py), without its stats logging."""
    old_logp, loss_mask = input_data["logprobs"], input_data["loss_mask"].bool()
    prox = areal_actor._resolve_proximal_logp(
        prox_logp_gt=input_data.get("prox_logp"),
        prox_logp_method=kw.get("prox_logp_method", "recompute"),
        old_logp=old_logp,
        logprobs=logprobs.detach(),
        versions=input_data.get("versions"),
        current_version=kw.get("current_version"),
    )
    if kw.get("m2_threshold") is not None:
        loss_mask = areal_actor._apply_m2po_masking(old_logp, prox, loss_mask, kw["m2_threshold"])
    common = dict(logprobs=logprobs, advantages=input_data["advantages"], loss_mask=loss_mask)
    common["cu_seqlens"] = input_data.get("cu_seqlens")
    if kw.get("use_sapo_loss"):
        loss, _ = areal_actor.sapo_loss_fn(
            old_logprobs=old_logp, tau_pos=kw["sapo_tau_pos"], tau_neg=kw["sapo_tau_neg"], **common
        )
    else:
        loss, _ = areal_actor.ppo_actor_loss_fn(
            old_logprobs=old_logp,
            proximal_logprobs=prox,
            eps_clip=kw["eps_clip"],
            eps_clip_higher=kw.get("eps_clip_higher"),
            c_clip=kw.get("c_clip"),
            rejection_sampling=kw.get("rejection_sampling"),
            **common,
        )
    return loss


def as_float32(lp: torch.Tensor, data: dict) -> tuple[torch.Tensor, dict]:
    cast = lambda v: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    return cast(lp), {k: cast(v) for k, v in data.items()}


def run(loss_fn, lp: torch.Tensor, data: dict, **kwargs) -> tuple[float, torch.Tensor]:
    leaf = lp.clone().requires_grad_(True)
    loss = loss_fn(leaf, torch.zeros_like(leaf), dict(data), **kwargs)
    loss.backward()
    LAST_STATS.clear()
    LAST_STATS.update(stats_tracker.export_all(reset=True))  # AReaL's tracker, emptied after each call
    return float(loss.detach()), leaf.grad


BASE = dict(eps_clip=0.2, eps_clip_higher=0.28, c_clip=None, current_version=VERSION)
RS_MASK = RejectionSamplingConfig(level="token", action="mask", metric="ratio", upper=1.25)
RS_CLAMP = RejectionSamplingConfig(level="token", action="clamp", metric="ratio", upper=1.25)

CASES = {
    "plain": ("ppo", dict(BASE), "behavior"),
    "plain-dual-clip": ("ppo", dict(BASE, c_clip=2.5), "behavior"),
    "decoupled-recompute-mask": ("decoupled_ppo", dict(BASE, use_decoupled_loss=True, rejection_sampling=RS_MASK), ""),
    "decoupled-recompute-clamp": (
        "decoupled_ppo",
        dict(BASE, use_decoupled_loss=True, rejection_sampling=RS_CLAMP, c_clip=3.0),
        "",
    ),
    "decoupled-metrics": (
        "decoupled_ppo",
        dict(BASE, use_decoupled_loss=True, rejection_sampling=RS_MASK, prox_logp_method="metrics"),
        "",
    ),
    "decoupled-loglinear": (
        "decoupled_ppo",
        dict(BASE, use_decoupled_loss=True, rejection_sampling=RS_MASK, prox_logp_method="loglinear"),
        "drop_prox",
    ),
    "decoupled-no-rejection-is-ppo": ("ppo", dict(BASE, use_decoupled_loss=True), ""),
    "sapo": ("sapo", dict(BASE, use_sapo_loss=True, sapo_tau_pos=1.3, sapo_tau_neg=0.8), "behavior"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_grpo_loss_fn(case, seed):
    ours, kwargs, prox = CASES[case]
    lp, data = make_input(seed)
    if prox == "behavior":  # AReaL's _compute_advantages without decoupled loss: prox_logp := logprobs
        data["prox_logp"] = data["logprobs"]
    if prox == "drop_prox":
        data["prox_logp"] = None
    ref_loss, ref_grad = run(areal_reference, lp, data, **kwargs)
    loss, grad = run(areal_adapter.make_loss_fn(ours), lp, data, **kwargs)
    # AReaL's α is float32 (versions.float()), so is its behavior weight (apply_rejection_sampling)
    rtol = 1e-6 if prox == "drop_prox" or kwargs.get("rejection_sampling") else 1e-10
    assert loss == pytest.approx(ref_loss, rel=rtol, abs=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=rtol, atol=1e-13)
    # grpo_loss_fn itself, float32 (its stats_tracker takes float32 only)
    lp32, data32 = as_float32(lp, data)
    ref_loss, ref_grad = run(areal_actor.grpo_loss_fn, lp32, data32, **kwargs)
    ref_stats = dict(LAST_STATS)
    loss, grad = run(areal_adapter.make_loss_fn(ours), lp32, data32, **kwargs)
    if case.startswith("plain"):  # AReaL's token-mean clip fraction, under the same name
        assert LAST_STATS["clip_ratio"] == pytest.approx(ref_stats["clip_ratio/avg"], rel=1e-6, abs=1e-9)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packed_microbatch_matches_grpo_loss_fn(seed):
    """1-D packed tensors with ``cu_seqlens`` (AReaL's FSDP engine), decoupled PPO, log-linear proximal."""
    lp, data = make_input(seed)
    mask = data["loss_mask"]
    lengths = mask.sum(-1)
    packed = {k: v[mask] for k, v in data.items() if k != "prox_logp"}
    packed["prox_logp"] = None
    packed["cu_seqlens"] = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    kwargs = dict(BASE, use_decoupled_loss=True, rejection_sampling=RS_CLAMP, prox_logp_method="loglinear")
    ref_loss, ref_grad = run(areal_reference, lp[mask], packed, **kwargs)
    loss, grad = run(areal_adapter.make_loss_fn("decoupled_ppo"), lp[mask], packed, **kwargs)
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-13)  # AReaL's α is float32
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-13)


@pytest.mark.parametrize("threshold", [0.01, 0.02])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_m2po_matches_m2_threshold(threshold, seed):
    lp, data = make_input(seed)
    kwargs = dict(BASE, eps_clip=1e6, eps_clip_higher=None, use_decoupled_loss=True, m2_threshold=threshold)
    ref_loss, ref_grad = run(areal_reference, lp, data, **kwargs)
    loss_fn = areal_adapter.make_loss_fn("m2po")
    batch = areal_adapter.policy_batch(lp, data, None, kwargs)
    resolved = areal_adapter.resolve_hyperparameters("m2po", kwargs, {})
    import stable_async as sa

    out = sa.get_loss("m2po", **resolved)(batch)
    n_valid = float(data["loss_mask"].sum())
    kept = n_valid * (1.0 - out.metrics["actor/m2po_masked_fraction"])
    assert 0 < kept < n_valid  # the mask acts, and keeps something
    loss, grad = run(loss_fn, lp, data, **kwargs)
    assert loss * n_valid / kept == pytest.approx(ref_loss, rel=1e-10, abs=1e-13)
    torch.testing.assert_close(grad * n_valid / kept, ref_grad, rtol=1e-10, atol=1e-13)
