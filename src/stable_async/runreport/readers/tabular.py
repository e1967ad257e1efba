"""Metric dicts as JSON lines, a JSON list, CSV rows, and TRL's ``trainer_state.json``.

TRL (like every ``transformers.Trainer``) keeps what it logged in ``trainer_state.json``:
``{"log_history": [{"loss": ..., "clip_ratio/region_mean": ..., "step": 10}, ...], ...}``, one
entry per logging call (training and evaluation entries, both with ``step``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from stable_async.runreport.runlog import ReportError, RunLog, from_records


def load_json(path: Path) -> Any:
    """The file's JSON; a `ReportError` naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON ({err})") from None


def read_jsonl(path: Path, name: str | None = None) -> RunLog:
    """One JSON object per line (blank lines skipped)."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}:{number}: not a JSON line ({err})") from None
    return from_records(records, name or path.stem, str(path), "jsonl")


def read_csv(path: Path, name: str | None = None) -> RunLog:
    """A header row, then one row per logging call; empty and non-numeric cells are skipped."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return from_records(rows, name or path.stem, str(path), "csv")


def read_trainer_state(path: Path, name: str | None = None) -> RunLog:
    """TRL's / the HF Trainer's ``trainer_state.json``: its ``log_history``."""
    state = load_json(path)
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ReportError(f"{path}: no 'log_history' list (not a trainer_state.json)")
    return from_records(history, name or path.parent.name, str(path), "trainer_state")


def read_json_records(path: Path, name: str | None = None) -> RunLog:
    """A JSON file holding a list of metric dicts (one per step)."""
    data = load_json(path)
    if isinstance(data, dict) and "log_history" in data:
        return read_trainer_state(path, name)
    if not isinstance(data, list):
        raise ReportError(
            f"{path}: expected a list of metric dicts or a trainer_state.json, got a {type(data).__name__}"
        )
    return from_records(data, name or path.stem, str(path), "json")
