"""diagnose and `batchnorm inspect`: every planted problem flagged, nothing on a healthy model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm import BatchNormalization, DiagnosisReport, diagnose, freeze, recalibrate
from batchnorm.__main__ import main
from tests.test_convert_activation import conv_model_with_dropout_inside_a_batch_norm


def data(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 4, generator=generator) * 2 + 3


class FourNorms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin_a, self.bn_a = nn.Linear(4, 8), nn.BatchNorm1d(8)
        self.lin_b, self.bn_b = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.lin_c, self.bn_c = nn.Linear(8, 8), nn.BatchNorm1d(8)
        self.lin_d, self.bn_d = nn.Linear(8, 8), BatchNormalization(8, momentum=0.9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_a(self.lin_a(x)))
        x = torch.relu(self.bn_b(self.lin_b(x)))
        x = torch.relu(self.bn_c(self.lin_c(x)))
        return self.bn_d(self.lin_d(x))


def healthy_model(seed: int = 0) -> FourNorms:
    torch.manual_seed(seed)
    model = FourNorms().train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(150):
            model(data(32, generator))
    return model


def batches(n: int = 32, count: int = 8, seed: int = 9) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [data(n, generator) for _ in range(count)]


@pytest.mark.parametrize("seed", [0, 1])
def test_nothing_flagged_on_a_healthy_model(seed):
    model = healthy_model(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = diagnose(model, batches(seed=seed + 10), steps={"bn_d": 150})
    assert report.healthy, str(report)
    assert report.problems == {}
    assert [row.name for row in report.layers] == ["bn_a", "bn_b", "bn_c", "bn_d"]
    for row in report.layers:
        assert row.mean_shift is not None and row.mean_shift < 0.25
        assert row.train_inference_gap is not None and row.train_inference_gap < 0.5
        assert row.smallest_batch == 32 and row.samples == 256
    assert report["bn_a"].steps == 150 and report["bn_a"].horizon == pytest.approx(10)
    for key, value in model.state_dict().items():  # diagnose changes nothing
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert "no problem found in 4 layer(s)" in str(report)


def test_each_planted_problem_is_flagged_on_its_layer():
    model = healthy_model()
    generator = torch.Generator().manual_seed(5)
    # bn_a: restarted with Keras momentum 0.999 (torch 0.001) and trained only 10 steps.
    model.bn_a.reset_running_stats()
    model.bn_a.momentum = 0.001
    with torch.no_grad():
        for _ in range(10):
            model.bn_a(model.lin_a(data(32, generator)))
    # bn_b: a NaN variance.
    with torch.no_grad():
        model.bn_b.running_var[3] = math.nan
    # bn_c: "frozen" by requires_grad only; model.train() still updates its statistics.
    for parameter in model.bn_c.parameters():
        parameter.requires_grad_(False)
    # bn_d: ghost batches of 2.
    model.bn_d.virtual_batch_size = 2
    report = diagnose(model.train(), batches(), steps={"bn_d": 150})
    problems = report.problems
    assert set(problems) == {"bn_a", "bn_b", "bn_c", "bn_d"}
    a = " | ".join(problems["bn_a"])
    assert "momentum 0.999 averages over ~1000 steps but only 10 were taken" in a
    assert "moving mean" in a and "away from the population mean" in a
    assert "training and inference outputs differ" in a
    assert report["bn_b"].nan_variance == [3]
    assert problems["bn_b"][0] == "NaN variance in 1 channel(s) [3]"
    assert problems["bn_c"] == [
        "frozen (gamma/beta requires_grad=False) but its statistics still update"
    ]
    assert report["bn_d"].smallest_batch == 2
    assert any("ghost batch) of 2 is too small" in p for p in problems["bn_d"])
    # The same layer truly frozen is not flagged.
    freeze(model.bn_c)
    assert "bn_c" not in diagnose(model, batches(count=2)).problems


def test_a_batch_of_two_is_flagged_on_every_layer():
    report = diagnose(healthy_model(), batches(n=2, count=3))
    for row in report.layers:
        assert row.smallest_batch == 2
        assert any("batch (or ghost batch) of 2 is too small" in p for p in row.problems)


def test_variance_states_and_report_formats():
    model = healthy_model()
    with torch.no_grad():
        model.bn_a.running_var[:4] = torch.tensor([0.0, -1.0, math.inf, math.nan])
    report = diagnose(model.eval(), batches(count=2))
    row = report["bn_a"]
    assert (row.zero_variance, row.negative_variance, row.inf_variance, row.nan_variance) == (
        [0],
        [1],
        [2],
        [3],
    )
    document = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert document["healthy"] is False and document["batches"] == 2
    assert document["layers"][0]["name"] == "bn_a" and document["layers"][0]["problems"]
    table = str(report)
    assert table.splitlines()[0].split()[:4] == ["layer", "type", "C", "mean"]
    assert "bn_a: zero variance in 1 channel(s) [0]" in table
    assert isinstance(report, DiagnosisReport)


def test_diagnose_errors():
    model = healthy_model()
    with pytest.raises(ValueError, match=r"`batches` is empty: diagnose needs at least one batch"):
        diagnose(model, [])
    with pytest.raises(ValueError, match=r"`diagnose` found no batch-norm layer"):
        diagnose(nn.Linear(4, 4), batches())
    with pytest.raises(ValueError, match=r"`steps` must be a non-negative int.*Received: steps=-1"):
        diagnose(model, batches(), steps=-1)
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module"):
        diagnose("model", batches())
    with pytest.raises(KeyError, match=r"No batch-norm layer named 'nope'"):
        diagnose(model, batches(count=1))["nope"]


def test_inspect_command_on_saved_state_dicts(tmp_path, capsys):
    model = healthy_model()
    healthy = tmp_path / "healthy.pt"
    torch.save(model.state_dict(), healthy)
    assert main(["inspect", str(healthy)]) == 0
    out = capsys.readouterr().out
    assert "no problem found in 4 layer(s)" in out and "bn_d" in out

    with torch.no_grad():
        model.bn_c.running_var[1] = -0.5
        model.bn_d.moving_variance[0] = math.nan
    broken = tmp_path / "broken.pth"
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, broken)
    report_path = tmp_path / "report.json"
    assert main(["inspect", str(broken), "--json", str(report_path)]) == 1
    out = capsys.readouterr().out
    assert "bn_c: negative variance in 1 channel(s) [1]" in out
    assert "bn_d: NaN variance in 1 channel(s) [0]" in out
    document = json.loads(report_path.read_text())
    assert [row["name"] for row in document["layers"]] == ["bn_a", "bn_b", "bn_c", "bn_d"]
    assert document["layers"][0]["steps"] == 150


def test_inspect_command_errors(tmp_path, capsys):
    keras_file = tmp_path / "model.keras"
    keras_file.write_bytes(b"")
    assert main(["inspect", str(keras_file)]) == 2
    assert "`path` must be a Keras file" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.pt")]) == 2
    assert "No checkpoint file at" in capsys.readouterr().err
    no_norms = tmp_path / "linear.pt"
    torch.save(nn.Linear(2, 2).state_dict(), no_norms)
    assert main(["inspect", str(no_norms)]) == 2
    assert "No batch-norm statistics" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert main(["inspect", str(garbage)]) == 2
    assert "Could not read" in capsys.readouterr().err


def test_inspect_statistics_takes_a_mapping():
    from batchnorm.tools._inspect import inspect_statistics

    report = inspect_statistics(
        {
            "conv_bn": {"moving_mean": np.zeros(3), "moving_variance": np.array([1.0, 0.0, 2.0])},
            "slow": {"moving_mean": [0.0], "moving_variance": [1.0], "momentum": 0.999, "steps": 5},
        }
    )
    assert report["conv_bn"].zero_variance == [1]
    assert any("only 5 were taken" in p for p in report["slow"].problems)
    with pytest.raises(ValueError, match=r"Layer bad needs one of moving_variance / running_var"):
        inspect_statistics({"bad": {"moving_mean": [0.0]}})


def test_recalibrate_clears_what_diagnose_flags():
    model = healthy_model()
    model.bn_a.reset_running_stats()
    model.bn_a.momentum = 0.001
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _ in range(10):
            model.bn_a(model.lin_a(data(32, generator)))
    data_batches = batches(count=8)
    assert set(diagnose(model, data_batches, steps=150).problems) == {"bn_a"}
    recalibrate(model, data_batches, progress=False)
    after = diagnose(model, data_batches, steps=150)
    assert after.healthy, str(after)
    assert after["bn_a"].mean_shift < 1e-5 and after["bn_a"].variance_ratio < 1 + 1e-5


@pytest.mark.parametrize("name", ["tfk_model.h5", "k3_model.keras"])
def test_inspect_reads_keras_files(name, capsys):
    golden = Path(__file__).parent / "golden"
    expected = json.loads((golden / "keras_files.json").read_text())
    assert main(["inspect", str(golden / name)]) == 0
    out = capsys.readouterr().out
    layers = expected["files"][name]["batch_norm_layers"]
    assert f"no problem found in {len(layers)} layer(s)" in out
    for layer in layers:
        assert layer["config"]["name"] in out


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "prune"])
def test_diagnose_copies_a_model_whose_hooks_keep_computed_weights(wrap):
    """Old-style weight_norm, spectral_norm and pruning keep the weight they compute as a plain
    attribute; after a forward with gradients deepcopy refused it ("Only Tensors created
    explicitly by the user ... support the deepcopy protocol") and diagnose crashed."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    if wrap == "weight_norm":
        with pytest.warns(FutureWarning, match="weight_norm"):
            conv = nn.utils.weight_norm(conv)
    elif wrap == "spectral_norm":
        conv = nn.utils.spectral_norm(conv)
    else:
        nn.utils.prune.l1_unstructured(conv, "weight", amount=0.3)
    model = nn.Sequential(conv, BatchNormalization(4, axis=1))
    batches = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    model(batches[0]).sum().backward()  # the computed weight now has a graph
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = diagnose(model, batches)
    assert [layer.name for layer in report.layers] == ["1"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_in_place_layers_are_measured_on_their_input_and_leave_the_data_as_it_was():
    torch.manual_seed(0)
    data = [torch.randn(16, 3, 6, 6) * 2 + 3]
    kept = data[0].clone()
    measured = {}
    for memory in ("default", "in_place"):
        torch.manual_seed(1)
        model = nn.Sequential(
            nn.Flatten(start_dim=2),
            BatchNormalization(
                3, axis=1, activation="leaky_relu", activation_param=0.1, memory=memory
            ),
        )
        recalibrate(model, data)
        torch.testing.assert_close(data[0], kept, rtol=0, atol=0)  # not overwritten
        report = diagnose(model.eval(), data, steps=10**6)
        torch.testing.assert_close(data[0], kept, rtol=0, atol=0)
        (layer,) = report.layers
        measured[memory] = (layer.mean_shift, layer.variance_ratio, layer.problems)
    assert measured["in_place"][:2] == pytest.approx(measured["default"][:2])
    assert measured["in_place"][2] == measured["default"][2] == []


def test_diagnose_leaves_a_model_not_yet_built_as_it_was():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), BatchNormalization())
    before = (model[1].built, model[1].axis, model[1].fused, sorted(model.state_dict()))
    report = diagnose(model, [torch.randn(16, 3) for _ in range(2)], steps=0)
    assert len(report.layers) == 1
    assert (model[1].built, model[1].axis, model[1].fused, sorted(model.state_dict())) == before


