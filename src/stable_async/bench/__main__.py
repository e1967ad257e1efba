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

from stable_async.bench.methods import METHODS, VARIANTS
from stable_async.bench.presets import PRESETS
from stable_async.bench.tasks import TASKS


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if names == ("all",):
        return tuple(METHODS)
    unknown = [n for n in names if n not in METHODS and n not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; see --list")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="grid and budget (default: quick)")
    p.add_argument("--methods", type=_names, help="comma-separated method names, or 'all' (default: the preset's)")
    p.add_argument("--lags", type=_ints, help="comma-separated lags in training steps, e.g. 0,8,32")
    p.add_argument("--seeds", type=_ints, help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--tasks", type=lambda s: tuple(s.split(",")), help=f"comma-separated, from {list(TASKS)}")
    p.add_argument("--steps", type=int, help="training steps per run (default: the preset's)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a BenchSettings field (presets.py), e.g. --set head_scale=1 --set reward=prefix",
    )
    p.add_argument("--logit-noise", type=float, help="engine mismatch: std of the noise on the engine's logits")
    p.add_argument("--buggy-fraction", type=float, help="friction: fraction of sequences from a buggy actor")
    p.add_argument("--reward-corruption", type=float, help="friction: fraction of rewards replaced by noise")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel processes")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default: bench-out)")
    p.add_argument(
        "--from", dest="from_dir", type=Path, help="do not run: re-render DIR/results.json (tables, Markdown, plots)"
    )
    p.add_argument("--report-md", type=Path, help="also write the Markdown results section to this file")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list the methods and presets, then exit")


def _list() -> str:
    lines = ["methods:"] + [f"  {m.name:<16} {m.summary}" for m in METHODS.values()]
    lines += ["sweep variants (benchmarks/staleness/sweep.md):"] + [
        f"  {m.name:<16} {m.summary}" for m in VARIANTS.values()
    ]
    lines += ["presets:"]
    for p in PRESETS.values():
        lines.append(
            f"  {p.name:<6} methods={','.join(p.methods)} lags={list(p.lags)} seeds={list(p.seeds)} "
            f"tasks={list(p.tasks)} steps={p.settings.steps}"
        )
    return "\n".join(lines)


def _specs(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    from stable_async.bench.runner import grid

    preset = PRESETS[args.preset]
    settings = preset.settings
    if args.steps is not None:
        settings = dataclasses.replace(settings, steps=args.steps)
    for item in args.overrides:
        name, _, text = item.partition("=")
        fields = {f.name: f for f in dataclasses.fields(settings) if f.name != "engine"}
        if name not in fields or not text:
            raise SystemExit(f"--set: expected FIELD=VALUE with FIELD in {sorted(fields)}, got {item!r}")
        current = getattr(settings, name)
        value = text if isinstance(current, str) else (int(text) if isinstance(current, int) else float(text))
        settings = dataclasses.replace(settings, **{name: value})
    engine_changes = {
        k: v
        for k, v in {
            "logit_noise": args.logit_noise,
            "buggy_fraction": args.buggy_fraction,
            "reward_corruption": args.reward_corruption,
        }.items()
        if v is not None
    }
    if engine_changes:
        settings = dataclasses.replace(settings, engine=dataclasses.replace(settings.engine, **engine_changes))
    tasks = args.tasks or preset.tasks
    for task in tasks:
        if task not in TASKS:
            raise SystemExit(f"--tasks: unknown task {task!r}; expected one of {list(TASKS)}")
    specs = grid(args.methods or preset.methods, args.lags or preset.lags, args.seeds or preset.seeds, settings, tasks)
    return specs, {"preset": preset.name, "settings": dataclasses.asdict(settings)}


def run(args: argparse.Namespace) -> int:
    from stable_async.bench import report

    if args.list:
        print(_list())
        return 0
    if args.from_dir is not None:
        out_dir = args.from_dir
        records, info = report.load(out_dir)
    else:
        import torch

        from stable_async.bench.runner import run_grid

        out_dir = args.out
        specs, info = _specs(args)
        print(f"stable-async bench: {len(specs)} runs on {args.workers} worker(s) -> {out_dir}", file=sys.stderr)
        start = time.perf_counter()
        records = run_grid(specs, workers=args.workers, progress=not args.no_progress)
        info.update(
            command="stable-async bench " + shlex.join(sys.argv[1:] if sys.argv[1:2] != ["bench"] else sys.argv[2:]),
            runs=len(records),
            workers=args.workers,
            wall_time_s=time.perf_counter() - start,
            cpu_time_s=sum(r["cpu_time_s"] for r in records),
            torch=torch.__version__,
            python=platform.python_version(),
            methods={m.name: m.summary for m in [*METHODS.values(), *VARIANTS.values()]},
        )
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
