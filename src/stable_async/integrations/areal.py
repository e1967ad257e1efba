"""AReaL adapter: a stable-async loss in place of AReaL's actor loss ``grpo_loss_fn``; ESS-LR/GAC at its step.

Translation only: AReaL's loss inputs go into a `stable_async.PolicyBatch` and a loss config;
the core computes; metrics go to AReaL's ``stats_tracker``. Tested against AReaL 1.0.4
(``areal`` on the package index).

**Selecting a loss: one call.** AReaL's ``PPOActor`` binds the module function
``areal.trainer.ppo.actor.grpo_loss_fn`` with ``functools.partial`` at every update, so
`use_loss` (``use_loss("vcpo")``, in the process that runs the actor, before training)
replaces that function by `make_loss_fn`'s, which has ``grpo_loss_fn``'s signature; `restore`
puts AReaL's back. `make_loss_fn`'s function can also be passed to ``engine.train_batch``.

**Inputs** (``grpo_loss_fn(logprobs, entropy, input_data, ...)``):

* ``logprobs`` (π_θ, from the training forward pass) → ``logprobs``;
* ``input_data["logprobs"]`` (the behavior policy μ, from the inference engine) → ``rollout_logprobs``;
* the proximal policy → ``old_logprobs``: ``input_data["prox_logp"]``, resolved by AReaL's own
  ``_resolve_proximal_logp`` for its ``prox_logp_method`` (``recompute`` / ``metrics``: the
  recomputed one; ``loglinear``: AReaL's log-linear approximation from the versions). For a loss
  with a ``proximal`` setting (``decoupled_ppo``) and ``prox_logp_method="loglinear"`` without
  ``prox_logp``, our own ``proximal="loglinear"`` computes it instead, from:
* ``input_data["versions"]`` (per-token policy versions, −1 on prompt tokens) → ``versions``,
  the actor's ``current_version`` → ``current_version``;
* ``advantages`` → ``advantages``; ``loss_mask`` → ``mask``.

Packed micro-batches (1-D tensors with ``cu_seqlens``, what AReaL's FSDP engine passes) are laid
out as right-padded rows, one per sequence; 2-D inputs are used as they are.

**Hyperparameters** (see `resolve_hyperparameters`): ``aggregation="token-mean"`` (AReaL's
engine weights every micro-batch's loss by its share of valid tokens, so its losses are token
means); AReaL's arguments where they mean the same as for AReaL's own loss (`AREAL_FIELDS`):
``eps_clip`` / ``eps_clip_higher`` → ``eps_low`` / ``eps_high``, ``c_clip`` → ``dual_clip``,
``sapo_tau_pos/neg`` → ``tau_pos/neg``, ``m2_threshold``; ``rejection_sampling`` (token level,
``ratio`` metric, no lower bound) → ``decoupled_ppo``'s ``behavior_cap`` and
``behavior_cap_mode`` (``mask`` / ``clamp`` → ``truncate``); ``m2po`` selects per micro-batch and rank
(``scope="local"``), as AReaL does; then the keyword arguments given to `use_loss`, which win.
AReaL's ``use_sapo_loss`` / ``use_decoupled_loss`` / ``importance_sampling_level`` choose among
AReaL's own losses and are not read: the stable-async loss is the one named in `use_loss`.

**Metrics** go to ``areal.utils.stats_tracker`` as scalars, under AReaL's names where it has one
(`METRIC_NAMES`: ``clip_ratio``, ``dual_clip_ratio``), otherwise without the ``actor/`` prefix.

**ESS-scaled LR and GAC.** AReaL's FSDP engine builds its optimizer itself (AdamW /
AnyPrecisionAdamW / SGD from ``optimizer.type``) and calls ``optimizer.zero_grad()`` and
``optimizer.step()`` in ``train_batch``; `install_stable_step` wraps ``engine.optimizer`` in
the same `stable_async.StableStep` wrapper as the SkyRL adapter's, fed by the losses of this
process.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from areal.trainer.ppo import actor as areal_actor
from areal.utils import stats_tracker

import stable_async as sa
from stable_async.integrations._stable_step import ProcessAccumulator, StableOptimizerWrapper, install, uninstall

_ORIGINAL_LOSS_FN = areal_actor.grpo_loss_fn

_CLIP = {"eps_low": "eps_clip", "eps_high": "eps_clip_higher"}
AREAL_FIELDS: dict[str, dict[str, str]] = {
    "ppo": {**_CLIP, "dual_clip": "c_clip"},
    "decoupled_ppo": {**_CLIP, "dual_clip": "c_clip"},
    "gspo": dict(_CLIP),
    "gspo_token": dict(_CLIP),
    "sapo": {"tau_pos": "sapo_tau_pos", "tau_neg": "sapo_tau_neg"},
    "m2po": {"m2_threshold": "m2_threshold"},
}
"""Our hyperparameter → the ``grpo_loss_fn`` argument AReaL's own loss reads, per loss."""

