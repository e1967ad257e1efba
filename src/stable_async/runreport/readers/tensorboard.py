"""TensorBoard event files (``events.out.tfevents.*``), read with the ``tensorboard`` package.

Scalars come either as ``simple_value`` (TF1 summaries) or as one-element tensors (what
``torch.utils.tensorboard`` and TF2 write, plugin ``scalars``); both are read. Each directory
holding event files is one run (its event files merged, as TensorBoard shows them).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stable_async.runreport.runlog import ReportError, RunLog

EVENT_GLOB = "events.out.tfevents.*"
EXTRA = "report"


def _loader() -> tuple[Any, Any]:
    try:  # imported by name: the package is optional and untyped
        loader = importlib.import_module("tensorboard.backend.event_processing.event_file_loader")
        tensor_util = importlib.import_module("tensorboard.util.tensor_util")
    except ImportError:
        raise ReportError(
            f"reading TensorBoard event files needs the 'tensorboard' package: pip install 'stable-async[{EXTRA}]'"
        ) from None
    return loader.EventFileLoader, tensor_util


def event_files(path: Path) -> list[Path]:
    """The event files at ``path`` (a file, or every one under a directory), sorted."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob(EVENT_GLOB) if p.is_file())


def _scalar(value: Any, tensor_util: Any) -> float | None:
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor":
        array = tensor_util.make_ndarray(value.tensor)
        if array.size == 1 and array.dtype.kind in "fiu":
            return float(array.reshape(-1)[0])
    return None


def _points(files: Iterable[Path]) -> Iterable[tuple[str, float, float]]:
    loader_cls, tensor_util = _loader()
    for file in files:
        for event in loader_cls(str(file)).Load():
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                number = _scalar(value, tensor_util)
                if number is not None:
                    yield value.tag, float(event.step), number


def read_tensorboard(path: Path) -> list[RunLog]:
    """One `RunLog` per directory holding event files (named by its path relative to ``path``)."""
    files = event_files(path)
    if not files:
        raise ReportError(f"{path}: no TensorBoard event files ({EVENT_GLOB})")
    by_dir: dict[Path, list[Path]] = {}
    for file in files:
        by_dir.setdefault(file.parent, []).append(file)
    root = path if path.is_dir() else path.parent
    runs = []
    for directory, group in by_dir.items():
        name = str(directory.relative_to(root)) if directory != root else directory.name
        runs.append(RunLog.from_points(name, str(directory), "tensorboard", _points(group)))
    return runs
