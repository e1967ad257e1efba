"""`stable-async report` on what a real TRL run writes: its trainer_state.json and its TensorBoard events.

`StableGRPOTrainer` (the real ``GRPOTrainer`` underneath, tiny offline model, stub rollouts that
TRL treats as vLLM's) trains 4 steps with ESS-LR and GAC, reporting to TensorBoard; the report
must find our signals under the names TRL's logger gives them (``stable_async/...`` in
``log_history``, ``train/stable_async/...`` in the event files) with the values TRL logged.
"""

import json

import pytest

from sa_testing import tiny_causal_lm
from stable_async.runreport import load_runs, report_path
from trl_helpers import make_trainer

pytestmark = pytest.mark.trainers
pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("tensorboard")

from stable_async.integrations.trl import StableGRPOTrainer  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory):
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    out = tmp_path_factory.mktemp("trl-run")
    trainer = make_trainer(
        StableGRPOTrainer,
        tiny_causal_lm(tmp_path_factory.mktemp("tiny")),
        out,
        vllm=True,
        trainer_kwargs={"ess_lr": True, "gac": True},
        max_steps=STEPS,
        report_to=["tensorboard"],  # the HF Trainer's callback: events under output_dir/runs/<date>_<host>/
    )
    trainer.train()
    trainer.save_state()
    return out, [h for h in trainer.state.log_history if "loss" in h]


def test_trainer_state_of_a_real_trl_run(trl_run):
    out, logged = trl_run
    (report,) = report_path(out, out / "report")  # the output directory: its trainer_state.json
    assert report.run.format == "trainer_state"
    signals = report.signals
    assert signals["seq_ess"].metric == "stable_async/vcpo/ess_ratio"
    assert list(signals["seq_ess"].values) == [h["stable_async/vcpo/ess_ratio"] for h in logged]
    assert list(signals["seq_ess"].steps) == [float(h["step"]) for h in logged]
    assert signals["lr_scale"].metric == "stable_async/vcpo/lr_scale"
    assert signals["clip_fraction"].metric == "stable_async/actor/pg_clipfrac"  # ours ranks before TRL's
    assert "grad_cos" in signals and "token_ess" in signals
    for key in signals:
        assert (out / "report" / f"{key}.png").is_file()
    saved = json.loads((out / "report" / "verdicts.json").read_text())
    assert saved["signals"]["seq_ess"]["points"] == STEPS


def test_tensorboard_events_of_a_real_trl_run(trl_run):
    out, logged = trl_run
    (run,) = load_runs(out / "runs")
    assert run.format == "tensorboard"
    (report,) = report_path(out / "runs", out / "report-tb")
    seq = report.signals["seq_ess"]
    assert seq.metric == "train/stable_async/vcpo/ess_ratio"
    assert list(seq.values) == pytest.approx([h["stable_async/vcpo/ess_ratio"] for h in logged], rel=1e-6)
    assert report.signals["clip_fraction"].metric == "train/stable_async/actor/pg_clipfrac"