AREAL_FIXED: dict[str, dict[str, Any]] = {"m2po": {"scope": "local"}}
"""Settings AReaL fixes: its M2PO mask is selected per micro-batch on each rank."""

CAP_MODES = {"mask": "mask", "clamp": "truncate"}
"""AReaL's ``rejection_sampling.action`` → our ``behavior_cap_mode``."""

METRIC_NAMES = {"actor/pg_clipfrac": "clip_ratio", "actor/pg_clipfrac_lower": "dual_clip_ratio"}
"""Our metric → AReaL's ``stats_tracker`` name; others lose the ``actor/`` prefix."""


def _behavior_cap(rejection_sampling: Any) -> dict[str, Any]:
    """``rejection_sampling`` → ``behavior_cap`` / ``behavior_cap_mode`` (the forms that map one to one)."""
    if rejection_sampling is None:
        return {}
    level, metric, action = rejection_sampling.level, rejection_sampling.metric, rejection_sampling.action
    lower = rejection_sampling.lower
    if level != "token" or metric != "ratio" or not (lower is None or (action == "clamp" and lower == 0.0)):
        raise ValueError(
            "rejection_sampling: decoupled_ppo's behavior_cap expresses level='token', metric='ratio' "
            f"without a lower bound; got level={level!r}, metric={metric!r}, lower={lower!r}"
        )
    return {"behavior_cap": float(rejection_sampling.upper), "behavior_cap_mode": CAP_MODES[action]}


def resolve_hyperparameters(
    name: str, areal_kwargs: Mapping[str, Any], overrides: Mapping[str, Any], *, has_proximal: bool = True
) -> dict:
    """Keyword arguments for ``sa.get_loss(name, ...)`` from ``grpo_loss_fn``'s keyword arguments.

    Order (later wins): ``aggregation="token-mean"``; `AREAL_FIELDS` (``eps_clip_higher=None``
    means ``eps_clip``, as in AReaL); ``rejection_sampling`` → ``behavior_cap`` (losses with one);
    `AREAL_FIXED`; ``proximal="loglinear"`` when AReaL would approximate the proximal policy
    (``prox_logp_method="loglinear"`` and no ``prox_logp``: ``has_proximal=False``) and the loss
    has that setting; ``overrides`` (what `use_loss` was given).
    """
    fields = {f.name for f in dataclasses.fields(sa.loss_config_class(name)) if f.init}
    out: dict[str, Any] = {"aggregation": "token-mean"} if "aggregation" in fields else {}
    for ours, theirs in AREAL_FIELDS.get(name, {}).items():
        value = areal_kwargs.get(theirs)
        if value is None and theirs == "eps_clip_higher":
            value = areal_kwargs.get("eps_clip")
        if value is not None and ours in fields:
            out[ours] = float(value)
    if "behavior_cap" in fields:
        out.update(_behavior_cap(areal_kwargs.get("rejection_sampling")))
    out.update(AREAL_FIXED.get(name, {}))
    if "proximal" in fields and areal_kwargs.get("prox_logp_method") == "loglinear" and not has_proximal:
        out["proximal"] = "loglinear"
    out.update(overrides)
    return out


