"""W&B offline run directories (``wandb/offline-run-*``), read without a login or a network.

What a run directory may hold, in the order tried:

* ``files/wandb-history.jsonl``: one JSON object per ``wandb.log`` call, step in ``_step``
  (older clients, and runs exported with it);
* ``run-<id>.wandb``: the binary transaction log every current client writes. It is framed in
  LevelDB's log format (7-byte file header ``:W&B`` + magic 0xBEE1 + version; 32 KiB blocks of
  records, each with a 4-byte checksum, a 2-byte length and a 1-byte type: full / first /
  middle / last); each record is a ``wandb.proto.wandb_internal_pb2.Record``, whose
  ``history`` records carry W&B's step and the logged items (name in ``key`` or the parts of
  ``nested_key``, joined with ``/``; the value as JSON). A logged step metric (OpenRLHF's and the
  HF Trainer's ``train/global_step``, see `stable_async.runreport.runlog.STEP_KEYS`) is the step
  when present, else W&B's. Parsing it needs the ``wandb``
  package (its protobuf classes); checksums are not verified.
* ``files/wandb-summary.json`` alone (the last value of each metric) is not a history: it is
  refused with a message saying so.
"""

from __future__ import annotations

import importlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stable_async.runreport.readers.tabular import read_jsonl
from stable_async.runreport.runlog import STEP_KEYS, ReportError, RunLog, as_number, step_of

HISTORY = "files/wandb-history.jsonl"
SUMMARY = "files/wandb-summary.json"
HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
RECORD_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / HISTORY).is_file() or any(path.glob("*.wandb")) or (path / SUMMARY).is_file())


def run_dirs(path: Path) -> list[Path]:
    """``path`` itself if it is a run directory, else the run directories in it or in its ``wandb/``."""
    if is_run_dir(path):
        return [path]
    for parent in (path, path / "wandb"):
        if parent.is_dir():
            found = sorted(p for p in parent.iterdir() if p.name != "latest-run" and is_run_dir(p))
            if found:
                return found
    return []


def frames(data: bytes, source: str) -> Iterable[bytes]:
    """The records of a LevelDB-log-framed file (after its 7-byte header)."""
    if not data.startswith(HEADER):
        raise ReportError(f"{source}: not a W&B transaction log (header {data[:7]!r}, expected {HEADER!r})")
    offset, pending = len(HEADER), b""
    while offset + RECORD_HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < RECORD_HEADER:  # the block's tail is padding
            offset += room
            continue
        _, length, kind = struct.unpack_from("<IHB", data, offset)
        offset += RECORD_HEADER
        chunk = data[offset : offset + length]
        offset += length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:  # zero padding at the end of a file still being written
            return


def _record_class() -> Any:
    try:  # imported by name: the package is optional and its generated protobuf module untyped
        wandb_internal_pb2 = importlib.import_module("wandb.proto.wandb_internal_pb2")
    except ImportError:
        raise ReportError(
            "reading a binary .wandb file needs the 'wandb' package (pip install wandb); or export the history "
            f"as {HISTORY} (one JSON object per step)"
        ) from None
    return wandb_internal_pb2.Record


def history_points(path: Path) -> Iterable[tuple[str, float, float]]:
    """(metric, step, value) of every numeric item of the ``history`` records of a ``.wandb`` file."""
    record_cls = _record_class()
    for chunk in frames(path.read_bytes(), str(path)):
        record = record_cls()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") != "history":
            continue
        items = {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
            if item.value_json
        }
        step = step_of(items, record.history.step.num)  # a logged step metric (train/global_step) wins
        for key, raw in items.items():
            value = as_number(raw)
            if value is not None and not key.startswith("_") and key not in STEP_KEYS:
                yield key, step, value


def read_wandb_dir(path: Path) -> RunLog:
    """One W&B offline run directory."""
    if (path / HISTORY).is_file():
        run = read_jsonl(path / HISTORY, name=path.name)
        run.format = "wandb-history"
        return run
    logs = sorted(path.glob("*.wandb"))
    if logs:
        return RunLog.from_points(path.name, str(logs[-1]), "wandb", history_points(logs[-1]))
    raise ReportError(
        f"{path}: only {SUMMARY} (the last value of each metric), no history: nothing to draw against step"
    )


def read_wandb(path: Path) -> list[RunLog]:
    if path.is_file() and path.suffix == ".wandb":
        return [RunLog.from_points(path.parent.name, str(path), "wandb", history_points(path))]
    dirs = run_dirs(path)
    if not dirs:
        raise ReportError(f"{path}: no W&B run directory ({HISTORY} or run-*.wandb)")
    return [read_wandb_dir(d) for d in dirs]
