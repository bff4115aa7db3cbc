"""The command line, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from batchnorm.__main__ import main


def test_demo_modes_shows_modes_and_frozen_layer(capsys, tmp_path):
    assert main(["demo", "modes", "--steps", "20", "--seed", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "training=False (moving stats) -> mean" in out
    assert "moving statistics unchanged, frozen layers run in inference mode" in out
    assert (tmp_path / "modes.png").is_file()


def test_demo_rejects_bad_steps(capsys):
    assert main(["demo", "modes", "--steps", "0"]) == 2
    assert "--steps must be >= 1. Received: 0" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "batchnorm",
            "demo",
            "modes",
            "--steps",
            "5",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "2. Moving mean of channel 0" in result.stdout
    assert f"wrote {tmp_path / 'modes.png'}" in result.stdout


def test_demo_help_lists_the_experiments(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "{placement,shift,modes}" in out and "--data" in out and "--epochs" in out


def test_bench_quick_writes_table_json_and_chart(tmp_path, capsys):
    import json

    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    code = main(
        [
            "bench",
            "--quick",
            "--repeats",
            "1",
            "--no-compile-time",
            "--allocators",
            "default",
            "--json",
            str(json_path),
            "--png",
            str(png_path),
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    assert "| conv-early NCHW |" in out and "ours / torch (spread)" in out
    assert "| mlp 784-1000-10, batch 64 |" in out
    # stderr is not a terminal here: no redrawn bar, one closing progress line.
    assert "\r" not in err and err.count("\n") == 1 and err.startswith("bench: 100%")
    report = json.loads(json_path.read_text())
    assert {c["name"] for c in report["cases"]} >= {"dense NC", "sequence NLC", "small-batch NC"}
    for case in report["cases"]:
        assert set(case["modes"]) == {"train forward", "inference", "train forward+backward"}
        for numbers in case["modes"].values():
            assert numbers["seconds"]["batchnorm"] > 0 and numbers["seconds"]["torch"] > 0
    assert {t["target"].split(":")[0] for t in report["summary"]["targets"]} >= {"renorm NHWC"}
    assert {t["verdict"] for t in report["summary"]["targets"]} <= {"met", "NO", "unclear"}
    assert {m["name"] for m in report["models"]} == {
        "mlp 784-1000-10, batch 64",
        "conv net 3x32x32, batch 32",
    }
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_repeats(capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1. Received: 0" in capsys.readouterr().err
