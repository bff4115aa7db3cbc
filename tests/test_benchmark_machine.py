"""The machine a benchmark report names (batchnorm.bench._machine)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from batchnorm.bench._machine import cpu_facts, cpu_model


def test_cpu_model_is_the_model_name_line_of_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 143\n"
        "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: fpu vme\n\n"
        "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Processor\n"
    )
    assert cpu_model(cpuinfo) == "Intel(R) Xeon(R) Processor"


def test_cpu_model_without_cpuinfo_falls_back_to_the_platform(tmp_path: Path) -> None:
    expected = platform.processor() or "unknown CPU"
    assert cpu_model(tmp_path / "missing") == expected
    (tmp_path / "no-model").write_text("processor\t: 0\nmodel name\t:\n")
    assert cpu_model(tmp_path / "no-model") == expected


def test_cpu_facts_name_the_model_and_core_count() -> None:
    facts = cpu_facts()
    assert facts["cpu_count"] == os.cpu_count()
    assert isinstance(facts["cpu_model"], str) and facts["cpu_model"]
