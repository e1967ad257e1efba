"""PNG plots (matplotlib, Agg backend; matplotlib is the ``bench`` extra, imported only here).

Per setting (bounded staleness, shared lr): ``success_vs_step_<task>.png`` (one panel per lag,
one line per method, mean over seeds with the min–max band), ``success_vs_lag_<task>.png``
(final success and AUC against the lag), ``success_vs_time_<task>.png`` (success against the
simulated wall-clock of `costmodel`, one panel per method, one line per lag),
``ess_trace_<task>.png`` and ``grad_cos_trace_<task>.png`` (per-step sequence ESS/N and the
cosine of consecutive step gradients, smoothed, one panel per lag), and with governed rows
``governor_vs_time_<task>.png`` (final success against the simulated time to 90% of synchronous
PPO's final success and against the simulated total time: each governed row and every fixed
bound of the row it governs, mean over seeds with the min–max of final success).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stable_async.bench.report import (
    by_setting,
    fixed_bounds_of,
    is_governed,
    lag_order,
    run_times,
    slug_of,
    summarize_cells,
)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(y) < window:
        return y
    kernel = np.ones(window) / window
    return np.convolve(np.nan_to_num(y, nan=0.0), kernel, mode="valid")


def _panels(plt: Any, n: int) -> tuple[Any, list[Any]]:
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False, sharey=True)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _per_lag_plot(plt: Any, records: Sequence[dict[str, Any]], x_key: str, y_key: str, window: int) -> Any:
    lags = sorted({r["lag"] for r in records}, key=lag_order)
    methods = list(dict.fromkeys(r["method"] for r in records))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(methods), 2)))
    fig, axes = _panels(plt, len(lags))
    for ax, lag in zip(axes, lags):
        for color, method in zip(colors, methods):
            runs = [r for r in records if r["lag"] == lag and r["method"] == method]
            if not runs:
                continue
            ys = np.array([_smooth(np.asarray(r[y_key], dtype=float), window) for r in runs])
            xs = np.asarray(runs[0][x_key] if x_key else np.arange(1, len(runs[0][y_key]) + 1))[-ys.shape[1] :]
            ax.plot(xs, ys.mean(0), color=color, label=method, lw=1.4)
            if len(runs) > 1:
                ax.fill_between(xs, ys.min(0), ys.max(0), color=color, alpha=0.12)
        ax.set_title(f"lag {lag}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    return fig


def _time_plot(plt: Any, records: Sequence[dict[str, Any]]) -> Any:
    methods = list(dict.fromkeys(r["method"] for r in records))
    lags = sorted({r["lag"] for r in records if r["lag"] != "offline"}, key=lag_order)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(lags), 2)))
    fig, axes = _panels(plt, len(methods))
    for ax, method in zip(axes, methods):
        for color, lag in zip(colors, lags):
            runs = [r for r in records if r["lag"] == lag and r["method"] == method]
            if not runs:
                continue
            times = (0.0, *run_times(runs[0]))
            xs = np.array([times[step] for step in runs[0]["eval_steps"]]) / 1e3
            ys = np.array([r["success"] for r in runs])
            ax.plot(xs, ys.mean(0), color=color, label=f"lag {lag}", lw=1.4)
        target = runs[0].get("sim_target") if runs else None
        if target:
            ax.axhline(target, color="grey", ls=":", lw=1)
        ax.set_title(method)
        ax.set_xlabel("simulated time (k units)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def _governor_plot(plt: Any, cells: Sequence[dict[str, Any]]) -> Any:
    """Rows: time to 90%, total time; columns: one per governed cell. Fixed bounds as circles, the governor a star."""
    governed = [c for c in cells if is_governed(c["method"])]
    fig, axes = plt.subplots(2, len(governed), figsize=(max(8, 5 * len(governed)), 7), squeeze=False, sharey=True)
    for col, g in enumerate(governed):
        fixed = fixed_bounds_of(cells, g)
        for row, (key, label) in enumerate((("sim_time_to_90", "time to 90%"), ("sim_total_time", "total time"))):
            ax = axes[row][col]
            for c in [*fixed, g]:
                if c.get(key) is None:
                    continue
                x = c[key] / 1e3
                err = [[c["final"] - c["final_min"]], [c["final_max"] - c["final"]]]
                star = c is g
                ax.errorbar(
                    x,
                    c["final"],
                    yerr=err,
                    fmt="*" if star else "o",
                    ms=12 if star else 6,
                    color="tab:red" if star else "tab:blue",
                    capsize=3,
                )
                ax.annotate(
                    f"≤ {g['lag']}" if star else f"k={c['lag']}",
                    (x, c["final"]),
                    fontsize=8,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
            ax.set_xlabel(f"simulated {label} (k units)")
            ax.set_title(f"{g['method']} vs fixed k of {g['base']}" if row == 0 else "")
            ax.grid(alpha=0.3)
        axes[0][col].set_ylabel("final success")
        axes[1][col].set_ylabel("final success")
    return fig


def write_plots(records: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    written = []
    for setting, everything in by_setting(records).items():
        task = slug_of(setting)
        runs = [r for r in everything if "@" not in r["method"] and r["staleness"] in ("bounded", "offline")]
        timed = [r for r in runs if r["lag"] != "offline"]
        figures = {
            "success_vs_step": (_per_lag_plot(plt, runs, "eval_steps", "success", 1), "greedy success"),
            "success_vs_time": (_time_plot(plt, timed), "greedy success"),
            "ess_trace": (_per_lag_plot(plt, runs, "", "trace_ess_ratio", 5), "sequence ESS/N (π_θ vs μ)"),
            "grad_cos_trace": (_per_lag_plot(plt, runs, "", "trace_grad_cos", 5), "cos(g_t, g_t−1), step gradients"),
        }
        for name, (fig, ylabel) in figures.items():
            fig.axes[0].set_ylabel(ylabel)
            fig.suptitle(f"{setting}: {ylabel}")
            fig.tight_layout()
            written.append(out_dir / f"{name}_{task}.png")
            fig.savefig(written[-1], dpi=100)
            plt.close(fig)

        if any(is_governed(r["method"]) for r in timed):
            fig = _governor_plot(plt, summarize_cells(everything))
            fig.suptitle(f"{setting}: staleness governor vs fixed bounds (mean over seeds, min–max)")
            fig.tight_layout()
            written.append(out_dir / f"governor_vs_time_{task}.png")
            fig.savefig(written[-1], dpi=100)
            plt.close(fig)

        runs = [r for r in runs if not is_governed(r["method"])]
        cells = summarize_cells(runs)
        lags = sorted({c["lag"] for c in cells}, key=lag_order)
        positions = {lag: i for i, lag in enumerate(lags)}  # lags are spread unevenly: equal spacing
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        methods = list(dict.fromkeys(c["method"] for c in cells))
        colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(methods), 2)))  # one colour per method
        for index, (color, method) in enumerate(zip(colors, methods)):
            mine = [c for c in cells if c["method"] == method]
            xs = [positions[c["lag"]] for c in mine]
            style = {"color": color, "marker": "osD^v<>"[index % 7], "label": method}
            axes[0].plot(xs, [c["final"] for c in mine], **style)
            axes[1].plot(xs, [c["auc"] for c in mine], **style)
        for ax, title in zip(axes, ("final greedy success", "area under the success curve")):
            ax.set_xticks(range(len(lags)), [str(lag) for lag in lags])
            ax.set_xlabel("staleness bound k (training steps); offline: never refreshed")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7, ncol=2)
        fig.suptitle(f"{setting}: success vs lag (mean over seeds)")
        fig.tight_layout()
        written.append(out_dir / f"success_vs_lag_{task}.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
