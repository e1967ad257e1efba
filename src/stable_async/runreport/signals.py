"""A run's canonical signals: for each, the series of the highest-priority logged name that maps to it."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from stable_async.runreport.names import SIGNALS, canonical
from stable_async.runreport.runlog import ReportError, RunLog


@dataclass(frozen=True)
class SignalSeries:
    """One canonical signal of a run: the logged ``metric`` it was read from, its steps and values."""

    signal: str
    metric: str  # the logged name it was read from
    steps: tuple[float, ...]
    values: tuple[float, ...]

    def finite(self) -> list[float]:
        return [v for v in self.values if math.isfinite(v)]

    def summary(self) -> dict[str, float | int | str | None]:
        finite = self.finite()
        return {
            "metric": self.metric,
            "points": len(self.values),
            "first_step": self.steps[0],
            "last_step": self.steps[-1],
            "median": statistics.median(finite) if finite else None,
            "min": min(finite) if finite else None,
            "max": max(finite) if finite else None,
            "nan": sum(1 for v in self.values if math.isnan(v)),
            "inf": sum(1 for v in self.values if math.isinf(v)),
        }


def extract(run: RunLog) -> dict[str, SignalSeries]:
    """Canonical signal key → its series, in `SIGNALS` order; a name logged under several wrappers
    keeps the one with the most points."""
    best: dict[str, tuple[int, int, str]] = {}
    for name, points in run.metrics.items():
        match = canonical(name)
        if match is None or not points:
            continue
        signal, rank = match
        key = (rank, -len(points), name)
        if signal not in best or key < best[signal]:
            best[signal] = key
    out = {}
    for s in SIGNALS:
        if s.key in best:
            name = best[s.key][2]
            steps, values = zip(*run.metrics[name])
            out[s.key] = SignalSeries(s.key, name, tuple(steps), tuple(values))
    return out


def require_signals(run: RunLog) -> dict[str, SignalSeries]:
    """`extract`, or a `ReportError` listing what the run logged when nothing maps to a signal."""
    found = extract(run)
    if not found:
        logged = sorted(run.metrics)
        shown = ", ".join(logged[:12]) + (f", … ({len(logged)} in all)" if len(logged) > 12 else "")
        raise ReportError(
            f"{run.source}: no recognized metric (logged: {shown or 'nothing numeric'}); "
            "see docs/report.md for the names read per trainer"
        )
    return found
