"""Policy versions through TRL's asynchronous GRPO data path (``trl.experimental.async_grpo``, TRL 1.16).

TRL stamps every ``RolloutSample`` with ``model_version``, the trainer's version (number of
weight syncs) whose weights generated it. Its queue reader (``RolloutQueueDataset.__iter__``)
compares that with the trainer's ``model_version`` to drop samples staler than
``max_staleness`` and to log ``sample/staleness_*``, then yields a dict without it, so the
collated batch has no versions. `carrying_versions` puts two subclasses in place of TRL's reader
and collator while ``AsyncGRPOTrainer.get_train_dataloader`` builds them (TRL names both classes
there and nowhere else), and nothing else changes:

* `VersionedQueueReader` is TRL's reader, adding the ``model_version`` of the sample it yields
  (the last one its queue returned: TRL's loop yields a sample right after reading it, and
  reads again only after a drop);
* `VersionedCollator` is TRL's collator, adding two tensors that TRL's dispatcher slices per rank
  like its own: ``model_version`` (ranks × samples, per rank in the row's sample order = the
  ``segment_id`` order, −1 padded) and ``current_model_version`` (one per rank), the trainer's
  ``model_version`` when the micro-batch is collated, on the main process, where TRL keeps it
  (it is 0 on the other ranks). That is the version TRL's staleness filter compares with, so
  ``current_model_version − model_version`` is TRL's ``sample/staleness`` of each sample, read
  at collation. The dataloader prefetches one micro-batch: a weight sync between collating a
  micro-batch and training on it is not counted (nor by TRL's filter, which reads the version
  when it dequeues a sample).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from trl.experimental.async_grpo import async_grpo_trainer as trl_async

__all__ = [
    "CURRENT_KEY",
    "VERSION_KEY",
    "VersionedCollator",
    "VersionedQueueReader",
    "carrying_versions",
    "versions_of",
]

VERSION_KEY = "model_version"
CURRENT_KEY = "current_model_version"


class _QueueTap:
    """TRL's rollout queue, remembering the last sample ``get`` returned."""

    def __init__(self, rollout_queue: Any) -> None:
        self._queue = rollout_queue
        self.last: Any = None

    def get(self, *args: Any, **kwargs: Any) -> Any:
        self.last = self._queue.get(*args, **kwargs)
        return self.last

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


class VersionedQueueReader(trl_async.RolloutQueueDataset):
    """TRL's ``RolloutQueueDataset``; each yielded sample also carries its ``model_version``."""

    def __init__(self, rollout_queue: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_QueueTap(rollout_queue), *args, **kwargs)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for example in super().__iter__():
            example[VERSION_KEY] = int(self.queue.last.model_version)
            yield example


@dataclass
class VersionedCollator(trl_async.DataCollatorForRollout):
    """TRL's ``DataCollatorForRollout`` plus the samples' versions and the trainer's (module docstring)."""

    model_version_fn: Callable[[], int] | None = None

    def torch_call(self, examples: list[Any]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        (rows,) = examples
        per_row = [torch.tensor([s.get(VERSION_KEY, -1) for s in row.samples], dtype=torch.long) for row in rows]
        batch[VERSION_KEY] = torch.nn.utils.rnn.pad_sequence(per_row, batch_first=True, padding_value=-1)
        current = self.model_version_fn() if self.model_version_fn is not None else -1
        batch[CURRENT_KEY] = torch.full((self.num_processes,), int(current), dtype=torch.long)
        return batch


@contextlib.contextmanager
def carrying_versions(model_version_fn: Callable[[], int]) -> Iterator[None]:
    """While ``get_train_dataloader`` runs: TRL's reader and collator are the versioned subclasses."""

    def collator(*args: Any, **kwargs: Any) -> VersionedCollator:
        return VersionedCollator(*args, model_version_fn=model_version_fn, **kwargs)

    saved = trl_async.RolloutQueueDataset, trl_async.DataCollatorForRollout
    trl_async.RolloutQueueDataset, trl_async.DataCollatorForRollout = VersionedQueueReader, collator
    try:
        yield
    finally:
        trl_async.RolloutQueueDataset, trl_async.DataCollatorForRollout = saved


def versions_of(inputs: Mapping[str, Any], completions: int) -> tuple[torch.Tensor | None, int | None]:
    """(versions of the rank's first ``completions`` samples, the trainer's version), or (None, None) without them."""
    if VERSION_KEY not in inputs or CURRENT_KEY not in inputs:
        return None, None
    versions = inputs[VERSION_KEY].reshape(-1)[:completions]
    current = int(inputs[CURRENT_KEY].reshape(-1)[0])
    if current < 0 or versions.numel() < completions or bool((versions < 0).any()):
        return None, None
    return versions, current