def test_diagnose_of_a_layer_not_yet_built_measures_it_as_it_would_build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), BatchNormalization())
    data = [torch.randn(32, 3) * 3 + 2 for _ in range(2)]
    (row,) = diagnose(model, data, steps=0).layers
    assert row.channels == 3 and row.mean_shift is not None and row.variance_ratio is not None
    assert not model[1].built


def test_a_dropout_inside_a_batch_norm_stays_off_when_measuring():
    """diagnose called train() on a batch norm and its copy, switching on the dropout they hold:
    a false gap (0.71 for 0.015) and a wrong variance ratio on the next layer."""
    torch.manual_seed(0)
    model = conv_model_with_dropout_inside_a_batch_norm()
    batches = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    recalibrate(model, batches, progress=False)
    report = diagnose(model, batches, steps=10**6)
    rows = {row.name: row for row in report.layers}
    with torch.no_grad():  # the layer's own outputs, batch and moving statistics, no dropout
        h = model[0](batches[0])
        y_train = torch.relu(
            nn.functional.batch_norm(h, None, None, model[1].weight, model[1].bias, True)
        )
        difference = (y_train - model[1](h)).double() / model[1].weight.abs().reshape(1, -1, 1, 1)
    assert rows["1"].train_inference_gap == pytest.approx(float(difference.pow(2).mean().sqrt()))
    assert rows["3"].variance_ratio == pytest.approx(1.0, abs=1e-5)
    assert report.problems == {}


