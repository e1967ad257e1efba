"""What every loss shares: the settings every loss accepts, the output record, and the last step.

Every loss computes a (B, T) per-token loss matrix (or a (B,) per-sequence loss) and hands it
to `finish`, which applies the optional `RolloutCorrection` as a per-token multiplier (and
mask), aggregates with the configured mode and data-parallel counts, and merges the metrics.
So a correction composes with every loss without a copy of the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from stable_async._numerics import masked_mean
from stable_async.aggregate import aggregate, aggregate_sequences, check_aggregation

if TYPE_CHECKING:
    from stable_async.batch import PolicyBatch
    from stable_async.correction import RolloutCorrection


@dataclass
class LossOutput:
    """The result of a loss.

    Attributes:
        loss: 0-dim tensor, aggregated; backpropagate it.
        metrics: name -> float, veRL-style names (``actor/pg_clipfrac``, ``rollout_corr/...``).
        per_token_loss: the (B, T) loss matrix after correction weights, before aggregation
            (detached); ``None`` for sequence-level losses.
    """

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    per_token_loss: torch.Tensor | None = None


@dataclass(frozen=True)
class LossConfig:
    """Settings every loss accepts.

    Attributes:
        aggregation: one of the modes in `stable_async.aggregate` (default ``token-mean``).
        correction: an optional `RolloutCorrection` applied to the per-token loss.
        norm_length: the constant L of ``seq-mean-token-sum-norm`` (default: the batch's T).
    """

    aggregation: str = "token-mean"
    correction: RolloutCorrection | None = None
    norm_length: float | None = None

    def __post_init__(self) -> None:
        check_aggregation(self.aggregation)
        if self.correction is not None:
            from stable_async.correction import RolloutCorrection

            if not isinstance(self.correction, RolloutCorrection):
                raise TypeError(
                    f"correction: expected a stable_async.RolloutCorrection, got {type(self.correction).__name__}"
                )
        if self.norm_length is not None and not self.norm_length > 0:
            raise ValueError(f"norm_length: expected a positive number, got {self.norm_length!r}")


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is a finite number > 0 (or >= 0)."""
    ok = isinstance(value, int | float) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")


def check_flag(name: str, value: bool) -> None:
    """Raise a TypeError naming ``name`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")


def check_clip_settings(eps_low: float, eps_high: float, dual_clip: float | None = None) -> None:
    """Validate a PPO-style clip range [1 − eps_low, 1 + eps_high] and an optional dual-clip c > 1."""
    check_positive("eps_low", eps_low, allow_zero=True)
    check_positive("eps_high", eps_high, allow_zero=True)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip: expected a value > 1 (or None), got {dual_clip!r}")


def finish(
    batch: PolicyBatch,
    config: LossConfig,
    loss_mat: torch.Tensor,
    metrics: dict[str, Any],
) -> LossOutput:
    """Apply the correction, aggregate a (B, T) loss matrix, and pack the output.

    With a `RolloutCorrection`, the loss matrix is multiplied by its weights and the mask
    intersected with its ``keep``; then `stable_async.aggregate.aggregate` reduces it with the
    configured mode and data-parallel counts (masked positions never reach the loss, even NaN).
    """
    mask = batch.mask
    if config.correction is not None:
        result = config.correction(batch)
        loss_mat = loss_mat * result.weights
        mask = mask & result.keep
        metrics.update(result.metrics)
    loss = aggregate(
        loss_mat,
        mask,
        config.aggregation,
        global_num_tokens=batch.global_num_tokens,
        global_num_seqs=batch.global_num_seqs,
        dp_size=batch.dp_size,
        norm_length=config.norm_length,
    )
    metrics["actor/pg_loss"] = loss.detach()
    return LossOutput(loss=loss, metrics=_to_floats(metrics), per_token_loss=loss_mat.detach())


def finish_sequences(
    batch: PolicyBatch,
    config: LossConfig,
    seq_loss: torch.Tensor,
    metrics: dict[str, Any],
) -> LossOutput:
    """Apply the correction (token weights → per-sequence geometric mean) and average sequences.

    For losses defined per sequence (``geo_mean``). The token weights of a correction are
    reduced to one weight per sequence by their geometric mean over valid tokens (as veRL does
    for GMPO); a sequence with a rejected token gets weight 0.
    """
    seq_valid = batch.mask.any(dim=-1)
    if config.correction is not None:
        result = config.correction(batch)
        log_w = torch.log(result.weights.clamp(min=torch.finfo(result.weights.dtype).tiny))
        seq_w = torch.exp(masked_mean(log_w, batch.mask, dim=-1))
        seq_w = torch.where(result.rejected.any(dim=-1), torch.zeros_like(seq_w), seq_w)
        seq_loss = seq_loss * seq_w
        metrics.update(result.metrics)
    loss = aggregate_sequences(seq_loss, seq_valid, global_num_seqs=batch.global_num_seqs, dp_size=batch.dp_size)
    metrics["actor/pg_loss"] = loss.detach()
    return LossOutput(loss=loss, metrics=_to_floats(metrics), per_token_loss=None)


def _to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Metric values as Python floats, with one host sync per device for all tensor values.

    Same-dtype values are stacked together first (fewer small ops than one cast per metric); every
    group is then widened to fp64, which holds every fp16/bf16/fp32 value exactly, so each result
    equals ``float(value.item())``.
    """
    out: dict[str, float] = {}
    groups: dict[torch.device, dict[torch.dtype, list[tuple[str, torch.Tensor]]]] = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            groups.setdefault(value.device, {}).setdefault(value.dtype, []).append((key, value))
        else:
            out[key] = float(value.detach().item()) if isinstance(value, torch.Tensor) else float(value)
    for by_dtype in groups.values():
        keys = [key for items in by_dtype.values() for key, _ in items]
        stacks = [torch.stack([v.detach().reshape(()) for _, v in items]) for items in by_dtype.values()]
        if len(stacks) == 1:
            values = stacks[0].tolist()
        else:
            values = torch.cat([stack.to(torch.float64) for stack in stacks]).tolist()
        out.update((key, float(v)) for key, v in zip(keys, values))
    return {key: out[key] for key in metrics}
