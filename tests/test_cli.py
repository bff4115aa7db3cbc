"""The command line, run as a user runs it."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    # The run's memory speed: the largest input's copy floor, read and written.
    bandwidth = report["copy_bandwidth"]

    def size(case):
        return math.prod(case["shape"]) * getattr(torch, case["dtype"]).itemsize

    largest = max(report["cases"], key=size)
    assert bandwidth["case"] == largest["name"] and bandwidth["seconds"] == largest["floor_seconds"]
    expected = 2 * size(largest) / largest["floor_seconds"] / 1e9
    assert bandwidth["gigabytes_per_second"] == pytest.approx(expected)
    assert f"memory during the run: the copy floor of {largest['name']}" in out
    for case in report["cases"]:
        assert set(case["modes"]) == {
            "train forward",
            "inference",
            "train forward+backward",
            "inference forward+backward",
        }
        for numbers in case["modes"].values():
            assert numbers["seconds"]["batchnorm"] > 0 and numbers["seconds"]["torch"] > 0
    assert {t["target"].split(":")[0] for t in report["summary"]["targets"]} >= {"renorm NHWC"}
    # Each variant is timed beside the plain layer in the same rounds, and compared with it.
    targets = {t["target"]: t["measured"] for t in report["summary"]["targets"]}
    assert {c["name"] for c in report["extra_cases"]} == {"renorm NHWC", "ghost NHWC", "mask NLC"}
    for case in report["extra_cases"]:
        seconds = case["modes"]["train forward"]["seconds"]
        ratio = targets[f"{case['name']}: train forward / plain <= 1.3"]
        assert seconds["plain"] > 0 and ratio == seconds["batchnorm"] / seconds["plain"]
    assert {t["verdict"] for t in report["summary"]["targets"]} <= {"met", "NO", "unclear"}
    assert {m["name"] for m in report["models"]} == {
        "mlp 784-1000-10, batch 64",
        "conv net 3x32x32, batch 32",
    }
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_repeats(capsys):
    assert main(["bench", "--repeats", "0"]) == 2
    assert "--repeats must be >= 1. Received: 0" in capsys.readouterr().err


def test_bench_rejects_devices_it_cannot_use(capsys, tmp_path):
    out = str(tmp_path / "b.json")
    assert main(["bench", "--device", "gpu0", "--json", out]) == 2
    assert "--device must name a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda", "--json", out]) == 2
        assert "no such device is available on this machine" in capsys.readouterr().err


def _subcommand_parsers(parser, path=()):
    """Every (command path, parser, help line) below ``parser``, depth first."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, subparser in action.choices.items():
                yield (*path, name), subparser, helps.get(name)
                yield from _subcommand_parsers(subparser, (*path, name))


def test_version_prints_the_package_version(capsys):
    import batchnorm

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"batchnorm {batchnorm.__version__}\n"


def test_every_command_has_a_help_line_and_a_description(capsys):
    from batchnorm.cli import build_parser

    parser = build_parser()
    found = list(_subcommand_parsers(parser))
    assert {path for path, _, _ in found} == {
        ("demo",),
        ("bench",),
        ("inspect",),
        ("demo", "placement"),
        ("demo", "shift"),
        ("demo", "modes"),
    }
    for path, subparser, help_line in found:
        assert help_line, f"{' '.join(path)} has no help line in its parent's -h"
        assert subparser.description, f"{' '.join(path)} -h has no description"
    with pytest.raises(SystemExit):
        main(["-h"])
    top = capsys.readouterr().out
    for path, _, help_line in found:
        if len(path) == 1:
            assert path[0] in top and help_line.split()[0] in top


@pytest.mark.parametrize(
    "command", [[], ["demo"], ["bench"], ["inspect"], ["demo", "placement"], ["demo", "shift"]]
)
def test_help_texts_have_no_restructuredtext_markup(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "-h"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['batchnorm', *command])}")
    assert "``" not in out and ":func:" not in out


def test_plain_text_unmarks_docstrings():
    from batchnorm.cli._main import plain_text

    assert (
        plain_text("Run ``batchnorm demo`` (see :func:`~batchnorm.diagnose`).")
        == "Run batchnorm demo (see batchnorm.diagnose)."
    )


def _no_training(monkeypatch):
    import batchnorm.cli._demo as demo_cli

    monkeypatch.setattr(demo_cli, "_run", lambda *_: pytest.fail("the demo started"))


