"""veRL fully async: a new threshold reaches the rollouter's own pause rule; stale samples are masked.

``FullyAsyncRollouter`` (veRL 0.9.1) is a Ray actor whose constructor needs datasets and rollout
servers; these tests run its real ``set_max_required_samples`` and ``_should_pause_generation``
(and, in the slow test, Ray's ``__ray_call__`` on a live actor of a subclass that only replaces
the constructor). The message queue client and server manager are the two collaborators those
methods ask (for the queue size and the number of rollout replicas).
"""

from __future__ import annotations

import asyncio
import os
import sys

import numpy as np
import pytest
import torch

import stable_async as sa
from stable_async.integrations import staleness

rollouter_module = pytest.importorskip("verl.experimental.fully_async_policy.fully_async_rollouter")
from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402

Rollouter = rollouter_module.FullyAsyncRollouter.__ray_metadata__.modified_class  # the class inside the actor


class Servers:
    def get_active_server_count(self) -> int:
        return 2


class QueueClient:
    def __init__(self):
        self.size = 0

    async def get_statistics(self) -> dict:
        return {"queue_size": self.size}


def prepare(rollouter, threshold: float, required: int = 4, sync_every: int = 2) -> None:
    """The fields veRL's ``__init__`` sets that its capacity methods read."""
    rollouter.config = OmegaConf.create(
        {"async_training": {"staleness_threshold": threshold, "trigger_parameter_sync_step": sync_every}}
    )
    rollouter.staleness_threshold = threshold
    rollouter.required_samples = required
    rollouter.total_rollout_steps = 1000
    rollouter.concurrent_samples_per_replica = 16
    rollouter.llm_server_manager = Servers()
    rollouter.message_queue_client = QueueClient()
    rollouter._active_count_history = [(0.0, 0, 0)]
    rollouter.staleness_samples = 0
    rollouter.paused = False


def new_rollouter(threshold: float) -> Rollouter:
    rollouter = Rollouter.__new__(Rollouter)
    prepare(rollouter, threshold)
    return rollouter


async def samples_before_pause(rollouter) -> int:
    """How many samples veRL's rollouter generates under one parameter version before it pauses."""
    rollouter.lock = asyncio.Lock()
    await rollouter.set_max_required_samples()
    rollouter.staleness_samples = 0
    while not await rollouter._should_pause_generation():
        rollouter.staleness_samples += 1
    return rollouter.staleness_samples


@pytest.mark.parametrize(("start", "bound", "applied"), [(4.0, 1, 1.0), (4.0, 0, 0.0), (2.0, 8, 2.0)])
def test_new_threshold_changes_when_generation_pauses(start, bound, applied):
    rollouter = new_rollouter(start)
    assert asyncio.run(samples_before_pause(rollouter)) == int(4 * (start + 1) * 2)
    assert rollouter.__ray_call__(staleness._set_staleness_threshold, bound) == applied  # Ray's own entry point
    assert rollouter.staleness_threshold == applied
    assert asyncio.run(samples_before_pause(rollouter)) == int(4 * (applied + 1) * 2)
    assert rollouter.max_queue_size == rollouter.max_required_samples == int(4 * (applied + 1) * 2)


def test_verl_admission_mask_clears_trajectories_older_than_the_bound():
    response_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.int64)
    batch = DataProto.from_dict(
        tensors={"response_mask": response_mask},
        non_tensors={
            "min_global_steps": np.array([7, 5, 4, 6], dtype=object),
            "max_global_steps": np.array([7, 6, 7, 6], dtype=object),
        },
    )
    mask = staleness.verl_admission_mask(batch, current_version=7, bound=2)
    expected = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0], [1, 1, 1]])  # started 3 versions back: dropped
    assert mask.dtype == response_mask.dtype
    assert torch.equal(mask, expected)
    assert torch.equal(staleness.verl_admission_mask(batch, 7, 0), torch.tensor([[1, 1, 0], [0] * 3, [0] * 3, [0] * 3]))


@pytest.mark.slow
def test_apply_bound_reaches_a_live_rollouter_actor(monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("RAY_raylet_start_wait_time_s", "180")  # a loaded CI machine starts the node slowly
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = os.path.dirname(os.path.dirname(sa.__file__))
    pythonpath = os.pathsep.join([src, tests_dir, os.environ.get("PYTHONPATH", "")])

    class LightRollouter(rollouter_module.FullyAsyncRollouter.__ray_actor_class__):
        def __init__(self, threshold):  # veRL's own __init__ builds datasets and servers
            prepare(self, threshold)
            self.lock = asyncio.Lock()

        async def samples_before_pause(self):
            return await samples_before_pause(self)

    # This test module is not importable in the actor's process: send its helpers by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    except Exception as error:  # Ray's own start-up (seen: "node timed out during startup" on a loaded machine)
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        pytest.skip(f"a local Ray node did not start: {error}")
    try:
        actor = ray.remote(max_concurrency=4)(LightRollouter).remote(3.0)
        assert ray.get(actor.samples_before_pause.remote(), timeout=300) == 4 * 4 * 2
        assert staleness.apply_bound_verl_fully_async(actor, 1) == 1.0
        assert ray.get(actor.__ray_call__.remote(lambda r: r.max_required_samples)) == 4 * 2 * 2
        assert ray.get(actor.samples_before_pause.remote()) == 4 * 2 * 2
        assert staleness.apply_bound_verl_fully_async(actor, 10) == 3.0  # the start-up value sized the queue
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_bad_bound_is_refused_before_any_remote_call():
    with pytest.raises(ValueError, match="^bound: expected an int"):
        staleness.apply_bound_verl_fully_async(object(), -1)
