"""GAC across rollout batches in TRL: ``integrations/trl/gac_num_iterations.py`` on a short run.

With ``num_iterations=2`` every rollout batch is used for two optimizer steps. The adapter tells
GAC where each batch begins, so a synchronous run (near-orthogonal batches) keeps its gradient,
while the control (the same run without that call: the two steps of one batch compared with each
other) projects the second step of every batch, and a synthetic stale-aligned sequence of
rollout-batch gradients is still projected at every step.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.trainers
pytest.importorskip("trl")

SCRIPT = Path(__file__).resolve().parents[2] / "integrations" / "trl" / "gac_num_iterations.py"


def test_gac_keeps_a_synchronous_num_iterations_run_and_projects_stale_batches():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "8", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=True,
    )
    results = json.loads(done.stdout.strip().splitlines()[-1])
    rule, control, stale = results["rule"], results["control"], results["stale"]
    assert rule["steps"] >= 5 and control["steps"] >= 5
    assert rule["mean_norm_removed"] < 0.10
    assert control["projected_frac"] >= 0.4 and control["mean_removed_frac"] > 0.3  # the within-batch pairs
    assert stale["projected_frac"] == 1.0 and stale["mean_removed_frac"] > 0.7
