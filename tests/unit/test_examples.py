"""The examples run end to end (a reduced number of steps, in a subprocess, as a user runs them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_custom_loop_runs_and_prints_metrics():
    out = run_example("custom_loop.py", env={"SA_EXAMPLE_STEPS": "6"})
    steps = re.findall(r"^step +(\d+) +reward ([0-9.]+) .*ESS/N ([0-9.]+) +lr×([0-9.]+) +gac cos", out, re.M)
    assert [int(s[0]) for s in steps] == [0, 5]
    for _, reward, ess_ratio, lr_scale in steps:
        assert 0.0 <= float(reward) <= 1.0
        assert 0.0 < float(ess_ratio) <= 1.0
        assert 0.0 < float(lr_scale) <= 1.0
    assert re.search(r"^done: 6 steps in", out, re.M)
    # GAC compares across rollout batches: the MINI_STEPS gradients of one batch are not projected
    # against each other, so not every optimizer step is projected.
    projected, total = map(int, re.search(r"GAC projected (\d+) of (\d+) optimizer steps", out).groups())
    assert total == 12 and projected < total


def test_custom_loop_steps_argument_wins_over_the_environment():
    out = run_example("custom_loop.py", "--steps", "2", env={"SA_EXAMPLE_STEPS": "50"})
    assert re.search(r"^done: 2 steps in", out, re.M)
