"""Per-step drift signals of benchmark runs, as percentiles per (method, lag): the calibration of
`stable_async.StalenessGovernor`'s defaults (docs/governor.md).

    python benchmarks/staleness/signal_percentiles.py docs/assets/benchmark/results.json ppo,ppo_tis,vcpo

For each (method, lag) of the reversal task with bounded staleness, over every training step of
every seed: the 10th / 50th / 90th percentile of the sequence ESS/N, the token ESS/N, the
per-token k3 mismatch KL and the consecutive-step gradient cosine, next to the mean final success.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in [0, 1]) of the finite values."""
    xs = sorted(v for v in values if v == v)
    return xs[round(q * (len(xs) - 1))] if xs else float("nan")


def main(path: str, methods: list[str], task: str = "reversal") -> None:
    with open(path) as f:
        records = json.load(f)
    runs: dict[tuple[str, object], list[dict]] = defaultdict(list)
    for r in records:
        if r["method"] in methods and r["task"] == task and r["staleness"] == "bounded":
            runs[(r["method"], r["lag"])].append(r)
    signals = (("ess_ratio", "ESS/N seq"), ("token_ess_ratio", "ESS/N tok"), ("mismatch_kl", "KL k3"))
    signals += (("grad_cos", "cos step"),)
    header = ["method", "lag", "final"] + [f"{label} p10/p50/p90" for _, label in signals]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for (method, lag), rs in sorted(runs.items(), key=lambda kv: (methods.index(kv[0][0]), kv[0][1])):
        row = [f"`{method}`", str(lag), f"{statistics.fmean(r['final_success'] for r in rs):.2f}"]
        for key, _ in signals:
            values = [v for r in rs for v in r[f"trace_{key}"]]
            row.append(" / ".join(f"{percentile(values, q):.3g}" for q in (0.1, 0.5, 0.9)))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else ["ppo", "ppo_tis", "vcpo"])
