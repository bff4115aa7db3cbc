"""The demo experiments end to end at tiny sizes, and their training machinery against oracles."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pytest
import torch

from batchnorm.__main__ import main
from batchnorm.demo._classic import run_classic_demo
from batchnorm.demo._datasets import load_dataset
from batchnorm.demo._measures import POPULATION_KEYS
from batchnorm.demo._models import (
    batch_norm_layers,
    classic_network,
    placement_network,
    sigmoid_network,
)
from batchnorm.demo._modes import MOMENTA, TRUE_MEAN, TRUE_STD, run_modes_demo, steps_to_within
from batchnorm.demo._shift import PERCENTILES, WATCHED_UNIT, run_shift_demo
from batchnorm.demo._training import HISTORY_KEYS, Split, epochs_to_reach, evaluate, fit
from batchnorm.tools._progress import Progress

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--limit", "120", "--seed", "3"]


@pytest.fixture(scope="module")
def small_digits():
    return load_dataset(None).limited(160, 60)


def _check_history(history: dict, epochs: int, with_batch_norm: bool) -> None:
    keys = set(HISTORY_KEYS) | (set(POPULATION_KEYS) if with_batch_norm else set())
    assert set(history) == keys
    for key in keys:
        assert len(history[key]) == epochs
        assert all(math.isfinite(value) for value in history[key])
    for key in keys:
        if key.endswith("accuracy"):
            assert all(0.0 <= value <= 1.0 for value in history[key])


def test_classic_cli_writes_curves_and_history(tmp_path, capsys):
    threads = torch.get_num_threads()
    code = main(["demo", "--epochs", "2", "--max-batches", "2", "--out", str(tmp_path), *TINY])
    assert code == 0
    assert torch.get_num_threads() == threads  # --threads applies to the run only
    out = capsys.readouterr().out
    assert "pixels scaled to [0, 1]" in out
    for measure in ("training", "validation, moving averages", "validation, population"):
        assert out.count(measure) >= 2  # in the table and in the epochs-to-target lines
    assert "Epochs to reach 95.0% accuracy" in out and "In words: on training accuracy" in out
    assert "Final accuracy" in out
    assert f"wrote {tmp_path / 'curves.png'}" in out
    assert (tmp_path / "curves.png").read_bytes()[:8] == PNG_MAGIC
    history = json.loads((tmp_path / "history.json").read_text())
    assert set(history) == {"with_bn", "without_bn"}
    _check_history(history["with_bn"], epochs=2, with_batch_norm=True)
    _check_history(history["without_bn"], epochs=2, with_batch_norm=False)


def test_classic_cli_on_raw_pixels(tmp_path, capsys):
    arguments = ["demo", "--inputs", "raw", "--epochs", "2", "--max-batches", "2"]
    assert main([*arguments, "--out", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    assert "120 training and 120 validation images of 8x8, pixels raw, 0..16" in out
    history = json.loads((tmp_path / "history.json").read_text())
    _check_history(history["with_bn"], epochs=2, with_batch_norm=True)
    _check_history(history["without_bn"], epochs=2, with_batch_norm=False)
    scaled = tmp_path / "scaled"
    assert main(["demo", "--epochs", "2", "--max-batches", "2", "--out", str(scaled), *TINY]) == 0
    assert json.loads((scaled / "history.json").read_text()) != history


def test_classic_is_deterministic_with_seed(tmp_path):
    arguments = ["demo", "--epochs", "1", "--max-batches", "2", "--limit", "100"]
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert main([*arguments, "--seed", seed, "--out", str(tmp_path / name)]) == 0
    first, second, other = (
        (tmp_path / name / "history.json").read_text() for name in ("a", "b", "c")
    )
    assert first == second
    assert first != other


def test_classic_runs_share_initial_weights_and_train_batch_norm(small_digits):
    with_bn = classic_network(64, with_batch_norm=True, seed=1)
    without = classic_network(64, with_batch_norm=False, seed=1)
    for a, b in zip(
        [m for m in with_bn if isinstance(m, torch.nn.Linear)],
        [m for m in without if isinstance(m, torch.nn.Linear)],
        strict=True,
    ):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=0)
    result = run_classic_demo(small_digits, epochs=1, seed=1, max_batches=3, stream=io.StringIO())
    (layer,) = batch_norm_layers(result.models["with_bn"])
    assert batch_norm_layers(result.models["without_bn"]) == []
    assert (layer.momentum, layer.epsilon) == (0.99, 1e-3)
    assert float(layer.moving_mean.abs().max()) > 0
    assert not torch.equal(layer.moving_variance, torch.ones(1000))
    assert result.steps_per_epoch == 3
    other = run_classic_demo(small_digits, epochs=1, seed=1, momentum=0.5, max_batches=1)
    assert batch_norm_layers(other.models["with_bn"])[0].momentum == 0.5


def test_keras_glorot_uniform_initialisation():
    layer = classic_network(64, with_batch_norm=False, seed=0)[1]
    limit = math.sqrt(6 / (64 + 1000))
    weight = layer.weight.detach().numpy()
    assert np.abs(weight).max() <= limit
    assert weight.std() == pytest.approx(limit / math.sqrt(3), rel=0.02)
    assert not layer.bias.detach().any()


def test_history_validation_numbers_match_a_numpy_evaluation(small_digits):
    data = Split(
        small_digits.train_images.flatten(1),
        small_digits.train_labels,
        small_digits.validation_images.flatten(1),
        small_digits.validation_labels,
    )
    model = classic_network(64, with_batch_norm=True, seed=2)
    history = fit(model, data, epochs=2, batch_size=64, seed=2, label="t", stream=io.StringIO())
    _check_history(history, epochs=2, with_batch_norm=False)
    model.eval()
    with torch.no_grad():
        logits = model(data.validation_inputs).double().numpy()
    labels = data.validation_labels.numpy()
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    expected_loss = -log_softmax[np.arange(len(labels)), labels].mean()
    assert history["val_loss"][-1] == pytest.approx(expected_loss, rel=1e-5)
    assert history["val_accuracy"][-1] == pytest.approx((logits.argmax(1) == labels).mean())
    assert evaluate(model, data.validation_inputs, data.validation_labels)[0] == pytest.approx(
        expected_loss, rel=1e-5
    )


def test_epochs_to_reach():
    assert epochs_to_reach([0.5, 0.94, 0.95, 0.99], 0.95) == 3
    assert epochs_to_reach([0.5, 0.6], 0.95) is None


def test_placement_cli_and_networks(tmp_path, capsys, small_digits):
    code = main(
        ["demo", "placement", "--epochs", "1", "--max-batches", "2", "--out", str(tmp_path), *TINY]
    )
    assert code == 0
    assert "Conv-BN-ReLU" in capsys.readouterr().out
    assert (tmp_path / "placement.png").read_bytes()[:8] == PNG_MAGIC
    history = json.loads((tmp_path / "placement.json").read_text())
    assert set(history) == {"bn_before_relu", "bn_after_relu"}
    for run in history.values():
        _check_history(run, epochs=1, with_batch_norm=True)
    before = placement_network(8, 8, batch_norm_before_relu=True, seed=0)
    after = placement_network(8, 8, batch_norm_before_relu=False, seed=0)
    kinds = [type(module).__name__ for module in before][1:4]
    assert kinds == ["Conv2d", "BatchNormalization", "ReLU"]
    assert [type(module).__name__ for module in after][1:4] == [
        "Conv2d",
        "ReLU",
        "BatchNormalization",
    ]
    assert before[2].axis == 1 and before(small_digits.train_images[:4]).shape == (4, 10)


def test_shift_records_accuracy_and_sigmoid_input_percentiles(tmp_path, capsys, small_digits):
    code = main(["demo", "shift", "--steps", "4", "--out", str(tmp_path), *TINY])
    assert code == 0
    assert "median sigmoid input moved" in capsys.readouterr().out
    assert (tmp_path / "shift.png").read_bytes()[:8] == PNG_MAGIC
    document = json.loads((tmp_path / "shift.json").read_text())
    assert document["steps"] == [0, 1, 2, 3, 4]
    for name in ("with_bn", "without_bn"):
        assert len(document[name]["val_accuracy"]) == 5
        spread = document[name]["sigmoid_input_percentiles"]
        assert set(spread) == {"15", "50", "85"}
        assert all(
            a <= b <= c for a, b, c in zip(spread["15"], spread["50"], spread["85"], strict=True)
        )

    result = run_shift_demo(small_digits, steps=6, seed=0, record_every=3, stream=io.StringIO())
    assert result.steps == [0, 3, 6]
    for name, model in result.models.items():
        assert len(batch_norm_layers(model)) == (3 if name == "with_bn" else 0)
        model.eval()
        with torch.no_grad():  # everything before the last sigmoid: its input
            hidden = model[:-2](small_digits.validation_images)[:, WATCHED_UNIT].double().numpy()
        for q in PERCENTILES:
            assert result.percentiles[name][q][-1] == pytest.approx(
                np.percentile(hidden, q), rel=1e-5, abs=1e-6
            )
    assert len(batch_norm_layers(sigmoid_network(64, with_batch_norm=True, seed=0))) == 3


def test_modes_moving_means_follow_the_keras_update(tmp_path, capsys):
    steps, seed = 12, 4
    assert (
        main(["demo", "modes", "--steps", str(steps), "--seed", str(seed), "--out", str(tmp_path)])
        == 0
    )
    out = capsys.readouterr().out
    assert "trainable=False, training=True" in out and f"wrote {tmp_path / 'modes.png'}" in out
    assert (tmp_path / "modes.png").read_bytes()[:8] == PNG_MAGIC

    result = run_modes_demo(seed=seed, steps=steps)
    generator = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(TRUE_MEAN), torch.tensor(TRUE_STD)
    torch.randn(256, 3, generator=generator)  # the demo's first draw: the comparison batch
    batches = [
        (torch.randn(64, 3, generator=generator) * std + mean)[:, 0].double().numpy()
        for _ in range(steps)
    ]
    for momentum in MOMENTA:
        moving_mean, moving_variance = 0.0, 1.0
        for step, batch in enumerate(batches, 1):
            moving_mean = momentum * moving_mean + (1 - momentum) * batch.mean()
            moving_variance = momentum * moving_variance + (1 - momentum) * batch.var()
            assert result.moving_mean[momentum][step] == pytest.approx(moving_mean, rel=1e-5)
            assert result.moving_variance[momentum][step] == pytest.approx(
                moving_variance, rel=1e-5
            )
    assert [steps_to_within(0.05, m) for m in MOMENTA] == [29, 299, 2995]


def test_modes_freezing_table_numbers():
    text = run_modes_demo(seed=0, steps=5).text
    rows = {
        line.strip().rsplit(None, 3)[0]: line.split()[-3:]
        for line in text.splitlines()
        if line.strip().startswith(("training=", "trainable="))
        and line.rstrip().endswith(("yes", "no"))
    }
    assert float(rows["training=True"][1]) > 0 and rows["training=True"][2] == "no"
    assert float(rows["training=False"][0]) > 0 and float(rows["training=False"][1]) == 0
    frozen = rows["trainable=False, training=True"]
    assert float(frozen[0]) == 0 and float(frozen[1]) == 0 and frozen[2] == "yes"


def test_progress_bar_is_quiet_off_a_terminal():
    stream = io.StringIO()
    bar = Progress("run", total=50, summary=True, stream=stream)
    for step in range(1, 51):
        bar.update(loss=1.0 / step)
    bar.close(val_accuracy=0.5)
    assert stream.getvalue().count("\n") == 1 and "\r" not in stream.getvalue()
    assert "50/50" in stream.getvalue() and "val_accuracy 0.5000" in stream.getvalue()

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    bar = Progress("run", total=3, summary=True, stream=terminal)
    bar.update(3, loss=0.5)
    bar.close()
    assert terminal.getvalue().startswith("\r") and terminal.getvalue().endswith("\n")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--epochs", "0"], "--epochs must be >= 1. Received: 0"),
        (["--max-batches", "0"], "--max-batches must be >= 1. Received: 0"),
        (["--target", "1.5"], r"--target must be in \(0, 1\]. Received: 1.5"),
        (["placement", "--momentum", "1"], r"--momentum must be in \[0, 1\). Received: 1.0"),
        (["--momentum", "0.9", "shift"], "--momentum does not apply to the shift demo"),
        (["--steps", "5"], "--steps does not apply to the classic demo"),
        (["--epochs", "2", "shift"], "--epochs does not apply to the shift demo"),
        (["--data", "x", "modes"], "--data does not apply to the modes demo"),
        (["--inputs", "raw", "modes"], "--inputs does not apply to the modes demo"),
        (["shift", "--steps", "0"], "--steps must be >= 1. Received: 0"),
        (["modes", "--threads", "0"], "--threads must be >= 1. Received: 0"),
        (["--data", "/nonexistent/mnist"], "/nonexistent/mnist: no such file or folder"),
        (["placement", "--data", "/nonexistent/x.npz"], "x.npz: no such file or folder"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(arguments, message, capsys, tmp_path):
    assert main(["demo", *arguments, "--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert re.search(message, captured.err)
    assert "Traceback" not in captured.err
    assert not any(tmp_path.iterdir())


def test_malformed_data_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "data"
    bad.mkdir()
    (bad / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 8)
    (bad / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")
    assert main(["demo", "--data", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte: not an IDX file of MNIST images" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["modes", "--data", "x"], "unrecognized arguments: --data x"),
        (["modes", "--inputs", "raw"], "unrecognized arguments: --inputs raw"),
        (["--inputs", "unscaled"], "argument --inputs: invalid choice: 'unscaled'"),
    ],
)
def test_parser_rejects_options_that_do_not_fit(arguments, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
