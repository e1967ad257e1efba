"""Shared by the SkyRL and AReaL adapters: a trainer's own optimizer, stepped by a `stable_async.StableStep`.

Both trainers build their optimizer themselves and call only ``optimizer.step()`` and
``optimizer.zero_grad()`` on it (SkyRL's ``strategy.optimizer_step``, AReaL's
``FSDPEngine.optimizer_step``), in the process that also calls the loss. `install` replaces the
owner's ``optimizer`` attribute by `StableOptimizerWrapper` and points `ProcessAccumulator` at
the step's `stable_async.StepAccumulator`, which the adapters' losses record into.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import stable_async as sa


class ProcessAccumulator:
    """The `stable_async.StepAccumulator` the adapters' losses of this process record into (None: off).

    One policy model per trainer worker process (SkyRL's policy worker, AReaL's actor engine).
    """

    current: sa.StepAccumulator | None = None


class StableOptimizerWrapper:
    """What the trainer steps: ``step()`` runs the `stable_async.StableStep` (GAC, then the ESS-scaled step).

    ``zero_grad()`` also clears the accumulator; ``last_metrics`` are the last step's metrics.
    Every other attribute (``param_groups``, ``state_dict``, what an LR scheduler reads) is the
    wrapped optimizer's.
    """

    def __init__(self, stable_step: sa.StableStep) -> None:
        self._stable_step = stable_step

    @property
    def stable_step(self) -> sa.StableStep:
        return self._stable_step

    @property
    def last_metrics(self) -> dict[str, float]:
        return self._stable_step.last_metrics

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._stable_step(closure)
        return self._stable_step.last_result

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._stable_step.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stable_step.optimizer, name)


def install(
    owner: Any,
    *,
    gac: sa.GradientAlignmentControl | Mapping[str, Any] | None = None,
    ess_lr: bool = True,
    **ess_settings: Any,
) -> StableOptimizerWrapper:
    """Replace ``owner.optimizer`` by a `StableOptimizerWrapper`; idempotent.

    Args:
        owner: the object whose ``optimizer`` attribute the trainer steps.
        gac: a `stable_async.GradientAlignmentControl`, its keyword arguments (a dict), or None.
        ess_lr: scale the LR by the step's ESS (VCPO); the losses record only when True.
        **ess_settings: `stable_async.StableStep`'s ``rule``, ``base_ratio``, ``min_scale``, ``missing``.
    """
    optimizer = owner.optimizer
    if isinstance(optimizer, StableOptimizerWrapper):
        return optimizer
    if isinstance(gac, Mapping):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        gac = sa.GradientAlignmentControl(params, **dict(gac))
    accumulator = sa.StepAccumulator()
    wrapped = StableOptimizerWrapper(sa.StableStep(optimizer, accumulator, gac=gac, ess_lr=ess_lr, **ess_settings))
    owner.optimizer = wrapped
    ProcessAccumulator.current = accumulator if ess_lr else None
    return wrapped


def uninstall() -> None:
    """Stop the adapters' losses of this process from recording."""
    ProcessAccumulator.current = None
