"""Pictures (one PNG per signal against step) and the HTML page embedding them with the verdicts.

Figures are built with matplotlib's object API (``Figure`` + the Agg canvas, no pyplot state),
so `signal_figure` returns the figure for inspection before `save_figure` writes it.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stable_async.runreport.names import SIGNAL_BY_KEY
from stable_async.runreport.runlog import ReportError
from stable_async.runreport.signals import SignalSeries
from stable_async.runreport.verdicts import RULE_BY_SIGNAL, Verdict

EXTRA = "report"


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(f"drawing the pictures needs matplotlib: pip install 'stable-async[{EXTRA}]'") from None
    return Figure


def signal_figure(series: SignalSeries, verdicts: Sequence[Verdict] = ()) -> Any:
    """The signal against step: its line, the rule's threshold (dashed) and the flagged step ranges (shaded)."""
    figure = _figure_class()(figsize=(7.0, 3.2), dpi=100)
    ax = figure.add_subplot(1, 1, 1)
    signal = SIGNAL_BY_KEY[series.signal]
    ax.plot(
        series.steps,
        series.values,
        color="C0",
        linewidth=1.2,
        marker="." if len(series.steps) < 50 else None,
        label=series.metric,
    )
    rule = RULE_BY_SIGNAL.get(series.signal)
    if rule is not None:
        ax.axhline(rule.threshold, color="C3", linestyle="--", linewidth=1.0, label=f"threshold {rule.threshold:g}")
    gaps = [b - a for a, b in zip(series.steps, series.steps[1:])]
    half = 0.5 * statistics.median(gaps) if gaps else 0.5  # a flagged point covers half a logging interval each side
    for verdict in verdicts:
        for start, end in verdict.ranges:
            ax.axvspan(start - half, end + half, color="C3", alpha=0.15, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel(signal.title)
    ax.set_title(f"{signal.title}: {signal.meaning}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return figure


def save_figure(figure: Any, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    figure.savefig(path)


def _list(items: Sequence[str], empty: str) -> str:
    if not items:
        return f"<p>{html.escape(empty)}</p>"
    return "<ul>\n" + "\n".join(f"<li>{html.escape(x)}</li>" for x in items) + "\n</ul>"


def run_page(
    title: str,
    source: str,
    fmt: str,
    verdicts: Sequence[Verdict],
    statuses: Sequence[str],
    guide_lines: Sequence[str],
    images: Sequence[tuple[str, str]],
) -> str:
    """The HTML page of one run; ``images`` are (file name relative to the page, caption)."""
    figures = "\n".join(
        f'<figure><img src="{html.escape(src)}" alt="{html.escape(cap)}">'
        f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        for src, cap in images
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;}} img{{max-width:100%;}}
li{{margin:.3em 0;}} figure{{margin:1em 0;}}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Read from <code>{html.escape(source)}</code> ({html.escape(fmt)}) by <code>stable-async report</code>.</p>
<h2>Verdicts</h2>
{_list([v.message for v in verdicts], "No signal left its band.")}
<h2>What the staleness benchmark's guide says at this drift</h2>
{_list(list(guide_lines), "No drift signal (ESS/N, mismatch KL) logged.")}
<h2>Signals</h2>
{_list(list(statuses), "")}
{figures}
</body></html>
"""


def index_page(title: str, entries: Sequence[tuple[str, str, int]]) -> str:
    """A page linking to each run's page: (relative link, run name, number of verdicts)."""
    rows = "\n".join(
        f'<li><a href="{html.escape(link)}">{html.escape(name)}</a>: {count} verdict{"s" if count != 1 else ""}</li>'
        for link, name, count in entries
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>
<body style="font-family:sans-serif;max-width:60em;margin:2em auto;">
<h1>{html.escape(title)}</h1>
<ul>
{rows}
</ul>
</body></html>
"""
