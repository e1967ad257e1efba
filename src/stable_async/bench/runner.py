"""The grid: every (task, method, lag, seed) run, in parallel worker processes, with a progress bar.

Each run is independent and single-threaded (`trainer.run` sets one torch thread), so ``workers``
processes use ``workers`` cores. Results do not depend on the number of workers or on the order
in which runs finish: every run seeds its own generators from its spec, and the records are
sorted before they are returned.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from stable_async.bench.engine import OFFLINE
from stable_async.bench.methods import get_method
from stable_async.bench.presets import Block
from stable_async.bench.trainer import RunSpec, run


def grid(blocks: Iterable[Block]) -> list[RunSpec]:
    """Every (method, lag, seed) of every block, in block order; a governed method has no offline control
    (its bound needs snapshots to choose from)."""
    return [
        RunSpec(method, lag, seed, block.settings)
        for block in blocks
        for method in block.methods
        for lag in block.lags
        if not (lag == OFFLINE and get_method(method).governor is not None)
        for seed in block.seeds
    ]


def spec_key(spec: RunSpec) -> tuple[Any, ...]:
    s = spec.settings
    return (s.task, s.reward, s.length, s.engine.staleness, spec.method, str(spec.lag), spec.seed)


def record_key(r: dict[str, Any]) -> tuple[Any, ...]:
    staleness = r["engine_staleness"]
    return (r["task"], r["reward"], r["length"], staleness, r["method"], str(r["lag"]), r["seed"])


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


def run_grid(
    specs: list[RunSpec], workers: int = 2, progress: bool = True, journal: Path | None = None
) -> list[dict[str, Any]]:
    """Run every spec; with ``journal``, also append each record to that JSON-lines file as it finishes."""
    bar = _progress(len(specs), progress)
    records, start = [], time.perf_counter()
    for i, record in enumerate(_completed(specs, workers), 1):
        records.append(record)
        if journal is not None:
            with open(journal, "a") as f:
                f.write(json.dumps(record) + "\n")
        note = (
            f"{record['task']} {record['method']} lag={record['lag']} {record['staleness']} seed={record['seed']}: "
            f"final {record['final_success']:.2f}"
        )
        if bar is not None:
            bar.set_postfix_str(note)
            bar.update(1)
        elif progress:
            elapsed = time.perf_counter() - start
            print(f"[{i}/{len(specs)} {elapsed:5.0f}s] {note}", file=sys.stderr, flush=True)
    if bar is not None:
        bar.close()
    order = {spec_key(s): i for i, s in enumerate(specs)}
    return sorted(records, key=lambda r: order[record_key(r)])
