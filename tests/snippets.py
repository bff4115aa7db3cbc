"""Running a Python program in a fresh process from the repository root (tests of process-wide
state: Numba's cache, threading layer and CPU target)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run_program(
    program: str, *arguments: str, **environment: str
) -> subprocess.CompletedProcess[str]:
    """``python -c program arguments...`` with ``environment`` added to this process's; its
    exit status and output are the caller's to check."""
    return subprocess.run(
        [sys.executable, "-c", program, *arguments],
        env={**os.environ, **environment},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