def test_an_in_place_layer_of_a_model_in_training_mode_is_measured_on_the_caller_batch():
    """In training mode the copy run in the current mode overwrote the caller's batch, and the
    statistics were measured on the overwritten values (variance ratio 2.8 for 10)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        BatchNormalization(3, axis=1, memory="in_place", activation="leaky_relu"),
        nn.Conv2d(3, 4, 1),
    )
    x = torch.randn(16, 3, 5, 5) * 3 + 2
    model.eval()(x)  # built: the stored variance's estimator is decided
    model.train()
    kept = x.clone()
    (row,) = diagnose(model, [x]).layers
    torch.testing.assert_close(x, kept, rtol=0, atol=0)
    layer = model[0]
    mean = kept.double().mean(dim=(0, 2, 3))
    variance = kept.double().var(dim=(0, 2, 3), unbiased=layer._stores_unbiased_variance())
    scale = (variance + layer.epsilon).sqrt()
    shift = ((layer.moving_mean.double() - mean).abs() / scale).max()
    ratio = (layer.moving_variance.double() + layer.epsilon) / (variance + layer.epsilon)
    assert row.mean_shift == pytest.approx(float(shift), rel=1e-5)
    assert row.variance_ratio == pytest.approx(
        float(torch.maximum(ratio, 1 / ratio).max()), rel=1e-5
    )
