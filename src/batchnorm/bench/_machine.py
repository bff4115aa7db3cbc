"""The machine a benchmark ran on, as its report and printed header name it.

Ratios against torch move with the CPU: the development VM changed from an AMD EPYC to an Intel
Xeon between two sessions, and (32, 4096) training forward+backward went from 0.94x torch's time
to 1.93x with the same code. A report that names the CPU model tells such runs apart.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name: Linux's ``/proc/cpuinfo`` "model name", else
    ``platform.processor()``, else "unknown CPU"."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_facts() -> dict[str, object]:
    """The CPU's model and core count."""
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count()}
