"""What stable-async adds to veRL 0.9.1's actor worker: rollout batches for GAC, policy versions for the losses.

Both sit on ``verl.workers.engine_workers.ActorRolloutRefWorker`` (the actor worker of every
veRL 0.9.1 trainer: ``main_ppo``, ``trainer.v1``, one-step-off-policy, fully async), installed by
the stable-async plugin in every process that imports veRL (`install`):

**One rollout batch per ``update_actor``.** veRL's trainers call ``update_actor(batch)`` once per
rollout batch; the worker steps the optimizer once per mini-batch and PPO epoch inside it. At the
start of each call, the engine's `StableOptimizer` starts a rollout batch
(`StableOptimizer.rollout_batch_begins`), so GAC compares every step of the call with the last
gradient of the previous call, never with another mini-batch of the same batch. An explicit
``gac_rollout_batch_steps=N`` overrides it.

**Policy versions.** veRL's rollout servers stamp every trajectory with the version of the
weights they generated it with: ``min_global_steps`` / ``max_global_steps`` (first and last
version during the trajectory; they differ only for a partial rollout that spanned a weight sync;
veRL keeps no per-token version). That version is the ``global_steps`` argument of the trainer's
``update_weights`` call (``checkpoint_manager.update_weights(global_steps)``, which reaches the
actor worker's ``update_weights`` and the servers' ``set_global_steps``). The batch carries it per
sample in one of two places, by trainer:

* ``main_ppo``, fully async, one-step-off-policy (``DataProto`` batches): the non-tensor fields
  ``min_global_steps`` / ``max_global_steps`` (``AgentLoopWorker._postprocess``, kept by
  ``DataProto.to_tensordict``);
* ``trainer.v1`` (TransferQueue): inside each sample's ``extra_fields`` dict, which the agent loop
  stores as a field (``agent_loop_tq.py``). ``update_actor`` is called with a ``KVBatchMeta``;
  veRL's ``register`` decorator (its ``tqbridge``) fetches the fields into a TensorDict before
  the worker's own method runs, so the versions are read where the loss sees the data.

During an ``update_actor`` call every ``sa_`` loss gets, per micro-batch row:

* ``versions`` ← ``max_global_steps`` (the version veRL's trainers count staleness by: the
  fully-async trainer's ``trajectory_param_versions``, ``trainer.v1``'s
  ``trajectory_staleness``);
* ``current_version`` ← the batch's non-tensor ``current_param_version`` when a driver sets it
  (veRL's fully-async trainer's name for its version; for a ``KVBatchMeta`` an ``extra_info``
  entry, which veRL turns into that non-tensor field), else the ``global_steps`` of this worker's
  last ``update_weights`` call, the newest version the servers have.

So ``current_version − versions`` is veRL's per-trajectory staleness (``current_param_version −
v`` in the fully-async trainer, ``(global_steps − 1) − max_global_steps`` in ``trainer.v1``).
Without a version in the batch, or with no current version known (before the first weight sync,
or a server that reports none), no versions are passed. The versions reach the loss through the
worker's loss function: for the duration of the call it is wrapped so that each micro-batch's
versions are read from the micro-batch veRL hands it (`loss_versions`), in the row order of the
tensors the loss receives.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tensordict import TensorDict

from stable_async.integrations.verl_strict import StrictPluginFailure, strict_mode

logger = logging.getLogger("stable_async.integrations.verl")

VERSION_KEY = "max_global_steps"
EXTRA_FIELDS_KEY = "extra_fields"
CURRENT_KEY = "current_param_version"
_WEIGHTS_VERSION_ATTR = "_stable_async_weights_version"

_VERSIONS: contextvars.ContextVar[tuple[torch.Tensor, int] | None] = contextvars.ContextVar(
    "stable_async_verl_versions", default=None
)


def loss_versions() -> tuple[torch.Tensor, int] | tuple[None, None]:
    """(per-row versions (B,), current version) of the micro-batch the loss is running on, or (None, None)."""
    found = _VERSIONS.get()
    return found if found is not None else (None, None)


def _row_versions(data: Any) -> torch.Tensor | None:
    """``max_global_steps`` per row: a per-sample field (DataProto trainers) or in ``extra_fields`` (``trainer.v1``)."""
    from verl.utils import tensordict_utils as tu

    keys = data.keys()
    if VERSION_KEY in keys:
        values = tu.get(data, VERSION_KEY)
    elif EXTRA_FIELDS_KEY in keys:
        extras = tu.get(data, EXTRA_FIELDS_KEY)
        extras = list(extras) if isinstance(extras, list | tuple) else [extras]
        values = [extra.get(VERSION_KEY) if isinstance(extra, dict) else None for extra in extras]
    else:
        return None
    values = list(values) if isinstance(values, list | tuple) else [values]
    if len(values) != data.batch_size[0] or any(v is None for v in values):
        return None
    return torch.tensor([int(v) for v in values], dtype=torch.long)


def current_version(worker: Any, data: Any) -> int | None:
    """The batch's ``current_param_version``, else the version of the worker's last weight sync (module docstring).

    ``data`` is the TensorDict ``update_actor`` trains on, or the TransferQueue ``KVBatchMeta``
    ``trainer.v1`` passes, whose ``extra_info`` veRL turns into the TensorDict's non-tensor fields.
    """
    from verl.utils import tensordict_utils as tu
    from verl.utils.transferqueue_utils import KVBatchMeta

    if isinstance(data, TensorDict):
        given = tu.get_non_tensor_data(data, CURRENT_KEY, None)
    elif isinstance(data, KVBatchMeta):
        given = (getattr(data, "extra_info", None) or {}).get(CURRENT_KEY)
    else:
        given = None
    if given is not None:
        return int(given)
    synced = getattr(worker, _WEIGHTS_VERSION_ATTR, None)
    return int(synced) if synced is not None else None


def with_versions(loss_fn: Callable[..., Any], current: int) -> Callable[..., Any]:
    """``loss_fn`` that makes each micro-batch's row versions and ``current`` visible to the ``sa_`` loss it runs."""

    @functools.wraps(loss_fn)
    def versioned(*args: Any, data: Any = None, **kwargs: Any) -> Any:
        rows = _row_versions(data) if data is not None else None
        token = _VERSIONS.set((rows, current) if rows is not None else None)
        try:
            return loss_fn(*args, data=data, **kwargs)
        finally:
            _VERSIONS.reset(token)

    return versioned