# --------------------------------------------------------------------------- layout
def padded_rows(values: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """A packed (N,) tensor as right-padded (B, T_max) rows (zeros after each sequence); 2-D unchanged."""
    if values.dim() == 2:
        return values
    if values.dim() != 1 or cu_seqlens is None:
        raise ValueError(
            f"input_data: expected (B, T) tensors, or packed (N,) ones with cu_seqlens; got {values.shape}"
        )
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    width = int(lengths.max()) if lengths.numel() else 0
    column = torch.arange(width, device=values.device)
    inside = column.unsqueeze(0) < lengths.unsqueeze(1)
    index = torch.where(inside, starts.unsqueeze(1) + column.unsqueeze(0), torch.zeros_like(inside, dtype=torch.long))
    return torch.where(inside, values[index], torch.zeros((), dtype=values.dtype, device=values.device))


def policy_batch(
    logprobs: torch.Tensor, input_data: Mapping[str, Any], config: Any, areal_kwargs: Mapping[str, Any]
) -> sa.PolicyBatch:
    """AReaL's loss inputs as a `PolicyBatch` (see the module docstring for the mapping)."""
    cu = input_data.get("cu_seqlens")
    behavior = input_data["logprobs"]
    prox: Any = input_data.get("prox_logp")
    versions = input_data.get("versions")
    own_proximal = getattr(config, "proximal", None) == "loglinear" and prox is None
    if not own_proximal:
        prox = areal_actor._resolve_proximal_logp(
            prox_logp_gt=prox,
            prox_logp_method=areal_kwargs.get("prox_logp_method", "recompute"),
            old_logp=behavior,
            logprobs=logprobs.detach(),
            versions=versions,
            current_version=areal_kwargs.get("current_version"),
        )
    rows = functools.partial(padded_rows, cu_seqlens=cu)
    mask = rows(input_data["loss_mask"].bool())
    return sa.PolicyBatch(
        logprobs=rows(logprobs),
        advantages=rows(input_data["advantages"]),
        mask=mask,
        old_logprobs=None if own_proximal else rows(prox),
        rollout_logprobs=rows(behavior),
        versions=rows(versions) if versions is not None else None,
        current_version=areal_kwargs.get("current_version"),
    )


# --------------------------------------------------------------------------- loss function
def areal_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Our metric names → AReaL's (`METRIC_NAMES`, else without ``actor/``); ``actor/pg_loss`` → ``sa_loss``."""
    out = {}
    for key, value in metrics.items():
        name = "sa_loss" if key == "actor/pg_loss" else METRIC_NAMES.get(key, key.removeprefix("actor/"))
        out[name] = float(value)
    return out


def make_loss_fn(name: str, **hyperparameters: Any) -> Callable[..., torch.Tensor]:
    """A function with ``grpo_loss_fn``'s signature that computes the stable-async loss ``name``."""
    sa.loss_config_class(name)  # unknown names fail here, with the list of ours
    cache: dict[tuple, sa.Loss] = {}

    def loss_fn(logprobs: torch.Tensor, entropy: torch.Tensor, input_data: Mapping[str, Any], **areal_kwargs: Any):
        has_proximal = input_data.get("prox_logp") is not None
        resolved = resolve_hyperparameters(name, areal_kwargs, hyperparameters, has_proximal=has_proximal)
        key = tuple(sorted((k, repr(v)) for k, v in resolved.items()))
        if key not in cache:
            cache[key] = sa.get_loss(name, **resolved)
        loss = cache[key]
        batch = policy_batch(logprobs, input_data, loss.config, areal_kwargs)
        out = loss(batch)
        accumulator = ProcessAccumulator.current
        if accumulator is not None and out.loss.requires_grad:
            accumulator.record(batch)
        stats_tracker.scalar(**areal_metrics(out.metrics))
        return out.loss

    loss_fn.__name__ = loss_fn.__qualname__ = f"sa_{name}"
    loss_fn.__doc__ = f"stable-async loss {name!r} in place of AReaL's grpo_loss_fn."
    return loss_fn


def use_loss(name: str, **hyperparameters: Any) -> Callable[..., torch.Tensor]:
    """Make AReaL's ``PPOActor`` train with the stable-async loss ``name`` (this process); returns it."""
    fn = make_loss_fn(name, **hyperparameters)
    areal_actor.grpo_loss_fn = fn
    return fn


def restore() -> None:
    """Put AReaL's own ``grpo_loss_fn`` back."""
    areal_actor.grpo_loss_fn = _ORIGINAL_LOSS_FN


def install_stable_step(
    engine: Any,
    *,
    gac: sa.GradientAlignmentControl | Mapping[str, Any] | None = None,
    ess_lr: bool = True,
    **ess_settings: Any,
) -> StableOptimizerWrapper:
    """Wrap ``engine.optimizer`` (AReaL's FSDP engine, after ``initialize``) in a `stable_async.StableStep`.

    Args mirror `stable_async.integrations.skyrl.install_stable_step`.
    """
    return install(engine, gac=gac, ess_lr=ess_lr, **ess_settings)


__all__ = [
    "AREAL_FIELDS",
    "AREAL_FIXED",
    "METRIC_NAMES",
    "areal_metrics",
    "install_stable_step",
    "make_loss_fn",
    "padded_rows",
    "policy_batch",
    "resolve_hyperparameters",
    "restore",
    "uninstall",
    "use_loss",
]
