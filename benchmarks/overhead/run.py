"""stable-async overhead benchmark: losses vs the trainers' own code, Top-K divergence memory, GAC / ESS-LR.

Usage::

    python benchmarks/overhead/run.py                # full (about 10-15 min on 2 CPU cores)
    python benchmarks/overhead/run.py --quick        # CI-style smoke, < 2 min
    python benchmarks/overhead/run.py --markdown     # Markdown tables (docs/performance.md)
    python benchmarks/overhead/run.py --parts losses topk --json out.json

Every figure is a ratio against a reference measured in the same process, interleaved, median of
paired repetitions (see common.py). Absolute times are printed only to show the scale.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from common import fmt_bytes, set_threads, table  # noqa: E402

PARTS = ("losses", "topk", "training")
LOSS_TARGET = 1.10
TARGET_SIZE = (64, 2048)


def run_losses(args) -> tuple[list[dict], str]:
    import losses

    sizes = [(8, 512)] if args.smallest else (losses.QUICK_SIZES if args.quick else losses.SIZES)
    if args.sizes:
        sizes = args.sizes
    repeats = 3 if args.smallest else (8 if args.quick else args.repeats)
    inner = 1 if args.smallest else 3
    rounds = [
        losses.run(
            sizes=sizes,
            cases=args.cases,
            repeats=repeats,
            inner=inner,
            memory=(k == 0),
            compile=args.compile,
            mask_form=args.reference_masks,
        )
        for k in range(args.rounds)
    ]
    rows = losses.combine_rounds(rounds)
    headers = ["reference", "ours", "B×T", "ref ms", "+batch", "+batch nocheck", "prebuilt", "peak mem ratio"]
    if args.rounds > 1:
        headers.insert(5, "+batch worst round")
    if args.compile:
        headers.insert(-1, "+batch compiled")
    control = any(r.get("ratio_batch_float_ref") is not None for r in rows)
    if control:
        headers.insert(-1, "float-mask ref / ref")
        headers.insert(-1, "+batch vs float-mask ref (worst)")
    lines = []
    for r in rows:
        line = [
            r["case"],
            r["ours"],
            f"{r['B']}×{r['T']}",
            f"{r['ref_ms']:.2f}",
            f"{r['ratio_batch']:.2f}",
            f"{r['ratio_nocheck']:.2f}",
            f"{r['ratio_prebuilt']:.2f}",
            f"{r['mem_ratio']:.2f} ({fmt_bytes(r['mem_ours'])} / {fmt_bytes(r['mem_ref'])})",
        ]
        if args.rounds > 1:
            line.insert(5, f"{r['ratio_batch_worst']:.2f}")
        if args.compile:
            line.insert(-1, "—" if r.get("ratio_compiled") is None else f"{r['ratio_compiled']:.2f}")
        if control:
            against_float = r.get("ratio_batch_float_ref")
            line.insert(-1, "—" if against_float is None else f"{r['ref_float_ratio']:.2f}")
            line.insert(-1, "—" if against_float is None else
                        f"{against_float:.2f} ({r['ratio_batch_float_ref_worst']:.2f})")  # fmt: skip
        lines.append(line)
    text = table(headers, lines, args.markdown)
    at_target = [r for r in rows if (r["B"], r["T"]) == TARGET_SIZE]
    if at_target:
        verdict = []
        for r in at_target:
            worst = r["ratio_batch_worst"]
            ok = "met" if worst <= LOSS_TARGET else "NOT met"
            verdict.append(f"{r['case']} → {r['ours']}: {r['ratio_batch']:.2f}× (+batch, median of "
                           f"{args.rounds} round(s)), worst round {worst:.2f}×, "
                           f"{r['ratio_prebuilt']:.2f}× prebuilt: {ok}")  # fmt: skip
        text += (
            f"\n\nTarget ≤ {LOSS_TARGET:.2f}× at {TARGET_SIZE[0]}×{TARGET_SIZE[1]}, with batch construction and "
            "validation, in every round:\n" + "\n".join(("- " if args.markdown else "  ") + v for v in verdict)
        )
        controls = [r for r in at_target if r.get("ratio_batch_float_ref") is not None]
        if controls:
            worsts = [r["ratio_batch_float_ref_worst"] for r in controls]
            within = sum(w <= LOSS_TARGET for w in worsts)
            text += (
                f"\n\nControl, the same run against the references given a float32 mask: worst round "
                f"{max(worsts):.2f}× ({within} of {len(controls)} veRL / OpenRLHF pairs within {LOSS_TARGET:.2f}×)"
            )
    return rows, text


def run_topk(args) -> tuple[list[dict], str]:
    import topk

    if args.smallest:
        rows = topk.run(sizes=[(64, 4096)], ks=[8], repeats=2)
    else:
        rows = topk.run(sizes=topk.QUICK_SIZES if args.quick else topk.SIZES, repeats=2 if args.quick else 3)
    headers = ["tokens", "V", "K", "naive ms", "time ratio", "naive extra fwd / fwd+bwd",
               "ours extra fwd / fwd+bwd", "ours fwd+bwd extra / (tokens·K·4 B)", "tokens·V·4 B"]  # fmt: skip
    lines = [
        [
            str(r["tokens"]),
            str(r["V"]),
            str(r["K"]),
            f"{r['naive_ms']:.0f}",
            f"{r['ratio']:.2f}",
            f"{fmt_bytes(r['naive_fwd'])} / {fmt_bytes(r['naive_extra'])}",
            f"{fmt_bytes(r['ours_fwd'])} / {fmt_bytes(r['ours_extra'])}",
            f"{r['ours_extra'] / r['tk_bytes']:.2f}",
            fmt_bytes(r["logits_bytes"]),
        ]
        for r in rows
    ]
    return rows, table(headers, lines, args.markdown)


def run_training(args) -> tuple[dict, str]:
    import training

    if args.smallest:
        res = training.run(B=1, T=32, repeats=1, layers=1, d=64, vocab=512)
    elif args.quick:
        res = training.run(B=2, T=128, repeats=3)
    else:
        res = training.run(B=8, T=256, repeats=args.train_repeats)
    head = (
        f"transformer: {res['layers']} layers, d={res['d']}, vocab {res['vocab']}, {res['n_params'] / 1e6:.2f}M params "
        f"({fmt_bytes(res['param_bytes'])} fp32), batch {res['B']}×{res['T']}; base step {res['base_step_s']:.2f} s"
    )
    headers = ["variant", "hook time / base step", "step time ratio", "stored state", "state / param memory",
               "allocated in apply()"]  # fmt: skip
    lines = []
    for r in res["rows"]:
        lines.append(
            [
                r["variant"],
                f"{100 * r['hook_frac']:.2f}%",
                f"{r['step_ratio']:.3f}",
                fmt_bytes(r["state_bytes"]) if "state_bytes" in r else "—",
                f"{100 * r['state_frac']:.2f}%" if "state_frac" in r else "—",
                fmt_bytes(r["apply_peak"]) if "apply_peak" in r else "—",
            ]
        )
    err = res["sketch_error"]
    dims = list(err["max_error"])
    err_lines = [[e["pair"], f"{e['exact']:.4f}", *(f"{e[d]:.4f}" for d in dims)] for e in err["pairs"]]
    err_lines.append(["max", "", *(f"{err['max_error'][d]:.4f}" for d in dims)])
    text = (
        head
        + "\n\n"
        + table(headers, lines, args.markdown)
        + "\n\nSketch cosine error |cos_sketch − cos_exact| (max over 3 hash seeds):\n\n"
        + table(
            ["gradient pair", "exact cos", *("default" if d is None else f"sketch_dim={d}" for d in dims)],
            err_lines,
            args.markdown,
        )
    )
    return res, text


def _size(text: str) -> tuple[int, int]:
    b, t = text.lower().replace("×", "x").split("x")
    return int(b), int(t)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (< 2 min)")
    parser.add_argument("--smallest", action="store_true", help="the smallest size of each part only (smoke test)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--cases", nargs="+", default=None, help="loss cases, e.g. verl:vanilla trl:dapo")
    parser.add_argument(
        "--sizes", nargs="+", type=_size, default=None, help="loss sizes B×T, e.g. 64x2048 (default: all)"
    )
    parser.add_argument("--repeats", type=int, default=15, help="loss timing repetitions (full run)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the whole loss measurement; report the median and the worst round"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also time the losses' compile=True setting (ppo, gspo, gspo_token)"
    )
    parser.add_argument(
        "--reference-masks",
        choices=("native", "float"),
        default="native",
        help="mask form of the veRL / OpenRLHF references: as their update paths pass it (bool / int64), or float32",
    )
    parser.add_argument("--train-repeats", type=int, default=5, help="training-step repetitions (full run)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on a shared box)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    args = parser.parse_args(argv)
    set_threads(args.threads)

    started = time.time()
    print(
        f"# stable-async overhead benchmark\n\ntorch {torch.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
        f"mode {'smallest' if args.smallest else 'quick' if args.quick else 'full'}\n",
        flush=True,
    )
    results = {}
    for part, fn, title in (
        ("losses", run_losses, "Losses: forward+backward time and peak memory, ratio to the trainer's own loss"),
        ("topk", run_topk, "Top-K divergence vs a naive full log_softmax"),
        ("training", run_training, "GAC and ESS-LR per training step"),
    ):
        if part not in args.parts:
            continue
        raw, text = fn(args)
        results[part] = raw
        print(f"## {title}\n\n{text}\n", flush=True)
    print(f"total {time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