@contextmanager
def _versions_during(training_worker: Any, current: int | None) -> Iterator[None]:
    loss_fn = getattr(training_worker, "loss_fn", None)
    if current is None or loss_fn is None:
        yield
        return
    training_worker.loss_fn = with_versions(loss_fn, current)
    try:
        yield
    finally:
        training_worker.loss_fn = loss_fn


def _update_actor(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def update_actor(self: Any, data: Any, *args: Any, **kwargs: Any) -> Any:
        from stable_async.integrations.verl_optim import StableOptimizer

        actor = getattr(self, "actor", None)
        optimizer = getattr(getattr(actor, "engine", None), "optimizer", None)
        if isinstance(optimizer, StableOptimizer):
            optimizer.rollout_batch_begins()
        # trainer.v1 passes a TransferQueue KVBatchMeta: veRL's register fetches its data below this hook,
        # so each row's version is read by the wrapped loss, from the micro-batch (with_versions).
        with _versions_during(actor, current_version(self, data)):
            return original(self, data, *args, **kwargs)

    update_actor._stable_async_hook = True  # type: ignore[attr-defined]
    return update_actor


def _update_weights(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def update_weights(self: Any, global_steps: int | None = None, *args: Any, **kwargs: Any) -> Any:
        result = await original(self, global_steps, *args, **kwargs)
        if global_steps is not None:
            setattr(self, _WEIGHTS_VERSION_ATTR, int(global_steps))
        return result

    update_weights._stable_async_hook = True  # type: ignore[attr-defined]
    return update_weights


def install() -> bool:
    """Wrap ``ActorRolloutRefWorker.update_actor`` and ``update_weights`` (module docstring); idempotent.

    Returns False when veRL's worker module cannot be imported here (logged at ERROR level; under
    ``STABLE_ASYNC_STRICT=1`` it raises `StrictPluginFailure`).
    """
    try:
        from verl.workers import engine_workers
    except Exception as exc:
        logger.error(
            "stable-async: veRL's actor worker module failed to import (%s: %s); GAC's rollout batches and the "
            "policy versions are not hooked into update_actor",
            type(exc).__name__,
            exc,
        )
        if strict_mode():
            raise StrictPluginFailure(f"stable-async: veRL worker hooks: {type(exc).__name__}: {exc}") from exc
        return False
    worker = engine_workers.ActorRolloutRefWorker
    for name, hook in (("update_actor", _update_actor), ("update_weights", _update_weights)):
        current = worker.__dict__[name]
        if not getattr(current, "_stable_async_hook", False):
            setattr(worker, name, hook(current))
    return True


__all__ = [
    "CURRENT_KEY",
    "EXTRA_FIELDS_KEY",
    "VERSION_KEY",
    "current_version",
    "install",
    "loss_versions",
    "with_versions",
]
