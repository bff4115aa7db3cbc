"""The command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from batchnorm.__main__ import main


def test_demo_shows_modes_and_frozen_layer(capsys):
    assert main(["demo", "--steps", "20", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "training=False -> output mean" in out
    assert "moving statistics unchanged" in out


def test_demo_rejects_bad_steps(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps must be >= 1. Received: 0" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "batchnorm", "demo", "--steps", "5"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "after   5 steps: moving mean" in result.stdout
