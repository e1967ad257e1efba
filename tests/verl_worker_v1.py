"""veRL 0.9.1's ``trainer.v1`` batches on the real actor worker, on a CPU (run as a script per scenario).

``trainer.v1`` keeps its batch in TransferQueue and calls ``update_actor`` with a ``KVBatchMeta``
(``PPOTrainer._update_actor``); veRL's ``register`` decorator (``tqbridge``) fetches the
fields into a TensorDict before the worker's method runs. `v1_samples` writes samples the way
``trainer.v1``'s agent loop does (``AgentLoopWorkerTQ._agent_loop_postprocess``: veRL's
``AgentLoopOutput.as_dict`` plus the fields and tags it adds, ``min_global_steps`` /
``max_global_steps`` inside ``extra_fields``), then the fields the trainer writes later
(``old_log_probs``, ``entropy``, ``advantages``, ``returns``, ``rm_scores``), all 1-D per sample.

Two transports, one scenario each (same runs, same checks):

* ``v1_tensordict``: the TensorDict ``tqbridge`` hands the method (veRL's
  ``list_of_dict_to_tensordict`` of the samples, which is what TransferQueue returns for them, and
  the meta's ``extra_info`` as non-tensor fields, as ``_async_meta_to_realdata`` assigns them),
  passed to ``update_actor`` directly. Needs no TransferQueue.
* ``v1_transferqueue``: TransferQueue itself (``transfer_queue``, the store ``trainer.v1`` uses) on
  a local Ray instance: the samples and tags go in with ``kv_batch_put`` (agent loop, then the
  trainer's later fields), the batch is reordered as ``_balance_batch`` does (``KVBatchMeta.reorder``),
  and ``update_actor`` receives the ``KVBatchMeta``: veRL's own ``tqbridge`` fetches the data.

``python verl_worker_v1.py SCENARIO MODEL_DIR OUT.json``.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
from functools import partial
from typing import Any

import torch

from verl_worker import (
    BATCH,
    PROMPT_LEN,
    RESPONSE_LEN,
    VOCAB,
    NoCheckpointEngine,
    PolicyBatchSpy,
    actor_config,
    build_worker,
    main,
    update,
    worker_overrides,
)

VERSION_BASE = 0
DATALOADER_STEP = 999
"""The samples' ``global_steps`` (the dataloader step the prompt came from): not a weights version."""
WEIGHTS_SYNC = 6
"""Versions are 2..5 (`VERSION_BASE` + response length): staleness 1..4 after this sync."""
EXTRA_INFO_CURRENT = 9
MINI_BATCH, EPOCHS = 2, 2


