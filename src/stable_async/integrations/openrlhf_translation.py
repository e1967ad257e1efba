"""OpenRLHF's ``PolicyLoss`` arguments in stable-async terms (no OpenRLHF import, no state).

* `validate_openrlhf_arguments`: OpenRLHF 0.11.2's constructor checks, in its order, with its messages;
* `translated_correction`: ``is_correction_{level,mode,gating,threshold}`` as a `RolloutCorrection`;
* `resolve_correction`: our ``correction=`` option (None → the translation above);
* `build_loss`: the registered loss (``policy_loss_type`` ppo / gspo, or our ``policy_loss=``);
* `filter_fraction`: OpenRLHF's ``is_filter_ratio`` from the correction's metrics.

The mapping table and the known differences are in `stable_async.integrations.openrlhf`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

import stable_async as sa

__all__ = [
    "DualClipError",
    "as_float",
    "build_loss",
    "filter_fraction",
    "resolve_correction",
    "translated_correction",
    "validate_openrlhf_arguments",
]

_STATISTIC = {"ratio": "ratio", "binary_kl": "binary_kl", "tv": "binary_tv"}
_OPENRLHF_DIVERGENCE_EPS = 1e-6  # OpenRLHF clamps both probabilities to [1e-6, 1 - 1e-6]


class DualClipError(ValueError, AssertionError):
    """``dual_clip <= 1``: OpenRLHF raises it with ``assert``; this error is caught by both."""


def validate_openrlhf_arguments(dual_clip: float | None, level: str, mode: str, gating: str, threshold: Any) -> None:
    """OpenRLHF's constructor checks, in its order and with its messages."""
    if dual_clip is not None and not dual_clip > 1.0:
        raise DualClipError(f"dual_clip must be > 1.0, got {dual_clip}")
    if level not in {"off", "token", "seq"}:
        raise ValueError(f"is_correction_level must be off/token/seq, got {level}")
    if mode not in {"mask", "clip"}:
        raise ValueError(f"is_correction_mode must be mask/clip, got {mode}")
    if gating not in {"ratio", "binary_kl", "tv"}:
        raise ValueError(f"is_correction_gating must be ratio/binary_kl/tv, got {gating}")
    if mode == "clip" and (level == "seq" or gating != "ratio"):
        raise ValueError("is_correction_mode=clip requires is_correction_level=token and is_correction_gating=ratio")
    if gating != "ratio" and level != "off" and threshold[0] > 0:
        raise ValueError(f"is_correction_gating={gating} takes an upper bound only (a single delta)")


def translated_correction(
    loss_type: str, level: str, mode: str, gating: str, threshold: Any
) -> sa.RolloutCorrection | None:
    """The `RolloutCorrection` equivalent to OpenRLHF's IS correction (None: none is applied).

    ``clip`` → token truncation; ``mask`` → token or geometric-mean sequence masking on the ratio,
    the binary KL or the binary TV (OpenRLHF's probability clamp as ``divergence_eps``). With
    ``gspo`` OpenRLHF applies no IS coefficient (it takes the GSPO ratio against μ instead).
    """
    if level == "off" or loss_type == "gspo":
        return None
    low, high = threshold
    try:
        if mode == "clip":
            return sa.RolloutCorrection(level="token", mode="truncate", low=low, high=high)
        statistic = _STATISTIC[gating]
        return sa.RolloutCorrection(
            level="token" if level == "token" else "geometric",
            mode="mask",
            low=low,
            high=high,
            statistic=statistic,
            weight="token",
            divergence_eps=0.0 if statistic == "ratio" else _OPENRLHF_DIVERGENCE_EPS,
        )
    except ValueError as err:
        raise ValueError(f"is_correction_threshold: {err}") from err


def resolve_correction(correction: Any, translated: sa.RolloutCorrection | None) -> sa.RolloutCorrection | None:
    """Our ``correction=``: None → ``translated``, False → none, a `RolloutCorrection`, or a dict of its arguments."""
    if correction is None:
        return translated
    if correction is False:
        return None
    if isinstance(correction, sa.RolloutCorrection):
        return correction
    if isinstance(correction, Mapping):
        try:
            return sa.RolloutCorrection(**correction)
        except (TypeError, ValueError) as err:
            raise type(err)(f"correction: {err}") from err
    raise TypeError(f"correction: expected None, False, a RolloutCorrection or a dict, got {type(correction).__name__}")


def build_loss(
    policy_loss: str | sa.Loss | None,
    loss_kwargs: Mapping[str, Any],
    *,
    loss_type: str,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: float | None,
    token_level_loss: bool,
    correction: sa.RolloutCorrection | None,
) -> sa.Loss:
    """The loss ``forward`` calls: OpenRLHF's ``policy_loss_type`` translated, or our ``policy_loss``.

    A named loss gets the correction when its config takes one, then ``loss_kwargs`` (which win).
    """
    if policy_loss is None:
        if loss_kwargs:
            raise TypeError("loss_kwargs: only used with policy_loss= (the translated loss takes OpenRLHF's)")
        config: dict[str, Any] = {
            "eps_low": clip_eps_low,
            "eps_high": clip_eps_high,
            "dual_clip": dual_clip,
            "aggregation": "token-mean" if token_level_loss else "seq-mean-token-mean",
        }
        if correction is not None:
            config["correction"] = correction
        return sa.get_loss(loss_type, **config)
    if isinstance(policy_loss, sa.Loss):
        if loss_kwargs:
            raise TypeError("loss_kwargs: pass hyperparameters to get_loss() when policy_loss is a Loss object")
        return policy_loss
    if not isinstance(policy_loss, str):
        raise TypeError(f"policy_loss: expected a loss name or a stable_async.Loss, got {type(policy_loss)}")
    fields = {f.name for f in dataclasses.fields(sa.loss_config_class(policy_loss)) if f.init}
    config = {}
    if "correction" in fields and correction is not None:
        config["correction"] = correction
    config.update(loss_kwargs)
    return sa.get_loss(policy_loss, **config)


def filter_fraction(correction: sa.RolloutCorrection | None, metrics: Mapping[str, float], mask: torch.Tensor) -> float:
    """OpenRLHF's ``is_filter_ratio``: truncated / masked token fraction, or masked rows over *all* rows.

    Per sequence, OpenRLHF averages over every row and counts a row without valid tokens as
    filtered (its gate statistic is 0/0), so our fraction over valid rows is re-expressed.
    """
    if correction is None:
        return metrics.get("rollout_corr/rollout_rs_masked_fraction", 0.0)
    if correction.mode == "truncate":
        return metrics["rollout_corr/truncated_fraction"]
    if correction.level == "token":
        return metrics["rollout_corr/rollout_rs_masked_fraction"]
    rows, valid = mask.shape[0], int(mask.any(dim=-1).sum())
    if rows == 0:
        return 0.0
    return (metrics["rollout_corr/rollout_rs_seq_masked_fraction"] * valid + (rows - valid)) / rows


def as_float(value: Any) -> float | None:
    """A count passed by OpenRLHF as a number or a one-element tensor (None stays None)."""
    if value is None:
        return None
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)
