"""Plumbing shared by the adapters: a trainer's optimizer whose every ``step()`` is a `StableStep`.

Trainers call ``optimizer.step()`` once per optimizer step and never pass an ESS ratio; their
loss hook sees the micro-batches. `SteppedOptimizer` joins the two with the core's per-optimizer
pieces: the loss hook records each micro-batch into the optimizer's own `StepAccumulator`, and
the trainer's ``step()`` runs `StableStep` (GAC, a possible skip, the ESS-scaled step, the
accumulator cleared). Nothing is shared between two optimizers.

``ess_lr=None`` still measures the step's ESS (the ``vcpo/*`` metrics) but never scales the
learning rate: the scale is floored at 1 (``min_scale=1``).

GAC and rollout batches: when several optimizer steps reuse one rollout batch, the adapter calls
`SteppedOptimizer.new_rollout_batch` where the trainer starts a new one;
`GradientAlignmentControl.new_rollout_batch` is then called before the next GAC decision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from stable_async.optim.accumulator import StepAccumulator
from stable_async.optim.ess_lr import ESSScaledLR
from stable_async.optim.gac import GradientAlignmentControl
from stable_async.optim.step import StableStep

__all__ = ["SteppedOptimizer"]

_MEASURE_ONLY = {"min_scale": 1.0}  # ESS measured, LR never scaled


class SteppedOptimizer(ESSScaledLR):
    """``optimizer`` wrapped so that ``step()`` is ``StableStep(self, accumulator, gac)()``.

    Args:
        optimizer: the trainer's torch optimizer (or any object with ``param_groups`` and ``step``).
        accumulator: the `StepAccumulator` this optimizer's loss hook records into.
        ess_lr: `ESSScaledLR` keyword arguments (scale the LR by the step's ESS), or ``None``
            (measure the ESS, keep the LR).
        gac: `GradientAlignmentControl` keyword arguments, or ``None``. GAC is built at the first
            step over this optimizer's parameters (the trainable ones; under ZeRO, the partitions
            the wrapped optimizer steps), with ``sharded`` from ``sharded()`` when given.
        on_metrics: called with each step's metrics (``gac/*``, ``vcpo/*``).
        sharded: returns GAC's ``sharded`` argument at the first step (``None``: GAC's default).
        measure_ess: with ``ess_lr=None``, still reduce the accumulator and report the ``vcpo/*``
            step statistics (default); ``False``: a plain step (nothing is recorded then).
    """

    def __init__(
        self,
        optimizer: Any,
        accumulator: StepAccumulator,
        *,
        ess_lr: Mapping[str, Any] | None = None,
        gac: Mapping[str, Any] | None = None,
        on_metrics: Callable[[dict[str, float]], None] | None = None,
        sharded: Callable[[], bool] | None = None,
        measure_ess: bool = True,
    ) -> None:
        super().__init__(optimizer, **(dict(ess_lr) if ess_lr is not None else _MEASURE_ONLY))
        self.scales_lr = ess_lr is not None
        self.gac_settings = None if gac is None else dict(gac)
        self.sharded = sharded
        self.on_metrics = on_metrics
        self.stable_step = StableStep(self, accumulator, ess_lr=self.scales_lr or measure_ess)
        self._new_rollout_batch = False

    @property
    def accumulator(self) -> StepAccumulator:
        return self.stable_step.accumulator

    @property
    def gac(self) -> GradientAlignmentControl | None:
        return self.stable_step.gac

    def new_rollout_batch(self) -> None:
        """A new rollout batch starts: GAC's next decision compares against the previous batch's gradient."""
        self._new_rollout_batch = True

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """GAC, a possible skip, the ESS-scaled step (see `StableStep`); returns the wrapped step's result."""
        if self.gac_settings is not None and self.stable_step.gac is None:
            settings = dict(self.gac_settings)
            if self.sharded is not None:
                settings.setdefault("sharded", self.sharded())
            self.stable_step.gac = GradientAlignmentControl(self.param_groups, **settings)
        if self._new_rollout_batch and self.stable_step.gac is not None:
            self.stable_step.gac.new_rollout_batch()
        self._new_rollout_batch = False
        metrics = self.stable_step(closure)
        if self.on_metrics is not None:
            self.on_metrics(metrics)
        return self.stable_step.last_result
