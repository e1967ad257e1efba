"""From a run path to its report: load, extract the signals, judge, consult the guide, write.

``out_dir`` receives, per run, ``<signal>.png`` for every signal found, ``verdicts.json`` and
``index.html``; a path holding several runs (a benchmark output, several TensorBoard or W&B
runs) gets one sub-directory per run and a top-level ``index.html`` and ``verdicts.json``.
"""

from __future__ import annotations

import fnmatch
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stable_async.runreport.detect import load_runs
from stable_async.runreport.guide import MATCH_ORDER, describe, load_guide, recommend
from stable_async.runreport.names import SIGNAL_BY_KEY
from stable_async.runreport.render import index_page, run_page, save_figure, signal_figure
from stable_async.runreport.runlog import ReportError, RunLog
from stable_async.runreport.signals import SignalSeries, extract, require_signals
from stable_async.runreport.verdicts import Verdict, judge, status_line


@dataclass
class RunReport:
    """One run's report: its signals, the verdicts on them, and the guide rows nearest its drift."""

    run: RunLog
    signals: dict[str, SignalSeries]
    verdicts: list[Verdict]
    guide: list[dict[str, Any]]

    def statuses(self) -> list[str]:
        return [status_line(s) for s in self.signals.values()]

    def guide_lines(self) -> list[str]:
        return [describe(g) for g in self.guide]

    def as_dict(self) -> dict[str, Any]:
        return {
            "run": self.run.name,
            "source": self.run.source,
            "format": self.run.format,
            "signals": {k: s.summary() for k, s in self.signals.items()},
            "verdicts": [v.as_dict() for v in self.verdicts],
            "guide": [{**g, "text": describe(g)} for g in self.guide],
        }

    def text(self) -> str:
        lines = [f"run: {self.run.name}  ({self.run.format}: {self.run.source})"]
        lines += [f"  VERDICT: {v.message}" for v in self.verdicts] or ["  no signal left its band"]
        lines += [f"  guide: {g}" for g in self.guide_lines()]
        lines += [f"  signal: {s}" for s in self.statuses()]
        return "\n".join(lines)


def measured_drift(signals: dict[str, SignalSeries]) -> dict[str, float]:
    """The run's median of each drift signal the guide is indexed by."""
    out = {}
    for key, _, _ in MATCH_ORDER:
        finite = signals[key].finite() if key in signals else []
        if finite:
            out[key] = statistics.median(finite)
    return out


def analyze(run: RunLog, guide: dict[str, Any] | None = None) -> RunReport:
    """Signals, verdicts and the guide's recommendation of one run (`ReportError` if no metric is recognized)."""
    signals = require_signals(run)
    return RunReport(run, signals, judge(signals), recommend(guide or load_guide(), measured_drift(signals)))


def select(runs: list[RunLog], pattern: str | None) -> list[RunLog]:
    """Runs whose name matches ``pattern`` (a glob if it has * ? [, else a substring); all if None."""
    if pattern is None:
        return runs
    glob = any(c in pattern for c in "*?[")
    chosen = [r for r in runs if (fnmatch.fnmatchcase(r.name, pattern) if glob else pattern in r.name)]
    if not chosen:
        names = "; ".join(r.name for r in runs[:8]) + (" …" if len(runs) > 8 else "")
        raise ReportError(f"--run {pattern!r}: matches none of the {len(runs)} runs ({names})")
    return chosen


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "run"


def write_run(report: RunReport, out_dir: Path) -> list[Path]:
    """The run's PNGs, verdicts.json and index.html in ``out_dir``; returns the PNG paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images, pngs = [], []
    for key, series in report.signals.items():
        mine = [v for v in report.verdicts if v.signal == key]
        path = out_dir / f"{key}.png"
        save_figure(signal_figure(series, mine), path)
        images.append((path.name, f"{SIGNAL_BY_KEY[key].title} ({series.metric})"))
        pngs.append(path)
    (out_dir / "verdicts.json").write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    page = run_page(
        f"stable-async report: {report.run.name}",
        report.run.source,
        report.run.format,
        report.verdicts,
        report.statuses(),
        report.guide_lines(),
        images,
    )
    (out_dir / "index.html").write_text(page)
    return pngs


def default_out(path: Path) -> Path:
    return (path if path.is_dir() else path.parent) / "report"


def report_path(
    path: str | Path, out_dir: str | Path | None = None, fmt: str = "auto", run: str | None = None
) -> list[RunReport]:
    """Load every run at ``path`` (``run`` filters by name), write their reports, return them."""
    path = Path(path)
    runs = select(load_runs(path, fmt), run)
    out = Path(out_dir) if out_dir is not None else default_out(path)
    guide = load_guide()
    if len(runs) == 1:
        report = analyze(runs[0], guide)
        write_run(report, out)
        return [report]
    reports = [analyze(r, guide) for r in runs if extract(r)]
    if not reports:
        require_signals(runs[0])  # raises, naming what was logged
    entries = []
    for report in reports:
        name = slug(report.run.name)
        write_run(report, out / name)
        entries.append((f"{name}/index.html", report.run.name, len(report.verdicts)))
    (out / "index.html").write_text(index_page(f"stable-async report: {path}", entries))
    (out / "verdicts.json").write_text(json.dumps([r.as_dict() for r in reports], indent=1) + "\n")
    return reports
