"""``stable-async report RUN``: the command line of `stable_async.runreport.report.report_path`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stable_async.runreport.detect import FORMATS
from stable_async.runreport.report import default_out, report_path
from stable_async.runreport.runlog import ReportError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, metavar="RUN", help="a log file or a run directory (format detected)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN's directory/report)")
    p.add_argument("--format", choices=FORMATS, default="auto", help="the log format (default: detected)")
    p.add_argument("--run", default=None, help="only the runs whose name contains this (or matches this glob)")


def run(args: argparse.Namespace) -> int:
    try:
        reports = report_path(args.path, args.out, args.format, args.run)
    except ReportError as err:
        print(f"stable-async report: error: {err}", file=sys.stderr)
        return 2
    for report in reports:
        print(report.text())
        print()
    out = args.out or default_out(args.path)
    print(f"{len(reports)} run(s); pictures, verdicts.json and index.html in {out}/")
    return 0
