"""The packaged guide: regenerated from the committed benchmark results, equal to the report's table."""

from __future__ import annotations

import json
import pathlib

import pytest

from stable_async.bench.report import by_setting, guide_table, summarize_cells
from stable_async.runreport.guide import build_guide, describe, dumps, load_guide, packaged_path, recommend
from stable_async.runreport.guide import main as guide_main

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "assets" / "benchmark" / "results.json"
COMMAND = "python -m stable_async.runreport.write_guide docs/assets/benchmark/results.json"


def test_committed_guide_is_what_the_command_writes(tmp_path):
    out = tmp_path / "guide.json"
    assert guide_main([str(RESULTS), "--out", str(out)]) == 0  # the command, in this process
    assert packaged_path().read_text() == out.read_text(), f"guide.json is stale: rerun `{COMMAND}`"


def test_guide_rows_match_the_benchmark_report_table():
    records = json.loads(RESULTS.read_text())
    guide = build_guide(records)
    for entry, (setting, runs) in zip(guide["settings"], by_setting(records).items(), strict=True):
        assert entry["setting"] == setting
        table = guide_table(summarize_cells(runs)).splitlines()[2:]  # header and rule
        assert len(table) == len(entry["rows"])
        for line, row in zip(table, entry["rows"]):
            lag, ess, tok, kl, kept, best = line.split(maxsplit=5)
            assert lag == str(row["lag"])
            assert ess == f"{row['ppo_ess_ratio']:.3f}" and tok == f"{row['ppo_token_ess_ratio']:.3f}"
            assert kl == f"{row['ppo_mismatch_kl']:.4f}" and kept == f"{100 * row['ppo_kept']:.0f}%"
            assert best.strip() == ", ".join(f"{b['method']} {b['final']:.2f}" for b in row["best"])


GUIDE = {
    "reference": "ppo",
    "settings": [
        {
            "setting": "toy",
            "task": "toy",
            "rows": [
                {"lag": 0, "ppo_ess_ratio": 1.0, "ppo_token_ess_ratio": 1.0, "ppo_mismatch_kl": 0.0, "ppo_kept": 1.0,
                 "best": [{"method": "ppo", "final": 0.9}]},
                {"lag": 4, "ppo_ess_ratio": 0.8, "ppo_token_ess_ratio": 0.99, "ppo_mismatch_kl": 0.01, "ppo_kept": 0.9,
                 "best": [{"method": "ppo_tis", "final": 0.85}]},
                {"lag": 16, "ppo_ess_ratio": 0.2, "ppo_token_ess_ratio": 0.9, "ppo_mismatch_kl": 0.2, "ppo_kept": 0.4,
                 "best": [{"method": "vcpo", "final": 0.8}, {"method": "m2po", "final": 0.79}]},
            ],
        }
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("measured", "signal", "lag"),
    [
        # |log 0.5 − log 0.8| = 0.47 < |log 0.5 − log 0.2| = 0.92: lag 4.
        ({"seq_ess": 0.5, "mismatch_kl": 0.5}, "seq_ess", 4),
        # |log 0.35 − log 0.2| = 0.56 < |log 0.35 − log 0.8| = 0.83: lag 16.
        ({"seq_ess": 0.35}, "seq_ess", 16),
        # no sequence ESS: KL, log-distance with the 1e-8 floor: 1e-6 is nearest the synchronous row.
        ({"mismatch_kl": 1e-6, "token_ess": 0.9}, "mismatch_kl", 0),
        ({"token_ess": 0.91}, "token_ess", 16),
    ],
)
def test_recommend_nearest_row(measured, signal, lag):
    (rec,) = recommend(GUIDE, measured)
    assert rec["matched_on"] == signal and rec["row"]["lag"] == lag


def test_recommend_nothing_measured_and_describe():
    assert recommend(GUIDE, {"grad_cos": 0.3}) == []
    (rec,) = recommend(GUIDE, {"seq_ess": 0.3})
    text = describe(rec)
    assert "nearest lag 16" in text and "vcpo 0.80, m2po 0.79" in text and "keeps 40%" in text


def test_packaged_guide_loads_and_round_trips():
    guide = load_guide()
    assert guide["settings"] and dumps(guide) == packaged_path().read_text()


def test_guide_ships_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "runreport/guide.json" in config["tool"]["setuptools"]["package-data"]["stable_async"]
