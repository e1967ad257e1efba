"""Feed a staleness bound (e.g. `stable_async.StalenessGovernor.bound`) to each trainer's own knob.

Translation only: the governor decides k in the core; each function here writes k where the
trainer re-reads its bound, and returns the bound now in effect. None imports its trainer.
Versions are those of the installed releases (TRL 1.16, AReaL 1.0.4, SkyRL 0.3.0, veRL 0.9.1):

* TRL ``async_grpo``: `apply_bound_trl_async` sets ``RolloutQueueDataset.max_staleness``,
  which the queue reader compares with every sample (drops t − v > k). Live.
* AReaL: `apply_bound_areal` sets ``StalenessManager.max_staleness``, which every capacity
  check reads (``get_capacity``: (k + t + 1)·B − (accepted + running); ``get_pending_limit``). Live.
* SkyRL: `apply_bound_skyrl` / `apply_bound_skyrl_async` set
  ``_AsyncStalenessManager.max_staleness_steps``, read by its capacity rule
  (k + t)·B − (accepted + running) before each submission. Live.
* veRL fully async: ``async_training.staleness_threshold`` is read into the rollouter actor at
  start-up and turned into ``max_required_samples`` / ``max_queue_size`` once
  (``FullyAsyncRollouter.set_max_required_samples``, called by ``fully_async_main``);
  `apply_bound_verl_fully_async` re-runs that inside the actor with the new value. For the
  samples already queued, `verl_admission_mask` drops those more than k versions behind.

**The start-up value is the ceiling.** Each trainer sizes something from its bound once, at
start-up: SkyRL its generation buffer (``mini_batch_size · (max_staleness_steps + 1)``; a
larger live bound overfills it and SkyRL stops with an assertion), veRL its message queue
(``max_queue_size``; beyond it the oldest samples are evicted), TRL its in-flight generation
(``max_inflight_tasks``) and LoRA adapter retention, AReaL its LoRA adapter retention
(``max_head_offpolicyness + 2`` versions). So where the object passed in records the start-up
value, a larger k is lowered to it (the return value says what was applied): start the trainer
with its knob at the governor's ``max_bound``, and the governor moves the live value below it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from stable_async.admission import admission_mask
from stable_async.checks import ArgumentTypeError, check_int

__all__ = [
    "SIGNAL_METRICS",
    "apply_bound_areal",
    "apply_bound_skyrl",
    "apply_bound_skyrl_async",
    "apply_bound_trl_async",
    "apply_bound_verl_fully_async",
    "governor_signals",
    "verl_admission_mask",
]

SIGNAL_METRICS = {
    "token_ess_ratio": "rollout_corr/rollout_is_eff_sample_size",
    "mismatch_kl": "rollout_corr/k3_kl",
    "clip_fraction": "actor/pg_clipfrac",
    "grad_cos": "gac/cos",
}
"""`StalenessGovernor.update` argument → the logged metric it reads (veRL's names, which stable-async
emits too): token ESS/N of the applied weights, k3 mismatch KL per token, clipped token fraction,
consecutive-step gradient cosine (GAC). The sequence ESS/N is ``vcpo/ess / vcpo/ess_num_seqs``."""


def governor_signals(metrics: Mapping[str, Any], *, prefix: str = "") -> dict[str, float | None]:
    """The keyword arguments of `StalenessGovernor.update` from one step's logged metrics.

    Reads `SIGNAL_METRICS` (each under ``prefix``, the trainer's prefix for our metrics) and the
    sequence ESS/N ``ess_ratio = vcpo/ess / vcpo/ess_num_seqs`` (`stable_async.StableStep`'s
    step statistics); a metric that is absent gives None (the governor ignores it). Values pass
    through as floats: a NaN is the governor's error, named after its signal.
    """

    def read(name: str) -> float | None:
        value = metrics.get(prefix + name)
        return None if value is None else float(value)

    signals = {arg: read(name) for arg, name in SIGNAL_METRICS.items()}
    ess, seqs = read("vcpo/ess"), read("vcpo/ess_num_seqs")
    signals["ess_ratio"] = ess / seqs if ess is not None and seqs else None
    return signals


def _capped(bound: Any, ceiling: Any) -> int:
    k = check_int("bound", bound, low=0)
    return k if ceiling is None else min(k, int(ceiling))


# ---------------------------------------------------------------------------------------- TRL
def apply_bound_trl_async(trainer: Any, bound: int) -> int:
    """Set TRL ``AsyncGRPOTrainer``'s live staleness bound: its queue reader drops t − v > k.

    ``trl/experimental/async_grpo/async_grpo_trainer.py`` (TRL 1.16): ``RolloutQueueDataset``
    keeps ``max_staleness`` as an attribute and compares ``model_version − sample.model_version``
    with it for every sample it takes from the rollout queue (``__iter__``), so a new value
    applies from the next sample on. The dataset lives in the main process only
    (``trainer._rollout_dataset``, built in ``get_train_dataloader``); on other processes this
    returns the bound without setting anything (they receive batches, they do not read the queue).

    Args:
        trainer: an ``AsyncGRPOTrainer`` whose train dataloader is built (call this from a
            callback during training), or its ``RolloutQueueDataset``.
        bound: the staleness bound k ≥ 0; above the trainer's ``args.max_staleness`` (the
            start-up value) it is lowered to it.

    Returns:
        The bound in effect.
    """
    args = getattr(trainer, "args", None)
    k = _capped(bound, getattr(args, "max_staleness", None))
    if hasattr(trainer, "max_staleness") and hasattr(trainer, "model_version_fn"):
        trainer.max_staleness = k  # the RolloutQueueDataset itself
        return k
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None and not accelerator.is_main_process:
        return k
    dataset = getattr(trainer, "_rollout_dataset", None)
    if dataset is None:
        raise ArgumentTypeError(
            f"trainer: expected an AsyncGRPOTrainer whose train dataloader is built (during training) or its "
            f"RolloutQueueDataset, got {type(trainer).__name__} without a rollout dataset"
        )
    dataset.max_staleness = k
    return k


# -------------------------------------------------------------------------------------- AReaL
def _areal_manager(target: Any) -> Any:
    """AReaL's StalenessManager behind ``target``, looked up the way AReaL's trainer does."""
    if hasattr(target, "version_provider") and hasattr(target, "max_staleness"):  # StalenessManager
        return target
    if hasattr(target, "staleness_manager"):  # RolloutController, WorkflowExecutor
        manager = target.staleness_manager
    elif hasattr(target, "workflow_executor"):  # RemoteInfEngine (SPMD mode)
        manager = target.workflow_executor.staleness_manager
    else:
        manager = None
    if manager is None:
        raise ArgumentTypeError(
            "rollout: expected an AReaL StalenessManager, or a RolloutController / WorkflowExecutor / "
            f"remote inference engine with one (initialized), got {type(target).__name__}"
        )
    return manager


def apply_bound_areal(rollout: Any, bound: int) -> int:
    """Set AReaL's live ``max_head_offpolicyness``: the ``StalenessManager`` capacity rule's k.

    ``areal/infra/staleness_manager.py`` (AReaL 1.0.4): ``get_capacity`` computes
    min(concurrency, (k + t + 1)·B − (accepted + running)) under the manager's lock, and
    ``get_pending_limit`` (k + 1)·B, both from the attribute ``max_staleness`` at every call;
    the dispatcher asks before each submission. The manager is built from
    ``config.max_head_offpolicyness``; this sets the attribute (under the same lock).

    Args:
        rollout: the trainer's rollout engine (``PPOTrainer.rollout``: a ``RolloutController`` in
            single-controller mode, a remote inference engine with a ``workflow_executor``
            otherwise), a ``WorkflowExecutor``, or the ``StalenessManager`` itself.
        bound: the staleness bound k ≥ 0; above ``rollout.config.max_head_offpolicyness`` (the
            start-up value, where ``rollout`` has a config) it is lowered to it.

    Returns:
        The bound in effect.
    """
    config = getattr(rollout, "config", None)
    k = _capped(bound, getattr(config, "max_head_offpolicyness", None))
    manager = _areal_manager(rollout)
    with manager.lock:
        manager.max_staleness = k
    return k


# -------------------------------------------------------------------------------------- SkyRL
def _skyrl_manager(trainer: Any) -> tuple[Any, Any]:
    """(manager, start-up bound or None) for a FullyAsyncRayPPOTrainer or its staleness manager."""
    if hasattr(trainer, "max_staleness_steps") and hasattr(trainer, "acquire_submission_slot"):
        return trainer, None
    manager = getattr(trainer, "_staleness_manager", None)
    if manager is None or not hasattr(manager, "max_staleness_steps"):
        raise ArgumentTypeError(
            "trainer: expected a SkyRL FullyAsyncRayPPOTrainer or its _AsyncStalenessManager, "
            f"got {type(trainer).__name__}"
        )
    return manager, getattr(trainer, "max_staleness_steps", None)


def apply_bound_skyrl(trainer: Any, bound: int) -> int:
    """Set SkyRL's live ``max_staleness_steps`` in its fully async staleness manager.

    ``skyrl/train/fully_async_trainer.py`` (SkyRL 0.3.0): ``_AsyncStalenessManager`` computes
    min(workers − running, (k + t)·B − (accepted + running)) from its attribute
    ``max_staleness_steps`` each time a generation worker asks for a slot. Generation workers
    already blocked re-check when the manager next wakes them (a rollout accepted, the step
    advanced); from a coroutine on the trainer's event loop, `apply_bound_skyrl_async` wakes
    them at once.

    Args:
        trainer: a ``FullyAsyncRayPPOTrainer`` or its ``_AsyncStalenessManager``.
        bound: the staleness bound k ≥ 0; above the trainer's ``max_staleness_steps`` (the
            start-up value, which sized its generation buffer) it is lowered to it.

    Returns:
        The bound in effect.
    """
    manager, ceiling = _skyrl_manager(trainer)
    k = _capped(bound, ceiling)
    manager.max_staleness_steps = k
    return k


async def apply_bound_skyrl_async(trainer: Any, bound: int) -> int:
    """`apply_bound_skyrl` under the manager's condition, waking the generation workers that wait."""
    manager, ceiling = _skyrl_manager(trainer)
    k = _capped(bound, ceiling)
    async with manager._cond:
        manager.max_staleness_steps = k
        manager._cond.notify_all()
    return k


