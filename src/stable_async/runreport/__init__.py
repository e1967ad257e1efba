"""``stable-async report``: a finished run's logged signals as pictures and verdicts.

Read a run's metrics (`detect`, `readers`), map each trainer's names to the canonical signals
(`names`, `signals`), judge them against named thresholds (`verdicts`), look the measured drift
up in the staleness benchmark's guide (`guide`), and write PNGs, ``verdicts.json`` and an HTML
page (`render`, `report`). Command line: `command` (``stable-async report RUN``).
"""

from __future__ import annotations

from stable_async.runreport.detect import load_runs
from stable_async.runreport.report import RunReport, analyze, report_path
from stable_async.runreport.runlog import ReportError, RunLog
from stable_async.runreport.signals import SignalSeries, extract
from stable_async.runreport.verdicts import Verdict, judge

__all__ = [
    "ReportError",
    "RunLog",
    "RunReport",
    "SignalSeries",
    "Verdict",
    "analyze",
    "extract",
    "judge",
    "load_runs",
    "report_path",
]
