"""The staleness benchmark's guide as package data, and what it recommends at a measured drift.

The guide is the per-lag table of the benchmark's report (`stable_async.bench.report.guide_table`):
per setting and lag, the drift uncorrected PPO measures there (median sequence ESS/N, token
ESS/N, mismatch KL k3 over its runs) and what it keeps of its synchronous success, next to the
best methods at that lag (the highest mean final success, and every method whose best seed
reaches it). ``guide.json`` is generated from the committed benchmark results by

    python -m stable_async.runreport.write_guide docs/assets/benchmark/results.json

(rerun it whenever those results are regenerated; a test compares the two).

At a run's measured drift, `recommend` picks per setting the lag whose PPO drift is nearest:
by sequence ESS/N if the run logs it, else mismatch KL, else token ESS/N, the distance being
|log x − log x_lag| (ESS/N ≈ exp(−D₂), a Rényi divergence, so log-distance compares drifts).
"""

from __future__ import annotations

import argparse
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

from stable_async.bench.report import REFERENCE, by_setting, guide_selection, summarize_cells

GUIDE_FILE = "guide.json"
#: (run signal, guide field, what it is called) in the order `recommend` tries them.
MATCH_ORDER = (
    ("seq_ess", "ppo_ess_ratio", "sequence ESS/N"),
    ("mismatch_kl", "ppo_mismatch_kl", "mismatch KL"),
    ("token_ess", "ppo_token_ess_ratio", "token ESS/N"),
)
KL_FLOOR = 1e-8  # log-distance of KLs: the synchronous row measures ~0


def _clean(x: Any) -> float | None:
    """A float with 6 significant digits (the committed file stays readable), None for NaN / missing."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return float(f"{float(x):.6g}")


def guide_rows(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The guide table's rows for one setting: the cells `bench.report.guide_selection` picks."""
    rows = []
    for lag, ref, tied in guide_selection(cells):
        rows.append(
            {
                "lag": lag,
                "ppo_ess_ratio": _clean(ref["ess_ratio"]) if ref else None,
                "ppo_token_ess_ratio": _clean(ref["token_ess_ratio"]) if ref else None,
                "ppo_mismatch_kl": _clean(ref["mismatch_kl"]) if ref else None,
                "ppo_kept": _clean(ref["kept"]) if ref else None,
                "best": [{"method": c["method"], "final": _clean(c["final"])} for c in tied],
            }
        )
    return rows


def build_guide(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The guide of a benchmark's results records, one entry per setting."""
    settings = []
    for setting, runs in by_setting(records).items():
        settings.append({"setting": setting, "task": runs[0]["task"], "rows": guide_rows(summarize_cells(runs))})
    return {"reference": REFERENCE, "settings": settings}


def dumps(guide: dict[str, Any]) -> str:
    return json.dumps(guide, indent=1, allow_nan=False) + "\n"


def packaged_path() -> Path:
    return Path(str(resources.files("stable_async.runreport").joinpath(GUIDE_FILE)))


def load_guide(path: str | Path | None = None) -> dict[str, Any]:
    """The packaged guide (or the one at ``path``)."""
    text = Path(path).read_text() if path is not None else packaged_path().read_text()
    guide: dict[str, Any] = json.loads(text)
    return guide


def recommend(guide: dict[str, Any], measured: dict[str, float]) -> list[dict[str, Any]]:
    """Per setting, the guide row nearest the measured drift (``measured``: signal key → value).

    Returns ``[{"setting", "matched_on", "measured", "row"}]``; empty when no drift signal was measured.
    """
    out = []
    for signal, field, _ in MATCH_ORDER:
        value = measured.get(signal)
        if value is None or not math.isfinite(value) or value < 0:
            continue
        for entry in guide["settings"]:
            rows = [r for r in entry["rows"] if r.get(field) is not None]
            if not rows:
                continue

            def distance(row: dict[str, Any], v: float = value, f: str = field) -> float:
                return abs(math.log(max(v, KL_FLOOR)) - math.log(max(row[f], KL_FLOOR)))

            out.append(
                {"setting": entry["setting"], "matched_on": signal, "measured": value, "row": min(rows, key=distance)}
            )
        if out:
            return out
    return out


def describe(rec: dict[str, Any]) -> str:
    """One sentence for a `recommend` entry."""
    name = next(label for signal, _, label in MATCH_ORDER if signal == rec["matched_on"])
    row = rec["row"]

    def num(key: str, fmt: str) -> str:
        return "—" if row.get(key) is None else format(row[key], fmt)

    kept = "—" if row.get("ppo_kept") is None else f"{100 * row['ppo_kept']:.0f}%"
    best = ", ".join(f"{b['method']} {b['final']:.2f}" for b in row["best"])
    return (
        f"benchmark guide, {rec['setting']}: measured {name} {rec['measured']:.4g} (median) "
        f"is nearest lag {row['lag']}, "
        f"where uncorrected PPO measures sequence ESS/N {num('ppo_ess_ratio', '.3f')}, token ESS/N "
        f"{num('ppo_token_ess_ratio', '.3f')}, KL {num('ppo_mismatch_kl', '.4f')} and keeps {kept} of its synchronous "
        f"success; best there (final success): {best}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stable_async.runreport.write_guide",
        description="Write guide.json from a benchmark's results.json.",
    )
    parser.add_argument("results", type=Path, help="the benchmark's results.json (or its output directory)")
    parser.add_argument("--out", type=Path, default=None, help=f"where to write (default: the packaged {GUIDE_FILE})")
    args = parser.parse_args(argv)
    results = args.results / "results.json" if args.results.is_dir() else args.results
    out = args.out or packaged_path()
    out.write_text(dumps(build_guide(json.loads(results.read_text()))))
    print(out)
    return 0
