"""TRL async_grpo: `apply_bound_trl_async` changes which samples TRL's own queue reader drops.

Drives TRL 1.16's real ``RolloutQueueDataset`` (the reader ``AsyncGRPOTrainer`` iterates in its
main process) on a queue of samples of known policy versions; only the vLLM server and the
rollout worker process are absent (the queue is filled by hand).
"""

from __future__ import annotations

import os
import queue
from collections import defaultdict

import numpy as np
import pytest
from accelerate import PartialState

from stable_async.integrations.staleness import apply_bound_trl_async

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
async_grpo = pytest.importorskip("trl.experimental.async_grpo.async_grpo_trainer")
from trl.experimental.async_grpo.async_grpo_config import AsyncGRPOConfig  # noqa: E402
from trl.experimental.async_grpo.async_rollout_worker import RolloutSample  # noqa: E402


def sample(version: int, tag: int) -> RolloutSample:
    ids = np.array([tag, tag + 1, tag + 2])
    return RolloutSample(
        prompt=[],
        completion=[],
        input_ids=ids,
        completion_mask=np.array([0, 1, 1]),
        old_log_probs=np.zeros(3),
        advantage=float(tag),
        model_version=version,
        group_id=tag,
        metrics={},
    )


def reader(current_version: dict, max_staleness: int):
    PartialState(cpu=True)  # TRL's reader logs through accelerate's logger, as inside the trainer
    metrics: dict = defaultdict(list)
    dataset = async_grpo.RolloutQueueDataset(
        rollout_queue=queue.Queue(),
        model_version_fn=lambda: current_version["v"],
        check_health_fn=lambda stale_after_s: None,
        stale_after_s=300.0,
        metrics=metrics,
        max_staleness=max_staleness,
        poll_interval_s=0.01,
    )
    return dataset, metrics


def consumed(dataset, samples, count):
    """The advantages (sample tags) of the first ``count`` samples TRL's reader yields."""
    for s in samples:
        dataset.queue.put(s)
    stream = iter(dataset)
    return [next(stream)["advantage"] for _ in range(count)]


def test_lowered_bound_drops_what_trl_kept_before():
    clock = {"v": 10}
    versions = [10, 9, 8, 7, 6, 5]  # staleness 0..5, tagged 0..5
    samples = [sample(v, tag) for tag, v in enumerate(versions)]

    dataset, metrics = reader(clock, max_staleness=4)
    assert consumed(dataset, samples, 5) == [0.0, 1.0, 2.0, 3.0, 4.0]  # staleness 5 is never yielded

    dataset, metrics = reader(clock, max_staleness=4)
    assert apply_bound_trl_async(dataset, 1) == 1
    assert dataset.max_staleness == 1
    fresh = sample(10, 99)  # after the stale ones, so the reader has a third sample to yield
    assert consumed(dataset, [*samples, fresh], 3) == [0.0, 1.0, 99.0]
    assert len(metrics["sample/dropped_stale_total"]) == 4  # staleness 2, 3, 4, 5


def test_bound_changes_between_samples_of_one_iteration():
    clock = {"v": 3}
    dataset, metrics = reader(clock, max_staleness=3)
    stream = iter(dataset)
    for s in (sample(1, 0), sample(1, 1), sample(3, 2)):
        dataset.queue.put(s)
    assert next(stream)["advantage"] == 0.0  # staleness 2 ≤ 3
    apply_bound_trl_async(dataset, 0)
    assert next(stream)["advantage"] == 2.0  # the second staleness-2 sample is dropped under k = 0
    assert len(metrics["sample/dropped_stale_total"]) == 1


def test_trainer_route_sets_the_dataset_and_caps_at_the_start_up_value(tmp_path):
    trainer = async_grpo.AsyncGRPOTrainer.__new__(async_grpo.AsyncGRPOTrainer)
    trainer.args = AsyncGRPOConfig(output_dir=str(tmp_path), max_staleness=3, use_cpu=True, bf16=False, report_to=[])
    with pytest.raises(TypeError, match="trainer: expected an AsyncGRPOTrainer whose train dataloader is built"):
        apply_bound_trl_async(trainer, 2)
    trainer._rollout_dataset, _ = reader({"v": 0}, max_staleness=trainer.args.max_staleness)
    assert apply_bound_trl_async(trainer, 2) == 2
    assert trainer._rollout_dataset.max_staleness == 2
    assert apply_bound_trl_async(trainer, 32) == 3  # the start-up value sized in-flight generation
    assert trainer._rollout_dataset.max_staleness == 3


@pytest.mark.parametrize("bad", [-1, 1.0, True, "2", None])
def test_bad_bound_names_the_argument(bad):
    dataset, _ = reader({"v": 0}, max_staleness=2)
    with pytest.raises(ValueError, match="^bound: expected an int"):
        apply_bound_trl_async(dataset, bad)
    assert dataset.max_staleness == 2