def v1_samples(
    seed: int, *, stamped: bool = True
) -> tuple[list[str], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(keys, agent-loop fields, agent-loop tags, the trainer's later fields) for `BATCH` samples.

    Sample i has a response of its own length (a permutation of 2..5 tokens), so a row's version,
    ``max_global_steps`` = `VERSION_BASE` + response length, tells which row it is; odd rows are
    partial rollouts that spanned one weight sync (``min_global_steps`` = max − 1). ``stamped=False``:
    a server that reports no version (``None``, as ``llm_server.py`` then copies it).
    """
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randperm(BATCH, generator=g) + RESPONSE_LEN - BATCH + 1).tolist()
    keys, fields, tags, later = [], [], [], []
    for i, r in enumerate(lengths):
        p = int(torch.randint(1, PROMPT_LEN + 1, (1,), generator=g))
        newest = VERSION_BASE + r if stamped else None
        oldest = newest - i % 2 if newest is not None else None
        output = AgentLoopOutput(
            prompt_ids=torch.randint(3, VOCAB, (p,), generator=g).tolist(),
            response_ids=torch.randint(3, VOCAB, (r,), generator=g).tolist(),
            response_mask=[1] * r,
            response_logprobs=(-math.log(VOCAB) + 0.3 * torch.randn(r, generator=g)).tolist(),
            num_turns=2,
            metrics=AgentLoopMetrics(),
            extra_fields={"min_global_steps": oldest, "max_global_steps": newest, "turn_scores": []},
        )
        field = output.as_dict()
        field.update(uid=f"prompt{i}", session_id=0, global_steps=DATALOADER_STEP)
        field["loss_mask"] = field["response_mask"]
        field["input_ids"] = torch.cat([field["prompts"], field["responses"]])
        field["position_ids"] = torch.arange(p + r)
        field["multi_modal_inputs"] = {}
        keys.append(f"prompt{i}_0_0")
        fields.append(field)
        tags.append({"status": "success", "prompt_len": p, "response_len": r, "seq_len": p + r,
                     "global_steps": DATALOADER_STEP, "min_global_steps": oldest,
                     "max_global_steps": newest})  # fmt: skip
        old = field["rollout_log_probs"] - 0.2 * torch.randn(r, generator=g)
        advantage = torch.randn(1, generator=g).expand(r).clone()
        zeros = torch.zeros(r)
        later.append({"old_log_probs": old, "entropy": zeros, "rm_scores": zeros, "advantages": advantage,
                      "returns": zeros})  # fmt: skip
    return keys, fields, tags, later


def update_actor_extra_info(current_param_version: int | None = None) -> dict[str, Any]:
    """The ``extra_info`` ``PPOTrainer._update_actor`` sets on the batch (shuffled mini-batches, 2 epochs here)."""
    info: dict[str, Any] = {
        "temperature": 1.0,
        "calculate_entropy": False,
        "distillation_use_topk": False,
        "distillation_only": False,
        "global_batch_size": MINI_BATCH,
        "mini_batch_size": MINI_BATCH,
        "epochs": EPOCHS,
        "seed": 42,
        "dataloader_kwargs": {"shuffle": True},
    }
    if current_param_version is not None:
        info["current_param_version"] = current_param_version
    return info


ORDER = [2, 0, 3, 1]
"""The batch order handed to the worker (``_balance_batch`` reorders the keys): not the order written."""


def tensordict_batch(seed: int, extra_info: dict[str, Any], stamped: bool = True) -> Any:
    """What ``tqbridge`` hands ``update_actor`` for these samples in `ORDER` (no TransferQueue)."""
    from verl.utils import tensordict_utils as tu

    _, fields, _, later = v1_samples(seed, stamped=stamped)
    data = tu.list_of_dict_to_tensordict([{**fields[i], **later[i]} for i in ORDER])
    for key, value in extra_info.items():
        tu.assign_non_tensor_data(tensor_dict=data, key=key, val=value)
    return data


class RayDidNotStart(RuntimeError):
    """A local Ray node could not start (the machine, not the code under test)."""


class TransferQueueBatches:
    """TransferQueue on a local Ray instance; `batch` writes samples as ``trainer.v1`` does and returns the meta."""

    def __init__(self) -> None:
        import ray
        import transfer_queue as tq
        from omegaconf import OmegaConf

        # The controller and a storage unit each ask Ray for 1 logical CPU.
        os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")  # a loaded CI machine starts the node slowly
        try:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        except Exception as error:  # Ray's own start-up (e.g. "node timed out during startup")
            ray.shutdown()
            raise RayDidNotStart(f"a local Ray node did not start: {error}") from error
        tq.init(OmegaConf.create({"backend": {"SimpleStorage": {"num_data_storage_units": 1}}}))
        self.tq = tq
        self.written: list[tuple[list[str], str]] = []

    def batch(self, seed: int, extra_info: dict[str, Any], stamped: bool = True) -> Any:
        from verl.utils import tensordict_utils as tu

        keys, fields, tags, later = v1_samples(seed, stamped=stamped)
        keys = [f"s{seed}_{k}" for k in keys]
        self.tq.kv_batch_put(keys=keys, partition_id="train", fields=tu.list_of_dict_to_tensordict(fields), tags=tags)
        self.tq.kv_batch_put(keys=keys, partition_id="train", fields=tu.list_of_dict_to_tensordict(later))
        self.written.append((keys, "train"))
        meta = self.tq.KVBatchMeta(partition_id="train", keys=keys, tags=tags, extra_info=extra_info)
        meta.reorder(ORDER)
        return meta

    def close(self) -> None:
        import ray

        for keys, partition in self.written:
            self.tq.kv_clear(keys=keys, partition_id=partition)
        self.tq.close()
        ray.shutdown()


def scenario_v1(model_path: str, transport: str) -> dict[str, Any]:
    """Versions of ``trainer.v1`` samples into every training call's PolicyBatch, row by row.

    Runs, in order, on one worker (``sa_ppo`` config only, mini-batches of 2, 2 shuffled epochs):
    ``no_sync_yet`` (no current version known), then veRL's ``update_weights(global_steps=6)``,
    ``after_weight_sync`` (current 6), ``current_in_extra_info`` (the meta's
    ``current_param_version`` 9 wins), ``server_without_versions`` (``None`` versions: none passed),
    ``loglinear_ppo_loss`` (``sa_decoupled_ppo`` with
    ``proximal=loglinear`` through ``ppo_loss``, current 6).
    """
    from stable_async.integrations import verl as adapter

    epochs = (f"actor_rollout_ref.actor.ppo_epochs={EPOCHS}",)
    worker, config = build_worker(worker_overrides(model_path, loss_mode="sa_ppo", mini_batch=MINI_BATCH, extra=epochs))
    try:
        store = TransferQueueBatches() if transport == "transferqueue" else None
    except RayDidNotStart as error:
        return {"transport": transport, "skipped": str(error)}
    make = store.batch if store is not None else tensordict_batch
    spy = PolicyBatchSpy()
    out: dict[str, Any] = {"transport": transport, "input_types": []}
    from verl.single_controller.base.decorator import MAGIC_ATTR

    # Under the stable-async hook: veRL's registered method (register, with its tqbridge).
    out["registered_under_hook"] = MAGIC_ATTR in vars(type(worker).update_actor.__wrapped__)

    def run(label: str, seed: int, current: int | None = None, stamped: bool = True) -> dict[str, Any]:
        data = make(seed, update_actor_extra_info(current), stamped)
        out["input_types"].append(type(data).__name__)
        spy.begin(label)
        metrics, _ = update(worker, data)
        return metrics

    try:
        run("no_sync_yet", 0)
        engine = NoCheckpointEngine()
        worker.checkpoint_engine = engine
        asyncio.run(worker.update_weights(global_steps=WEIGHTS_SYNC, mode="no_checkpoint_engine"))
        out["sent"] = engine.sent
        run("after_weight_sync", 1)
        run("current_in_extra_info", 2, current=EXTRA_INFO_CURRENT)
        run("server_without_versions", 4, stamped=False)
        changes = {"policy_loss.loss_mode": "sa_decoupled_ppo", "policy_loss.sa_kwargs": {"proximal": "loglinear"}}
        worker.set_loss_fn(partial(adapter.ppo_loss, config=actor_config(config, **changes)))
        metrics = run("loglinear_ppo_loss", 3)
        out["loglinear_alpha_mean"] = metrics.get("actor/prox_alpha_mean")
    finally:
        spy.restore()
        if store is not None:
            store.close()
    out["runs"] = spy.runs
    out["expected"] = {"version_base": VERSION_BASE, "weights_sync": WEIGHTS_SYNC, "extra_info": EXTRA_INFO_CURRENT}
    return out


SCENARIOS = {
    "v1_tensordict": partial(scenario_v1, transport="tensordict"),
    "v1_transferqueue": partial(scenario_v1, transport="transferqueue"),
}

if __name__ == "__main__":
    main(sys.argv[1:], SCENARIOS)
