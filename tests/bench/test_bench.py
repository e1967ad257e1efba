"""The staleness benchmark: end to end, determinism, every method, the CLI, the report."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from stable_async import cli
from stable_async.bench import report
from stable_async.bench.__main__ import main as bench_main
from stable_async.bench.methods import METHODS, get_method
from stable_async.bench.model import ModelConfig, TinyTransformer, generate
from stable_async.bench.presets import PRESETS
from stable_async.bench.tasks import Task
from stable_async.bench.trainer import RunSpec, run

pytest.importorskip("matplotlib")

TINY = PRESETS["tiny"].blocks[0].settings
REQUIRED = (
    "method",
    "task",
    "lag",
    "staleness",
    "seed",
    "final_success",
    "auc",
    "collapsed",
    "median_ess_ratio",
    "median_token_ess_ratio",
    "median_mismatch_kl",
    "median_grad_cos",
    "sim_time_to_90",
)


def _without_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("wall_time_s", "cpu_time_s")}


def test_tiny_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    assert bench_main(["--preset", "tiny", "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 7  # 2 methods × 3 lags (0, 2, offline) × 1 seed, and governor_ppo_tis at 2
    assert {r["lag"] for r in records} == {0, 2, "offline"}
    governed = [r for r in records if r["method"] == "governor_ppo_tis"]
    assert len(governed) == 1 and len(governed[0]["trace_bound"]) == TINY.steps
    assert all(0 <= k <= 2 for k in governed[0]["trace_bound"]) and governed[0]["sim_total_time"] > 0
    for r in records:
        assert all(k in r for k in REQUIRED), [k for k in REQUIRED if k not in r]
        assert 0.0 <= r["final_success"] <= 1.0 and isinstance(r["collapsed"], bool)
        assert len(r["trace_ess_ratio"]) == TINY.steps and len(r["trace_grad_cos"]) == TINY.steps
        assert r["staleness"] == ("offline" if r["lag"] == "offline" else "bounded")
    for name in (
        "runs.csv",
        "summary.csv",
        "run_info.json",
        "success_vs_step_reversal.png",
        "success_vs_time_reversal.png",
        "governor_vs_time_reversal.png",
    ):
        assert (out / name).stat().st_size > 0, name
    terminal = capsys.readouterr().out
    assert "kept" in terminal and "Governor: `governor_ppo_tis`" in terminal  # the tables and the governor check

    md = tmp_path / "docs" / "results.md"
    assert bench_main(["--from", str(out), "--report-md", str(md)]) == 0
    text = md.read_text()
    assert "`ppo_tis`" in text and "../out/success_vs_step_reversal.png" in text and "offline" in text
    assert "Staleness governor" in text and "../out/governor_vs_time_reversal.png" in text


def test_same_seed_same_results():
    spec = RunSpec("dppo_topk_tv", lag=2, seed=3, settings=TINY)
    a, b = run(spec), run(spec)
    assert _without_times(a) == _without_times(b)
    assert _without_times(run(dataclasses.replace(spec, seed=4))) != _without_times(a)


@pytest.mark.parametrize("method", [*sorted(METHODS), "vcpo@tuned", "ppo@lr=0.002"])
def test_every_method_trains_finitely(method):
    settings = dataclasses.replace(TINY, steps=3, eval_every=3)
    record = run(RunSpec(method, lag=1, seed=0, settings=settings))
    assert record["nonfinite_losses"] == 0
    assert all(math.isfinite(x) for x in record["trace_ess_ratio"])


def test_method_names():
    assert get_method("ppo@lr=0.002").lr == 0.002 and get_method("ppo").lr is None
    for bad in ("nope", "ppo@lr=abc", "ppo@lr=5", "ppo@other"):
        with pytest.raises(ValueError, match="method"):
            get_method(bad)


def test_tasks_rewards_and_demonstrations():
    prompts = torch.tensor([[3, 1, 2, 9]])
    assert Task("reversal", 9, 3).targets(prompts).tolist() == [[2, 1, 3]]
    assert Task("copy", 9, 3).targets(prompts).tolist() == [[3, 1, 2]]
    responses = torch.tensor([[2, 1, 0]])
    assert Task("reversal", 9, 3, "tokens").reward(prompts, responses).item() == pytest.approx(2 / 3)
    assert Task("reversal", 9, 3, "outcome").reward(prompts, responses).item() == 0.0
    assert Task("reversal", 9, 3, "outcome").reward(prompts, torch.tensor([[2, 1, 3]])).item() == 1.0
    task = Task("reversal", 8, 16)
    many = task.sample_prompts(2000, torch.Generator().manual_seed(0))
    demos = task.demonstrations(many, noise=0.3, generator=torch.Generator().manual_seed(1))
    wrong = (demos != task.targets(many)).float().mean().item()
    assert wrong == pytest.approx(0.3 * 7 / 8, abs=0.01)  # a replaced token is right with probability 1/M


def test_kv_cache_sampler_matches_full_pass():
    prompts = torch.tensor([[3, 1, 2, 9]])
    cfg = ModelConfig(vocab=10, max_len=7, d_model=16, n_heads=2, n_layers=1)
    model = TinyTransformer(cfg)
    tokens, logits = generate(model, prompts, 3, greedy=True)
    full, _ = model(torch.cat([prompts, tokens], 1)[:, :-1])
    assert torch.allclose(full[:, 3:], logits, atol=1e-5)
    resumed, resumed_logits = generate(model, torch.cat([prompts, tokens[:, :1]], 1), 2, greedy=True)
    assert torch.equal(resumed, tokens[:, 1:]) and torch.allclose(resumed_logits, logits[:, 1:], atol=1e-5)


def test_cell_summary_offline_flag_and_checks():
    base = {
        "task": "t",
        "reward": "tokens",
        "length": 8,
        "staleness": "bounded",
        "lr": 1e-3,
        "final_entropy": 0.0,
        "median_ess_ratio": 1.0,
        "median_token_ess_ratio": 1.0,
        "median_mismatch_kl": 0.0,
        "median_grad_cos": 0.0,
        "median_within_batch_cos": math.nan,
        "mean_staleness": 0.0,
        "cpu_time_s": 1.0,
        "sim_time_to_90": None,
        "collapsed": False,
    }
    rows = [("ppo", 0, 0.8, 0.4), ("ppo", 8, 0.3, 0.1), ("ppo", "offline", 0.35, 0.2)]
    rows += [("ppo_tis", 0, 0.8, 0.4), ("ppo_tis", 8, 0.7, 0.3), ("ppo_tis", "offline", 0.2, 0.1)]
    records = [
        {**base, "method": m, "lag": lag, "seed": 0, "final_success": f, "auc": a}
        | ({"staleness": "offline"} if lag == "offline" else {})
        for m, lag, f, a in rows
    ]
    cells = {(c["method"], c["lag"]): c for c in report.summarize_cells(records)}
    assert cells[("ppo", 8)]["kept"] == pytest.approx(0.375) and cells[("ppo", 8)]["kept_auc"] == pytest.approx(0.25)
    assert cells[("ppo", 8)]["beats_offline"] is False and cells[("ppo", 0)]["beats_offline"] is True
    assert cells[("ppo", "offline")]["beats_offline"] is None
    lines = report.checks(list(cells.values()))
    assert any("Hard" in line and "met" in line and "NOT" not in line for line in lines)  # 0.375 ≤ 0.5
    assert any("do not beat their offline control" in line and "`ppo` lag 8" in line for line in lines)
    assert any("best cell at lag 8 (`ppo_tis`, 0.70) beats its offline control (0.20)" in line for line in lines)


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
