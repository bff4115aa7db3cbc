"""Command line: ``batchnorm demo``, ``batchnorm bench`` and ``batchnorm inspect`` (also ``python -m batchnorm ...``)."""

from __future__ import annotations

import argparse

from batchnorm.cli._bench import add_bench_parser, run_bench
from batchnorm.cli._demo import add_demo_parser, run_demo
from batchnorm.cli._inspect import add_inspect_parser, run_inspect

_COMMANDS = {"demo": run_demo, "bench": run_bench, "inspect": run_inspect}


def build_parser() -> argparse.ArgumentParser:
    """The ``batchnorm`` parser with its three sub-commands."""
    parser = argparse.ArgumentParser(prog="batchnorm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_parser(commands)
    add_bench_parser(commands)
    add_inspect_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    arguments = build_parser().parse_args(argv)
    return _COMMANDS[arguments.command](arguments)
