"""From run records to what people read: per-cell summaries, the terminal table, JSON, CSV, Markdown.

A *cell* is one (task, method, lag) over its seeds. Definitions (also in docs/benchmark.md):

* ``final``: a run's greedy success, mean of its last 10% of evaluations; the cell shows the
  mean over seeds ± the standard deviation, and the [min, max] over seeds.
* ``kept``: final at this lag / final of the *same method* at lag 0 (mean over seeds each), the
  fraction of its own synchronous success a method keeps. [min, max]: each seed's final over
  the lag-0 mean. ``kept_auc``: the same with the area under the success curve (``auc``, the
  mean success over all evaluations), which still separates methods that all end at 1.0.
* ``vs_sync_ppo``: final / final of uncorrected PPO at lag 0 (the absolute reference).
* ``collapses``: runs with a non-finite loss, or whose final success is below half their peak
  (peak ≥ 0.1).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CURVE_FIELDS = ("eval_steps", "success", "entropy", "trace_ess_ratio", "trace_grad_cos", "trace_reward")
AIM_LAG, AIM_KEPT = 32, 0.98


def _ratio(a: float, b: float | None) -> float:
    return a / b if b else math.nan


def summarize_cells(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (task, method, lag), in the order the records come in."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"], r["lag"]), []).append(r)

    def mean_of(task: str, method: str, lag: int, field: str) -> float | None:
        runs = groups.get((task, method, lag))
        return statistics.fmean(r[field] for r in runs) if runs else None

    cells = []
    for (task, method, lag), runs in groups.items():
        finals = [r["final_success"] for r in runs]
        aucs = [r["auc"] for r in runs]
        sync = mean_of(task, method, 0, "final_success")
        cells.append(
            {
                "task": task,
                "method": method,
                "lag": lag,
                "seeds": len(runs),
                "final": statistics.fmean(finals),
                "final_std": statistics.pstdev(finals),
                "final_min": min(finals),
                "final_max": max(finals),
                "kept": _ratio(statistics.fmean(finals), sync),
                "kept_min": _ratio(min(finals), sync),
                "kept_max": _ratio(max(finals), sync),
                "auc": statistics.fmean(aucs),
                "auc_std": statistics.pstdev(aucs),
                "kept_auc": _ratio(statistics.fmean(aucs), mean_of(task, method, 0, "auc")),
                "vs_sync_ppo": _ratio(statistics.fmean(finals), mean_of(task, "ppo", 0, "final_success")),
                "collapses": sum(r["collapsed"] for r in runs),
                "entropy": statistics.fmean(r["final_entropy"] for r in runs),
                "ess_ratio": statistics.median(r["median_ess_ratio"] for r in runs),
                "grad_cos": statistics.median(r["median_grad_cos"] for r in runs),
                "cpu_s": statistics.fmean(r["cpu_time_s"] for r in runs),
            }
        )
    return cells


# ---------------------------------------------------------------------------------- formatting
def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.0f}%"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def cell_table(cells: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """One row per (method, lag): absolute and relative success, area, collapses, diagnostics."""
    header = ["method", "lag", "final ± sd", "[min, max]", "kept", "kept [min, max]", "vs sync PPO"]
    header += ["AUC", "kept AUC", "collapses", "entropy", "ESS/N", "grad cos", "cpu s/run"]
    rows = []
    for c in cells:
        rows.append(
            [
                c["method"] if not markdown else f"`{c['method']}`",
                str(c["lag"]),
                f"{c['final']:.3f} ± {c['final_std']:.3f}",
                f"[{c['final_min']:.2f}, {c['final_max']:.2f}]",
                _pct(c["kept"]),
                f"[{_pct(c['kept_min'])}, {_pct(c['kept_max'])}]",
                _pct(c["vs_sync_ppo"]),
                f"{c['auc']:.3f}",
                _pct(c["kept_auc"]),
                f"{c['collapses']}/{c['seeds']}",
                f"{c['entropy']:.2f}",
                f"{c['ess_ratio']:.2f}",
                f"{c['grad_cos']:+.2f}",
                f"{c['cpu_s']:.1f}",
            ]
        )
    return _table(header, rows, markdown)


def lag_matrix(cells: Sequence[dict[str, Any]], key: str, markdown: bool = False) -> str:
    """Methods × lags, each entry ``mean (kept%)`` of ``key`` ("final" or "auc")."""
    lags = sorted({c["lag"] for c in cells})
    kept_key = "kept" if key == "final" else "kept_auc"
    by = {(c["method"], c["lag"]): c for c in cells}
    methods = list(dict.fromkeys(c["method"] for c in cells))
    rows = []
    for m in methods:
        row = [m if not markdown else f"`{m}`"]
        for lag in lags:
            c = by.get((m, lag))
            row.append("" if c is None else f"{c[key]:.2f} ({_pct(c[kept_key])})" + ("*" if c["collapses"] else ""))
        rows.append(row)
    return _table(["method"] + [f"lag {lag}" for lag in lags], rows, markdown)


def aim_check(cells: Sequence[dict[str, Any]]) -> list[str]:
    """The configurations that keep ≥ 98% of their synchronous final success at lag 32, no collapse."""
    return [
        c["method"]
        for c in cells
        if c["lag"] == AIM_LAG and c["kept"] >= AIM_KEPT and c["kept_min"] >= AIM_KEPT and c["collapses"] == 0
    ]


def terminal_report(records: Sequence[dict[str, Any]]) -> str:
    parts = []
    for task in dict.fromkeys(r["task"] for r in records):
        cells = summarize_cells([r for r in records if r["task"] == task])
        parts.append(f"task: {task}   (kept = final / same method at lag 0; * = a collapse)")
        parts.append(lag_matrix(cells, "final"))
        parts.append("")
        parts.append(cell_table(cells))
        parts.append("")
    return "\n".join(parts)


def markdown_report(records: Sequence[dict[str, Any]], info: dict[str, Any], image_dir: str | None = None) -> str:
    """The results section of docs/benchmark.md, rendered from results.json and run_info.json."""
    out = ["## Results", ""]
    out.append(f"Produced by `{info.get('command', 'stable-async bench')}` ")
    out.append(
        f"({info.get('runs', len(records))} runs, {info.get('workers', '?')} workers, "
        f"{info.get('wall_time_s', 0) / 60:.1f} min wall; torch {info.get('torch', '?')})."
    )
    out.append("")
    for task in dict.fromkeys(r["task"] for r in records):
        cells = summarize_cells([r for r in records if r["task"] == task])
        seeds = sorted({r["seed"] for r in records if r["task"] == task})
        out += [f"### Task: {task} (seeds {', '.join(map(str, seeds))})", ""]
        out += ["Final greedy success, mean over seeds (kept: fraction of the same method's lag-0 success;", ""]
        out += ["`*` marks a cell with a collapse):", "", lag_matrix(cells, "final", markdown=True), ""]
        out += ["Area under the success curve (kept: same, for the area):", ""]
        out += [lag_matrix(cells, "auc", markdown=True), "", "Every cell, with the spread over seeds:", ""]
        out += [cell_table(cells, markdown=True), ""]
        met = aim_check(cells)
        verdict = ", ".join(f"`{m}`" for m in met) if met else "**none**"
        out += [
            f"Aim (keeps ≥ {AIM_KEPT:.0%} of its synchronous final success at lag {AIM_LAG} in every seed, "
            f"no collapse): {verdict}.",
            "",
        ]
        if image_dir is not None:
            for name, title in (
                ("success_vs_step", "Success vs step, one panel per lag"),
                ("success_vs_lag", "Final success and AUC vs lag"),
                ("ess_trace", "ESS/N of π_old against μ, per step"),
                ("grad_cos_trace", "Cosine of consecutive gradients, per step"),
            ):
                out += [f"![{title}]({image_dir}/{name}_{task}.png)", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------- files
def write_outputs(records: Sequence[dict[str, Any]], info: dict[str, Any], out_dir: Path) -> None:
    """results.json (one record per run, curves included), runs.csv, summary.csv, run_info.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(list(records), indent=1, allow_nan=True) + "\n")
    (out_dir / "run_info.json").write_text(json.dumps(info, indent=1) + "\n")
    scalar = [k for k in records[0] if k not in CURVE_FIELDS] if records else []
    with open(out_dir / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    cells = [
        c
        for task in dict.fromkeys(r["task"] for r in records)
        for c in summarize_cells([r for r in records if r["task"] == task])
    ]
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(cells[0]) if cells else [])
        writer.writeheader()
        writer.writerows(cells)


def load(out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records = json.loads((out_dir / "results.json").read_text())
    info_path = out_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return records, info


def write_markdown(records: Sequence[dict[str, Any]], info: dict[str, Any], out_dir: Path, md_path: Path) -> None:
    has_plots = any(out_dir.glob("*.png"))
    image_dir = os.path.relpath(out_dir, md_path.parent) if has_plots else None
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown_report(records, info, image_dir) + "\n")
