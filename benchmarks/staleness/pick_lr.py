"""Pick each method's lr from the sweep preset's results and write the table behind methods.TUNED_LR.

    stable-async bench --preset sweep --workers 2 --no-plots --out sweep-out
    python benchmarks/staleness/pick_lr.py sweep-out/results.json > benchmarks/staleness/sweep-lr.md

Score of an lr: the mean over the sweep's lags (0 and the middle lag) and seeds (never reported)
of the AUC of the success curve; a collapse in any run disqualifies the lr. Ties go to the
shared lr. The printed dict is pasted into ``methods.TUNED_LR`` (only entries that differ from
the shared lr).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict

from stable_async.bench.methods import LEARNING_RATE


def main(path: str) -> None:
    with open(path) as f:
        records = json.load(f)
    runs: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in records:
        base = r["method"].partition("@")[0]
        runs[(base, r["lr"])].append(r)
    methods = list(dict.fromkeys(k[0] for k in runs))
    lrs = sorted({k[1] for k in runs})
    lags = sorted({r["lag"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    print("# Learning-rate sweep\n")
    print(
        f"Lags {lags}, seeds {seeds} (never reported), from `{path}`. "
        "Entry: mean AUC (mean final success); `*`: a run collapsed.\n"
    )
    print("| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |")
    print("|---|" + "---|" * (len(lrs) + 1))
    tuned = {}
    for m in methods:
        scores = {}
        cells = []
        for lr in lrs:
            rs = runs.get((m, lr), [])
            if not rs:
                cells.append("")
                continue
            auc = statistics.fmean(r["auc"] for r in rs)
            final = statistics.fmean(r["final_success"] for r in rs)
            collapsed = any(r["collapsed"] for r in rs)
            cells.append(f"{auc:.3f} ({final:.2f})" + ("*" if collapsed else ""))
            if not collapsed:
                scores[lr] = auc
        best = max(scores, key=lambda lr: (scores[lr], lr == LEARNING_RATE)) if scores else LEARNING_RATE
        if best != LEARNING_RATE:
            tuned[m] = best
        print(f"| `{m}` | " + " | ".join(cells) + f" | {best:g} |")
    print("\n`methods.TUNED_LR` =\n")
    print("```python")
    print(json.dumps(tuned, indent=4))
    print("```")


if __name__ == "__main__":
    main(sys.argv[1])
