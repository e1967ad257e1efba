"""Which reader a run path needs, and loading it.

A file: ``trainer_state.json`` (or any JSON object with ``log_history``) → TRL's log history;
the benchmark's ``results.json`` (a list of run records) → its runs; ``*.jsonl`` / ``*.ndjson``
→ JSON lines; another ``*.json`` list → metric dicts; ``*.csv`` → CSV; ``events.out.tfevents.*``
→ TensorBoard; ``*.wandb`` → W&B's transaction log.

A directory, first match wins: the benchmark's ``results.json``; ``trainer_state.json`` (else
the one in the latest ``checkpoint-N/``); a W&B offline run directory (or ``wandb/`` holding
some); TensorBoard event files anywhere below; a single ``*.jsonl`` or ``*.csv``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from stable_async.runreport.readers.bench import RESULTS, is_bench_records, read_bench
from stable_async.runreport.readers.tabular import (
    load_json,
    read_csv,
    read_json_records,
    read_jsonl,
    read_trainer_state,
)
from stable_async.runreport.readers.tensorboard import EVENT_GLOB, event_files, read_tensorboard
from stable_async.runreport.readers.wandb_offline import read_wandb, run_dirs
from stable_async.runreport.runlog import ReportError, RunLog

TRAINER_STATE = "trainer_state.json"


def _one(reader: Callable[[Path], RunLog]) -> Callable[[Path], list[RunLog]]:
    return lambda path: [reader(path)]


READERS: dict[str, Callable[[Path], list[RunLog]]] = {
    "jsonl": _one(read_jsonl),
    "csv": _one(read_csv),
    "json": _one(read_json_records),
    "trainer_state": _one(read_trainer_state),
    "tensorboard": read_tensorboard,
    "wandb": read_wandb,
    "bench": read_bench,
}
FORMATS = ("auto", *READERS)


def _latest_checkpoint_state(path: Path) -> Path | None:
    states = [
        (int(m.group(1)), p)
        for p in path.glob(f"checkpoint-*/{TRAINER_STATE}")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.parent.name))
    ]
    return max(states)[1] if states else None


def _json_kind(path: Path) -> str:
    data = load_json(path)
    if isinstance(data, dict) and "log_history" in data:
        return "trainer_state"
    return "bench" if is_bench_records(data) else "json"


def detect_file(path: Path) -> str:
    name = path.name
    if name.startswith("events.out.tfevents."):
        return "tensorboard"
    if path.suffix == ".wandb":
        return "wandb"
    if path.suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if path.suffix == ".csv":
        return "csv"
    if path.suffix == ".json":
        return _json_kind(path)
    raise ReportError(
        f"{path}: unknown log format (expected .jsonl, .csv, .json, trainer_state.json, {EVENT_GLOB} or .wandb)"
    )


def detect_dir(path: Path) -> tuple[str, Path]:
    if (path / RESULTS).is_file() and _json_kind(path / RESULTS) == "bench":
        return "bench", path
    if (path / TRAINER_STATE).is_file():
        return "trainer_state", path / TRAINER_STATE
    checkpoint = _latest_checkpoint_state(path)
    if checkpoint is not None:
        return "trainer_state", checkpoint
    if run_dirs(path):
        return "wandb", path
    if event_files(path):
        return "tensorboard", path
    tables = sorted([*path.glob("*.jsonl"), *path.glob("*.csv")])
    if len(tables) == 1:
        return detect_file(tables[0]), tables[0]
    found = f" ({len(tables)} .jsonl/.csv files: name one)" if tables else ""
    raise ReportError(
        f"{path}: no run found{found}; looked for the benchmark's {RESULTS}, {TRAINER_STATE} (also in checkpoint-N/), "
        f"a W&B offline run directory, TensorBoard {EVENT_GLOB} files, a single .jsonl or .csv"
    )


def load_runs(path: str | Path, fmt: str = "auto") -> list[RunLog]:
    """Every run at ``path`` (one, except a benchmark output or several TensorBoard / W&B runs)."""
    if fmt not in FORMATS:
        raise ReportError(f"format: expected one of {list(FORMATS)}, got {fmt!r}")
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such file or directory")
    target = path
    if fmt == "auto":
        fmt, target = detect_dir(path) if path.is_dir() else (detect_file(path), path)
    runs = READERS[fmt](target)
    if not runs:
        raise ReportError(f"{path}: no run in it ({fmt})")
    return runs
