"""`StableStep`: one optimizer step of stable-async — GAC, a possible skip, then the ESS-scaled step.

Per optimizer step, after the last micro-batch's ``backward()`` (and the trainer's gradient
reduction and clipping):

1. GAC (`stable_async.GradientAlignmentControl.apply`, if given) measures and edits ``.grad``.
   When it decides ``"skip"`` (``gac/action`` = 2), the optimizer is not stepped, the
   accumulator is cleared, and only the ``gac/*`` metrics are returned.
2. With ``ess_lr=True``: the accumulator is reduced across data-parallel ranks (a collective,
   on every rank at every step), and the optimizer steps at ``lr · s(ESS/N)``
   (`stable_async.ESSScaledLR`, VCPO's rule, ESS/N of the step's sequence weights). With
   ``ess_lr=False``: one plain step.
3. The accumulator is cleared, also when a step raises.

No ESS recorded (no sequence with a valid token in the whole step, on every rank): the step
follows ``missing``, `ESSScaledLR`'s ``on_missing``: ``"base"`` (default: the unscaled schedule
LR, warned once), ``"zero"`` (the VCPO reference code: lr 0, moments still advance), ``"skip"``
(no step) or ``"raise"``. The metrics then say ``vcpo/ess_missing = 1`` and carry no
``vcpo/ess_ratio``.

Metrics (returned, and in ``last_metrics``): `GradientAlignmentControl`'s ``gac/*``, then
`ESSScaledLR`'s ``vcpo/lr_scale``, ``vcpo/lr``, ``vcpo/ess_missing``, ``vcpo/ess_ratio``, then
the step statistics of `stable_async.StepStatistics.metrics` (``vcpo/ess``,
``vcpo/ess_num_seqs``, ``vcpo/token_ess_ratio``, ``vcpo/mismatch_kl`` ...). A NaN value (e.g.
``gac/cos`` at the first step, when there is no previous gradient) is left out.

Everything lives on the instance: two models, each with its optimizer, accumulator and
`StableStep`, never see each other's records or metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from stable_async.checks import ArgumentTypeError, check_flag
from stable_async.optim.accumulator import StepAccumulator, StepStatistics
from stable_async.optim.ess_lr import ESSScaledLR
from stable_async.optim.gac import GradientAlignmentControl


class StableStep:
    """GAC, then the ESS-scaled step of one optimizer, fed by its own `StepAccumulator`.

    Args:
        optimizer: a torch optimizer (wrapped here in an `ESSScaledLR` built from ``rule``,
            ``base_ratio``, ``min_scale``, ``missing``), or an `ESSScaledLR` (used as it is; then
            leave those four unset). For a subclass of `ESSScaledLR` whose own ``step`` calls this
            `StableStep`, `ESSScaledLR.scaled_step` is what runs (no recursion, its step hooks run
            once, around its own ``step``).
        accumulator: the `StepAccumulator` the losses of this optimizer's model record into
            (required with ``ess_lr=True``; a new one is made if None).
        gac: a `GradientAlignmentControl` over this optimizer's parameters, or None.
        ess_lr: scale the LR by the step's ESS (default True); False: a plain step.
        rule: `ESSScaledLR`'s ``rule`` (default "sqrt").
        base_ratio: `ESSScaledLR`'s ``base_ratio`` (default 1.0).
        min_scale: `ESSScaledLR`'s ``min_scale`` (default 0.0).
        missing: `ESSScaledLR`'s ``on_missing`` (default "base").
        device: where the accumulator's collective runs on a rank that recorded nothing
            (default: the device of the optimizer's first parameter).

    Example::

        acc = sa.StepAccumulator()
        step = sa.StableStep(torch.optim.AdamW(model.parameters(), lr=1e-6), acc, gac=gac)
        for micro in micro_batches:
            batch = sa.PolicyBatch(...)
            loss_fn(batch).loss.backward()
            acc.record(batch)
        metrics = step()          # GAC, ESS-scaled AdamW step, accumulator cleared
        step.zero_grad()
    """

    def __init__(
        self,
        optimizer: Any,
        accumulator: StepAccumulator | None = None,
        gac: GradientAlignmentControl | None = None,
        *,
        ess_lr: bool = True,
        rule: str | None = None,
        base_ratio: float | None = None,
        min_scale: float | None = None,
        missing: str | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.ess_lr = check_flag("ess_lr", ess_lr)
        if accumulator is None:
            accumulator = StepAccumulator()
        if not isinstance(accumulator, StepAccumulator):
            raise ArgumentTypeError(
                f"accumulator: expected a stable_async.StepAccumulator, got {type(accumulator).__name__}"
            )
        if gac is not None and not isinstance(gac, GradientAlignmentControl):
            raise ArgumentTypeError(
                f"gac: expected a stable_async.GradientAlignmentControl or None, got {type(gac).__name__}"
            )
        settings: dict[str, Any] = {
            "rule": rule,
            "base_ratio": base_ratio,
            "min_scale": min_scale,
            "on_missing": missing,
        }
        given = {k: v for k, v in settings.items() if v is not None}
        if isinstance(optimizer, ESSScaledLR):
            if given:
                names = ", ".join("missing" if k == "on_missing" else k for k in given)
                raise ValueError(f"{names}: optimizer is already an ESSScaledLR; set these on it instead")
            self.scaled = optimizer
        else:
            self.scaled = ESSScaledLR(optimizer, **given)
        self.optimizer = self.scaled.optimizer
        self.accumulator = accumulator
        self.gac = gac
        self.device = device
        self.last_metrics: dict[str, float] = {}
        self.last_statistics: StepStatistics | None = None
        self.last_result: Any = None
        self.stepped = False

    def __repr__(self) -> str:
        return f"StableStep({self.scaled!r}, gac={self.gac!r}, ess_lr={self.ess_lr})"

    def _collective_device(self) -> torch.device | str | None:
        if self.device is not None:
            return self.device
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                local = p.to_local() if hasattr(p, "to_local") else p
                return local.device
        return None

    def __call__(self, closure: Callable[[], Any] | None = None) -> dict[str, float]:
        """One step (see the module docstring); returns the metrics. ``closure`` goes to the optimizer."""
        metrics: dict[str, float] = {}
        self.stepped, self.last_result, self.last_statistics = False, None, None
        try:
            if self.gac is not None:
                metrics.update(self.gac.apply())
                if self.gac.should_skip:
                    return self._finish(metrics)
            if self.ess_lr:
                stats = self.accumulator.reduce(self._collective_device())
                ratio = stats.sequence.ess_ratio if stats.sequence.n > 0 else None
                self.last_result = self.scaled.scaled_step(ratio, closure)
                self.stepped = ratio is not None or self.scaled.on_missing != "skip"
                metrics.update(self.scaled.last_metrics)
                metrics.update(stats.metrics())
                self.last_statistics = stats
            else:
                self.last_result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
                self.stepped = True
        finally:
            self.accumulator.clear()
        return self._finish(metrics)

    step = __call__

    def _finish(self, metrics: dict[str, float]) -> dict[str, float]:
        self.last_metrics = {k: float(v) for k, v in metrics.items() if not math.isnan(float(v))}
        return dict(self.last_metrics)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the optimizer's gradients and clear the accumulator (a new step starts, e.g. after a
        trainer skipped ``step()`` on a non-finite gradient norm)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.accumulator.clear()


__all__ = ["StableStep"]
