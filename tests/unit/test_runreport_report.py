"""End to end: ``stable-async report`` on a benchmark run directory and on a TRL trainer_state.json.

The pictures are checked for the series they should hold (the figure's line data, before saving)
and read back as images that are not blank.
"""

from __future__ import annotations

import json
import math

import pytest

from stable_async.cli import main
from stable_async.runreport import ReportError, load_runs, report_path
from stable_async.runreport.render import signal_figure
from stable_async.runreport.signals import extract

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.image import imread  # noqa: E402


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "tiny"
    args = ["bench", "--preset", "tiny", "--methods", "ppo_tis", "--workers", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0  # lags 0 and 2 and the offline control: 3 runs
    return out


def not_blank(png) -> bool:
    pixels = imread(png)[..., :3]
    return pixels.std() > 0.01 and len({tuple(p) for p in pixels.reshape(-1, 3)[::97].tolist()}) > 5


def test_benchmark_directory(bench_dir, capsys):
    records = json.loads((bench_dir / "results.json").read_text())
    out = bench_dir / "report-out"
    assert main(["report", str(bench_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("run: ") == len(records) and f"{len(records)} run(s)" in printed
    index = (out / "index.html").read_text()
    summary = json.loads((out / "verdicts.json").read_text())
    assert [r["run"] for r in summary] == [run.name for run in load_runs(bench_dir)]
    first = records[0]
    run_dir = out / next(p.name for p in out.iterdir() if p.is_dir() and p.name.startswith("ppo_tis_lag_0_"))
    assert f'href="{run_dir.name}/index.html"' in index
    for key in ("seq_ess", "token_ess", "mismatch_kl", "grad_cos", "staleness"):
        assert not_blank(run_dir / f"{key}.png")
        assert f'src="{key}.png"' in (run_dir / "index.html").read_text()
    own = json.loads((run_dir / "verdicts.json").read_text())
    assert own["signals"]["seq_ess"]["points"] == len(first["trace_ess_ratio"])
    assert own["guide"] and own["guide"][0]["matched_on"] == "seq_ess"


def test_benchmark_run_filter_and_picture_series(bench_dir, tmp_path):
    reports = report_path(bench_dir, tmp_path / "one", run="ppo_tis lag 2")
    assert [r.run.name for r in reports] == ["ppo_tis lag 2 bounded seed 0 reversal"]
    record = next(
        r for r in json.loads((bench_dir / "results.json").read_text()) if r["method"] == "ppo_tis" and r["lag"] == 2
    )
    assert (tmp_path / "one" / "seq_ess.png").is_file()  # a single run: written directly in --out
    series = reports[0].signals["seq_ess"]
    figure = signal_figure(series, reports[0].verdicts)
    (line, threshold) = figure.axes[0].lines
    assert list(line.get_xdata()) == list(range(1, len(record["trace_ess_ratio"]) + 1))
    assert list(line.get_ydata()) == record["trace_ess_ratio"]
    assert list(threshold.get_ydata()) == [0.5, 0.5]
    with pytest.raises(ReportError, match="matches none"):
        report_path(bench_dir, tmp_path / "none", run="no such method")


def trl_state(path, steps=40):
    """A TRL GRPO log_history whose clip ratio leaves its band from step 25 on and whose ESS falls."""
    history = []
    for step in range(1, steps + 1):
        history.append(
            {
                "loss": 0.01,
                "learning_rate": 1e-6,
                "clip_ratio/region_mean": 0.05 if step < 25 else 0.3,
                "clip_ratio/low_mean": 0.01,
                "kl": 0.5,  # KL to the reference model: not a mismatch signal
                "stable_async/vcpo/ess_ratio": 1.0 - step / 50,
                "stable_async/vcpo/lr_scale": math.sqrt(1.0 - step / 50),
                "stable_async/gac/cos": math.nan if step == 1 else 0.1,
                "step": step,
            }
        )
    path.write_text(json.dumps({"global_step": steps, "log_history": history}))


def test_trl_trainer_state(tmp_path, capsys):
    state = tmp_path / "trainer_state.json"
    trl_state(state)
    assert main(["report", str(state)]) == 0
    out = tmp_path / "report"  # default: next to the run
    printed = capsys.readouterr().out
    verdicts = json.loads((out / "verdicts.json").read_text())
    by_signal = {v["signal"]: v for v in verdicts["verdicts"]}
    # clip: steps 25..40 above 0.2, all 16 points from step 25 on.
    assert by_signal["clip_fraction"]["ranges"] == [[25.0, 40.0]] and by_signal["clip_fraction"]["share"] == 1.0
    # ESS/N = 1 − s/50 < 0.5 for s > 25: steps 26..40.
    assert (
        by_signal["seq_ess"]["ranges"] == [[26.0, 40.0]]
        and by_signal["seq_ess"]["metric"] == "stable_async/vcpo/ess_ratio"
    )
    # lr scale sqrt(1 − s/50) < 0.5 for s > 37.5: steps 38..40.
    assert by_signal["lr_scale"]["ranges"] == [[38.0, 40.0]]
    assert "grad_cos" not in by_signal and "mismatch_kl" not in verdicts["signals"]
    assert "clipped fraction above 0.2 in 100% of the logged steps from step 25 on (steps 25–40)" in printed
    for key in ("seq_ess", "clip_fraction", "grad_cos", "lr_scale"):
        assert not_blank(out / f"{key}.png")
    page = (out / "index.html").read_text()
    assert "steps 26–40" in page and "benchmark guide" in page


def test_report_bad_input_exit_code(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"step": 1, "loss": 0.3, "reward": 1.0}) + "\n")
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no recognized metric" in err and "loss, reward" in err


def test_figure_shades_flagged_ranges(tmp_path):
    state = tmp_path / "trainer_state.json"
    trl_state(state)
    signals = extract(load_runs(state)[0])
    from stable_async.runreport.verdicts import judge

    verdicts = [v for v in judge(signals) if v.signal == "clip_fraction"]
    figure = signal_figure(signals["clip_fraction"], verdicts)
    spans = list(figure.axes[0].patches)
    assert len(spans) == 1
    x0, x1 = spans[0].get_x(), spans[0].get_x() + spans[0].get_width()
    assert (x0, x1) == (24.5, 40.5)
