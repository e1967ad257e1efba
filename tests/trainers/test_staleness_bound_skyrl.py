"""SkyRL: `apply_bound_skyrl(_async)` changes how many groups SkyRL's own staleness manager lets start.

Drives SkyRL 0.3.0's real ``_AsyncStalenessManager`` (``skyrl/train/fully_async_trainer.py``):
its generation workers call ``acquire_submission_slot`` before each group, which waits while
min(workers − running, (k + t)·B − (accepted + running)) ≤ 0.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import typing

import pytest

from stable_async.integrations.staleness import apply_bound_skyrl, apply_bound_skyrl_async


def load_fully_async_trainer():
    """SkyRL's fully async trainer module.

    SkyRL 0.3.0 declares Python ≥ 3.11, but its ``skyrl/tinker/types.py`` (imported on the way)
    builds pydantic models on ``typing.TypedDict``, which pydantic refuses below 3.12; there
    ``typing_extensions.TypedDict`` is the same type, so it stands in while that module loads.
    """
    pytest.importorskip("skyrl")
    if sys.version_info >= (3, 12):
        return importlib.import_module("skyrl.train.fully_async_trainer")
    typing_extensions = pytest.importorskip("typing_extensions")
    original = typing.TypedDict
    typing.TypedDict = typing_extensions.TypedDict  # type: ignore[misc]
    try:
        return importlib.import_module("skyrl.train.fully_async_trainer")
    finally:
        typing.TypedDict = original  # type: ignore[misc]


fully_async = load_fully_async_trainer()


def manager(max_staleness_steps: int, mini_batch_size: int = 2, workers: int = 1000):
    return fully_async._AsyncStalenessManager(
        max_concurrent_generation_groups=workers,
        mini_batch_size=mini_batch_size,
        max_staleness_steps=max_staleness_steps,
    )


async def slots_granted(m, timeout: float = 0.05) -> int:
    """How many groups SkyRL's manager lets start before a worker has to wait."""
    count = 0
    while True:
        try:
            await asyncio.wait_for(m.acquire_submission_slot(), timeout)
        except asyncio.TimeoutError:
            return count
        count += 1


@pytest.mark.parametrize(("start", "bound"), [(4, 1), (4, 0), (0, 2)])
def test_slots_follow_the_new_bound(start, bound):
    m = manager(start, mini_batch_size=3)
    assert apply_bound_skyrl(m, bound) == bound
    assert m.max_staleness_steps == bound
    assert asyncio.run(slots_granted(m)) == (bound + 1) * 3  # (k + t)·B at step t = 1, nothing accepted


def test_async_route_wakes_a_worker_waiting_for_capacity():
    async def scenario():
        m = manager(0, mini_batch_size=2)
        assert await slots_granted(m) == 2
        waiter = asyncio.create_task(m.acquire_submission_slot())  # a generation worker, blocked
        await asyncio.sleep(0.05)
        assert not waiter.done()
        assert await apply_bound_skyrl_async(m, 1) == 1
        await asyncio.wait_for(waiter, 1.0)  # woken by the bound, not by a finished rollout
        assert m._stat.running == 3
        assert await slots_granted(m) == 1  # (1 + 1)·2 − 3

    asyncio.run(scenario())


def test_lowered_bound_holds_back_generation_across_steps():
    async def scenario():
        m = manager(3, mini_batch_size=2)
        assert await slots_granted(m) == 8
        apply_bound_skyrl(m, 1)
        for _ in range(8):
            await m.on_rollout_accepted()
        await m.notify_capacity_change(2)  # one step trained: (1 + 2)·2 − 8 < 0
        assert await slots_granted(m) == 0
        await m.notify_capacity_change(4)
        assert await slots_granted(m) == 2

    asyncio.run(scenario())


def test_trainer_route_caps_at_the_start_up_value():
    trainer = fully_async.FullyAsyncRayPPOTrainer.__new__(fully_async.FullyAsyncRayPPOTrainer)
    trainer.max_staleness_steps = 4  # sized the trainer's generation buffer: B·(4 + 1)
    trainer._staleness_manager = manager(4)
    assert apply_bound_skyrl(trainer, 2) == 2
    assert trainer._staleness_manager.max_staleness_steps == 2
    assert asyncio.run(apply_bound_skyrl_async(trainer, 9)) == 4
    assert trainer._staleness_manager.max_staleness_steps == 4
    assert trainer.max_staleness_steps == 4


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="^trainer: expected a SkyRL FullyAsyncRayPPOTrainer"):
        apply_bound_skyrl(object(), 1)
    m = manager(2)
    with pytest.raises(ValueError, match="^bound: expected an int"):
        apply_bound_skyrl(m, 1.5)
    assert m.max_staleness_steps == 2
