"""Each log format read back from hand-made files (TensorBoard and W&B written by their own writers)."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

from stable_async.runreport import ReportError, extract, load_runs
from stable_async.runreport.readers import tensorboard as tb_reader
from stable_async.runreport.readers import wandb_offline

ESS = [0.9, 0.7, 0.4, 0.2]
STEPS = [10, 20, 30, 40]


def only(runs):
    assert len(runs) == 1
    return runs[0]


def test_jsonl_with_step_key(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "vcpo/ess_ratio": e, "note": "text", "flag": True}) for s, e in zip(STEPS, ESS)]
    path.write_text("\n".join(lines) + "\n\n")
    run = only(load_runs(path))
    assert run.format == "jsonl"
    assert run.metrics["vcpo/ess_ratio"] == [(float(s), e) for s, e in zip(STEPS, ESS)]
    assert "note" not in run.metrics and "flag" not in run.metrics and "step" not in run.metrics


def test_jsonl_without_step_uses_row_index(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("\n".join(json.dumps({"gac/cos": c}) for c in (0.1, 0.2, 0.3)))
    assert only(load_runs(path)).metrics["gac/cos"] == [(0.0, 0.1), (1.0, 0.2), (2.0, 0.3)]


def test_csv_global_step_and_empty_cells(tmp_path):
    path = tmp_path / "log.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["global_step", "actor/pg_clipfrac", "rollout_corr/k3_kl"])
        w.writerows([[5, 0.1, ""], [10, 0.3, 0.02], [15, "", 0.04]])
    run = only(load_runs(path))
    assert run.metrics["actor/pg_clipfrac"] == [(5.0, 0.1), (10.0, 0.3)]
    assert run.metrics["rollout_corr/k3_kl"] == [(10.0, 0.02), (15.0, 0.04)]


def write_trainer_state(path):
    history = [
        {"loss": 0.1, "clip_ratio/region_mean": 0.05, "stable_async/vcpo/ess_ratio": e, "step": s}
        for s, e in zip(STEPS, ESS)
    ]
    history.insert(2, {"eval_loss": 0.3, "step": 20})  # evaluation entries share the step
    path.write_text(json.dumps({"global_step": 40, "log_history": history}))


def test_trainer_state_file_and_checkpoint_dirs(tmp_path):
    write_trainer_state(tmp_path / "trainer_state.json")
    run = only(load_runs(tmp_path / "trainer_state.json"))
    assert run.format == "trainer_state"
    assert run.metrics["stable_async/vcpo/ess_ratio"] == [(float(s), e) for s, e in zip(STEPS, ESS)]
    out = tmp_path / "out"
    for n in (5, 40):
        (out / f"checkpoint-{n}").mkdir(parents=True)
    (out / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 5, "gac/cos": 1}]}))
    write_trainer_state(out / "checkpoint-40" / "trainer_state.json")
    run = only(load_runs(out))  # the latest checkpoint's
    assert len(run.metrics["clip_ratio/region_mean"]) == 4
    assert extract(run)["seq_ess"].values == tuple(ESS)


def test_tensorboard_event_file(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run_a"))
    for s, e in zip(STEPS, ESS):
        writer.add_scalar("train/stable_async/vcpo/ess_ratio", e, s)
        writer.add_scalar("train/clip_ratio/region_mean", 0.01 * s, s)
    writer.close()
    run = only(load_runs(tmp_path))
    assert run.format == "tensorboard" and run.name == "run_a"
    assert [s for s, _ in run.metrics["train/stable_async/vcpo/ess_ratio"]] == [float(s) for s in STEPS]
    assert [v for _, v in run.metrics["train/stable_async/vcpo/ess_ratio"]] == pytest.approx(ESS, rel=1e-6)
    signals = extract(run)
    assert signals["clip_fraction"].values == pytest.approx([0.1, 0.2, 0.3, 0.4], rel=1e-6)


def test_tensorboard_missing_names_the_extra(tmp_path, monkeypatch):
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"")
    real = importlib.import_module

    def refuse(name, *args):
        if name.startswith("tensorboard"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(tb_reader.importlib, "import_module", refuse)
    with pytest.raises(ReportError, match=r"stable-async\[report\]"):
        load_runs(tmp_path)


def test_wandb_history_jsonl_dir(tmp_path):
    run_dir = tmp_path / "wandb" / "offline-run-20260101_000000-abc"
    (run_dir / "files").mkdir(parents=True)
    lines = [
        json.dumps({"_step": s, "_runtime": 1.0, "train/ppo_clip_ratio": 0.1, "train/vllm_kl": 0.01}) for s in STEPS
    ]
    (run_dir / "files" / "wandb-history.jsonl").write_text("\n".join(lines))
    run = only(load_runs(tmp_path))  # the project directory holding wandb/
    assert run.format == "wandb-history" and run.name == run_dir.name
    signals = extract(run)
    assert signals["clip_fraction"].metric == "train/ppo_clip_ratio"
    assert signals["mismatch_kl"].steps == tuple(float(s) for s in STEPS)


def test_wandb_summary_only_is_refused(tmp_path):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "wandb-summary.json").write_text(json.dumps({"gac/cos": 0.3}))
    with pytest.raises(ReportError, match="no history"):
        load_runs(tmp_path)


WANDB_SCRIPT = textwrap.dedent(
    """
    import sys, wandb
    run = wandb.init(dir=sys.argv[1], project="p", mode="offline")
    for s in range(1500):  # > 32 KiB: records cross the log's blocks
        run.log({"actor/vcpo/ess_ratio": 1.0 / (1 + s), "actor/pg_clipfrac": 0.001 * (s % 7)}, step=2 * s)
    run.finish()
    # OpenRLHF's logger: W&B counts its own _step, the trainer's step is the metric train/global_step.
    run = wandb.init(dir=sys.argv[2], project="p", mode="offline")
    for s in range(3):
        run.log({"train/ppo_clip_ratio": 0.1 * s, "train/global_step": 10 * (s + 1)})
    run.finish()
    """
)


def test_wandb_binary_offline_run(tmp_path):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb not installed")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    subprocess.run(
        [sys.executable, "-c", WANDB_SCRIPT, str(tmp_path / "a"), str(tmp_path / "b")], check=True, env=env, timeout=240
    )
    logs = list(tmp_path.glob("a/wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 1 and logs[0].stat().st_size > wandb_offline.BLOCK
    run = only(load_runs(tmp_path / "a"))
    assert run.format == "wandb"
    ess = run.metrics["actor/vcpo/ess_ratio"]
    assert [s for s, _ in ess] == [2.0 * s for s in range(1500)]
    assert [v for _, v in ess] == pytest.approx([1.0 / (1 + s) for s in range(1500)])
    assert extract(run)["seq_ess"].metric == "actor/vcpo/ess_ratio"
    openrlhf = only(load_runs(tmp_path / "b"))
    assert openrlhf.metrics["train/ppo_clip_ratio"] == [(10.0, 0.0), (20.0, 0.1), (30.0, 0.2)]
    assert "train/global_step" not in openrlhf.metrics


def test_wandb_binary_without_wandb_package(tmp_path, monkeypatch):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(wandb_offline.HEADER)
    real = importlib.import_module
    monkeypatch.setattr(
        wandb_offline.importlib,
        "import_module",
        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name.startswith("wandb") else real(name, *a),
    )
    with pytest.raises(ReportError, match="needs the 'wandb' package"):
        load_runs(path)


def test_not_a_wandb_log(tmp_path):
    path = tmp_path / "run-x.wandb"
    path.write_bytes(b"garbage!")
    with pytest.raises(ReportError, match="not a W&B transaction log"):
        load_runs(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "no such file"),
        ("notes.txt", "hello", "unknown log format"),
        ("bad.jsonl", '{"step": 1}\n{oops\n', r"bad.jsonl:2: not a JSON line"),
        ("bad.json", "{", "not valid JSON"),
        ("scalar.json", "3", "expected a list of metric dicts"),
        ("rows.json", "[1, 2]", "record 0 is a int"),
    ],
)
def test_bad_input(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ReportError, match=message):
        load_runs(path)


def test_empty_directory_and_unknown_format_name(tmp_path):
    with pytest.raises(ReportError, match="no run found"):
        load_runs(tmp_path)
    with pytest.raises(ReportError, match="format: expected one of"):
        load_runs(tmp_path, fmt="parquet")
