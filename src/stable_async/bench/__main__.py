"""``stable-async bench`` / ``python -m stable_async.bench``: run a grid, write and print the results.

stable-async bench --preset quick --out bench-out
stable-async bench --preset full --workers 2 --out bench-full --report-md docs/benchmark-results.md
stable-async bench --from bench-full --report-md docs/benchmark-results.md   # re-render only
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from stable_async.bench.engine import OFFLINE, STALENESS_MODELS
from stable_async.bench.methods import METHODS, TUNED_LR, get_method
from stable_async.bench.presets import PRESETS
from stable_async.bench.tasks import TASKS


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _lags(text: str) -> tuple[int | str, ...]:
    return tuple(OFFLINE if x.strip() == OFFLINE else int(x) for x in text.split(",") if x.strip())


def _shard(text: str) -> tuple[int, int]:
    k, _, n = text.partition("/")
    try:
        index, count = int(k), int(n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"expected 0 <= K < N, got {text!r}")
    return index, count


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if names == ("all",):
        return tuple(METHODS)
    for name in names:
        try:
            get_method(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{err}; see --list") from None
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="grid and budget (default: quick)")
    p.add_argument("--methods", type=_names, help="comma-separated method names, or 'all' (default: the preset's)")
    p.add_argument(
        "--lags", type=_lags, help="comma-separated staleness bounds in training steps, or 'offline', e.g. 0,4,offline"
    )
    p.add_argument(
        "--staleness", choices=STALENESS_MODELS, help="staleness model for every block (default: the preset's)"
    )
    p.add_argument("--seeds", type=_ints, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--tasks", type=lambda s: tuple(s.split(",")), help=f"comma-separated, from {list(TASKS)}")
    p.add_argument("--steps", type=int, help="training steps per run (default: the preset's)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a BenchSettings field (presets.py), e.g. --set steps=64 --set reward=outcome",
    )
    p.add_argument("--logit-noise", type=float, help="engine mismatch: std of the noise on the engine's logits")
    p.add_argument("--buggy-fraction", type=float, help="friction: fraction of sequences from a buggy actor")
    p.add_argument("--top-p", type=float, help="engine samples with nucleus top-p (mu from its renormalized top-p set)")
    p.add_argument("--reward-corruption", type=float, help="friction: fraction of rewards replaced by noise")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default: bench-out)")
    p.add_argument(
        "--from",
        dest="from_dirs",
        type=Path,
        action="append",
        help="do not run: re-render DIR/results.json (tables, Markdown, plots); given several times, merge "
        "the runs of each (e.g. the shards of one grid) into --out",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        help="K/N: run only every N-th run of the grid, starting at the K-th (0-based); merge with --from",
    )
    p.add_argument("--report-md", type=Path, help="also write the Markdown results section to this file")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the methods and presets, then exit")


def _list() -> str:
    lines = ["methods (each also as NAME@tuned, at its swept lr, or NAME@lr=X):"]
    lines += [
        f"  {m.name:<18} {m.summary}" + (f" [tuned lr {TUNED_LR[m.name]:g}]" if m.name in TUNED_LR else "")
        for m in METHODS.values()
    ]
    lines += ["presets:"]
    for p in PRESETS.values():
        lines.append(f"  {p.name:<6} {p.description}")
        for b in p.blocks:
            lines.append(
                f"         {b.settings.task}/{b.settings.reward}/H={b.settings.length}/{b.settings.engine.staleness}: "
                f"{len(b.methods)} methods, lags {list(b.lags)}, seeds {list(b.seeds)}, {b.settings.steps} steps"
            )
    return "\n".join(lines)


def _override(settings: Any, items: list[str]) -> Any:
    for item in items:
        name, _, text = item.partition("=")
        fields = {f.name: f for f in dataclasses.fields(settings) if f.name != "engine"}
        if name not in fields or not text:
            raise SystemExit(f"--set: expected FIELD=VALUE with FIELD in {sorted(fields)}, got {item!r}")
        current = getattr(settings, name)
        if isinstance(current, str):
            value: Any = text
        elif isinstance(current, bool):
            value = text.lower() in ("1", "true", "yes")
        elif isinstance(current, int):
            value = int(text)
        else:
            value = float(text)
        settings = dataclasses.replace(settings, **{name: value})
    return settings


def _specs(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    from stable_async.bench.runner import grid

    preset = PRESETS[args.preset]
    engine_changes = {
        k: v
        for k, v in {
            "staleness": args.staleness,
            "logit_noise": args.logit_noise,
            "buggy_fraction": args.buggy_fraction,
            "reward_corruption": args.reward_corruption,
            "top_p": args.top_p,
        }.items()
        if v is not None
    }
    blocks = []
    for block in preset.blocks:
        if args.tasks and block.settings.task not in args.tasks:
            continue
        settings = _override(block.settings, args.overrides)
        if args.steps is not None:
            settings = dataclasses.replace(settings, steps=args.steps)
        if engine_changes:
            settings = dataclasses.replace(settings, engine=dataclasses.replace(settings.engine, **engine_changes))
        blocks.append(
            dataclasses.replace(
                block,
                settings=settings,
                methods=args.methods or block.methods,
                lags=args.lags or block.lags,
                seeds=args.seeds or block.seeds,
            )
        )
    for task in args.tasks or ():
        if task not in TASKS:
            raise SystemExit(f"--tasks: unknown task {task!r}; expected one of {list(TASKS)}")
    specs = list(dict.fromkeys(grid(blocks)))  # --methods / --lags may make two blocks the same
    return specs, {"preset": preset.name, "blocks": [dataclasses.asdict(b) for b in blocks]}


def run(args: argparse.Namespace) -> int:
    from stable_async.bench import report

    if args.list:
        print(_list())
        return 0
    if args.from_dirs:
        out_dir = args.from_dirs[0]
        records, info = report.load(out_dir)
        if len(args.from_dirs) > 1:
            records, info = report.merge([report.load(d) for d in args.from_dirs])
            out_dir = args.out
            report.annotate(records)
            report.write_outputs(records, info, out_dir)
    else:
        import torch

        from stable_async.bench.runner import run_grid

        out_dir = args.out
        specs, info = _specs(args)
        if args.shard is not None:
            index, count = args.shard
            specs = specs[index::count]
        print(f"stable-async bench: {len(specs)} runs on {args.workers} worker(s) -> {out_dir}", file=sys.stderr)
        start = time.perf_counter()
        out_dir.mkdir(parents=True, exist_ok=True)
        journal = out_dir / "runs.jsonl"  # one line per finished run, so that an interrupted grid keeps its runs
        journal.unlink(missing_ok=True)
        records = run_grid(specs, workers=args.workers, progress=not args.no_progress, journal=journal)
        info.update(
            command="stable-async bench " + shlex.join(sys.argv[1:] if sys.argv[1:2] != ["bench"] else sys.argv[2:]),
            runs=len(records),
            workers=args.workers,
            wall_time_s=time.perf_counter() - start,
            cpu_time_s=sum(r["cpu_time_s"] for r in records),
            torch=torch.__version__,
            python=platform.python_version(),
            methods={m.name: m.summary for m in METHODS.values()},
            tuned_lr=dict(TUNED_LR),
        )
        report.annotate(records)
        report.write_outputs(records, info, out_dir)
    if not args.no_plots:  # with --from too: re-draws the figures from the stored records
        from stable_async.bench.plots import write_plots

        write_plots(records, out_dir)
    print(report.terminal_report(records))
    if args.report_md is not None:
        report.write_markdown(records, info, out_dir, args.report_md)
        print(f"wrote {args.report_md}", file=sys.stderr)
    if "wall_time_s" in info:
        print(
            f"{info['runs']} runs in {info['wall_time_s']:.0f} s wall, {info['cpu_time_s'] / max(info['runs'], 1):.1f} "
            f"cpu s/run; outputs in {out_dir}/",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stable-async bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
