"""Command line: ``batchnorm demo``, ``batchnorm bench`` and ``batchnorm inspect`` (also ``python -m batchnorm ...``)."""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys

from batchnorm.cli._bench import add_bench_parser, run_bench
from batchnorm.cli._demo import add_demo_parser, run_demo
from batchnorm.cli._inspect import add_inspect_parser, run_inspect

_COMMANDS = {"demo": run_demo, "bench": run_bench, "inspect": run_inspect}


def build_parser() -> argparse.ArgumentParser:
    """The ``batchnorm`` parser with its three sub-commands and ``--version``."""
    parser = argparse.ArgumentParser(prog="batchnorm", description=plain_text(__doc__ or ""))
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(
        dest="command", required=True, title="commands", metavar="{demo,bench,inspect}"
    )
    add_demo_parser(commands)
    add_bench_parser(commands)
    add_inspect_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command in ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    arguments = build_parser().parse_args(argv)
    return _COMMANDS[arguments.command](arguments)


def package_version() -> str:
    """The installed distribution's version, else ``batchnorm.__version__`` (a source tree)."""
    try:
        return importlib.metadata.version("batchnorm")
    except importlib.metadata.PackageNotFoundError:
        # The package is always imported before its cli; an import statement here would point
        # from cli up to the package root, against the one-way import rule.
        return str(getattr(sys.modules.get("batchnorm"), "__version__", "unknown"))


def plain_text(docstring: str) -> str:
    """A docstring as terminal help: reStructuredText ``literals`` and :role:`targets` unmarked.

    Example:
        >>> plain_text("Run ``batchnorm demo``, see :func:`~batchnorm.diagnose`.")
        'Run batchnorm demo, see batchnorm.diagnose.'
    """
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", docstring)
    return re.sub(r"``(.+?)``", r"\1", text)
