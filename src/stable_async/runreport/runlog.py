"""A finished run's logged metrics, as every reader returns them: metric name → (step, value) points."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: Keys that carry the step in a record, in the order they are looked for: ours and veRL's
#: ``step``, HF Trainer's ``global_step``, OpenRLHF's W&B ``train/global_step``, W&B's ``_step``.
STEP_KEYS = ("step", "global_step", "train/global_step", "trainer/global_step", "_step")


class ReportError(ValueError):
    """A run that cannot be reported: missing file, unknown format, no recognized metric."""


@dataclass
class RunLog:
    """One run: ``metrics[name]`` is that metric's (step, value) points, sorted by step.

    A step logged twice keeps its last value (TRL and W&B may log a step's metrics in pieces).
    Values may be NaN or ±inf: the verdicts report them.
    """

    name: str
    source: str
    format: str
    metrics: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    @classmethod
    def from_points(cls, name: str, source: str, fmt: str, points: Iterable[tuple[str, float, float]]) -> RunLog:
        """From (metric, step, value) triples in logging order."""
        by_name: dict[str, dict[float, float]] = {}
        for metric, step, value in points:
            by_name.setdefault(metric, {})[step] = value
        metrics = {k: sorted(v.items()) for k, v in by_name.items()}
        return cls(name=name, source=source, format=fmt, metrics=metrics)


def as_number(value: Any) -> float | None:
    """A logged value as a float, or None when it is not a number (a bool, a string that is no number, a list)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def step_of(record: Mapping[str, Any], index: int) -> float:
    """The record's step (the first of `STEP_KEYS` that holds a finite number), else its row index."""
    for key in STEP_KEYS:
        step = as_number(record.get(key))
        if step is not None and math.isfinite(step):
            return step
    return float(index)


def from_records(records: Iterable[Mapping[str, Any]], name: str, source: str, fmt: str) -> RunLog:
    """One record per logging call (a metrics dict); numeric fields become metrics, step keys excepted."""

    def points() -> Iterable[tuple[str, float, float]]:
        for index, record in enumerate(records):
            if not isinstance(record, Mapping):
                raise ReportError(f"{source}: record {index} is a {type(record).__name__}, expected a dict of metrics")
            step = step_of(record, index)
            for key, raw in record.items():
                value = as_number(raw)
                if value is not None and key not in STEP_KEYS:
                    yield str(key), step, value

    return RunLog.from_points(name, source, fmt, points())
