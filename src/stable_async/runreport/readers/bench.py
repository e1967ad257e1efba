"""The staleness benchmark's output directory (``stable-async bench --out DIR``): one run per record.

``results.json`` holds one record per (method, lag, staleness model, seed, setting); its
per-step curves are the ``trace_*`` lists (`stable_async.bench.trainer.summarize`), trace entry
i being training step i + 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stable_async.runreport.runlog import ReportError, RunLog

RESULTS = "results.json"
TRACE_PREFIX = "trace_"


def is_bench_records(data: Any) -> bool:
    return isinstance(data, list) and bool(data) and all(isinstance(r, dict) and "method" in r for r in data)


def run_name(record: dict[str, Any]) -> str:
    return f"{record['method']} lag {record['lag']} {record['staleness']} seed {record['seed']} {record['task']}"


def run_of(record: dict[str, Any], source: str) -> RunLog:
    points = (
        (key, float(i + 1), float(v))
        for key, values in record.items()
        if key.startswith(TRACE_PREFIX) and isinstance(values, list)
        for i, v in enumerate(values)
        if isinstance(v, int | float) and not isinstance(v, bool)
    )
    return RunLog.from_points(run_name(record), source, "bench", points)


def read_bench(path: Path) -> list[RunLog]:
    """Every run of a benchmark output (``path`` is the directory or its results.json)."""
    file = path / RESULTS if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{file}: cannot read the benchmark's results ({err})") from None
    if not is_bench_records(data):
        raise ReportError(f"{file}: not the benchmark's results (a list of run records with 'method')")
    return [run_of(r, str(file)) for r in data]
