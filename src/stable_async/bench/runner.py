"""The grid: every (task, method, lag, seed) run, in parallel worker processes, with a progress bar.

Each run is independent and single-threaded (`trainer.run` sets one torch thread), so ``workers``
processes use ``workers`` cores. Results do not depend on the number of workers or on the order
in which runs finish: every run seeds its own generators from its spec, and the records are
sorted before they are returned.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from stable_async.bench.presets import BenchSettings
from stable_async.bench.trainer import RunSpec, run


def grid(
    methods: Iterable[str], lags: Iterable[int], seeds: Iterable[int], settings: BenchSettings, tasks: Iterable[str]
) -> list[RunSpec]:
    """Every combination. Slow runs (large lag keeps more snapshots) do not differ much; no reordering."""
    return [
        RunSpec(method, lag, seed, replace(settings, task=task))
        for task in tasks
        for method in methods
        for lag in lags
        for seed in seeds
    ]


def _progress(total: int, enabled: bool) -> Any:
    """A tqdm bar, or a plain line per finished run when tqdm is not installed."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="run", desc="bench", dynamic_ncols=True)


def _completed(specs: list[RunSpec], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        for spec in specs:
            yield run(spec)
        return
    # spawn: a clean interpreter per worker (no forked torch thread pools).
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run, spec) for spec in specs]
        for future in cf.as_completed(futures):
            yield future.result()


def run_grid(specs: list[RunSpec], workers: int = 2, progress: bool = True) -> list[dict[str, Any]]:
    bar = _progress(len(specs), progress)
    records, start = [], time.perf_counter()
    for i, record in enumerate(_completed(specs, workers), 1):
        records.append(record)
        note = f"{record['method']} lag={record['lag']} seed={record['seed']}: final {record['final_success']:.2f}"
        if bar is not None:
            bar.set_postfix_str(note)
            bar.update(1)
        elif progress:
            elapsed = time.perf_counter() - start
            print(f"[{i}/{len(specs)} {elapsed:5.0f}s] {note}", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    order = {(s.settings.task, s.method, s.lag, s.seed): i for i, s in enumerate(specs)}
    return sorted(records, key=lambda r: order[(r["task"], r["method"], r["lag"], r["seed"])])
