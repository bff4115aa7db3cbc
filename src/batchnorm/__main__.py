"""Command line: ``batchnorm demo`` (also ``python -m batchnorm demo``)."""

from __future__ import annotations

import argparse
import sys

from batchnorm._demo_modes import run_modes_demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchnorm", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="show training vs inference mode on a small example")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if arguments.command == "demo":
        if arguments.steps < 1:
            print(
                f"batchnorm demo: --steps must be >= 1. Received: {arguments.steps}",
                file=sys.stderr,
            )
            return 2
        print(run_modes_demo(seed=arguments.seed, steps=arguments.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
