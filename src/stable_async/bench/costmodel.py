"""Simulated wall-clock: what a training step costs in a synchronous and an asynchronous pipeline.

The tiny benchmark model generates every response in the same time, so its own clock says
nothing about asynchrony. This cost model stands in for an LLM cluster:

* ``slots`` sequences are generated concurrently (actors × concurrent requests per actor);
  a sequence of L tokens occupies a slot for L·``token_time``; lengths are long-tailed,
  log-normal with median ``length_median`` and log-std ``length_sigma``, capped at
  ``length_max`` (reasoning traces: most short, a few very long), drawn from ``seed``;
* a training step on a batch of ``batch`` sequences takes ``train_time``.

Synchronous (lag 0): generate the batch with the current weights (list scheduling of its
sequences on the slots, the batch ends with its last sequence), then train; the two never overlap.

Asynchronous with staleness bound k (AReaL's rollout controller): slots generate continuously;
a new sequence may start only while fewer than (v + k_v + 1)·``batch`` sequences have been started,
v being the trainer's version (steps done), so no sequence is more than k versions older than
the weights it trains. k_v is one bound for every version, or a per-version sequence (a
`stable_async.StalenessGovernor`'s bounds, k_v the bound in force while the trainer holds
version v); when the bound falls, no sequence starts until the trainer has caught up. Batch t
is the t-th group of ``batch`` sequences *to finish*; the trainer starts step t once batch t is
complete and step t − 1 is done. Generation overlaps training,
and a long sequence holds up one slot instead of the whole batch.

`step_end_times` returns the simulated time at which each training step ends; k = 0 in the
asynchronous pipeline gives the synchronous times when ``slots ≥ batch``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from stable_async.checks import check_int


@dataclass(frozen=True)
class CostModel:
    batch: int = 64  # sequences per training step
    slots: int = 32  # sequences generated concurrently (all actors together)
    token_time: float = 1.0  # time units per generated token
    length_median: float = 200.0
    length_sigma: float = 1.0
    length_max: int = 4000
    train_time: float = 1500.0  # time units per training step
    seed: int = 0

    def lengths(self, n: int) -> list[int]:
        """The first n generation lengths of the stream (the same stream for every pipeline)."""
        gen = torch.Generator().manual_seed(self.seed)
        z = torch.randn(n, generator=gen, dtype=torch.float64)
        raw = torch.exp(math.log(self.length_median) + self.length_sigma * z)
        return [int(x) for x in raw.round().clamp(1, self.length_max).tolist()]


def synchronous_times(model: CostModel, steps: int, lengths: list[int] | None = None) -> list[float]:
    """End time of each step: generate the batch (list scheduling on the slots), then train."""
    lengths = model.lengths(steps * model.batch) if lengths is None else lengths
    now, ends = 0.0, []
    for t in range(steps):
        free = [now] * model.slots  # slot free times
        heapq.heapify(free)
        done = now
        for length in lengths[t * model.batch : (t + 1) * model.batch]:
            start = heapq.heappop(free)
            finish = start + length * model.token_time
            done = max(done, finish)
            heapq.heappush(free, finish)
        now = done + model.train_time
        ends.append(now)
    return ends


def _bounds(k: int | Sequence[int], steps: int) -> list[int]:
    """k_v for v = 0 .. steps − 1: one int for every version, or one per version (validated)."""
    if not isinstance(k, Sequence):
        return [check_int("k", k, low=0)] * steps
    if len(k) < steps:
        raise ValueError(f"k: expected an int or one bound per version ({steps}), got {len(k)} bounds")
    return [check_int(f"k[{v}]", x, low=0) for v, x in enumerate(k)][:steps]


def asynchronous_times(
    model: CostModel, steps: int, k: int | Sequence[int], lengths: list[int] | None = None
) -> list[float]:
    """End time of each step with generation overlapping training, staleness bound k (module docstring).

    ``k``: one bound, or the bound k_v of each version v = 0 .. steps − 1 (a longer sequence is
    cut). A discrete-event simulation with two kinds of events, a sequence finishing and a
    training step ending (at equal times the step ends first, so the new version admits
    sequences at once).
    """
    B = model.batch
    ks = _bounds(k, steps)
    lengths = model.lengths((steps + max(ks, default=0) + 1) * B) if lengths is None else lengths
    running: list[float] = []  # finish times of the sequences being generated
    started, finished, idle = 0, 0, model.slots
    version, train_end = 0, math.inf
    ends: list[float] = []
    now = 0.0
    while len(ends) < steps:
        if train_end == math.inf and finished >= (version + 1) * B:
            train_end = now + model.train_time  # batch `version` is complete: train on it
        while idle > 0 and started < min((version + ks[version] + 1) * B, len(lengths)):
            heapq.heappush(running, now + lengths[started] * model.token_time)
            started, idle = started + 1, idle - 1
        next_finish = running[0] if running else math.inf
        if train_end == math.inf and next_finish == math.inf:
            raise RuntimeError("cost model: nothing running and no batch ready (lengths exhausted)")
        if train_end <= next_finish:
            now, train_end = train_end, math.inf
            ends.append(now)
            version += 1
        else:
            now = heapq.heappop(running)
            finished, idle = finished + 1, idle + 1
    return ends


def step_end_times(model: CostModel, steps: int, lag: int | Sequence[int]) -> list[float]:
    """Simulated end time of steps 1..steps: the synchronous pipeline at lag 0, else asynchronous with k = lag.

    A per-version sequence of bounds (a governed run) is always the asynchronous pipeline.
    """
    return synchronous_times(model, steps) if lag == 0 else asynchronous_times(model, steps, lag)
