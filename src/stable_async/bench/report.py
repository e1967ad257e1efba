"""From run records to what people read: per-cell summaries, checks, tables, JSON, CSV, Markdown.

A *setting* is (task, reward, response length); a *cell* is one (setting, method, lag,
staleness model) over its seeds. Definitions (also in docs/benchmark.md):

* ``final``: a run's greedy success, mean of its last 10% of evaluations; a cell shows the mean
  over seeds ± the standard deviation and the [min, max] over seeds.
* ``kept``: final / final of the *same method* at lag 0 (means over seeds); ``kept_auc`` the
  same with the area under the success curve (``auc``, the mean success over the evaluations).
* ``offline``: the method's offline control (data from the initial policy only); a cell
  ``beats_offline`` when its mean final exceeds the control's.
* ``collapses``: runs with a non-finite loss, or whose final is below half their peak (peak ≥ 0.1).
* ``sim_time_to_90``: the simulated time (`costmodel`) at which a run first reaches 90% of the
  synchronous final success of uncorrected PPO in its setting (lag 0, mean over seeds); None
  if never. The cell shows the median over seeds that reached it, and how many did.
  ``sim_total_time``: the simulated time at which the run's last training step ends.
* governed rows (``Method.governor``, e.g. ``governor_ppo_tis``): a `stable_async.StalenessGovernor`
  sets each step's bound (≤ the lag); their simulated times come from the run's own bound trace
  (``trace_bound``), and ``kept`` / ``offline`` refer to the row they govern (``Method.base``).
  The governor check: the governed cell keeps ≥ 98% of its base row's synchronous final success
  with no collapse in ≥ 3 seeds, at a mean simulated total time no longer than the best fixed
  bound of the base row that also keeps ≥ 98% with no collapse (the fixed k with the shortest
  total time; k = 0 keeps 100% by definition); the speed-up over synchronous is the base row's
  lag-0 total time over the governed one's.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from stable_async.bench.costmodel import CostModel, step_end_times
from stable_async.bench.engine import OFFLINE, Lag
from stable_async.bench.methods import TUNED_SUFFIX, get_method
from stable_async.bench.presets import PAPER_METHODS

CURVE_PREFIX = "trace_"
CURVE_FIELDS = ("eval_steps", "success", "greedy_success", "entropy")
AIM_KEPT, AIM_KEPT_AUC = 0.98, 0.95
HARD_RATIO = 0.5
REFERENCE = "ppo"  # uncorrected PPO: the synchronous reference and the "naive async" baseline
BASELINE = "ppo_tis"  # what the paper methods are compared with
TARGET_FRACTION = 0.9


def setting_of(r: dict[str, Any]) -> str:
    return f"{r['task']} ({r['reward']} reward, H = {r['length']})"


def lag_order(lag: Any) -> tuple[int, int]:
    return (1, 0) if lag == OFFLINE else (0, int(lag))


def _ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else math.nan


def _median(xs: Iterable[float]) -> float:
    finite = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(finite) if finite else math.nan


# ---------------------------------------------------------------------------------- simulated time
@functools.lru_cache(maxsize=256)
def simulated_times(steps: int, lag: int | tuple[int, ...]) -> tuple[float, ...]:
    """End time of each step for a fixed bound ``lag``, or per-version bounds (a governed run)."""
    return tuple(step_end_times(CostModel(), steps, lag))


def run_times(r: dict[str, Any]) -> tuple[float, ...]:
    """A (non-offline) run's simulated step end times: from its bound trace if governed, else its lag."""
    bounds = r.get(f"{CURVE_PREFIX}bound")
    return simulated_times(r["steps"], tuple(int(b) for b in bounds) if bounds else int(r["lag"]))


def base_method(method: str) -> str:
    """The fixed-bound row a governed row governs (``Method.base``, at the same lr suffix); any other method: itself."""
    try:
        base = get_method(method).base
    except ValueError:  # a record of a method this version does not define
        return method
    suffix = method.partition("@")[2]
    return method if base is None else f"{base}@{suffix}" if suffix else base


