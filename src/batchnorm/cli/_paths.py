"""argparse ``type=`` checks for output paths, so a bad one stops the command before any work.

A run that trains or times for minutes and then cannot write its results has wasted them; these
checks run while the arguments are parsed (argparse also passes string defaults through them) and
fail with argparse's usage message and exit status 2. :func:`files_to_write` checks the files a
command will write into such a folder, once it knows which.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="tool")
    >>> _ = parser.add_argument("--out", type=output_directory, default="results")
    >>> str(parser.parse_args([]).out)
    'results'
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def _can_write_in(folder: Path) -> bool:
    """Whether a file can be made in ``folder``, found by making (and removing) one: for root,
    ``os.access`` says yes even on /sys and /proc, where the write then failed after the work."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def output_directory(text: str) -> Path:
    """A folder to write into: an existing writable one, or one that can be created."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"must be a directory to write into (created if missing). Received: {text!r}, "
            "an existing file"
        )
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(
            f"must be a directory to write into, but it cannot be created: {str(existing)!r} "
            f"is a file. Received: {text!r}"
        )
    if not _can_write_in(existing):
        raise argparse.ArgumentTypeError(
            f"must be a directory this user can write into. Received: {text!r} "
            f"({str(existing)!r} is not writable)"
        )
    return path


def output_file(text: str) -> Path:
    """A file to write: not a folder, inside an existing folder, writable."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"must be a file to write, not a directory. Received: {text!r}, an existing directory"
        )
    folder = path.parent
    if not folder.is_dir():
        state = "is not a directory" if folder.exists() else "does not exist"
        raise argparse.ArgumentTypeError(
            f"must be a file in an existing directory. Received: {text!r} ({str(folder)!r} {state})"
        )
    writable = os.access(path, os.W_OK) if path.exists() else _can_write_in(folder)
    if not writable:
        raise argparse.ArgumentTypeError(
            f"must be a file this user can write. Received: {text!r} "
            f"({str(path if path.exists() else folder)!r} is not writable)"
        )
    return path


def files_to_write(folder: Path, names: Iterable[str]) -> None:
    """Check that the files ``names`` can be written into ``folder`` (already checked by
    :func:`output_directory`): none is a directory or a file this user cannot write.

    Raises:
        ValueError: naming the first file that cannot be written.
    """
    for name in names:
        path = folder / name
        if path.is_dir():
            problem = "is a directory"
        elif path.exists() and not os.access(path, os.W_OK):
            problem = "is a file this user cannot write"
        else:
            continue
        raise ValueError(
            f"--out must be a folder where {name} can be written. Received: --out {folder}, "
            f"where {str(path)!r} {problem}"
        )
