"""Smoke test of benchmarks/overhead: the smallest size of each part runs and reports its structure.

No timing thresholds here: performance claims come from the benchmark (docs/performance.md).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "overhead"


@pytest.fixture(scope="module")
def bench_run():
    pytest.importorskip("verl")
    pytest.importorskip("trl")
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("overhead_run", BENCH / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smallest_run_reports_every_part(bench_run, tmp_path, capsys):
    out = tmp_path / "results.json"
    assert bench_run.main(["--smallest", "--markdown", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for title in ("## Losses", "## Top-K divergence", "## GAC and ESS-LR"):
        assert title in text
    assert "| reference | ours |" in text  # Markdown tables

    results = json.loads(out.read_text())
    losses = results["losses"]
    assert {r["case"] for r in losses} == set(bench_run_cases())
    for r in losses:
        for key in ("ratio_batch", "ratio_nocheck", "ratio_prebuilt", "mem_ratio"):
            assert r[key] > 0, (r["case"], key)

    (topk,) = results["topk"]
    assert topk["ratio"] > 0 and topk["ours_extra"] < topk["logits_bytes"]  # no tokens × V temporary

    training = results["training"]
    variants = {r["variant"] for r in training["rows"]}
    assert {"gac full", "gac bf16", "gac sketch", "ess-lr"} <= variants
    full = next(r for r in training["rows"] if r["variant"] == "gac full")
    assert full["state_bytes"] == training["param_bytes"]
    assert set(training["sketch_error"]["max_error"]) and all(
        0 <= e <= 2 for e in training["sketch_error"]["max_error"].values()
    )


def bench_run_cases():
    import losses

    return losses.CASES


def test_rounds_and_compiled_variant(bench_run, tmp_path, capsys):
    """--rounds reports the median and the worst round; --compile adds a column for ppo / gspo_token only."""
    out = tmp_path / "results.json"
    argv = ["--smallest", "--parts", "losses", "--rounds", "2", "--compile", "--json", str(out)]
    assert bench_run.main([*argv, "--cases", "openrlhf:PolicyLoss", "verl:cispo"]) == 0
    text = capsys.readouterr().out
    assert "+batch worst round" in text and "+batch compiled" in text
    rows = {r["case"]: r for r in json.loads(out.read_text())["losses"]}
    ppo, cispo = rows["openrlhf:PolicyLoss"], rows["verl:cispo"]
    assert len(ppo["rounds"]) == 2
    assert ppo["ratio_batch_worst"] == max(r["ratio_batch"] for r in ppo["rounds"])
    assert ppo["ratio_compiled"] > 0 and cispo["ratio_compiled"] is None


def test_reference_mask_forms(bench_run):
    """veRL's references get a bool mask and OpenRLHF's an int64 one (their update paths' forms);
    the float control gives both float32; all describe the same valid tokens."""
    import losses

    x = losses.make_inputs(3, 8)
    native = {fw: losses.reference_mask(fw, x) for fw in ("verl", "openrlhf")}
    assert native["verl"].dtype == torch.bool and native["openrlhf"].dtype == torch.int64
    for fw in ("verl", "openrlhf"):
        control = losses.reference_mask(fw, x, "float")
        assert control.dtype == torch.float32
        assert torch.equal(control != 0, x.mask) and torch.equal(native[fw] != 0, x.mask)
    with pytest.raises(ValueError, match="reference mask form"):
        losses.reference_mask("verl", x, "half")
