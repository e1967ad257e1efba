"""Several corrections on one loss: their weights multiply, their rejections add up.

    correction=(sa.sequence_mask(high=3.0), sa.opsm(threshold=0.5))      # TRL: vLLM IS + OPSM

A loss's ``correction=`` takes one correction (a `RolloutCorrection`, an `OffPolicySequenceMask`)
or a tuple / list of them, which becomes a `CorrectionChain`. For corrections c_1..c_n with
per-token weights w^(j), loss masks keep^(j) and rejections rej^(j):

    w = Π_j w^(j),   keep = ∧_j keep^(j),   rejected = ∨_j rej^(j)

Every factor is detached and applied per token, so the order does not matter (TRL multiplies its
OPSM mask and its IS ratio into the per-token loss the same way). Metrics are merged; two members
writing the same metric name is an error (give one of them another ``prefix``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from stable_async.batch import PolicyBatch
from stable_async.correction import CorrectionResult, RolloutCorrection
from stable_async.opsm import OffPolicySequenceMask

SINGLE_CORRECTIONS = (RolloutCorrection, OffPolicySequenceMask)


@dataclass(frozen=True)
class CorrectionChain:
    """Corrections applied together (see module docstring)."""

    corrections: tuple[RolloutCorrection | OffPolicySequenceMask, ...]

    def __post_init__(self) -> None:
        items = tuple(self.corrections) if isinstance(self.corrections, list | tuple) else None
        if not items:
            raise ValueError(f"corrections: expected a non-empty tuple of corrections, got {self.corrections!r}")
        flat: list[Any] = []
        for item in items:
            flat.extend(item.corrections if isinstance(item, CorrectionChain) else [_check_single(item)])
        object.__setattr__(self, "corrections", tuple(flat))

    def __call__(self, batch: PolicyBatch) -> CorrectionResult:
        results = [c(batch) for c in self.corrections]
        weights, keep, rejected = results[0].weights, results[0].keep, results[0].rejected
        metrics = dict(results[0].metrics)
        for r in results[1:]:
            weights = weights * r.weights
            keep = keep & r.keep
            rejected = rejected | r.rejected
            clash = sorted(set(metrics) & set(r.metrics))
            if clash:
                raise ValueError(
                    f"correction: two corrections write the metric {clash[0]!r}; give one of them another prefix="
                )
            metrics.update(r.metrics)
        return CorrectionResult(weights=weights, keep=keep, rejected=rejected, metrics=metrics)


Correction = RolloutCorrection | OffPolicySequenceMask | CorrectionChain


def _check_single(item: Any) -> Any:
    if not isinstance(item, SINGLE_CORRECTIONS):
        raise TypeError(
            "correction: expected a stable_async.RolloutCorrection, an OffPolicySequenceMask (sa.opsm), "
            f"a CorrectionChain or a tuple of them, got {type(item).__name__}"
        )
    return item


def as_correction(value: Any) -> Correction:
    """One correction object from what a loss's ``correction=`` accepts (a tuple → `CorrectionChain`)."""
    if isinstance(value, CorrectionChain):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        return CorrectionChain(tuple(value))
    return _check_single(value)


def split_corrections(
    correction: Correction | None,
) -> tuple[CorrectionChain | RolloutCorrection | None, CorrectionChain | OffPolicySequenceMask | None]:
    """(importance weights, sequence masks): the `RolloutCorrection` members and the OPSM members.

    For losses that fold the rollout weights into their own sequence weight (``vespo``) and apply
    only the masks to the loss, as TRL does.
    """
    members = () if correction is None else getattr(correction, "corrections", (correction,))
    weights = [c for c in members if isinstance(c, RolloutCorrection)]
    masks = [c for c in members if isinstance(c, OffPolicySequenceMask)]

    def pack(items: list[Any]) -> Any:
        return None if not items else items[0] if len(items) == 1 else CorrectionChain(tuple(items))

    return pack(weights), pack(masks)
