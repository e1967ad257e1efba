"""The ``stable-async`` command. Subcommands:

stable-async bench ...   the staleness stress benchmark (see ``stable-async bench --help``)
stable-async report RUN  a finished run's signals as pictures and verdicts (``stable-async report --help``)
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="stable-async",
        description="Stabilizers for asynchronous (off-policy, stale-rollout) RL post-training of LLMs.",
    )
    from stable_async import __version__

    parser.add_argument("--version", action="version", version=f"stable-async {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    bench = commands.add_parser(
        "bench",
        help="run the staleness stress benchmark (needs the 'bench' extra: matplotlib, tqdm)",
        description="Simulated asynchronous RL on a CPU: every stabilizer at every lag, several seeds.",
    )
    from stable_async.bench.__main__ import add_arguments, run

    add_arguments(bench)
    bench.set_defaults(handler=run)
    report = commands.add_parser(
        "report",
        help="draw a finished run's ESS/N, KL, clip fractions, gradient cosine... and print verdicts",
        description="Read a run's logged metrics (JSON lines, CSV, TRL trainer_state.json, TensorBoard, W&B offline, "
        "the benchmark's output) and write one PNG per signal, index.html and verdicts.json.",
    )
    from stable_async.runreport import command as report_command

    report_command.add_arguments(report)
    report.set_defaults(handler=report_command.run)
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
