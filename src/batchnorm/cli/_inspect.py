"""``batchnorm inspect CHECKPOINT``: the static batch-norm checks on a saved checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_inspect_parser(commands: Any) -> None:
    """Register the ``inspect`` sub-command on an ``add_subparsers()`` object."""
    inspect = commands.add_parser(
        "inspect",
        help="check the batch-norm statistics saved in a checkpoint (NaN/Inf/zero/negative "
        "variance, momentum horizon)",
    )
    inspect.add_argument("checkpoint", type=Path, help="a torch state_dict (.pt/.pth)")
    inspect.add_argument("--json", type=Path, default=None, help="also write the report here")


def run_inspect(arguments: argparse.Namespace) -> int:
    """Print the report table; exit status 0 when healthy, 1 with problems, 2 on a bad file."""
    from batchnorm.tools._inspect import inspect_checkpoint

    try:
        report = inspect_checkpoint(arguments.checkpoint)
    except (OSError, ValueError) as error:
        print(f"batchnorm inspect: {error}", file=sys.stderr)
        return 2
    print(report)
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        print(f"report written to {arguments.json}")
    return 0 if report.healthy else 1