def is_governed(method: str) -> bool:
    return base_method(method) != method


def annotate(records: list[dict[str, Any]]) -> None:
    """Fill ``sim_time_to_90``, ``sim_total_time`` (and ``sim_target``) in place; see the module docstring."""
    by_setting: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_setting.setdefault(setting_of(r), []).append(r)
    for runs in by_setting.values():
        sync = [r["final_success"] for r in runs if r["method"] == REFERENCE and r["lag"] == 0]
        target = TARGET_FRACTION * statistics.fmean(sync) if sync else None
        for r in runs:
            r["sim_target"] = target
            r["sim_time_to_90"] = r["sim_total_time"] = None
            if r["lag"] == OFFLINE:
                continue
            times = run_times(r)
            r["sim_total_time"] = times[-1]
            if target is None:
                continue
            for step, ok in zip(r["eval_steps"], r["success"]):
                if ok >= target:
                    r["sim_time_to_90"] = 0.0 if step == 0 else times[step - 1]
                    break


# ---------------------------------------------------------------------------------- cells
def cell_key(r: dict[str, Any]) -> tuple[str, str, Any, str]:
    return (setting_of(r), r["method"], r["lag"], r["staleness"])


def summarize_cells(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per (setting, method, lag, staleness), in the order the records come in."""
    groups: dict[tuple[str, str, Any, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(cell_key(r), []).append(r)

    def runs_of(setting: str, method: str, lag: Any) -> list[dict[str, Any]]:
        return [r for k, rs in groups.items() if k[:3] == (setting, method, lag) for r in rs]

    def mean_of(setting: str, method: str, lag: Any, field: str) -> float | None:
        runs = runs_of(setting, method, lag)
        return statistics.fmean(r[field] for r in runs) if runs else None

    cells = []
    for (setting, method, lag, staleness), runs in groups.items():
        finals = [r["final_success"] for r in runs]
        aucs = [r["auc"] for r in runs]
        base = base_method(method)  # a governed row is compared with the row it governs
        sync = mean_of(setting, base, 0, "final_success")
        offline = mean_of(setting, base, OFFLINE, "final_success")
        totals = [r["sim_total_time"] for r in runs if r.get("sim_total_time") is not None]
        bounds = [r["mean_bound"] for r in runs if r.get("mean_bound") is not None]
        reached = [r["sim_time_to_90"] for r in runs if r.get("sim_time_to_90") is not None]
        cells.append(
            {
                "setting": setting,
                "task": runs[0]["task"],
                "method": method,
                "lag": lag,
                "staleness": staleness,
                "seeds": len(runs),
                "lr": runs[0]["lr"],
                "final": statistics.fmean(finals),
                "final_std": statistics.pstdev(finals),
                "final_min": min(finals),
                "final_max": max(finals),
                "kept": _ratio(statistics.fmean(finals), sync),
                "kept_min": _ratio(min(finals), sync),
                "auc": statistics.fmean(aucs),
                "auc_std": statistics.pstdev(aucs),
                "kept_auc": _ratio(statistics.fmean(aucs), mean_of(setting, base, 0, "auc")),
                "vs_sync_ppo": _ratio(statistics.fmean(finals), mean_of(setting, REFERENCE, 0, "final_success")),
                "offline_final": offline,
                "beats_offline": None if offline is None or lag == OFFLINE else statistics.fmean(finals) > offline,
                "collapses": sum(r["collapsed"] for r in runs),
                "entropy": statistics.fmean(r["final_entropy"] for r in runs),
                "ess_ratio": _median(r["median_ess_ratio"] for r in runs),
                "token_ess_ratio": _median(r["median_token_ess_ratio"] for r in runs),
                "mismatch_kl": _median(r["median_mismatch_kl"] for r in runs),
                "grad_cos": _median(r["median_grad_cos"] for r in runs),
                "within_batch_cos": _median(r["median_within_batch_cos"] for r in runs),
                "staleness_mean": statistics.fmean(r["mean_staleness"] for r in runs),
                "sim_time_to_90": statistics.median(reached) if reached else None,
                "reached_90": len(reached),
                "sim_total_time": statistics.fmean(totals) if totals else None,
                "base": base,
                "mean_bound": statistics.fmean(bounds) if bounds else None,
                "cpu_s": statistics.fmean(r["cpu_time_s"] for r in runs),
            }
        )
    return cells


# ---------------------------------------------------------------------------------- checks
def _largest_lag(cells: Sequence[dict[str, Any]]) -> int | None:
    lags = [c["lag"] for c in cells if c["lag"] != OFFLINE]
    return max(lags) if lags else None


def is_base_cell(c: dict[str, Any]) -> bool:
    return "@" not in c["method"] and c["staleness"] in ("bounded", OFFLINE) and c["base"] == c["method"]


def checks(cells: Sequence[dict[str, Any]]) -> list[str]:
    """The benchmark's validity checks and the honest aims, one sentence each, for one setting."""
    out: list[str] = []
    base = [c for c in cells if is_base_cell(c)]
    big = _largest_lag(base)
    if big is None:
        return out
    by = {(c["method"], c["lag"]): c for c in base}
    ref = by.get((REFERENCE, big))
    if ref is not None and (REFERENCE, 0) in by:
        verdict = "met" if ref["kept"] <= HARD_RATIO else "NOT met"
        out.append(
            f"Hard: uncorrected PPO at lag {big} keeps {_pct(ref['kept'])} of its synchronous final success "
            f"(needs ≤ {HARD_RATIO:.0%}): {verdict}."
        )
    small = by.get((REFERENCE, 4))
    if small is not None:
        verdict = "met" if small["ess_ratio"] >= 0.7 else "NOT met"
        out.append(
            f"Drift: uncorrected PPO's median sequence ESS/N at lag 4 is {small['ess_ratio']:.2f} "
            f"(needs ≥ 0.7): {verdict}."
        )
    lags = sorted({c["lag"] for c in base if c["lag"] not in (0, OFFLINE)})
    for lag in lags:
        at = [c for c in base if c["lag"] == lag]
        if not at:
            continue
        best = max(at, key=lambda c: (c["final"], c["auc"]))
        if best["beats_offline"] is None:
            continue
        verdict = "beats" if best["beats_offline"] else "does NOT beat"
        out.append(
            f"Asynchrony, not offline learning: the best cell at lag {lag} (`{best['method']}`, {best['final']:.2f}) "
            f"{verdict} its offline control ({best['offline_final']:.2f})."
        )
    not_beating = [c for c in base if c["beats_offline"] is False]
    if not_beating:
        names = ", ".join(f"`{c['method']}` lag {c['lag']}" for c in not_beating)
        out.append(f"Cells that do not beat their offline control (they say nothing about asynchrony): {names}.")
    aim = [
        c
        for c in cells
        if c["lag"] == big
        and c["staleness"] == "bounded"
        and c["kept"] >= AIM_KEPT
        and c["kept_min"] >= AIM_KEPT
        and c["kept_auc"] >= AIM_KEPT_AUC
        and c["collapses"] == 0
        and c["seeds"] >= 3
    ]
    names = ", ".join(f"`{c['method']}`" for c in aim) if aim else "**none** (aim not met)"
    out.append(
        f"Aim: keeps ≥ {AIM_KEPT:.0%} of its synchronous final success in every seed and ≥ {AIM_KEPT_AUC:.0%} of its "
        f"AUC at lag {big}, bounded staleness, no collapse, ≥ 3 seeds: {names}."
    )
    tis = by.get((BASELINE, big))
    if tis is not None:
        parts = []
        for m in PAPER_METHODS:
            c = by.get((m, big))
            if c is None:
                continue
            if c["final_min"] > tis["final_max"]:
                word = "beats"
            elif c["final_max"] < tis["final_min"]:
                word = "loses to"
            else:
                word = "ties (spreads overlap)"
            parts.append(f"`{m}` {word}")
        if parts:
            out.append(
                f"Paper methods vs PPO + token TIS at lag {big}, final success, seed ranges: " + "; ".join(parts) + "."
            )
    return out + governor_checks(cells)


def fixed_bounds_of(cells: Sequence[dict[str, Any]], governed: dict[str, Any]) -> list[dict[str, Any]]:
    """The fixed-bound cells (bounded staleness, shared lr) of the row a governed cell governs, k ≤ its lag."""
    return sorted(
        (
            c
            for c in cells
            if c["method"] == governed["base"]
            and c["staleness"] == "bounded"
            and c["lag"] != OFFLINE
            and int(c["lag"]) <= int(governed["lag"])
        ),
        key=lambda c: int(c["lag"]),
    )


def _keeps(c: dict[str, Any], seeds: int = 1) -> bool:
    return c["kept"] >= AIM_KEPT and c["collapses"] == 0 and c["seeds"] >= seeds


def governor_verdict(cells: Sequence[dict[str, Any]], governed: dict[str, Any]) -> dict[str, Any]:
    """The governor check of one governed cell (module docstring): what it is compared with and whether it is met."""
    fixed = fixed_bounds_of(cells, governed)
    sync = next((c for c in fixed if c["lag"] == 0), None)
    keeping = [c for c in fixed if _keeps(c) and c.get("sim_total_time") is not None]
    best = min(keeping, key=lambda c: (c["sim_total_time"], int(c["lag"]))) if keeping else None
    total = governed.get("sim_total_time")
    keeps = _keeps(governed, seeds=3)
    faster = best is not None and total is not None and total <= best["sim_total_time"]
    sync_total = sync.get("sim_total_time") if sync else None
    sync_90, gov_90 = (sync or {}).get("sim_time_to_90"), governed.get("sim_time_to_90")
    return {
        "best_fixed": best,
        "keeps": keeps,
        "met": keeps and faster,
        "speedup_total": _ratio(sync_total, total),
        "speedup_90": _ratio(sync_90, gov_90),
    }


def governor_checks(cells: Sequence[dict[str, Any]]) -> list[str]:
    """One sentence per governed cell: the issue's must-show check, met or NOT met."""
    out = []
    for g in (c for c in cells if is_governed(c["method"])):
        v = governor_verdict(cells, g)
        best = v["best_fixed"]
        if best is not None:
            against = (
                f"the best fixed bound that keeps ≥ {AIM_KEPT:.0%} is k = {best['lag']} "
                f"({_time(best['sim_total_time'])}, kept {_pct(best['kept'])})"
            )
        elif fixed_bounds_of(cells, g):
            against = f"no fixed bound of that row keeps ≥ {AIM_KEPT:.0%} with no collapse"
        else:
            against = "no fixed bound of that row was run"
        out.append(
            f"Governor: `{g['method']}` (bound ≤ {g['lag']}, mean {_num(g['mean_bound'], '.1f')}) keeps "
            f"{_pct(g['kept'])} of `{g['base']}`'s synchronous final success, {g['collapses']}/{g['seeds']} collapses, "
            f"simulated total time {_time(g['sim_total_time'])}; {against}; speed-up over synchronous "
            f"×{_num(v['speedup_total'], '.2f')} (total), ×{_num(v['speedup_90'], '.2f')} (time to 90%): "
            f"{'met' if v['met'] else 'NOT met'}"
            + ("" if v["met"] else f" ({'quality' if not v['keeps'] else 'wall-clock'})")
            + "."
        )
    return out


def governor_table(cells: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """Per governed cell, then each fixed bound of its base row: success kept, collapses, simulated times."""
    header = ["method", "bound", "mean bound", "final ± sd", "kept", "collapses", "t→90%", "total time", "×sync"]
    rows = []
    for g in (c for c in cells if is_governed(c["method"])):
        fixed = fixed_bounds_of(cells, g)
        sync = next((c for c in fixed if c["lag"] == 0), None)
        sync_total = sync.get("sim_total_time") if sync else None
        for c, bound in [(g, f"≤ {g['lag']}")] + [(c, str(c["lag"])) for c in fixed]:
            rows.append(
                [
                    _name(c["method"], markdown),
                    bound,
                    _num(c["mean_bound"], ".1f"),
                    f"{c['final']:.3f} ± {c['final_std']:.3f}",
                    _pct(c["kept"]),
                    f"{c['collapses']}/{c['seeds']}",
                    f"{_time(c['sim_time_to_90'])} ({c['reached_90']}/{c['seeds']})",
                    _time(c.get("sim_total_time")),
                    _num(_ratio(sync_total, c.get("sim_total_time")), ".2f"),
                ]
            )
    return _table(header, rows, markdown)


# ---------------------------------------------------------------------------------- formatting
def _pct(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.0f}%"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _time(x: float | None) -> str:
    return "never" if x is None else f"{x / 1e3:.0f}k"


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def _name(method: str, markdown: bool) -> str:
    return f"`{method}`" if markdown else method


def cell_table(cells: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """One row per cell: success, its spread, drift, gradient cosines, simulated time."""
    header = ["method", "lag", "staleness", "lr", "final ± sd", "[min, max]", "kept", "AUC", "kept AUC"]
    header += ["offline", "collapses", "ESS/N seq", "ESS/N tok", "KL k3", "cos step", "cos within", "t→90%"]
    rows = []
    for c in cells:
        flag = "" if c["beats_offline"] is not False else " ≤off"
        rows.append(
            [
                _name(c["method"], markdown),
                str(c["lag"]),
                c["staleness"],
                f"{c['lr']:g}",
                f"{c['final']:.3f} ± {c['final_std']:.3f}" + flag,
                f"[{c['final_min']:.2f}, {c['final_max']:.2f}]",
                _pct(c["kept"]),
                f"{c['auc']:.3f}",
                _pct(c["kept_auc"]),
                _num(c["offline_final"]),
                f"{c['collapses']}/{c['seeds']}",
                _num(c["ess_ratio"]),
                _num(c["token_ess_ratio"], ".3f"),
                _num(c["mismatch_kl"], ".4f"),
                _num(c["grad_cos"], "+.2f"),
                _num(c["within_batch_cos"], "+.2f"),
                f"{_time(c['sim_time_to_90'])} ({c['reached_90']}/{c['seeds']})",
            ]
        )
    return _table(header, rows, markdown)


def lag_matrix(cells: Sequence[dict[str, Any]], key: str, markdown: bool = False) -> str:
    """Methods × lags, each entry ``mean (kept%)`` of ``key`` ("final" or "auc"); * collapse, † ≤ offline.

    Rows are sorted by ``key`` at the largest lag (best first).
    """
    lags = sorted({c["lag"] for c in cells}, key=lag_order)
    kept_key = "kept" if key == "final" else "kept_auc"
    by = {(c["method"], c["lag"]): c for c in cells}
    rows = []
    big = _largest_lag(cells)
    methods = list(dict.fromkeys(c["method"] for c in cells))
    methods.sort(key=lambda m: -by[(m, big)][key] if (m, big) in by else 0.0)
    for m in methods:
        row = [_name(m, markdown)]
        for lag in lags:
            c = by.get((m, lag))
            if c is None:
                row.append("")
                continue
            mark = ("*" if c["collapses"] else "") + ("†" if c["beats_offline"] is False else "")
            kept = "" if lag in (0, OFFLINE) else f" ({_pct(c[kept_key])})"
            row.append(f"{c[key]:.2f}{kept}{mark}")
        rows.append(row)
    return _table(["method"] + [lag if lag == OFFLINE else f"lag {lag}" for lag in lags], rows, markdown)


def drift_table(cells: Sequence[dict[str, Any]], method: str = REFERENCE, markdown: bool = False) -> str:
    """Per lag, for one method: measured drift (ESS/N, KL, staleness) next to the success it keeps."""
    rows = []
    for c in sorted((c for c in cells if c["method"] == method and is_base_cell(c)), key=lambda c: lag_order(c["lag"])):
        rows.append(
            [
                str(c["lag"]),
                f"{c['staleness_mean']:.1f}",
                _num(c["ess_ratio"], ".3f"),
                _num(c["token_ess_ratio"], ".3f"),
                _num(c["mismatch_kl"], ".4f"),
                f"{c['final']:.2f}",
                _pct(c["kept"]),
            ]
        )
    header = ["lag", "mean versions behind", "ESS/N seq", "ESS/N token", "KL k3 / token", "final", "kept"]
    return _table(header, rows, markdown)


def time_table(cells: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """Methods × lags: simulated time to 90% of synchronous PPO, and the speed-up over synchronous PPO."""
    base = [c for c in cells if is_base_cell(c) and c["lag"] != OFFLINE]
    lags = sorted({c["lag"] for c in base}, key=lag_order)
    by = {(c["method"], c["lag"]): c for c in base}
    sync = by.get((REFERENCE, 0), {}).get("sim_time_to_90")
    rows = []
    for m in dict.fromkeys(c["method"] for c in base):
        row = [_name(m, markdown)]
        for lag in lags:
            c = by.get((m, lag))
            if c is None:
                row.append("")
            elif c["sim_time_to_90"] is None:
                row.append(f"never (0/{c['seeds']})")
            else:
                speed = f" ×{sync / c['sim_time_to_90']:.1f}" if sync and c["sim_time_to_90"] else ""
                row.append(f"{_time(c['sim_time_to_90'])}{speed} ({c['reached_90']}/{c['seeds']})")
        rows.append(row)
    return _table(["method"] + [f"lag {lag}" for lag in lags], rows, markdown)


def guide_selection(
    cells: Sequence[dict[str, Any]],
) -> list[tuple[Lag, dict[str, Any] | None, list[dict[str, Any]]]]:
    """Per lag (offline excluded): uncorrected PPO's cell (None if absent) and the best cells.

    "Best" = the base cell with the highest mean final success, and every base cell whose seed
    range reaches it (final_max ≥ the best mean): the spread over seeds does not separate them.
    """
    base = [c for c in cells if is_base_cell(c) and c["lag"] != OFFLINE]
    selection = []
    for lag in sorted({c["lag"] for c in base}, key=lag_order):
        at = [c for c in base if c["lag"] == lag]
        ref = next((c for c in at if c["method"] == REFERENCE), None)
        best = max(at, key=lambda c: (c["final"], c["auc"]))
        tied = [c for c in sorted(at, key=lambda c: -c["final"]) if c["final_max"] >= best["final"]]
        selection.append((lag, ref, tied))
    return selection


def guide_table(cells: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """Per lag, indexed by uncorrected PPO's measured drift: which methods are best there
    (`guide_selection`)."""
    rows = []
    for lag, ref, tied in guide_selection(cells):
        rows.append(
            [
                str(lag),
                _num(ref["ess_ratio"] if ref else None, ".3f"),
                _num(ref["token_ess_ratio"] if ref else None, ".3f"),
                _num(ref["mismatch_kl"] if ref else None, ".4f"),
                _pct(ref["kept"]) if ref else "—",
                ", ".join(f"{_name(c['method'], markdown)} {c['final']:.2f}" for c in tied),
            ]
        )
    header = ["lag", "PPO ESS/N seq", "PPO ESS/N token", "PPO KL k3", "PPO kept", "best (final; ties by seed range)"]
    return _table(header, rows, markdown)


def by_setting(records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(setting_of(r), []).append(r)
    return out


def terminal_report(records: Sequence[dict[str, Any]]) -> str:
    parts = []
    for setting, runs in by_setting(records).items():
        cells = summarize_cells(runs)
        base = [c for c in cells if is_base_cell(c)]
        parts.append(f"setting: {setting}   (final success; (kept) = vs same method at lag 0; * collapse; † ≤ offline)")
        parts += [lag_matrix(base, "final"), "", drift_table(cells), "", cell_table(cells), ""]
        if any(is_governed(c["method"]) for c in cells):
            parts += [governor_table(cells), ""]
        parts += [*checks(cells), ""]
    return "\n".join(parts)


def markdown_report(records: Sequence[dict[str, Any]], info: dict[str, Any], image_dir: str | None = None) -> str:
    """The results page, rendered from results.json and run_info.json."""
    out = ["# Staleness benchmark: results", ""]
    out.append(f"Produced by `{info.get('command', 'stable-async bench')}` ")
    out.append(
        f"({info.get('runs', len(records))} runs, {info.get('workers', '?')} workers, "
        f"{info.get('wall_time_s', 0) / 60:.1f} min wall; torch {info.get('torch', '?')}). "
        "Protocol, definitions and the guide: [benchmark.md](benchmark.md)."
    )
    out.append("")
    for setting, runs in by_setting(records).items():
        cells = summarize_cells(runs)
        base = [c for c in cells if is_base_cell(c)]
        seeds = sorted({r["seed"] for r in runs})
        out += [f"## {setting}", "", f"Seeds {', '.join(map(str, seeds))}; shared lr unless the row says `@tuned`.", ""]
        out += ["Checks:", ""] + [f"- {line}" for line in checks(cells)] + [""]
        out += [
            "Guide: per lag, the drift uncorrected PPO measures there (what a user reads in veRL's "
            "`rollout_corr/*` or `stable_async.effective_sample_size`) and the methods that are best:",
            "",
            guide_table(cells, markdown=True),
            "",
        ]
        out += [
            "Final success (exact answers among sampled responses, pass@1), mean over seeds, bounded staleness, "
            "shared lr, rows by the largest lag; (kept) = fraction of the same method's lag-0 success; `*` a "
            "collapse in some seed; `†` not above the method's offline control:",
            "",
            lag_matrix(base, "final", markdown=True),
            "",
            "Area under the success curve:",
            "",
            lag_matrix(base, "auc", markdown=True),
            "",
            "Measured drift of uncorrected PPO per lag (medians over steps, then over seeds), next to what it keeps:",
            "",
            drift_table(cells, markdown=True),
            "",
        ]
        tuned = [c for c in cells if c["method"].endswith(TUNED_SUFFIX)]
        if tuned:
            out += ["Each method at its tuned lr (`methods.TUNED_LR`, from the sweep on seeds never reported):", ""]
            out += [lag_matrix(tuned, "final", markdown=True), ""]
        models = [c for c in cells if c["staleness"] in ("fixed", "partial")]
        if models:
            big = max(c["lag"] for c in models)
            same = [c for c in cells if c["lag"] == big and "@" not in c["method"]]
            same = [c for c in same if c["method"] in {m["method"] for m in models}]
            out += [
                f"Staleness models at lag {big} (fixed: every batch k versions old; bounded: mixed versions in "
                "[t − k, t]; partial: the version changes inside a sequence):",
                "",
            ]
            out += [cell_table(sorted(same, key=lambda c: (c["method"], c["staleness"])), markdown=True), ""]
        if any(is_governed(c["method"]) for c in cells):
            out += [
                "Staleness governor (`sa.StalenessGovernor`, docs/governor.md): each governed row at its largest "
                "bound, then the fixed bounds of the row it governs; kept = vs that row at lag 0; total time = "
                "simulated end of the last step, from the run's own bound trace; ×sync = the row's lag-0 total time "
                "over this one:",
                "",
                governor_table(cells, markdown=True),
                "",
            ]
            if image_dir is not None:
                out += [f"![Final success vs simulated time]({image_dir}/governor_vs_time_{slug_of(setting)}.png)", ""]
        out += [
            "Simulated time to 90% of synchronous PPO's final success (cost model in `costmodel.py`; "
            "×: speed-up over synchronous PPO; (n/3): seeds that got there):",
            "",
            time_table(cells, markdown=True),
            "",
            "Every cell:",
            "",
            cell_table(cells, markdown=True),
            "",
        ]
        if image_dir is not None:
            slug = slug_of(setting)
            for name, title in (
                ("success_vs_step", "Success vs step, one panel per lag"),
                ("success_vs_lag", "Final success and AUC vs lag"),
                ("success_vs_time", "Success vs simulated time"),
                ("ess_trace", "Sequence ESS/N of π_θ against μ at the time of use, per step"),
                ("grad_cos_trace", "Cosine of consecutive step gradients"),
            ):
                out += [f"![{title}]({image_dir}/{name}_{slug}.png)", ""]
    return "\n".join(out)


def slug_of(setting: str) -> str:
    return setting.split(" ")[0]


# ---------------------------------------------------------------------------------- files
def write_outputs(records: Sequence[dict[str, Any]], info: dict[str, Any], out_dir: Path) -> None:
    """results.json (one record per run, curves included), runs.csv, summary.csv, run_info.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ",\n".join(json.dumps(r, allow_nan=True) for r in records)  # one record per line
    (out_dir / "results.json").write_text("[\n" + lines + "\n]\n")
    (out_dir / "run_info.json").write_text(json.dumps(info, indent=1) + "\n")
    scalar = [k for k in records[0] if k not in CURVE_FIELDS and not k.startswith(CURVE_PREFIX)] if records else []
    with open(out_dir / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=scalar, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    cells = [c for runs in by_setting(records).values() for c in summarize_cells(runs)]
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(cells[0]) if cells else [])
        writer.writeheader()
        writer.writerows(cells)


def load(out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records = json.loads((out_dir / "results.json").read_text())
    info_path = out_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    return records, info


def merge(parts: Sequence[tuple[list[dict[str, Any]], dict[str, Any]]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Runs of several outputs (the shards of one grid) as one: records in grid order, times summed."""
    from stable_async.bench.presets import PRESETS
    from stable_async.bench.runner import grid, record_key, spec_key

    records = [r for rs, _ in parts for r in rs]
    info = dict(parts[0][1])
    preset = PRESETS.get(info.get("preset", ""))
    if preset is not None:
        order = {spec_key(s): i for i, s in enumerate(grid(preset.blocks))}
        records.sort(key=lambda r: order.get(record_key(r), len(order)))
    info["command"] = f"stable-async bench --preset {info.get('preset', '?')}, merged from {len(parts)} parts"
    info["runs"] = len(records)
    info["shards"] = len(parts)
    info["wall_time_s"] = max(i.get("wall_time_s", 0.0) for _, i in parts)
    info["cpu_time_s"] = sum(i.get("cpu_time_s", 0.0) for _, i in parts)
    info["workers"] = sum(i.get("workers", 1) for _, i in parts)
    return records, info


def write_markdown(records: Sequence[dict[str, Any]], info: dict[str, Any], out_dir: Path, md_path: Path) -> None:
    has_plots = any(out_dir.glob("*.png"))
    image_dir = os.path.relpath(out_dir, md_path.parent) if has_plots else None
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(markdown_report(records, info, image_dir) + "\n")
