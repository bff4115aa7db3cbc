"""Command line: ``batchnorm demo``, ``batchnorm bench`` and ``batchnorm inspect`` (also ``python -m batchnorm ...``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from batchnorm._inspect_cli import add_inspect_parser, run_inspect
from batchnorm.demo import add_demo_parser, run_demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchnorm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(commands)
    bench = commands.add_parser(
        "bench", help="time batchnorm against torch native batch norm and the copy floor"
    )
    bench.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    bench.add_argument("--repeats", type=int, default=9, help="timed runs per median (default 9)")
    bench.add_argument(
        "--json", type=Path, default=Path("bench.json"), help="where to write numbers"
    )
    bench.add_argument("--png", type=Path, default=None, help="also draw a bar chart here")
    bench.add_argument(
        "--no-compile-time",
        action="store_true",
        help="skip timing the first call in fresh processes",
    )
    bench.add_argument(
        "--sync",
        action="store_true",
        help="time synchronized batch norm over 2 gloo processes instead (default json: bench-sync.json)",
    )
    add_inspect_parser(commands)
    return parser


def run_bench(arguments: argparse.Namespace) -> int:
    from batchnorm._benchmark import format_table, run_benchmark

    if arguments.repeats < 1:
        print(
            f"batchnorm bench: --repeats must be >= 1. Received: {arguments.repeats}",
            file=sys.stderr,
        )
        return 2
    if arguments.sync:
        from batchnorm._benchmark_sync import run_sync_bench

        return run_sync_bench(arguments)
    report = run_benchmark(
        quick=arguments.quick,
        repeats=arguments.repeats,
        compile_time=not arguments.no_compile_time,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    machine = report["machine"]
    print(
        f"CPU, {machine['threads']} threads, torch {machine['torch']}; medians of {report['repeats']} runs"
    )
    if "first_call_seconds" in report:
        first = report["first_call_seconds"]
        print(
            f"first call: {first['cold_cache']:.1f} s with JIT compilation, "
            f"{first['warm_cache']:.1f} s from the on-disk cache"
        )
    print(format_table(report["cases"], report["extra_cases"], report["summary"]))
    arguments.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"numbers written to {arguments.json}")
    if arguments.png is not None:
        from batchnorm._benchmark_plot import plot_benchmark

        plot_benchmark(report, arguments.png)
        print(f"chart written to {arguments.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.command == "demo":
        return run_demo(arguments)
    elif arguments.command == "bench":
        return run_bench(arguments)
    elif arguments.command == "inspect":
        return run_inspect(arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