# --------------------------------------------------------------------------------------- veRL
def _set_staleness_threshold(rollouter: Any, bound: int) -> float:
    """Run inside veRL's FullyAsyncRollouter actor: its threshold, at most the start-up value."""
    ceiling = float(rollouter.config.async_training.get("staleness_threshold", 1))
    rollouter.staleness_threshold = min(float(bound), ceiling)
    return float(rollouter.staleness_threshold)


def apply_bound_verl_fully_async(rollouter: Any, bound: int) -> float:
    """Change veRL fully async's ``staleness_threshold`` in the running rollouter actor.

    veRL 0.9.1 reads ``async_training.staleness_threshold`` once, in
    ``FullyAsyncRollouter.__init__`` (``verl/experimental/fully_async_policy/fully_async_rollouter.py``
    line 421), and turns it into ``max_required_samples = required · (s + 1) · trigger_parameter_sync_step``
    and ``max_queue_size`` in ``set_max_required_samples`` (line 491), which ``fully_async_main``
    calls once (line 133); ``_should_pause_generation`` then compares the samples produced since
    the last weight sync with ``max_required_samples``. There is no setter: this sets the
    attribute inside the actor (Ray's ``__ray_call__``) and calls the actor's own
    ``set_max_required_samples`` again, so generation pauses under the new value from its next
    check on. Samples already in the message queue stay there: drop the over-stale ones at
    training time with `verl_admission_mask`.

    s counts *parameter versions* (one per weight sync, every ``trigger_parameter_sync_step``
    trainer steps): the rollouter runs at most s versions' worth of samples ahead, so k = s.
    veRL's default 0.1 is a fraction of one version; the governor's k is whole versions.

    Args:
        rollouter: the ``FullyAsyncRollouter`` actor handle (``FullyAsyncTrainer.rollouter``).
        bound: the staleness bound k ≥ 0 (versions); above the start-up
            ``staleness_threshold`` (which sized the message queue) it is lowered to it.

    Returns:
        The threshold in effect (a float, as veRL keeps it).
    """
    import ray

    k = check_int("bound", bound, low=0)
    applied = ray.get(rollouter.__ray_call__.remote(_set_staleness_threshold, k))
    ray.get(rollouter.set_max_required_samples.remote())
    return float(applied)


def verl_admission_mask(batch: Any, current_version: int, bound: int) -> torch.Tensor:
    """veRL's ``response_mask`` with the samples more than k versions behind cleared.

    A veRL ``DataProto`` from the fully async rollouter carries, per trajectory,
    ``non_tensor_batch["min_global_steps"]`` (the parameter version when its generation started;
    ``max_global_steps`` when it ended, later under partial rollout). A trajectory is admitted
    when ``current_version − min_global_steps ≤ k`` (`stable_async.admission_mask`), every one
    of its tokens then generated by a policy at most k versions old. ``current_version`` is
    the version the rollouter stamps on new samples now (``FullyAsyncTrainer.current_param_version``).

    Returns:
        The new response mask (same shape and dtype as ``batch.batch["response_mask"]``); assign
        it to ``batch.batch["response_mask"]`` before the actor update.
    """
    versions = torch.as_tensor(batch.non_tensor_batch["min_global_steps"].astype("int64"))
    mask = batch.batch["response_mask"]
    return admission_mask(versions.to(mask.device), current_version, bound, mask)