@pytest.mark.parametrize(
    "command",
    [
        ["demo", "--out", "{file}"],
        ["demo", "--out", "{file}", "shift"],
        ["demo", "placement", "--out", "{file}"],
        ["demo", "shift", "--out", "{file}"],
        ["demo", "modes", "--out", "{file}"],
    ],
)
def test_demo_out_an_existing_file_stops_before_training(command, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    existing = tmp_path / "notes.txt"
    existing.write_text("kept\n")
    with pytest.raises(SystemExit) as exit_info:
        main([part.format(file=existing) for part in command])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --out: must be a directory to write into" in err
    assert f"Received: {str(existing)!r}, an existing file" in err
    assert existing.read_text() == "kept\n"


def test_demo_out_below_a_file_cannot_be_created(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "modes", "--out", str(tmp_path / "notes.txt" / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out: must be a directory to write into, but it cannot be created" in err
    assert f"{str(tmp_path / 'notes.txt')!r} is a file" in err


def test_demo_default_out_is_checked_too(tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-output").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "modes"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out: must be a directory" in err and "Received: 'demo-output'" in err


def test_demo_out_not_writable(tmp_path, monkeypatch, capsys):
    import batchnorm.cli._paths as paths

    _no_training(monkeypatch)
    monkeypatch.setattr(paths.os, "access", lambda *_: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "modes", "--out", str(tmp_path / "new")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "must be a directory this user can write into" in err
    assert f"({str(tmp_path)!r} is not writable)" in err


def test_demo_out_that_does_not_exist_yet_is_accepted_and_not_created(tmp_path):
    from batchnorm.cli import build_parser

    out = tmp_path / "a" / "b"
    assert build_parser().parse_args(["demo", "shift", "--out", str(out)]).out == out
    assert not (tmp_path / "a").exists()


def test_demo_without_matplotlib_stops_before_training(tmp_path, monkeypatch, capsys):
    import importlib.util

    _no_training(monkeypatch)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "matplotlib" else find_spec(name)
    )
    assert main(["demo", "modes", "--out", str(tmp_path)]) == 2
    assert "the demo's plots need matplotlib" in capsys.readouterr().err


def _no_timing(monkeypatch):
    import batchnorm.bench as bench

    monkeypatch.setattr(bench, "run_benchmark", lambda **_: pytest.fail("the bench started"))
    monkeypatch.setattr(bench, "run_sync_benchmark", lambda **_: pytest.fail("the bench started"))


@pytest.mark.parametrize("option", ["--json", "--png"])
def test_bench_output_a_directory_stops_before_timing(option, tmp_path, monkeypatch, capsys):
    _no_timing(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", option, str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: must be a file to write, not a directory" in err
    assert f"Received: {str(tmp_path)!r}, an existing directory" in err


@pytest.mark.parametrize("option", ["--json", "--png"])
def test_bench_output_in_a_missing_folder_stops_before_timing(
    option, tmp_path, monkeypatch, capsys
):
    _no_timing(monkeypatch)
    target = tmp_path / "missing" / "bench.out"
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--quick", option, str(target)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be a file in an existing directory" in err
    assert f"({str(tmp_path / 'missing')!r} does not exist)" in err


@pytest.mark.parametrize(("sync", "default"), [(False, "bench.json"), (True, "bench-sync.json")])
def test_bench_default_json_is_checked_before_timing(sync, default, tmp_path, monkeypatch, capsys):
    _no_timing(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / default).mkdir()
    assert main(["bench", "--quick", *(["--sync"] if sync else [])]) == 2
    err = capsys.readouterr().err
    assert (
        f"argument --json: must be a file to write, not a directory. Received: {default!r}" in err
    )


def test_bench_png_does_not_apply_with_sync(tmp_path, monkeypatch, capsys):
    _no_timing(monkeypatch)
    png = tmp_path / "chart.png"
    assert main(["bench", "--sync", "--png", str(png)]) == 2
    assert f"--png does not apply with --sync. Received: --png {png}" in capsys.readouterr().err


def test_bench_png_without_matplotlib_stops_before_timing(tmp_path, monkeypatch, capsys):
    import importlib.util

    _no_timing(monkeypatch)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "matplotlib" else find_spec(name)
    )
    assert main(["bench", "--png", str(tmp_path / "chart.png")]) == 2
    assert "--png needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["demo", "inspect"])
def test_an_output_path_where_no_file_can_be_made_stops_before_work(
    option, tmp_path, monkeypatch, capsys
):
    """For root, os.access says a folder is writable even on /proc and /sys; the command then
    trained or inspected and failed writing (a traceback, exit 1). The check now makes a file
    there (and removes it), so the command stops at once with exit status 2."""
    import batchnorm.cli._paths as paths

    _no_training(monkeypatch)
    monkeypatch.setattr(paths.os, "access", lambda *_: True)  # what root is told

    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(paths.tempfile, "TemporaryFile", refuse)
    arguments = (
        ["demo", "modes", "--out", str(tmp_path / "out")]
        if option == "demo"
        else ["inspect", "missing.pt", "--json", str(tmp_path / "report.json")]
    )
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2
    assert f"({str(tmp_path)!r} is not writable)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="no /proc")
def test_a_folder_under_proc_is_not_writable_even_for_root():
    import argparse

    from batchnorm.cli._paths import output_directory, output_file

    with pytest.raises(argparse.ArgumentTypeError, match="is not writable"):
        output_directory("/proc/demo-out")
    with pytest.raises(argparse.ArgumentTypeError, match="is not writable"):
        output_file("/proc/report.json")


@pytest.mark.parametrize(
    ("experiment", "name"),
    [
        ([], "curves.png"),
        ([], "history.json"),
        (["placement"], "placement.png"),
        (["placement"], "placement.json"),
        (["shift"], "shift.png"),
        (["shift"], "shift.json"),
        (["modes"], "modes.png"),
    ],
)
def test_demo_out_holding_a_directory_named_as_a_result_stops_before_training(
    experiment, name, tmp_path, monkeypatch, capsys
):
    """Only --out itself was checked: a folder named curves.png inside it let the training run
    to its end and then fail writing (a traceback, exit 1)."""
    _no_training(monkeypatch)
    (tmp_path / name).mkdir()
    assert main(["demo", *experiment, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"batchnorm demo: --out must be a folder where {name} can be written. "
        f"Received: --out {tmp_path}, where {str(tmp_path / name)!r} is a directory\n"
    )


def test_demo_out_holding_a_result_this_user_cannot_write_stops_before_training(
    tmp_path, monkeypatch, capsys
):
    import batchnorm.cli._paths as paths

    _no_training(monkeypatch)
    locked = tmp_path / "history.json"
    locked.write_text("{}\n")
    access = paths.os.access
    # root may write any file, so the read-only file is what os.access says for another user
    monkeypatch.setattr(
        paths.os, "access", lambda path, mode: Path(path) != locked and access(path, mode)
    )
    assert main(["demo", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"where {str(locked)!r} is a file this user cannot write\n" in err
    assert locked.read_text() == "{}\n"


def test_demo_out_with_results_from_an_earlier_run_is_accepted(tmp_path):
    from batchnorm.cli import build_parser
    from batchnorm.cli._demo import OUTPUT_FILES, _check

    for name in OUTPUT_FILES["classic"]:
        (tmp_path / name).write_text("old")
    _check(build_parser().parse_args(["demo", "--out", str(tmp_path)]), "classic")


def _images_npz(path: Path, size: int, images=None, labels=None) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    if images is None:
        images = rng.integers(0, 256, (20, size, size), dtype=np.uint8)
    labels = rng.integers(0, 10, len(images)) if labels is None else labels
    np.savez(path, x_train=images, y_train=labels, x_test=images[:5], y_test=labels[:5])
    return path


@pytest.mark.parametrize("size", [2, 3])
def test_demo_placement_on_images_too_small_for_its_network_exits_2(
    size, tmp_path, monkeypatch, capsys
):
    """2x2 images failed in torch's convolution and 3x3 ones in its pooling (a traceback)."""
    import batchnorm.demo._placement as placement

    monkeypatch.setattr(placement, "compare", lambda *_, **__: pytest.fail("training started"))
    data = _images_npz(tmp_path / "small.npz", size)
    arguments = ["demo", "placement", "--data", str(data), "--out", str(tmp_path / "out")]
    assert main(arguments) == 2
    out, err = capsys.readouterr()
    assert err == (
        "batchnorm demo: the placement demo needs images of at least 4x4 pixels (Conv2D 3x3, "
        f"then 2x2 max pooling). Received: images of {size}x{size} in MNIST ({data})\n"
    )
    assert "Training" not in out


def test_placement_demo_checks_the_image_size_itself(tmp_path):
    from batchnorm.demo._datasets import load_dataset
    from batchnorm.demo._placement import run_placement_demo

    small = load_dataset(_images_npz(tmp_path / "small.npz", 3))
    with pytest.raises(ValueError, match=r"at least 4x4 pixels .*Received: images of 3x3"):
        run_placement_demo(small, epochs=1, seed=0)
    fits = load_dataset(_images_npz(tmp_path / "fits.npz", 4))
    result = run_placement_demo(fits, epochs=1, seed=0, max_batches=1, stream=None)
    assert sorted(result.histories) == ["bn_after_relu", "bn_before_relu"]


def test_demo_on_images_scaled_to_0_1_exits_2_before_training(tmp_path, monkeypatch, capsys):
    """They were cast to uint8: every pixel 0, and the demo trained on blank images."""
    import numpy as np

    import batchnorm.demo._classic as classic

    monkeypatch.setattr(classic, "compare", lambda *_, **__: pytest.fail("training started"))
    images = np.random.default_rng(0).random((20, 6, 6)).astype(np.float32)
    data = _images_npz(tmp_path / "scaled.npz", 6, images=images)
    assert main(["demo", "--data", str(data), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"batchnorm demo: {data} (x_train, y_train): images must be whole pixel values 0..255"
    )
    assert err.count("\n") == 1 and "not all whole numbers" in err
