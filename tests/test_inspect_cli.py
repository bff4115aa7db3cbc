"""`batchnorm inspect` on checkpoints that are broken, not checkpoints, or not files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from batchnorm.__main__ import main
from batchnorm.tools._inspect import inspect_checkpoint, inspect_statistics, without_terminal_codes

GOLDEN = Path(__file__).parent / "golden"


def _torch_batch_norm(**buffers: torch.Tensor) -> dict[str, torch.Tensor]:
    state = {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)}
    state.update({f"bn.{name}": value for name, value in buffers.items()})
    return state


def test_non_scalar_num_batches_tracked_is_a_problem(tmp_path, capsys):
    path = tmp_path / "steps.pt"
    torch.save(_torch_batch_norm(num_batches_tracked=torch.tensor([3, 4])), path)
    report_path = tmp_path / "report.json"
    assert main(["inspect", str(path), "--json", str(report_path)]) == 1
    out, err = capsys.readouterr()
    assert (
        "bn: num_batches_tracked must be one non-negative whole number. "
        "Received: a tensor of shape (2,)"
    ) in out
    assert err == ""
    layer = json.loads(report_path.read_text())["layers"][0]
    assert layer["steps"] is None and layer["problems"] == layer["unusable"]


@pytest.mark.parametrize(
    ("steps", "received"), [(-1, "-1"), (2.5, "2.5"), (float("nan"), "nan"), ([], "a tensor")]
)
def test_a_step_count_that_is_not_one_whole_number_is_a_problem(steps, received):
    report = inspect_statistics(
        {"bn": {"moving_mean": [0.0], "moving_variance": [1.0], "steps": steps}}
    )
    (problem,) = report.problems["bn"]
    assert problem.startswith("steps must be one non-negative whole number. Received: " + received)


def test_a_whole_float_step_count_is_accepted():
    report = inspect_statistics(
        {"bn": {"moving_mean": [0.0], "moving_variance": [1.0], "steps": 4.0}}
    )
    assert report.healthy and report["bn"].steps == 4


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_statistics_are_a_problem(dtype, tmp_path, capsys):
    path = tmp_path / "complex.pt"
    state = _torch_batch_norm()
    state["bn.running_var"] = state["bn.running_var"].to(dtype)
    torch.save(state, path)
    assert main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    name = str(dtype).removeprefix("torch.")
    assert (
        f"bn: running_var holds complex numbers ({name}): batch-norm statistics must be real" in out
    )
    assert "running_mean holds" not in out


def test_complex_statistics_from_a_mapping():
    report = inspect_statistics({"bn": {"moving_mean": [0j, 1j], "moving_variance": [1.0, 1.0]}})
    assert report.problems == {
        "bn": ["moving_mean holds complex numbers (complex64): batch-norm statistics must be real"]
    }


@pytest.mark.parametrize(
    ("content", "received"),
    [
        (b"epoch,loss\n1,0.5\n", "Received: a file starting with b'epoch,loss\\n1,0.5\\n'"),
        (b"", "Received: an empty file"),
    ],
)
def test_a_file_that_is_no_checkpoint_is_named(content, received, tmp_path, capsys):
    path = tmp_path / "log.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"is not a PyTorch checkpoint or a Keras file") as error:
        inspect_checkpoint(path)
    assert received in str(error.value)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"Could not read {str(path)!r}: it is not a PyTorch checkpoint or a Keras file" in err
    assert "Expected a state_dict saved with torch.save (.pt/.pth)" in err
    assert received in err and "KeyError" not in err


def test_a_directory_is_named_as_one(tmp_path, capsys):
    folder = tmp_path / "checkpoints.pt"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a checkpoint file"):
        inspect_checkpoint(folder)
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{str(folder)!r} is a directory, not a checkpoint file" in err
    assert f"Received: the directory {str(folder)!r}" in err


def test_a_missing_file_is_named(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(FileNotFoundError, match=r"No checkpoint file at .*missing.pt'.*Received"):
        inspect_checkpoint(missing)


def test_torch_load_errors_reach_the_terminal_without_escape_codes(tmp_path, capsys):
    path = tmp_path / "whole_model.pt"
    torch.save(nn.BatchNorm1d(3), path)
    with pytest.raises(ValueError, match=r"Could not read .* with weights_only=True") as error:
        inspect_checkpoint(path)
    assert "\x1b" not in str(error.value)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Weights only load failed" in err and "\x1b" not in err


def test_layer_names_reach_the_terminal_without_escape_codes(tmp_path, capsys):
    path = tmp_path / "names.pt"
    state = _torch_batch_norm()
    state["\x1b[31mred\x1b[0m.running_mean"] = torch.zeros(1)
    state["\x1b[31mred\x1b[0m.running_var"] = -torch.ones(1)
    torch.save(state, path)
    assert main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "red: negative variance in 1 channel(s) [0]" in out and "\x1b" not in out


@pytest.mark.parametrize(
    "text",
    ["\x1b[1mbold\x1b[0m", "\x1b[38;5;196mred\x1b[m", "\x1b]8;;https://x\x07link\x1b]8;;\x07"],
)
def test_without_terminal_codes(text):
    assert without_terminal_codes(text) in {"bold", "red", "link"}


@pytest.mark.parametrize(
    ("name", "renamed"), [("tfk_model.h5", "model.pt"), ("k3_model.keras", "model.pth")]
)
def test_a_renamed_keras_file_is_read_by_content(name, renamed, tmp_path, capsys):
    pytest.importorskip("h5py")
    shutil.copy(GOLDEN / name, tmp_path / renamed)
    assert main(["inspect", str(tmp_path / renamed)]) == 0
    assert "BatchNormalization (" in capsys.readouterr().out


def test_inspect_help_names_every_format_and_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["inspect", "-h"])
    out = " ".join(capsys.readouterr().out.split())
    assert ".pt/.pth" in out and ".h5" in out and ".keras" in out
    assert "Exit status: 0 healthy, 1 problems found, 2 the file cannot be read" in out


def test_inspect_json_into_a_directory_stops_before_reading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(tmp_path / "missing.pt"), "--json", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --json: must be a file to write, not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["model.h5", "model.hdf5", "model.keras"])
def test_a_torch_checkpoint_with_a_keras_name_is_read_as_torch(name, tmp_path, capsys):
    """The suffix won over the content: a state_dict saved as "model.h5" was refused as a
    damaged Keras archive (exit 2); the same bytes named .pt read."""
    path = tmp_path / name
    torch.save(nn.BatchNorm1d(4).state_dict(), path)
    report = inspect_checkpoint(path)
    assert len(report.layers) == 1 and not report.problems
    assert main(["inspect", str(path)]) == 0


@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_statistics_without_dense_values_are_named(kind, tmp_path, capsys):
    """torch.load reads a state_dict of meta or sparse tensors; inspect then crashed with a
    traceback (exit 1). Now exit 2 naming the tensor."""
    path = tmp_path / "state.pt"
    if kind == "meta":
        with torch.device("meta"):
            state = nn.Sequential(nn.BatchNorm2d(4)).state_dict()
    else:
        state = {"bn.running_mean": torch.zeros(4).to_sparse(), "bn.running_var": torch.ones(4)}
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"is a (meta tensor|torch.sparse_coo tensor)"):
        inspect_checkpoint(path)
    assert main(["inspect", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64])
def test_statistics_that_are_not_floating_point_are_a_problem(dtype):
    """A bool running_var got "no problem found"."""
    report = inspect_statistics(
        {"bn": {"running_mean": torch.zeros(4), "running_var": torch.ones(4, dtype=dtype)}}
    )
    name = str(dtype).removeprefix("torch.")
    assert report.problems == {
        "bn": [f"running_var holds {name} values: batch-norm statistics are floating-point numbers"]
    }


def _garbled_keras(tmp_path: Path, member: str, edit) -> Path:
    """k3_model.keras with ``member`` (a JSON file of the archive) rewritten by ``edit``."""
    import zipfile

    path = tmp_path / "garbled.keras"
    with zipfile.ZipFile(GOLDEN / "k3_model.keras") as source:
        members = {name: source.read(name) for name in source.namelist()}
    members[member] = json.dumps(edit(json.loads(members[member]))).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def _bn_dense(config: dict) -> dict:
    return next(e for e in config["config"]["layers"] if e["config"]["name"] == "bn_dense")


def _with_build_config(config: dict) -> dict:
    _bn_dense(config)["build_config"] = [1]
    return config


@pytest.mark.parametrize(
    ("member", "edit", "holds"),
    [
        ("metadata.json", lambda metadata: [], "metadata.json must be a JSON object"),
        ("config.json", lambda config: None, "config.json must be a JSON object"),
        ("config.json", _with_build_config, "the `build_config` of layer 'bn_dense'"),
    ],
)
def test_a_keras_file_with_json_of_another_structure_is_one_line_and_exit_2(
    member, edit, holds, tmp_path, capsys
):
    """Before: a traceback (AttributeError) and exit status 1, which means "problems found"."""
    pytest.importorskip("h5py")
    path = _garbled_keras(tmp_path, member, edit)
    assert main(["inspect", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("batchnorm inspect: `path` lacks or garbles what a Keras file")
    assert holds in err and "garbled.keras" in err


@pytest.mark.parametrize(
    ("momentum", "status", "problem"),
    [
        (None, 0, None),
        ("0.5", 1, "bn_dense: momentum must be a number (Keras convention). Received: '0.5'"),
        (True, 1, "bn_dense: momentum must be a number (Keras convention). Received: True"),
        ([0.9], 1, "bn_dense: momentum must be a number (Keras convention). Received: [0.9]"),
    ],
)
def test_a_keras_momentum_that_is_no_number_is_not_a_crash(
    momentum, status, problem, tmp_path, capsys
):
    """Before: ``"momentum": null`` raised TypeError from float() (a traceback, exit 1); now a
    null momentum is unknown and one that is not a number is a problem of its layer."""
    pytest.importorskip("h5py")

    def edit(config: dict) -> dict:
        _bn_dense(config)["config"]["momentum"] = momentum
        return config

    path = _garbled_keras(tmp_path, "config.json", edit)
    assert main(["inspect", str(path)]) == status
    out, err = capsys.readouterr()
    assert err == ""
    if problem is not None:
        assert problem in out


def test_a_momentum_that_is_no_number_from_a_mapping_is_a_problem():
    report = inspect_statistics(
        {"bn": {"moving_mean": [0.0], "moving_variance": [1.0], "momentum": "0.9"}}
    )
    assert report["bn"].momentum is None
    assert report.problems["bn"] == [
        "momentum must be a number (Keras convention). Received: '0.9'"
    ]


def _damaged(source: Path, target: Path, offset: int) -> Path:
    """``source`` with 64 bytes at ``offset`` overwritten by 0xFF: a bad HDF5 signature there."""
    data = bytearray(source.read_bytes())
    data[offset : offset + 64] = b"\xff" * 64
    target.write_bytes(bytes(data))
    return target


def _damaged_keras_archive(tmp_path: Path) -> Path:
    import zipfile

    path = tmp_path / "damaged.keras"
    with zipfile.ZipFile(GOLDEN / "k3_model.keras") as source:
        members = {name: source.read(name) for name in source.namelist()}
    weights = tmp_path / "member.weights.h5"
    weights.write_bytes(members["model.weights.h5"])
    members["model.weights.h5"] = _damaged(weights, weights, 1536).read_bytes()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


@pytest.mark.parametrize(
    ("make", "holds"),
    [
        (
            lambda tmp: _damaged(GOLDEN / "tfk_model.h5", tmp / "damaged.h5", 6144),
            "bad symbol table node signature",
        ),
        (
            lambda tmp: _damaged(GOLDEN / "k3_model.weights.h5", tmp / "damaged.weights.h5", 6144),
            "wrong B-tree signature",
        ),
        (_damaged_keras_archive, "unknown symbol table entry cache type"),
    ],
)
def test_a_damaged_hdf5_structure_is_one_line_and_exit_2(make, holds, tmp_path, capsys):
    """h5py raised RuntimeError, which was not caught: a traceback and exit status 1, which
    means "problems found"."""
    pytest.importorskip("h5py")
    path = make(tmp_path)
    with pytest.raises(OSError, match=r"it may be truncated or damaged\. Received: path="):
        inspect_checkpoint(path)
    assert main(["inspect", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("batchnorm inspect: `path` could not be read as a Keras file (")
    assert holds in err and err.endswith(f"Received: path={str(path)!r}\n")


def test_an_overflow_error_from_h5py_names_the_file(tmp_path, monkeypatch):
    """h5py raises OverflowError for some damaged sizes and addresses (seen by the bug hunt)."""
    pytest.importorskip("h5py")
    from batchnorm.interop.keras import _read

    def overflow(handle):
        raise OverflowError("Python int too large to convert to C long")

    monkeypatch.setattr(_read, "read_tf_keras_h5", overflow)
    path = tmp_path / "model.h5"
    shutil.copy(GOLDEN / "tfk_model.h5", path)
    with pytest.raises(
        OSError,
        match=r"could not be read as a Keras file \(Python int too large to convert to C long\); "
        r"it may be truncated or damaged\. Received: path='.*model\.h5'",
    ):
        _read.read_batch_norm_layers(path)


@pytest.mark.parametrize(
    ("state", "holds"),
    [
        (
            {"bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(4)},
            "Layer bn: the mean and variance must have the same shape. Received: (3,) and (4,)",
        ),
        (
            {"bn.running_mean": torch.zeros(3)},
            "Layer bn needs one of moving_variance / running_var. Received keys: ['running_mean']",
        ),
    ],
)
def test_malformed_statistics_name_the_file(state, holds, tmp_path, capsys):
    path = tmp_path / "state.pt"
    torch.save(state, path)
    assert main(["inspect", str(path)]) == 2
    assert capsys.readouterr().err == (
        f"batchnorm inspect: Could not read the statistics in {str(path)!r}: {holds}\n"
    )


def _npz(path: Path) -> Path:
    import numpy as np

    with path.open("wb") as handle:  # a name np.savez would not extend with .npz
        np.savez(handle, x_train=np.zeros(3), y_train=np.ones(3))
    return path


def _truncated_zip(path: Path) -> Path:
    torch.save(nn.BatchNorm1d(3).state_dict(), path)
    path.write_bytes(path.read_bytes()[:100])
    return path


def _truncated_legacy(path: Path) -> Path:
    torch.save(nn.BatchNorm1d(3).state_dict(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:50])
    return path


@pytest.mark.parametrize(
    ("make", "holds"),
    [
        (
            _npz,
            "it is a zip archive but not a PyTorch checkpoint (torch.save's archives hold "
            "<name>/data.pkl). Expected a state_dict saved with torch.save (.pt/.pth), a "
            "tf-keras .h5 or a Keras 3 .keras file. Received: a NumPy .npz archive holding "
            "2 file(s): x_train.npy, y_train.npy",
        ),
        (
            _truncated_zip,
            "it starts like a zip archive (torch.save's format) but is truncated or damaged. "
            "Expected a state_dict saved with torch.save",
        ),
        (
            _truncated_legacy,
            "it is not a readable PyTorch checkpoint (truncated, damaged, or not written by "
            "torch.save). Expected a state_dict saved with torch.save",
        ),
    ],
)
def test_files_that_are_not_whole_models_get_no_state_dict_advice(make, holds, tmp_path, capsys):
    """A NumPy .npz or a truncated checkpoint went to torch.load, and its error came with the
    advice to save `model.state_dict()`, which was right only for a pickled model."""
    path = make(tmp_path / "checkpoint.pt")
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"batchnorm inspect: Could not read {str(path)!r}: {holds}")
    assert err.count("\n") == 1 and "state_dict()" not in err
