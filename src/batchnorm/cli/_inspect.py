"""``batchnorm inspect CHECKPOINT``: the static batch-norm checks on a saved checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from batchnorm.cli._paths import output_file

DESCRIPTION = (
    "Check the batch-norm statistics saved in a checkpoint, without running the model: NaN, "
    "Inf, negative or zero moving variance, NaN/Inf moving mean, statistics that are not real "
    "numbers, and a momentum whose averaging horizon is longer than the steps taken. Reads a "
    "torch state_dict (.pt/.pth, loaded with weights_only=True; also one nested under "
    "'state_dict', 'model', ...), a tf-keras .h5 file or a Keras 3 .keras file (these two need "
    "the keras extra: pip install 'batchnorm[keras]'). Exit status: 0 healthy, 1 problems "
    "found, 2 the file cannot be read."
)


def add_inspect_parser(commands: Any) -> None:
    """Register the ``inspect`` sub-command on an ``add_subparsers()`` object."""
    inspect = commands.add_parser(
        "inspect",
        help="check the batch-norm statistics saved in a checkpoint (.pt/.pth, .h5, .keras)",
        description=DESCRIPTION,
    )
    inspect.add_argument(
        "checkpoint",
        type=Path,
        help="a torch state_dict (.pt/.pth), a tf-keras .h5 or a Keras 3 .keras file",
    )
    inspect.add_argument(
        "--json", type=output_file, default=None, help="also write the report here as JSON"
    )


def run_inspect(arguments: argparse.Namespace) -> int:
    """Print the report table; exit status 0 when healthy, 1 with problems, 2 on a bad file."""
    from batchnorm.tools._inspect import inspect_checkpoint, without_terminal_codes

    try:
        report = inspect_checkpoint(arguments.checkpoint)
    except (OSError, ValueError, ImportError) as error:
        # The text comes from the file and from torch: no escape codes reach the terminal.
        print(f"batchnorm inspect: {without_terminal_codes(str(error))}", file=sys.stderr)
        return 2
    print(without_terminal_codes(str(report)))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        print(f"report written to {arguments.json}")
    return 0 if report.healthy else 1
