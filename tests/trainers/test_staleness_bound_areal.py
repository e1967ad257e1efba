"""AReaL: `apply_bound_areal` changes the capacity AReaL's own StalenessManager grants.

Drives AReaL 1.0.4's real ``StalenessManager`` (the capacity check its dispatcher makes before
each rollout submission) and reaches it through a real ``WorkflowExecutor``, the way AReaL's
trainer does (``rollout.workflow_executor.staleness_manager``); the inference engine is only a
version provider here.
"""

from __future__ import annotations

import pytest

from stable_async.integrations.staleness import apply_bound_areal

staleness_manager = pytest.importorskip("areal.infra.staleness_manager")
from areal.api.cli_args import InferenceEngineConfig  # noqa: E402
from areal.infra.workflow_executor import WorkflowExecutor  # noqa: E402


class Engine:
    """The version AReaL's inference engine reports (``get_version``)."""

    def __init__(self, version: int = 0):
        self.version = version

    def get_version(self) -> int:
        return self.version


def manager(max_staleness: int, batch: int = 2, concurrency: int = 1000, version: int = 0):
    return staleness_manager.StalenessManager(
        version_provider=Engine(version),
        max_concurrent_rollouts=concurrency,
        consumer_batch_size=batch,
        max_staleness=max_staleness,
    )


def admitted_before_full(m) -> int:
    """How many rollouts AReaL's capacity rule lets start before it reports no room."""
    count = 0
    while m.get_capacity() > 0:
        m.on_rollout_enqueued()
        m.on_rollout_submitted()
        count += 1
    return count


@pytest.mark.parametrize(("start", "bound"), [(4, 1), (4, 0), (1, 3)])
def test_capacity_follows_the_new_bound(start, bound):
    m = manager(start, batch=2, version=3)
    m.rollout_stat.accepted = 3 * 2  # three steps consumed, as at version 3 of a run
    assert m.get_pending_limit() == (start + 1) * 2
    assert apply_bound_areal(m, bound) == bound
    assert m.max_staleness == bound
    assert m.get_pending_limit() == (bound + 1) * 2
    assert admitted_before_full(m) == (bound + 1) * 2  # (k + t + 1)·B − accepted with t = 3


def test_lowering_mid_run_stops_submission_until_training_catches_up():
    engine = Engine(0)
    m = staleness_manager.StalenessManager(engine, max_concurrent_rollouts=1000, consumer_batch_size=4, max_staleness=3)
    assert admitted_before_full(m) == 16  # (3 + 0 + 1)·4 running
    apply_bound_areal(m, 1)
    assert m.get_capacity() == 8 - 16  # over capacity: nothing more starts
    for _ in range(16):
        m.on_rollout_accepted()
    engine.version = 2  # two training steps later
    assert m.get_capacity() == (1 + 2 + 1) * 4 - 16 == 0
    engine.version = 3
    assert m.get_capacity() == 4


def test_through_the_workflow_executor_capped_at_the_configured_value():
    config = InferenceEngineConfig(max_head_offpolicyness=4, consumer_batch_size=2, max_concurrent_rollouts=64)
    m = manager(config.max_head_offpolicyness, batch=2)
    executor = WorkflowExecutor(config, inference_engine=Engine(), staleness_manager=m)
    assert apply_bound_areal(executor, 2) == 2
    assert m.max_staleness == 2
    assert apply_bound_areal(executor, 32) == 4  # max_head_offpolicyness, the start-up value
    assert m.max_staleness == 4


def test_uninitialized_executor_and_wrong_objects_are_errors():
    config = InferenceEngineConfig(max_head_offpolicyness=4)
    with pytest.raises(RuntimeError, match="initialize"):
        apply_bound_areal(WorkflowExecutor(config, inference_engine=Engine()), 1)  # AReaL's own message
    with pytest.raises(TypeError, match="^rollout: expected an AReaL StalenessManager"):
        apply_bound_areal(object(), 1)
    with pytest.raises(ValueError, match="^bound: expected an integer >= 0, got -1"):
        apply_bound_areal(manager(2), -1)
