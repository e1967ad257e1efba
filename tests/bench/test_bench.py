"""The staleness benchmark: a tiny grid end to end, determinism, every method, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from stable_async import cli
from stable_async.bench import report
from stable_async.bench.__main__ import main as bench_main
from stable_async.bench.engine import EngineSettings, RolloutEngine
from stable_async.bench.methods import METHODS
from stable_async.bench.model import ModelConfig, TinyTransformer, generate
from stable_async.bench.presets import PRESETS
from stable_async.bench.tasks import Task
from stable_async.bench.trainer import RunSpec, run

pytest.importorskip("matplotlib")

TINY = PRESETS["tiny"].settings
REQUIRED = ("method", "lag", "seed", "final_success", "collapsed", "auc", "median_ess_ratio", "median_grad_cos")


def _without_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("wall_time_s", "cpu_time_s")}


def test_tiny_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert bench_main(["--preset", "tiny", "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 4  # 2 methods × 2 lags × 1 seed
    for r in records:
        assert all(k in r for k in REQUIRED)
        assert 0.0 <= r["final_success"] <= 1.0 and isinstance(r["collapsed"], bool)
        assert len(r["trace_ess_ratio"]) == TINY.steps
    for name in (
        "runs.csv",
        "summary.csv",
        "run_info.json",
        "success_vs_step_reversal.png",
        "success_vs_lag_reversal.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "ess_trace_reversal.png").exists() and (out / "grad_cos_trace_reversal.png").exists()
    assert "kept" in capsys.readouterr().out  # the terminal table

    md = tmp_path / "docs" / "results.md"
    assert bench_main(["--from", str(out), "--report-md", str(md)]) == 0
    text = md.read_text()
    assert "## Results" in text and "`ppo_tis`" in text and "../out/success_vs_step_reversal.png" in text


def test_same_seed_same_results():
    spec = RunSpec("dppo_topk_tv", lag=2, seed=3, settings=TINY)
    a, b = run(spec), run(spec)
    assert _without_times(a) == _without_times(b)
    assert _without_times(run(dataclasses.replace(spec, seed=4))) != _without_times(a)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_finitely(method):
    settings = dataclasses.replace(TINY, steps=3, eval_every=3)
    record = run(RunSpec(method, lag=1, seed=0, settings=settings))
    assert record["nonfinite_losses"] == 0
    assert all(math.isfinite(x) for x in record["trace_ess_ratio"])


def test_engine_serves_the_snapshot_lag_versions_old():
    task = Task("reversal", 4, 3)
    cfg = ModelConfig(task.vocab, task.seq_len, d_model=16, n_heads=2, n_layers=1)
    engine = RolloutEngine(cfg, task, EngineSettings(lag=2, topk=2), seed=0)
    policy = TinyTransformer(cfg)
    versions = []
    for v in range(5):
        engine.publish(policy, v)
        ro = engine.rollout(task.sample_prompts(2, torch.Generator().manual_seed(v)), group_size=3)
        versions.append(ro.version)
        assert ro.responses.shape == (6, 3) and ro.topk_ids.shape == (6, 3, 2)
        assert (ro.topk_ids == ro.responses.unsqueeze(-1)).any(-1).all()  # the sampled token is in the top-K
    assert versions == [0, 0, 0, 1, 2]


def test_tasks_and_greedy_sampler():
    prompts = torch.tensor([[3, 1, 2, 9]])
    assert Task("reversal", 9, 3).targets(prompts).tolist() == [[2, 1, 3]]
    assert Task("sorting", 9, 3).targets(prompts).tolist() == [[1, 2, 3]]
    cfg = ModelConfig(vocab=10, max_len=7, d_model=16, n_heads=2, n_layers=1)
    model = TinyTransformer(cfg)
    tokens, logits = generate(model, prompts, 3, greedy=True)
    full, _ = model(torch.cat([prompts, tokens], 1)[:, :-1])
    assert torch.allclose(full[:, 3:], logits, atol=1e-5)  # the KV cache reproduces the full pass


def test_collapse_and_kept_definitions():
    base = {"task": "t", "final_entropy": 0.0, "median_ess_ratio": 1.0, "median_grad_cos": 0.0, "cpu_time_s": 1.0}
    records = [
        {**base, "method": "ppo", "lag": 0, "seed": 0, "final_success": 0.8, "auc": 0.4, "collapsed": False},
        {**base, "method": "ppo", "lag": 8, "seed": 0, "final_success": 0.4, "auc": 0.1, "collapsed": True},
    ]
    cells = {c["lag"]: c for c in report.summarize_cells(records)}
    assert cells[8]["kept"] == pytest.approx(0.5) and cells[8]["kept_auc"] == pytest.approx(0.25)
    assert cells[8]["collapses"] == 1 and cells[0]["kept"] == pytest.approx(1.0)


def test_cli_parses(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0 and "bench" in capsys.readouterr().out
    assert cli.main(["bench", "--list"]) == 0
    assert "vcpo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--methods", "no_such_method"])


@pytest.mark.slow
def test_parallel_workers_match_serial(tmp_path):
    args = ["--preset", "tiny", "--no-plots", "--no-progress"]
    assert bench_main([*args, "--out", str(tmp_path / "a"), "--workers", "1"]) == 0
    assert bench_main([*args, "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [_without_times(r) for r in a] == [_without_times(r) for r in b]
