"""batchnorm.keras against model files written by real tf-keras 2.20.1 and Keras 3.15.1.

tools/make_keras3_golden.py saved the files in tests/golden/ and recorded, in keras_files.json and
keras3_cases.npz, each file's batch-norm weights as Keras returned them and an inference
input/output pair of the whole model (Conv2D -> BN -> ReLU -> Flatten -> Dense -> BN).
"""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm import BatchNormalization
from batchnorm.keras import LoadReport, load_weights, read_batch_norm_layers
from tests.test_keras_golden import assert_close

pytest.importorskip("h5py")

GOLDEN = Path(__file__).parent / "golden"
FILES = json.loads((GOLDEN / "keras_files.json").read_text())["files"]


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "keras3_cases.npz") as data:
        return {key: data[key] for key in data.files if key.startswith("files/")}


class ConvStack(nn.Module):
    """The generator's Keras model in torch: NHWC input, Keras kernels transposed for torch."""

    def __init__(self, arrays, file, bn_conv: nn.Module, bn_dense: nn.Module, nchw: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.dense = nn.Linear(48, 5)
        with torch.no_grad():
            self.conv.weight.copy_(
                torch.tensor(arrays[f"files/{source(file)}/conv_0"]).permute(3, 2, 0, 1)
            )
            self.dense.weight.copy_(torch.tensor(arrays[f"files/{source(file)}/dense_0"]).T)
            self.dense.bias.copy_(torch.tensor(arrays[f"files/{source(file)}/dense_1"]))
        self.bn_conv, self.bn_dense, self.nchw = bn_conv, bn_dense, nchw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.permute(0, 3, 1, 2))
        if not self.nchw:
            y = y.permute(0, 2, 3, 1)
        y = torch.relu(self.bn_conv(y))
        if self.nchw:
            y = y.permute(0, 2, 3, 1)  # Keras flattens channels last
        return self.bn_dense(self.dense(y.flatten(1)))


def source(file: str) -> str:
    """A weights-only file holds the same model as the full file saved beside it."""
    return FILES[file].get("arrays_of", file)


def infer(model: nn.Module, arrays, file: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(arrays[f"files/{source(file)}/x"]))


def assert_layer_weights(layer: BatchNormalization, arrays, file: str, keras_name: str):
    spec = next(s for s in FILES[file]["batch_norm_layers"] if s["name"] == keras_name)
    ours = dict(zip(layer._weight_names(), layer.get_weights(), strict=True))
    for weight_name in spec["weight_names"]:
        expected = arrays[f"files/{source(file)}/{keras_name}/{weight_name}"]
        np.testing.assert_array_equal(ours[weight_name], expected, err_msg=weight_name)


@pytest.mark.parametrize(
    ("file", "file_format", "has_config"),
    [
        ("tfk_model.h5", "tf-keras HDF5", True),
        ("tfk_weights.h5", "tf-keras HDF5", False),
        ("tfk_nested.h5", "tf-keras HDF5", True),
        ("k3_model.keras", "Keras 3", True),
        ("k3_model.weights.h5", "Keras 3", False),
    ],
)
def test_read_batch_norm_layers_returns_what_keras_saved(file, file_format, has_config, arrays):
    layers = read_batch_norm_layers(GOLDEN / file)
    specs = FILES[file]["batch_norm_layers"]
    assert [layer.name for layer in layers] == [spec["name"] for spec in specs]
    for layer, spec in zip(layers, specs, strict=True):
        assert layer.file_format == file_format
        names = list(layer.weights)
        if "gamma_or_beta" in names:  # a Keras 3 weights-only file does not say which
            assert file == "k3_model.weights.h5" and spec["weight_names"][0] == "beta"
            names[0] = "beta"
        assert names == spec["weight_names"]
        for weight_name, value in zip(names, layer.weights.values(), strict=True):
            expected = arrays[f"files/{source(file)}/{spec['name']}/{weight_name}"]
            np.testing.assert_array_equal(value, expected)
        if has_config:
            for key in ("axis", "momentum", "epsilon", "center", "scale"):
                assert layer.config[key] == spec["config"][key], key
        else:
            assert layer.config is None


def test_tf_keras_model_loads_into_matching_layers_and_reproduces_the_output(arrays):
    file = "tfk_model.h5"
    model = ConvStack(
        arrays,
        file,
        BatchNormalization(3, momentum=0.9, epsilon=0.01),
        BatchNormalization(5, renorm=True, center=False),
    )
    report = load_weights(model, GOLDEN / file)
    assert isinstance(report, LoadReport) and report.ok
    assert [(e.keras_name, e.module_name, e.status) for e in report] == [
        ("bn_conv", "bn_conv", "loaded"),
        ("bn_dense", "bn_dense", "loaded"),
    ]
    assert_layer_weights(model.bn_conv, arrays, file, "bn_conv")
    assert_layer_weights(model.bn_dense, arrays, file, "bn_dense")
    assert_close(
        infer(model, arrays, file), arrays[f"files/{source(file)}/y"], 1e-5, "model output"
    )


def test_tf_keras_fused_layer_keeps_storing_the_unbiased_variance(arrays):
    """tf-keras resolved fused for the rank-4 layer; ours does the same from the same config."""
    file = "tfk_model.h5"
    assert FILES[file]["fused"] == [True, False]
    model = ConvStack(
        arrays,
        file,
        BatchNormalization(momentum=0.9, epsilon=0.01),
        BatchNormalization(5, renorm=True, center=False),
    )
    model.bn_conv.build((4, 4, 4, 3))
    load_weights(model, GOLDEN / file)
    before = model.bn_conv.moving_variance.double().clone()
    x = torch.randn(8, 4, 4, 3)
    model.bn_conv(x, training=True)
    batch = x.double().reshape(-1, 3).var(dim=0, unbiased=True)
    np.testing.assert_allclose(model.bn_conv.moving_variance, 0.9 * before + 0.1 * batch, rtol=1e-5)


def test_configure_adopts_the_file_settings_and_strict_reports_what_it_cannot(arrays):
    file = "tfk_model.h5"
    model = ConvStack(arrays, file, BatchNormalization(3), BatchNormalization(5))
    with pytest.raises(
        ValueError,
        match=r"(?s)bn_dense -> bn_dense: center: file False, module True.*renorm: file True, module False",
    ) as error:
        load_weights(model, GOLDEN / file, configure=True)
    assert "momentum" not in str(error.value)  # configure=True settles it
    assert model.bn_conv.momentum == 0.99  # strict raised before changing anything
    report = load_weights(model, GOLDEN / file, configure=True, strict=False)
    assert not report.ok
    assert (model.bn_conv.momentum, model.bn_conv.epsilon) == (0.9, 0.01)
    assert any("configured momentum: 0.99 -> 0.9" in note for note in report[0].notes)
    assert [d.setting for d in report[1].differences] == ["center", "renorm"]
    np.testing.assert_array_equal(model.bn_dense.beta.detach(), np.zeros(5))  # file has no beta
    assert_close(
        infer(model, arrays, file), arrays[f"files/{source(file)}/y"], 1e-5, "model output"
    )


def test_without_configure_strict_lists_every_setting_that_differs(arrays):
    model = ConvStack(
        arrays,
        "tfk_model.h5",
        BatchNormalization(3),
        BatchNormalization(5, renorm=True, center=False),
    )
    with pytest.raises(
        ValueError, match=r"2 way\(s\):\n  bn_conv -> bn_conv: momentum: file 0.9, module 0.99"
    ) as error:
        load_weights(model, GOLDEN / "tfk_model.h5")
    assert "epsilon: file 0.01, module 0.001" in str(error.value)
    assert "configure=True" in str(error.value)


def test_weights_only_h5_loads_and_says_what_it_could_not_check(arrays):
    file = "tfk_weights.h5"
    model = ConvStack(
        arrays,
        file,
        BatchNormalization(3, momentum=0.9, epsilon=0.01),
        BatchNormalization(5, renorm=True, center=False),
    )
    report = load_weights(model, GOLDEN / file)
    assert report.ok
    assert all("weights only" in " ".join(entry.notes) for entry in report)
    assert_close(
        infer(model, arrays, file), arrays[f"files/{source(file)}/y"], 1e-5, "model output"
    )


def test_nested_tf_keras_model_loads_by_mapping(arrays):
    file = "tfk_nested.h5"
    model = nn.Sequential()
    model.add_module("second", BatchNormalization(3, axis=1, epsilon=0.1))
    model.add_module("first", BatchNormalization(3, scale=False))
    report = load_weights(model, GOLDEN / file, mapping={"inner_bn": "first", "outer_bn": "second"})
    assert report.ok
    assert_layer_weights(model.first, arrays, file, "inner_bn")
    assert_layer_weights(model.second, arrays, file, "outer_bn")


def test_keras3_model_needs_the_biased_estimator(arrays):
    file = "k3_model.keras"
    model = ConvStack(
        arrays,
        file,
        BatchNormalization(3, momentum=0.9, epsilon=0.01),
        BatchNormalization(5, scale=False),
    )
    with pytest.raises(ValueError, match=r"moving_variance_estimator: file 'biased', module 'auto"):
        load_weights(model, GOLDEN / file)
    report = load_weights(model, GOLDEN / file, configure=True)
    assert report.ok
    assert model.bn_conv.moving_variance_estimator == "biased"
    assert_layer_weights(model.bn_conv, arrays, file, "bn_conv")
    assert_layer_weights(model.bn_dense, arrays, file, "bn_dense")
    assert_close(
        infer(model, arrays, file), arrays[f"files/{source(file)}/y"], 1e-5, "model output"
    )
    # The loaded layer then keeps Keras 3's biased moving variance when training on.
    model.bn_conv.build((4, 4, 4, 3))
    before = model.bn_conv.moving_variance.double().clone()
    x = torch.randn(8, 4, 4, 3)
    model.bn_conv(x, training=True)
    batch = x.double().reshape(-1, 3).var(dim=0, unbiased=False)
    np.testing.assert_allclose(model.bn_conv.moving_variance, 0.9 * before + 0.1 * batch, rtol=1e-5)


@pytest.mark.parametrize("file", ["k3_model.keras", "k3_model.weights.h5"])
def test_configure_from_a_keras3_file_sets_what_like_keras3_sets(file, arrays):
    """Keras 3 has no fused path and casts the mask to bool: configure=True left the layers'
    fused=None, so the rank-4 bn_conv took tf-keras' fused path and ignored a mask (with a
    UserWarning), and a float mask weighed positions."""
    model = ConvStack(
        arrays,
        file,
        BatchNormalization(3, momentum=0.9, epsilon=0.01),
        BatchNormalization(5, scale=False),
    )
    report = load_weights(model, GOLDEN / file, configure=True)
    assert report.ok
    for layer in (model.bn_conv, model.bn_dense):
        assert (layer.fused, layer.mask_weights) == (False, False)
    notes = " ".join(report[0].notes)
    assert "configured fused: None -> False" in notes
    assert "configured mask_weights: True -> False" in notes
    assert_close(
        infer(model, arrays, file), arrays[f"files/{source(file)}/y"], 1e-5, "model output"
    )
    # A masked training step then is Keras 3's (float64 reference of its formula).
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((4, 4, 4, 3)) + 1).astype(np.float32)
    mask = rng.choice(np.array([0.0, 0.5, 2.0], np.float32), size=(4, 4, 4))
    before_mean = model.bn_conv.moving_mean.double().numpy().copy()
    before_variance = model.bn_conv.moving_variance.double().numpy().copy()
    y = model.bn_conv(torch.tensor(x), training=True, mask=torch.tensor(mask))
    keep = np.broadcast_to((mask != 0)[..., None], x.shape)
    count = keep.sum(axis=(0, 1, 2))
    mean = np.where(keep, x, 0.0).sum(axis=(0, 1, 2)) / (count + 1e-7)
    variance = (np.where(keep, x - mean, 0.0) ** 2).sum(axis=(0, 1, 2)) / (count + 1e-7)
    gamma = model.bn_conv.gamma.detach().double().numpy()
    beta = model.bn_conv.beta.detach().double().numpy()
    expected = (x - mean) / np.sqrt(variance + 0.01) * gamma + beta
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        model.bn_conv.moving_mean, 0.9 * before_mean + 0.1 * mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        model.bn_conv.moving_variance, 0.9 * before_variance + 0.1 * variance, rtol=1e-5
    )


def test_configure_from_a_tf_keras_file_keeps_the_fused_path_and_mask_weights(arrays):
    model = ConvStack(
        arrays,
        "tfk_model.h5",
        BatchNormalization(3),
        BatchNormalization(5, renorm=True, center=False),
    )
    report = load_weights(model, GOLDEN / "tfk_model.h5", configure=True)
    assert report.ok
    assert (model.bn_conv.fused, model.bn_conv.mask_weights) == (None, True)
    assert not any("fused" in note or "mask_weights" in note for note in report[0].notes)


def test_keras3_files_need_no_configure_for_fused_or_mask_weights(arrays):
    """Neither is in a Keras 3 config: without configure=True they are no mismatch."""
    model = ConvStack(
        arrays,
        "k3_model.keras",
        BatchNormalization(3, momentum=0.9, epsilon=0.01, moving_variance_estimator="biased"),
        BatchNormalization(5, scale=False, moving_variance_estimator="biased"),
    )
    assert load_weights(model, GOLDEN / "k3_model.keras").ok
    assert (model.bn_conv.fused, model.bn_conv.mask_weights) == (None, True)


@pytest.mark.parametrize("file", ["k3_model.keras", "k3_model.weights.h5"])
def test_keras3_files_load_into_unbuilt_layers(file, arrays):
    model = ConvStack(
        arrays,
        file,
        BatchNormalization.like("keras3", momentum=0.9, epsilon=0.01),
        BatchNormalization.like("keras3", scale=False),
    )
    report = load_weights(model, GOLDEN / file)
    assert report.ok
    if file.endswith(".weights.h5"):
        assert "loaded as beta, the module's only one" in " ".join(report[1].notes)
    assert_close(
        infer(model, arrays, file), arrays[f"files/{source(file)}/y"], 1e-5, "model output"
    )


def test_torch_batch_norm_modules_take_keras_weights(arrays):
    file = "k3_model.keras"
    model = ConvStack(arrays, file, nn.BatchNorm2d(3), nn.BatchNorm1d(5), nchw=True)
    with pytest.raises(ValueError, match=r"epsilon \(eps\): file 0.01, module 1e-05"):
        load_weights(model, GOLDEN / file)
    report = load_weights(model, GOLDEN / file, configure=True, strict=False)
    assert (model.bn_conv.eps, model.bn_conv.momentum) == (0.01, pytest.approx(0.1))
    assert [d.setting for d in report[1].differences] == ["scale (affine)"]
    assert any("unbiased" in note for note in report[0].notes)
    np.testing.assert_array_equal(model.bn_dense.weight.detach(), np.ones(5))
    assert_close(
        infer(model, arrays, file), arrays[f"files/{source(file)}/y"], 1e-5, "model output"
    )


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("file", ["tfk_no_bn.h5", "k3_no_bn.keras"])
def test_file_without_batch_norm(file):
    with pytest.raises(
        ValueError,
        match=r"Expected a Keras file with at least one BatchNormalization layer.*with none",
    ):
        load_weights(nn.Sequential(BatchNormalization(3)), GOLDEN / file)


def test_model_with_fewer_batch_norm_modules_than_the_file(arrays):
    model = nn.Sequential(BatchNormalization(3, momentum=0.9, epsilon=0.01))
    with pytest.raises(
        ValueError, match=r"bn_dense -> \(none\): no batch-norm module left in the model"
    ):
        load_weights(model, GOLDEN / "tfk_model.h5")
    report = load_weights(model, GOLDEN / "tfk_model.h5", strict=False)
    assert [e.status for e in report] == ["loaded", "no module"]
    assert_layer_weights(model[0], arrays, "tfk_model.h5", "bn_conv")


def test_model_with_more_batch_norm_modules_than_the_file():
    model = nn.Sequential(*[BatchNormalization(3, momentum=0.9, epsilon=0.01) for _ in range(3)])
    with pytest.raises(ValueError, match=r"None -> 2: no file layer left for this module"):
        load_weights(model, GOLDEN / "tfk_nested.h5", strict=True)


def test_model_without_batch_norm_modules():
    with pytest.raises(
        ValueError, match=r"`model` must hold batch-norm modules.*Received: a Linear with none"
    ):
        load_weights(nn.Linear(3, 3), GOLDEN / "tfk_model.h5")


def test_channel_count_mismatch_loads_nothing():
    model = nn.Sequential(BatchNormalization(4, momentum=0.9, epsilon=0.01), nn.BatchNorm1d(5))
    before = [t.clone() for t in model.state_dict().values()]
    with pytest.raises(
        ValueError,
        match=r"bn_conv -> 0: channels: file \(3,\), module \(4,\) \(the weights cannot be loaded\)",
    ):
        load_weights(model, GOLDEN / "tfk_model.h5", configure=True)
    for old, new in zip(before, model.state_dict().values(), strict=True):
        torch.testing.assert_close(old, new)
    report = load_weights(model, GOLDEN / "tfk_model.h5", configure=True, strict=False)
    assert report[0].status == "skipped"
    np.testing.assert_array_equal(model[0].moving_mean, np.zeros(4))


@pytest.mark.parametrize(
    ("mapping", "error", "match"),
    [
        (
            {"bn_missing": "0"},
            ValueError,
            r"`mapping` names Keras layers \['bn_missing'\] that the file does not have; it has 2 batch-norm layers \['bn_conv', 'bn_dense'\]",
        ),
        (
            {"bn_conv": "7"},
            ValueError,
            r"`mapping` names modules \['7'\] that are not batch-norm modules of `model`; its batch-norm modules are \['0', '1'\]",
        ),
        (
            {"bn_conv": "0", "bn_dense": "0"},
            ValueError,
            r"several Keras layers into the same modules \['0'\]",
        ),
        (
            ["bn_conv"],
            TypeError,
            r"`mapping` must be a dict \{keras_layer_name: module_qualified_name\}",
        ),
    ],
)
def test_bad_mapping(mapping, error, match):
    model = nn.Sequential(BatchNormalization(3), BatchNormalization(5))
    with pytest.raises(error, match=match):
        load_weights(model, GOLDEN / "tfk_model.h5", mapping=mapping)


def test_mapping_leaves_other_layers_unused(arrays):
    model = nn.Sequential(BatchNormalization(5, renorm=True, center=False))
    report = load_weights(model, GOLDEN / "tfk_model.h5", mapping={"bn_dense": "0"})
    assert [(e.keras_name, e.status) for e in report] == [
        ("bn_conv", "unused"),
        ("bn_dense", "loaded"),
    ]
    assert report.ok


def test_missing_and_non_keras_paths(tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"`path` must name an existing Keras file. Received: path='.*nope.h5'",
    ):
        read_batch_norm_layers(tmp_path / "nope.h5")
    text = tmp_path / "model.h5"
    text.write_text("not a model")
    with pytest.raises(
        ValueError, match=r"`path` must be a Keras file: a Keras 3 `.keras` zip archive or an HDF5"
    ):
        read_batch_norm_layers(text)
    with pytest.raises(
        TypeError, match=r"`path` must be a str or os.PathLike. Received: path of type int"
    ):
        read_batch_norm_layers(3)
    with pytest.raises(
        TypeError, match=r"`model` must be a torch.nn.Module. Received: model of type str"
    ):
        load_weights("model", GOLDEN / "tfk_model.h5")


def test_zip_and_hdf5_files_that_keras_did_not_write(tmp_path):
    import zipfile

    import h5py

    archive = tmp_path / "x.keras"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("config.json", "{}")
    with pytest.raises(
        ValueError, match=r"not a Keras 3 `.keras` file: it lacks \['model.weights.h5'\]"
    ):
        read_batch_norm_layers(archive)
    other = tmp_path / "x.h5"
    with h5py.File(other, "w") as handle:
        handle["data"] = np.zeros(3)
    with pytest.raises(
        ValueError, match=r"HDF5 file but not one Keras wrote.*top-level keys \['data'\]"
    ):
        read_batch_norm_layers(other)


def test_keras3_weights_only_file_with_a_wrong_variable_count(tmp_path):
    import h5py

    path = tmp_path / "odd.weights.h5"
    with h5py.File(path, "w") as handle:
        group = handle.create_group("layers/batch_normalization/vars")
        group.attrs["name"] = "bn"
        for i in range(8):
            group[str(i)] = np.ones(2, dtype="float32")
    with pytest.raises(
        ValueError,
        match=r"Expected 2 to 7 variables for BatchNormalization layer 'bn'. "
        r"Received: 8 at /layers/batch_normalization/vars",
    ):
        read_batch_norm_layers(path)


def test_keras3_weights_only_gamma_or_beta_needs_a_module_with_one_of_them(arrays):
    file = "k3_model.weights.h5"
    model = ConvStack(
        arrays,
        file,
        BatchNormalization.like("keras3", momentum=0.9, epsilon=0.01),
        BatchNormalization.like("keras3"),
    )
    with pytest.raises(
        ValueError,
        match=r"bn_dense -> bn_dense: scale/center: file 'gamma or beta \(a weights-only file "
        r"does not say which\)', module 'scale=True, center=True' \(the weights cannot be loaded\)",
    ):
        load_weights(model, GOLDEN / file)
    report = load_weights(model, GOLDEN / file, strict=False)
    assert [entry.status for entry in report] == ["loaded", "skipped"]
    assert model.bn_conv.built and not model.bn_dense.built


def test_missing_h5py_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"needs h5py.*pip install 'batchnorm\[keras\]'"):
        read_batch_norm_layers(GOLDEN / "tfk_model.h5")


def test_invalid_setting_in_the_file_is_named(tmp_path):
    import shutil

    import h5py

    path = tmp_path / "bad_momentum.h5"
    shutil.copy(GOLDEN / "tfk_model.h5", path)
    with h5py.File(path, "r+") as handle:
        handle.attrs["model_config"] = handle.attrs["model_config"].replace(
            '"momentum": 0.9,', '"momentum": 1.5,'
        )
    model = nn.Sequential(BatchNormalization(3), BatchNormalization(5, renorm=True, center=False))
    with pytest.raises(
        ValueError,
        match=r"Keras layer 'bn_conv' in the file has an invalid setting: `momentum` must be a "
        r"number in \[0, 1\]. Received: momentum=1.5",
    ):
        load_weights(model, path, configure=True)
    assert model[0].momentum == 0.99


def test_report_text_lists_each_pair():
    model = nn.Sequential(BatchNormalization(3), BatchNormalization(5, renorm=True, center=False))
    text = str(load_weights(model, GOLDEN / "tfk_model.h5", configure=True))
    assert "bn_conv -> 0: loaded" in text
    assert "note: configured epsilon: 0.001 -> 0.01" in text
    assert "bn_dense -> 1: loaded" in text


def test_channels_last_keras_layer_into_channels_first_module(arrays):
    """The usual port: Keras' NHWC layer (axis 3) into an NCHW model (axis 1); a note, no error."""
    file = "tfk_model.h5"
    bn_conv = BatchNormalization(3, axis=1, momentum=0.9, epsilon=0.01)
    bn_conv.build((4, 3, 4, 4))
    model = ConvStack(
        arrays, file, bn_conv, BatchNormalization(5, renorm=True, center=False), nchw=True
    )
    report = load_weights(model, GOLDEN / file)
    assert report.ok
    assert any("normalises axis 3, the module axis 1" in note for note in report[0].notes)
    assert_close(infer(model, arrays, file), arrays[f"files/{file}/y"], 1e-5, "model output")


# ------------------------------------------------ damaged files: checked before anything changes
def write_tf_keras_weights(path: Path, layers: dict[str, dict[str, np.ndarray]]) -> Path:
    """A tf-keras ``save_weights`` HDF5 file: layer_names on the root, weights under weight_names."""
    import h5py

    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = [name.encode() for name in layers]
        handle.attrs["keras_version"] = b"2.20.1"
        for name, weights in layers.items():
            group = handle.create_group(name)
            group.attrs["weight_names"] = [f"{name}/{w}:0".encode() for w in weights]
            for weight, value in weights.items():
                group[f"{name}/{weight}:0"] = value
    return path


def write_keras3_weights(path: Path, layers: dict[str, dict[str, np.ndarray]]) -> Path:
    """A Keras 3 ``.weights.h5``: unnamed variables under layers/batch_normalization[_n]/vars."""
    import h5py

    with h5py.File(path, "w") as handle:
        for i, (name, weights) in enumerate(layers.items()):
            group = handle.create_group(
                "layers/batch_normalization" + (f"_{i}" if i else "") + "/vars"
            )
            group.attrs["name"] = name
            for j, value in enumerate(weights.values()):
                group[str(j)] = value
    return path


def bn_weights(channels: int, *, seed: int = 0, **sizes: int) -> dict[str, np.ndarray]:
    """gamma, beta, moving_mean, moving_variance of ``channels`` values (``sizes`` overrides)."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.random(sizes.get(name, channels)) + 0.5).astype(np.float32)
        for name in ("gamma", "beta", "moving_mean", "moving_variance")
    }


def snapshot(model: nn.Module) -> list[tuple[str, torch.Tensor | str]]:
    """Every tensor of the state dict, and every module's settings and build state."""
    state: list[tuple[str, torch.Tensor | str]] = [
        (k, v.clone()) for k, v in model.state_dict().items()
    ]
    for name, module in model.named_modules():
        settings = {
            key: getattr(module, key, None)
            for key in ("momentum", "epsilon", "eps", "trainable", "renorm_clipping", "built")
        }
        state.append((name, repr(settings)))
    return state


def assert_unchanged(model: nn.Module, before: list[tuple[str, torch.Tensor | str]]) -> None:
    after = snapshot(model)
    assert [key for key, _ in after] == [key for key, _ in before]
    for (key, old), (_, new) in zip(before, after, strict=True):
        if isinstance(old, torch.Tensor):
            assert isinstance(new, torch.Tensor)
            torch.testing.assert_close(new, old, rtol=0, atol=0, msg=key)
        else:
            assert new == old, key


def first_then_second(kind: str) -> nn.Module:
    """A module for a good 3-channel layer, then one for a 5-channel layer."""
    if kind == "ours":
        return nn.Sequential(BatchNormalization(3), BatchNormalization(5))
    if kind == "ours unbuilt":
        return nn.Sequential(BatchNormalization(), BatchNormalization())
    return nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(5))


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("kind", ["ours", "ours unbuilt", "torch"])
@pytest.mark.parametrize("writer", [write_tf_keras_weights, write_keras3_weights])
def test_weights_of_different_lengths_are_refused_before_any_module_changes(
    tmp_path, writer, kind, strict
):
    """gamma/beta of 4 values and moving statistics of 5 in the second layer: the first layer,
    which fits, is not loaded either, in strict and non-strict mode."""
    path = writer(
        tmp_path / "bad.weights.h5",
        {"bn_good": bn_weights(3), "bn_bad": bn_weights(5, gamma=4, beta=4)},
    )
    model = first_then_second(kind)
    before = snapshot(model)
    match = (
        r"Every weight of Keras layer 'bn_bad' must have the same shape, one value per channel. "
        r"Received: gamma \(4,\), beta \(4,\), moving_mean \(5,\), moving_variance \(5,\) "
        r"at /layers/batch_normalization_1/vars in path='.*bad.weights.h5'"
    )
    if writer is write_tf_keras_weights:
        match = match.replace("/layers/batch_normalization_1/vars", "/bn_bad/bn_bad")
    with pytest.raises(ValueError, match=match):
        load_weights(model, path, strict=strict, configure=True)
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=match):
        read_batch_norm_layers(path)


@pytest.mark.parametrize("strict", [True, False])
def test_moving_statistics_that_disagree_are_refused(tmp_path, strict):
    path = write_tf_keras_weights(
        tmp_path / "w.h5", {"bn_good": bn_weights(3), "bn_bad": bn_weights(5, moving_variance=6)}
    )
    model = first_then_second("torch")
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"'bn_bad'.*moving_mean \(5,\), moving_variance \(6,\) at /bn_bad/bn_bad"
    ):
        load_weights(model, path, strict=strict)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("value", "expectation"),
    [
        (np.array([b"a", b"b", b"c"]), "real numbers"),
        (np.array([1 + 1j, 2, 3]), "real numbers"),
        (np.zeros(0, np.float32), "one value per channel"),
        (np.float32(1), "one value per channel"),
    ],
)
def test_weights_that_are_not_per_channel_numbers_are_refused(tmp_path, value, expectation):
    path = write_tf_keras_weights(tmp_path / "w.h5", {"bn": {**bn_weights(3), "gamma": value}})
    model = nn.Sequential(BatchNormalization(3))
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=rf"Weight `gamma` of Keras layer 'bn' must hold {expectation}. "
        r"Received: .* at /bn/bn in path='.*w.h5'",
    ):
        load_weights(model, path, strict=False)
    assert_unchanged(model, before)


def test_module_whose_tensors_do_not_match_its_channel_count_changes_nothing(tmp_path):
    """torch's num_features says 3, the running_var put in by hand has 4 values."""
    path = write_tf_keras_weights(tmp_path / "w.h5", {"a": bn_weights(3), "b": bn_weights(3)})
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3))
    model[1].running_var = torch.ones(4)
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"Keras layer 'b' holds 3 values per weight, which module '1' must take. "
        r"Received: `running_var` of shape \(4,\) in the module, path='.*w.h5'",
    ):
        load_weights(model, path, strict=False)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kind", ["ours", "torch"])
def test_non_finite_weights_are_a_mismatch_that_strict_false_still_loads(tmp_path, kind):
    """A diverged run saves NaN statistics: strict names them; strict=False loads them as Keras would."""
    bad = bn_weights(5)
    bad["moving_mean"][[1, 3]] = [np.nan, np.inf]
    bad["moving_variance"][0] = -0.5
    path = write_tf_keras_weights(tmp_path / "w.h5", {"bn_good": bn_weights(3), "bn_bad": bad})
    model = first_then_second(kind)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"2 way\(s\)") as error:
        load_weights(model, path)
    assert (
        "bn_bad -> 1: moving_mean values: file '2 of 5 not finite', module 'finite expected' "
        "(the weights still load)" in str(error.value)
    )
    assert "bn_bad -> 1: moving_variance values: file '1 of 5 negative'" in str(error.value)
    assert_unchanged(model, before)
    report = load_weights(model, path, strict=False)
    assert [entry.status for entry in report] == ["loaded", "loaded"]
    assert [d.setting for d in report[1].differences] == [
        "moving_mean values",
        "moving_variance values",
    ]
    mean = model[1].moving_mean if kind == "ours" else model[1].running_mean
    np.testing.assert_array_equal(mean.numpy(), bad["moving_mean"])


@pytest.mark.parametrize("writer", [write_tf_keras_weights, write_keras3_weights])
def test_big_endian_arrays_load(tmp_path, writer):
    """h5py returns arrays in the byte order stored; torch refuses non-native ones."""
    weights = {k: v.astype(">f4") for k, v in bn_weights(3).items()}
    path = writer(tmp_path / "big.weights.h5", {"bn": weights})
    ours, theirs = BatchNormalization(3), nn.BatchNorm1d(3, eps=1e-3, momentum=0.01)
    assert load_weights(ours, path, configure=True).ok
    assert load_weights(theirs, path).ok
    expected = [v.astype(np.float32) for v in weights.values()]
    for got, want in zip(ours.get_weights(), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(
        (theirs.weight, theirs.bias, theirs.running_mean, theirs.running_var), expected, strict=True
    ):
        np.testing.assert_array_equal(got.detach().numpy(), want)


def test_invalid_setting_in_a_later_layer_changes_no_earlier_module(tmp_path):
    """configure=True, strict=False: bn_dense's renorm_clipping (rmax < rmin) is refused before
    bn_conv, which fits, is configured or loaded."""
    import shutil

    import h5py

    path = tmp_path / "bad_clipping.h5"
    shutil.copy(GOLDEN / "tfk_model.h5", path)
    with h5py.File(path, "r+") as handle:
        config = json.loads(handle.attrs["model_config"])
        for layer in config["config"]["layers"]:
            if layer["config"]["name"] == "bn_dense":
                layer["config"]["renorm_clipping"] = {"rmin": 2.0, "rmax": 1.0}
        handle.attrs["model_config"] = json.dumps(config)
    model = nn.Sequential(BatchNormalization(3), BatchNormalization(5, renorm=True, center=False))
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"Keras layer 'bn_dense' in the file has an invalid setting: `renorm_clipping` "
        r"needs rmax >= rmin. Received: renorm_clipping=\{'rmin': 2.0, 'rmax': 1.0\}",
    ):
        load_weights(model, path, configure=True, strict=False)
    assert_unchanged(model, before)


def test_truncated_and_damaged_files_name_the_path(tmp_path):
    data = (GOLDEN / "tfk_model.h5").read_bytes()
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[: len(data) // 2])
    model = nn.Sequential(BatchNormalization(3), BatchNormalization(5))
    before = snapshot(model)
    with pytest.raises(
        OSError,
        match=r"`path` could not be read as a Keras file \(.*truncated file.*\); it may be "
        r"truncated or damaged. Received: path='.*truncated.h5'",
    ):
        load_weights(model, truncated, strict=False)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(data[:8] + b"\0" * 200)  # the HDF5 signature, then nothing HDF5
    with pytest.raises(OSError, match=r"could not be read as a Keras file.*path='.*garbage.h5'"):
        load_weights(model, garbage)
    archive = (GOLDEN / "k3_model.keras").read_bytes()
    cut = tmp_path / "cut.keras"
    cut.write_bytes(archive[: len(archive) // 2])
    with pytest.raises(
        ValueError, match=r"no end-of-archive record: a truncated `.keras` file\? .*'.*cut.keras'"
    ):
        load_weights(model, cut)
    with pytest.raises(
        FileNotFoundError, match=r"must name an existing Keras file. Received: path='.*gone.h5'"
    ):
        load_weights(model, tmp_path / "gone.h5")
    assert_unchanged(model, before)


def test_keras_archive_with_a_damaged_weights_member_names_the_path(tmp_path):
    import zipfile

    path = tmp_path / "damaged.keras"
    with zipfile.ZipFile(GOLDEN / "k3_model.keras") as source_archive:
        members = {name: source_archive.read(name) for name in source_archive.namelist()}
    weights = members["model.weights.h5"]
    members["model.weights.h5"] = weights[: len(weights) // 2]
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(OSError, match=r"could not be read as a Keras file.*path='.*damaged.keras'"):
        read_batch_norm_layers(path)
    members["config.json"] = b"{not json"
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    with pytest.raises(
        ValueError, match=r"lacks or garbles what a Keras file of its format holds.*damaged.keras"
    ):
        read_batch_norm_layers(path)


# ---------------------------------------------------------------------------- where layers sit
PLACED_FILES = [
    "tfk_repeated.h5",
    "k3_repeated.keras",
    "tfk_time_distributed.h5",
    "k3_time_distributed.keras",
]


def placed_weights(arrays, file: str, spec) -> dict[str, np.ndarray]:
    model_path = spec["path"].rpartition("/")[0]
    return {
        name: arrays[f"files/{source(file)}/{model_path}/{spec['name']}/{name}"]
        for name in spec["weight_names"]
    }


@pytest.mark.parametrize("file", PLACED_FILES)
def test_each_layer_gets_its_own_weights_and_config_where_names_do_not_say(file, arrays):
    """Two nested models each holding a "bn" (tf-keras: the last config won for both; Keras 3:
    their weights were swapped), and a layer inside TimeDistributed (tf-keras: dropped, so
    loading by order shifted every later layer)."""
    layers = read_batch_norm_layers(GOLDEN / file)
    specs = FILES[file]["batch_norm_layers"]
    assert [layer.path for layer in layers] == [spec["path"] for spec in specs]
    for layer, spec in zip(layers, specs, strict=True):
        assert layer.name == spec["name"]
        for key in ("momentum", "epsilon", "center", "scale"):
            assert layer.config[key] == spec["config"][key], (spec["path"], key)
        expected = placed_weights(arrays, file, spec)
        assert list(layer.weights) == list(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(layer.weights[name], value, err_msg=name)


@pytest.mark.parametrize(
    ("file", "mapping"),
    [
        ("tfk_time_distributed.h5", None),
        ("k3_time_distributed.keras", None),
        # weights only: layers come in group-name order, so they are paired by name or path
        ("k3_time_distributed.weights.h5", {"td_bn": "wrapped", "after": "after"}),
        ("k3_time_distributed.weights.h5", {"td/td_bn": "wrapped", "after": "after"}),
    ],
)
def test_time_distributed_model_reproduces_the_keras_output(file, mapping, arrays):
    """TimeDistributed(BatchNormalization) over (batch, 2, 3) inputs is, in inference, a batch
    norm over the last axis: the loaded layers give Keras' output."""
    model = nn.Sequential()
    model.add_module("wrapped", BatchNormalization(3, epsilon=0.1))
    model.add_module("after", BatchNormalization(3, momentum=0.9))
    report = load_weights(
        model, GOLDEN / file, mapping=mapping, configure=True, strict=mapping is None
    )
    assert [entry.status for entry in report] == ["loaded", "loaded"]
    assert_close(
        infer(model, arrays, file), arrays[f"files/{source(file)}/y"], 1e-5, "model output"
    )


@pytest.mark.parametrize("file", ["tfk_repeated.h5", "k3_repeated.keras"])
def test_a_name_that_two_nested_layers_share_is_mapped_by_path(file, arrays):
    """mapping={"bn": ...} loaded both layers into one module, with one's weights and the
    other's epsilon; it is refused, and paths name each layer."""
    model = nn.ModuleDict({"first": BatchNormalization(3), "second": BatchNormalization(3)})
    with pytest.raises(
        ValueError, match=r"several layers of the file share \(\{'bn': \['zz/bn', 'aa/bn'\]\}\)"
    ):
        load_weights(model, GOLDEN / file, mapping={"bn": "first"}, configure=True)
    assert model["first"].epsilon == 1e-3  # nothing configured
    report = load_weights(
        model, GOLDEN / file, mapping={"aa/bn": "first", "zz/bn": "second"}, configure=True
    )
    assert report.ok and [entry.keras_name for entry in report] == ["zz/bn", "aa/bn"]
    assert (model["second"].momentum, model["second"].epsilon) == (0.5, 0.1)
    assert (model["first"].momentum, model["first"].epsilon) == (0.99, 0.001)
    for module, spec in zip(
        (model["second"], model["first"]), FILES[file]["batch_norm_layers"], strict=True
    ):
        weights = dict(zip(module._weight_names(), module.get_weights(), strict=True))
        for name, value in placed_weights(arrays, file, spec).items():
            np.testing.assert_array_equal(weights[name], value, err_msg=name)


def test_inspect_lists_layers_of_nested_models_by_path(tmp_path, capsys):
    """Keyed by name, the second "bn" replaced the first: a NaN variance in one went unseen."""
    from batchnorm.__main__ import main

    assert main(["inspect", str(GOLDEN / "k3_repeated.keras")]) == 0
    shown = capsys.readouterr().out
    assert "zz/bn" in shown and "aa/bn" in shown and "2 layer(s)" in shown


def test_a_keras_layer_torch_cannot_express_is_a_mismatch(arrays):
    """A frozen (trainable=False) or ghost-batch Keras layer loads into torch's batch norm, but
    its training steps differ there: listed, where nothing was."""
    from batchnorm.interop.keras._compare import torch_differences

    record = read_batch_norm_layers(GOLDEN / "k3_repeated.keras")[0]
    for setting, value in (("trainable", False), ("virtual_batch_size", 2)):
        changed = dataclasses.replace(record, config={**record.config, setting: value})
        differences, _ = torch_differences(changed, nn.BatchNorm1d(3, eps=0.1, momentum=0.5))
        assert [(d.setting, d.in_file, d.resolution) for d in differences] == [
            (setting, value, "adapt")
        ]


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(ValueError, match=r"a directory such as a TensorFlow SavedModel"):
        read_batch_norm_layers(tmp_path)


# ------------------------------------------- batch norms that no model config lists
# tools/make_keras3_golden.py (keras_custom.json / .npz): a custom layer "block" holding two
# batch norms as attributes (bn1, bn2), a registered subclass "mine" (MyBN), in tf-keras a layer
# named "a/b"; and tf-keras 2.13+'s own .keras / .weights.h5 (tfk_native).
CUSTOM = json.loads((GOLDEN / "keras_custom.json").read_text())["files"]
_TF_KERAS_CUSTOM_PATHS = [
    "stem",
    "block/batch_normalization",
    "block/batch_normalization_1",
    "mine",
    "a/b",
    "head",
]
CUSTOM_PATHS = {
    "tfk_custom.h5": _TF_KERAS_CUSTOM_PATHS,
    "tfk_custom_weights.h5": _TF_KERAS_CUSTOM_PATHS,
    "k3_custom.keras": ["stem", "block/bn1", "block/bn2", "mine", "head"],
    # weights only: in group-name order (batch_normalization, _1, block/..., my_bn)
    "k3_custom.weights.h5": ["stem", "head", "block/bn1", "block/bn2", "mine"],
}


@pytest.fixture(scope="module")
def custom_arrays() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "keras_custom.npz") as data:
        return {key: data[key] for key in data.files}


def custom_spec(file: str, where: str) -> dict:
    return next(s for s in CUSTOM[file]["batch_norm_layers"] if s["where"] == where)


def custom_source(file: str) -> str:
    return CUSTOM[file].get("arrays_of", file)


def keras_where(path: str) -> str:
    """Our path -> the generator's name for the layer ("block/bn1" -> "block.bn1")."""
    return {
        "block/batch_normalization": "block.bn1",
        "block/batch_normalization_1": "block.bn2",
        "block/bn1": "block.bn1",
        "block/bn2": "block.bn2",
    }.get(path, path)


@pytest.mark.parametrize("file", list(CUSTOM_PATHS))
def test_batch_norms_held_by_a_custom_layer_or_subclassed_are_all_read(file, custom_arrays):
    """Attributes of a custom layer, a BatchNormalization subclass and a name with "/" were
    dropped (and "a/b" named "b" in a weights-only file): every layer is read, with its own
    weights, and its config where the file has one."""
    layers = read_batch_norm_layers(GOLDEN / file)
    assert [layer.path for layer in layers] == CUSTOM_PATHS[file]
    has_config = file in ("tfk_custom.h5", "k3_custom.keras")
    for layer in layers:
        spec = custom_spec(file, keras_where(layer.path))
        assert layer.name == spec["name"]
        names = list(layer.weights)
        assert names == spec["weight_names"]
        for name in names:
            expected = custom_arrays[f"{custom_source(file)}/{spec['where']}/{name}"]
            np.testing.assert_array_equal(layer.weights[name], expected, err_msg=name)
        if has_config and "." not in spec["where"]:
            assert str(layer.class_name).endswith(spec["class_name"])  # tf-keras: "pkg>MyBN"
            for key in ("momentum", "epsilon", "center", "scale"):
                assert layer.config[key] == spec["config"][key], (layer.path, key)
        else:  # weights only, or held by a custom layer: its config is not in the file
            assert layer.config is None


def custom_torch_model(file: str) -> nn.Sequential:
    """Keras' model as a chain of our layers, in Keras' call order."""
    model = nn.Sequential()
    for spec in CUSTOM[file]["batch_norm_layers"]:
        config = spec["config"]
        model.add_module(
            spec["where"].replace(".", "_").replace("/", "_"),
            BatchNormalization(4, momentum=config["momentum"], epsilon=config["epsilon"]),
        )
    return model


@pytest.mark.parametrize("file", list(CUSTOM_PATHS))
def test_custom_layer_model_reproduces_the_keras_output(file, custom_arrays):
    """Loaded by path into the torch chain, every layer gives Keras' inference output; loaded by
    order, the full files pair each layer with its module (before, "mine" went into the module
    of "head", and the block's layers were missing)."""
    model = custom_torch_model(file)
    module_of = {
        path: keras_where(path).replace(".", "_").replace("/", "_") for path in CUSTOM_PATHS[file]
    }
    report = load_weights(model, GOLDEN / file, mapping=module_of, strict=False)
    assert [entry.status for entry in report] == ["loaded"] * len(CUSTOM_PATHS[file])
    model.eval()
    with torch.no_grad():
        y = model(torch.tensor(custom_arrays[f"{custom_source(file)}/x"]))
    assert_close(y, custom_arrays[f"{custom_source(file)}/y"], 1e-5, "model output")
    if not file.endswith("weights.h5"):  # the full files list them in call order
        ordered = custom_torch_model(file)
        load_weights(ordered, GOLDEN / file, strict=False)
        ordered.eval()
        with torch.no_grad():
            y = ordered(torch.tensor(custom_arrays[f"{custom_source(file)}/x"]))
        assert_close(y, custom_arrays[f"{custom_source(file)}/y"], 1e-5, "by order")


@pytest.mark.parametrize("file", ["tfk_custom.h5", "k3_custom.keras"])
def test_a_custom_layers_batch_norm_says_its_config_is_unknown(file):
    model = custom_torch_model(file)
    report = load_weights(model, GOLDEN / file, strict=False)
    notes = {entry.keras_name: " ".join(entry.notes) for entry in report}
    held = [path for path in CUSTOM_PATHS[file] if path.startswith("block/")]
    assert held and all("held by a custom layer" in notes[path] for path in held)
    assert not any("custom layer" in notes[path] for path in ("stem", "mine", "head"))


def test_inspect_finds_a_nan_in_a_custom_layers_batch_norm(tmp_path, capsys):
    """A diverged statistic inside a ResNet-style block was hidden ('no problem found')."""
    from batchnorm.__main__ import main

    with zipfile.ZipFile(GOLDEN / "k3_custom.keras") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    h5py = pytest.importorskip("h5py")
    weights = tmp_path / "model.weights.h5"
    weights.write_bytes(members["model.weights.h5"])
    with h5py.File(weights, "r+") as handle:
        variance = handle["layers/block/bn1/vars/3"]
        values = variance[...]
        values[0] = np.nan
        variance[...] = values
    members["model.weights.h5"] = weights.read_bytes()
    damaged = tmp_path / "nan.keras"
    with zipfile.ZipFile(damaged, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    assert main(["inspect", str(damaged)]) == 1
    shown = capsys.readouterr().out
    assert "block/bn1: NaN variance in 1 channel(s)" in shown and "5 layer(s)" in shown


@pytest.mark.parametrize("file", ["tfk_native.keras", "tfk_native.weights.h5"])
def test_tf_keras_own_keras_format_is_read(file, custom_arrays):
    """tf-keras 2.13+'s model.save("m.keras") failed ("holds no variables": it writes no name
    attributes) and its SyncBatchNormalization was skipped in the .weights.h5."""
    layers = read_batch_norm_layers(GOLDEN / file)
    specs = CUSTOM[file]["batch_norm_layers"]
    assert len(layers) == 3
    if file.endswith(".keras"):
        assert [layer.path for layer in layers] == ["bn", "sync", "last"]
        assert {layer.file_format for layer in layers} == {"tf-keras .keras"}
        assert [layer.class_name for layer in layers] == [s["class_name"] for s in specs]
    else:  # group-name order; the file does not say it is tf-keras' (README)
        assert [layer.path for layer in layers] == [
            "batch_normalization",
            "batch_normalization_1",
            "sync_batch_normalization",
        ]
        specs = [specs[0], specs[2], specs[1]]
    for layer, spec in zip(layers, specs, strict=True):
        for name in spec["weight_names"]:
            expected = custom_arrays[f"tfk_native.keras/{spec['where']}/{name}"]
            np.testing.assert_array_equal(layer.weights[name], expected, err_msg=name)


def test_tf_keras_keras_file_configures_tf_keras_variance_rule(custom_arrays):
    """The fused layers of tf-keras store the unbiased batch variance, its SyncBatchNormalization
    the biased one: configured from the .keras file, one training step gives tf-keras' moving
    statistics (labelled Keras 3, every layer stored the biased variance and drifted)."""
    key = "tfk_native.keras"
    assert CUSTOM[key]["fused"] == [True, False, True]
    model = nn.Sequential(*(BatchNormalization() for _ in range(3)))
    report = load_weights(model, GOLDEN / key, configure=True)
    assert report.ok
    assert [layer.moving_variance_estimator for layer in model] == ["auto", "biased", "auto"]
    model.eval()
    with torch.no_grad():
        y = model(torch.tensor(custom_arrays[f"{key}/x"]))
    assert_close(y, custom_arrays[f"{key}/y"], 1e-5, "inference output")
    model.train()
    with torch.no_grad():
        model(torch.tensor(custom_arrays[f"{key}/x_train"]))
    for layer, spec in zip(model, CUSTOM[key]["batch_norm_layers"], strict=True):
        for name in ("moving_mean", "moving_variance"):
            expected = custom_arrays[f"{key}/{spec['where']}/{name}_after_step"]
            assert_close(getattr(layer, name), expected, 1e-5, f"{spec['where']} {name}")


def test_a_keras3_weights_file_with_nested_layers_is_not_paired_by_order():
    """A Keras 3 .weights.h5 records no order: its groups come in name order, so the custom
    layer's batch norms followed "head", and by-order loading put head's weights into
    block.bn1 (and so on), reporting every layer "loaded". Now it asks for `mapping`, and
    changes nothing."""
    model = custom_torch_model("k3_custom.weights.h5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"records no layer order.*'block/bn1'.*Pass `mapping`"):
        load_weights(model, GOLDEN / "k3_custom.weights.h5")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_keras3_archive_of_a_subclassed_model_asks_for_mapping_as_a_keras_file(tmp_path):
    """A subclassed model's `.keras` config lists no layers (Keras 3 writes its class and
    build config only), so its batch norms have no more order than in its weights: the error
    told the caller to read the `.keras` file, which they had passed."""
    path = tmp_path / "subclassed.keras"
    with zipfile.ZipFile(GOLDEN / "k3_custom.keras") as source_archive:
        members = {name: source_archive.read(name) for name in source_archive.namelist()}
    members["config.json"] = json.dumps(
        {
            "module": None,
            "class_name": "Sub",
            "config": {
                "trainable": True,
                "dtype": {
                    "module": "keras",
                    "class_name": "DTypePolicy",
                    "config": {"name": "float32"},
                    "registered_name": None,
                },
            },
            "registered_name": "Sub",
            "build_config": {"input_shape": [1, 4]},
            "compile_config": {},
        }
    ).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    model = custom_torch_model("k3_custom.weights.h5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"This Keras 3 `.keras` file records no layer order.*its config lists none of "
        r"them.*'block/bn1'.*Pass `mapping` .* with these paths. Received: path=.*subclassed",
    ) as error:
        load_weights(model, path)
    assert "weights-only" not in str(error.value)
    assert "read the `.keras` file" not in str(error.value)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("configure", [False, True])
def test_a_mismatch_suggests_configure_only_when_it_was_not_passed(configure):
    """The error told a caller who had passed configure=True to pass configure=True."""
    model = nn.Sequential(BatchNormalization(4), nn.BatchNorm1d(5))
    with pytest.raises(ValueError) as error:
        load_weights(model, GOLDEN / "tfk_model.h5", configure=configure)
    message = str(error.value)
    assert ("Pass configure=True" in message) is not configure
    assert "strict=False to load what fits" in message


# ------------------------- nested models in weights-only files, batch norms built in build()
# tools/make_keras3_golden.py --only nested (keras_nested.json / .npz): outer = [enc = [s2 =
# [Dense "dd", BN "bn"], BN "bn"], BN "bn"] as k3_deep.keras, k3_deep.weights.h5 and tf-keras'
# tfk_deep.weights.h5; tf-keras .h5 files of BNs built in an RNN cell's and a custom layer's
# build() (tfk_cell.h5, tfk_cell_weights.h5). Every BN has its own random weights.
NESTED = json.loads((GOLDEN / "keras_nested.json").read_text())["files"]
# Group-name order in the weights-only files; tf-keras writes no names, its groups stand in.
DEEP_PATHS = {
    "k3_deep.keras": ["enc/s2/bn", "enc/bn", "bn"],
    "k3_deep.weights.h5": ["bn", "enc/bn", "enc/s2/bn"],
    "tfk_deep.weights.h5": [
        "batch_normalization",
        "sequential/batch_normalization",
        "sequential/sequential/batch_normalization",
    ],
}
CELL_PATHS = ["bidir/forward_rnn/bn_cell", "bidir/backward_rnn/bn_cell", "block", "bn_end"]


@pytest.fixture(scope="module")
def nested_arrays() -> dict[str, np.ndarray]:
    with np.load(GOLDEN / "keras_nested.npz") as data:
        return {key: data[key] for key in data.files}


def nested_source(file: str) -> str:
    return NESTED[file].get("arrays_of", file)


def deep_where(file: str, path: str) -> str:
    """Our path -> the generator's path of the layer (tf-keras' group names -> Keras names)."""
    if file.startswith("tfk_"):
        return DEEP_PATHS["k3_deep.keras"][::-1][DEEP_PATHS[file].index(path)]
    return path


def assert_nested_weights(weights, nested_arrays, file: str, where: str) -> None:
    """``weights`` (by Keras name) equal what Keras returned for the layer at ``where``."""
    spec = next(s for s in NESTED[file]["batch_norm_layers"] if s["where"] == where)
    assert list(weights) == spec["weight_names"]
    for name in spec["weight_names"]:
        expected = nested_arrays[f"{nested_source(file)}/{where}/{name}"]
        np.testing.assert_array_equal(weights[name], expected, err_msg=f"{where} {name}")


class DeepModel(nn.Module):
    """The generator's deep model in torch: Dense "dd", then the three batch norms in call
    order, each with the epsilon Keras gave it."""

    def __init__(self, nested_arrays, file: str):
        super().__init__()
        self.dd = nn.Linear(3, 3)
        with torch.no_grad():
            self.dd.weight.copy_(torch.tensor(nested_arrays[f"{nested_source(file)}/dd_0"]).T)
            self.dd.bias.copy_(torch.tensor(nested_arrays[f"{nested_source(file)}/dd_1"]))
        self.s2_bn = BatchNormalization.like("keras3", 3, epsilon=0.1)
        self.enc_bn = BatchNormalization.like("keras3", 3, epsilon=0.01)
        self.outer_bn = BatchNormalization.like("keras3", 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outer_bn(self.enc_bn(self.s2_bn(self.dd(x))))


def deep_mapping(file: str) -> dict[str, str]:
    modules = {"enc/s2/bn": "s2_bn", "enc/bn": "enc_bn", "bn": "outer_bn"}
    return {path: modules[deep_where(file, path)] for path in DEEP_PATHS[file]}


@pytest.mark.parametrize("file", list(DEEP_PATHS))
def test_nested_models_layers_are_named_by_their_path_in_a_weights_file(file, nested_arrays):
    """Every layer of a Keras 3 .weights.h5 was named "bn" (every one of tf-keras' own
    "batch_normalization"), whatever model held it: each now has a path, the one the .keras
    file gives where the file writes names, with the weights Keras saved for that layer."""
    layers = read_batch_norm_layers(GOLDEN / file)
    assert [layer.path for layer in layers] == DEEP_PATHS[file]
    for layer in layers:
        assert_nested_weights(layer.weights, nested_arrays, file, deep_where(file, layer.path))
        assert (layer.config is None) is file.endswith(".weights.h5")


@pytest.mark.parametrize(
    "file", ["k3_deep.weights.h5", "tfk_deep.weights.h5", "k3_time_distributed.weights.h5"]
)
def test_a_weights_file_with_nested_models_or_wrappers_is_not_paired_by_order(file):
    """Its groups come in name order ("bn" of the outer model before enc's, "after" before the
    TimeDistributed layer): by order, the layers loaded into each other's modules, all reported
    "loaded". Now nothing changes, and the error lists the paths `mapping` takes."""
    model = nn.Sequential(*(BatchNormalization(3) for _ in range(3 if "deep" in file else 2)))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"records no layer order.*Pass `mapping`") as error:
        load_weights(model, GOLDEN / file, configure=True, strict=False)
    assert_unchanged(model, before)
    for layer in read_batch_norm_layers(GOLDEN / file):
        assert repr(layer.path) in str(error.value)


@pytest.mark.parametrize("file", list(DEEP_PATHS))
def test_nested_models_weights_load_by_path_and_reproduce_the_keras_output(file, nested_arrays):
    """Mapped by the paths the reader gives, every module gets its own layer's weights and the
    torch model gives Keras' inference output; the .keras file also pairs by order."""
    for mapping in [deep_mapping(file)] + ([None] if file.endswith(".keras") else []):
        model = DeepModel(nested_arrays, file)
        report = load_weights(model, GOLDEN / file, mapping=mapping)
        assert report.ok and [entry.status for entry in report] == ["loaded"] * 3
        for module_name, where in (("s2_bn", "enc/s2/bn"), ("enc_bn", "enc/bn"), ("bn", "bn")):
            module = getattr(model, "outer_bn" if module_name == "bn" else module_name)
            weights = dict(zip(module._weight_names(), module.get_weights(), strict=True))
            assert_nested_weights(weights, nested_arrays, file, where)
        model.eval()
        with torch.no_grad():
            y = model(torch.tensor(nested_arrays[f"{nested_source(file)}/x"]))
        assert_close(y, nested_arrays[f"{nested_source(file)}/y"], 1e-5, f"output, {mapping}")


@pytest.mark.parametrize("file", ["k3_deep.weights.h5", "tfk_deep.weights.h5"])
def test_a_name_in_mapping_is_a_path_first_and_shared_names_point_to_paths(
    file, tmp_path, nested_arrays
):
    """mapping={"bn": ...} matched every layer named "bn" and the error asked for paths the
    file did not have ("bn", "bn"). A key that is a layer's path names that layer (the outer
    model's); without the outer layer, the name is shared and the error lists the paths, which
    mapping then takes."""
    import h5py

    name = DEEP_PATHS[file][0]  # the outer model's layer: its path is its (group) name
    model = nn.ModuleDict(
        {key: BatchNormalization.like("keras3", 3) for key in ("first", "second")}
    )
    report = load_weights(model, GOLDEN / file, mapping={name: "first"})
    assert [entry.status for entry in report] == ["loaded", "unused", "unused"]
    weights = dict(zip(model["first"]._weight_names(), model["first"].get_weights(), strict=True))
    assert_nested_weights(weights, nested_arrays, file, "bn")

    inner_only = tmp_path / "inner_only.weights.h5"
    inner_only.write_bytes((GOLDEN / file).read_bytes())
    with h5py.File(inner_only, "r+") as handle:
        del handle["layers/batch_normalization"]
    shared = read_batch_norm_layers(inner_only)[0].name
    with pytest.raises(ValueError, match=r"several layers of the file share") as error:
        load_weights(model, inner_only, mapping={shared: "first"})
    listed = str(error.value).split("share (")[1].split("); name")[0]
    assert listed == repr({shared: DEEP_PATHS[file][1:]})
    report = load_weights(
        model, inner_only, mapping=dict(zip(DEEP_PATHS[file][1:], ("first", "second"), strict=True))
    )
    assert [entry.status for entry in report] == ["loaded", "loaded"]
    for module, path in zip(("first", "second"), DEEP_PATHS[file][1:], strict=True):
        weights = dict(zip(model[module]._weight_names(), model[module].get_weights(), strict=True))
        assert_nested_weights(weights, nested_arrays, file, deep_where(file, path))


def test_a_layer_named_twice_in_mapping_is_refused():
    """By name and by path, one layer into two modules: the path used to win silently."""
    model = nn.ModuleDict({"first": BatchNormalization(3), "second": BatchNormalization(3)})
    with pytest.raises(ValueError, match=r"names Keras layers \['td/td_bn'\] twice"):
        load_weights(
            model,
            GOLDEN / "k3_time_distributed.weights.h5",
            mapping={"td_bn": "first", "td/td_bn": "second"},
        )


@pytest.mark.parametrize("file", ["tfk_cell.h5", "tfk_cell_weights.h5"])
def test_batch_norms_built_in_a_custom_layers_build_are_read(file, nested_arrays):
    """tf-keras names the weights of a batch norm built in a custom layer's (or an RNN cell's)
    build() in the holder's scope, beside its Dense weights (block/kernel:0, block/gamma:0):
    those layers were dropped, and inspect found "no problem" in the one left."""
    layers = read_batch_norm_layers(GOLDEN / file)
    assert [layer.path for layer in layers] == CELL_PATHS
    for layer in layers:
        assert_nested_weights(layer.weights, nested_arrays, file, layer.path)
        assert (layer.config is not None) is (file == "tfk_cell.h5" and layer.path == "bn_end")
    model = nn.ModuleDict(
        {"cell": BatchNormalization(2), "block": BatchNormalization(3, epsilon=0.1)}
    )
    mapping = {"bidir/backward_rnn/bn_cell": "cell", "block": "block"}
    report = load_weights(model, GOLDEN / file, mapping=mapping, strict=False)
    assert [entry.status for entry in report] == ["unused", "loaded", "loaded", "unused"]
    for module_name, where in mapping.items():
        module = model[where]
        weights = dict(zip(module._weight_names(), module.get_weights(), strict=True))
        assert_nested_weights(weights, nested_arrays, file, module_name)


def test_inspect_lists_a_batch_norm_built_in_build(capsys):
    from batchnorm.__main__ import main

    main(["inspect", str(GOLDEN / "tfk_cell.h5")])
    shown = capsys.readouterr().out
    assert "4 layer(s)" in shown and "bidir/backward_rnn/bn_cell" in shown


@pytest.mark.parametrize(
    "extra",
    [
        {"moving_stddev": 3},  # one renorm weight of three
        {"gamma": 4},  # a gamma of another shape
    ],
)
def test_moving_statistics_beside_other_weights_that_are_no_batch_norm_are_skipped(tmp_path, extra):
    """Only a complete set of batch-norm weights in a custom layer's scope is read as one."""
    rng = np.random.default_rng(0)
    block = {"kernel": rng.random((3, 3)), "moving_mean": rng.random(3)}
    block["moving_variance"] = rng.random(3)
    block.update({name: rng.random(size) for name, size in extra.items()})
    path = write_tf_keras_weights(tmp_path / "w.h5", {"block": block, "bn": bn_weights(3)})
    assert [layer.path for layer in read_batch_norm_layers(path)] == ["bn"]


def test_tf_keras_weights_file_of_several_batch_norm_classes_is_not_paired_by_order(
    custom_arrays,
):
    """Groups sort by class name first: batch_normalization, _1, then sync_batch_normalization,
    though the sync layer sits between the two. By order, "last" loaded into the sync layer's
    module and back; it is refused, and the paths load by mapping."""
    file = GOLDEN / "tfk_native.weights.h5"
    model = nn.Sequential(*(BatchNormalization() for _ in range(3)))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"records no layer order.*'sync_batch_normalization'"):
        load_weights(model, file, strict=False)
    assert_unchanged(model, before)
    mapping = {"batch_normalization": "0", "sync_batch_normalization": "1"}
    mapping["batch_normalization_1"] = "2"
    report = load_weights(model, file, mapping=mapping, strict=False)  # variance rule unknown
    assert [entry.status for entry in report] == ["loaded"] * 3
    for layer, spec in zip(model, CUSTOM["tfk_native.keras"]["batch_norm_layers"], strict=True):
        weights = dict(zip(layer._weight_names(), layer.get_weights(), strict=True))
        for name in spec["weight_names"]:
            expected = custom_arrays[f"tfk_native.keras/{spec['where']}/{name}"]
            np.testing.assert_array_equal(weights[name], expected, err_msg=spec["where"])


def test_a_weights_file_whose_batch_norms_share_one_nested_model_pairs_by_order(tmp_path):
    """All in one layer list of a nested model (a backbone in a Sequential), the group names
    give the layer order: pairing by order stays allowed, by their paths."""
    import h5py

    path = tmp_path / "backbone.weights.h5"
    layers = [bn_weights(3, seed=seed) for seed in range(2)]
    with h5py.File(path, "w") as handle:
        handle.create_group("layers/functional/vars").attrs["name"] = "backbone"
        for i, (name, weights) in enumerate(zip(("bn_a", "bn_b"), layers, strict=True)):
            group = handle.create_group(
                "layers/functional/layers/batch_normalization" + (f"_{i}" if i else "") + "/vars"
            )
            group.attrs["name"] = name
            for j, value in enumerate(weights.values()):
                group[str(j)] = value
    model = nn.Sequential(BatchNormalization(3), BatchNormalization(3))
    report = load_weights(model, path, configure=True)
    assert [(entry.keras_name, entry.module_name) for entry in report] == [
        ("backbone/bn_a", "0"),
        ("backbone/bn_b", "1"),
    ]
    for module, weights in zip(model, layers, strict=True):
        for got, want in zip(module.get_weights(), weights.values(), strict=True):
            np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------- parametrized modules
class Halved(nn.Module):
    """weight = 2 * original: a parametrization with a right_inverse, so a value can be written."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * 2

    def right_inverse(self, t: torch.Tensor) -> torch.Tensor:
        return t / 2


class Doubled(nn.Module):
    """The same without a right_inverse: nothing can be written through it."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * 2


def test_parametrized_torch_weight_and_bias_are_written_through_right_inverse():
    """Before, copy_ went into the tensor the parametrization computes: the report said
    "loaded" and the module kept weight = 2, bias = 0; the gamma = 1 fill (bn_dense has
    scale=False) was lost the same way."""
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm1d(5))
    for module in model:
        parametrize.register_parametrization(module, "weight", Halved())
        parametrize.register_parametrization(module, "bias", Halved())
    bn_conv, bn_dense = read_batch_norm_layers(GOLDEN / "k3_model.keras")
    report = load_weights(model, GOLDEN / "k3_model.keras", strict=False)
    assert [entry.status for entry in report] == ["loaded", "loaded"]
    np.testing.assert_array_equal(model[0].weight.detach(), bn_conv.weights["gamma"])
    np.testing.assert_array_equal(model[0].bias.detach(), bn_conv.weights["beta"])
    np.testing.assert_array_equal(model[0].running_mean, bn_conv.weights["moving_mean"])
    np.testing.assert_array_equal(model[1].weight.detach(), np.ones(5))
    np.testing.assert_array_equal(model[1].bias.detach(), bn_dense.weights["beta"])
    original = model[0].parametrizations.weight.original
    np.testing.assert_array_equal(original.detach(), bn_conv.weights["gamma"] / 2)


@pytest.mark.parametrize("configure", [False, True])
@pytest.mark.parametrize("kind", ["ours", "torch"])
def test_a_later_weight_that_cannot_be_written_changes_no_earlier_module(kind, configure):
    """The second module's beta (bias) is parametrized without a right_inverse: the load is
    refused before the first module's weights or settings change (before, set_weights raised
    for the second after the first was configured and loaded)."""
    from torch.nn.utils import parametrize

    if kind == "ours":
        model = nn.Sequential(BatchNormalization(3), BatchNormalization(5, scale=False))
        offset = "beta"
    else:
        model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm1d(5))
        offset = "bias"
    parametrize.register_parametrization(model[1], offset, Doubled())
    before = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"Keras layer 'bn_dense' \(path='.*k3_model.keras'\) cannot be loaded into module "
        rf"'1': `{offset}` is parametrized by Doubled, which has no right_inverse",
    ):
        load_weights(model, GOLDEN / "k3_model.keras", strict=False, configure=configure)
    assert_unchanged(model, before)


def test_a_parametrized_torch_weight_without_right_inverse_is_refused():
    from torch.nn.utils import parametrize

    model = nn.Sequential(nn.BatchNorm2d(3))
    parametrize.register_parametrization(model[0], "weight", Doubled())
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"`weight` is parametrized by Doubled"):
        load_weights(model, GOLDEN / "k3_model.keras", mapping={"bn_conv": "0"}, strict=False)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------- garbled configs
def rewritten_keras(tmp_path: Path, edit: dict[str, bytes]) -> Path:
    """k3_model.keras with the archive members in ``edit`` replaced."""
    path = tmp_path / "garbled.keras"
    with zipfile.ZipFile(GOLDEN / "k3_model.keras") as source_archive:
        members = {name: source_archive.read(name) for name in source_archive.namelist()}
    members.update(edit)
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)
    return path


def k3_model_config(**bn_dense: object) -> bytes:
    """k3_model.keras' config.json with bn_dense's config keys set as given."""
    with zipfile.ZipFile(GOLDEN / "k3_model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    for layer in config["config"]["layers"]:
        if layer["config"]["name"] == "bn_dense":
            layer["config"].update(bn_dense)
    return json.dumps(config).encode()


def k3_model_with_bn_dense_entry(**entry: object) -> bytes:
    """k3_model.keras' config.json with bn_dense's layer entry (beside its config) updated."""
    with zipfile.ZipFile(GOLDEN / "k3_model.keras") as archive:
        config = json.loads(archive.read("config.json"))
    for layer in config["config"]["layers"]:
        if layer["config"]["name"] == "bn_dense":
            layer.update(entry)
    return json.dumps(config).encode()


@pytest.mark.parametrize(
    ("member", "content", "holds"),
    [
        (
            "config.json",
            b"null",
            "config.json must be a JSON object, as Keras writes it, but holds null",
        ),
        ("config.json", b"[1, 2]", r"config.json must be a JSON object.* holds \[1, 2\]"),
        ("metadata.json", b"[]", r"metadata.json must be a JSON object.* holds \[\]"),
        (
            "config.json",
            k3_model_with_bn_dense_entry(build_config=[1]),
            r"the `build_config` of layer 'bn_dense' in the model config must be a JSON "
            r"object.* holds \[1\]",
        ),
    ],
)
def test_json_of_another_structure_is_a_garbled_file(tmp_path, member, content, holds):
    """Before: config.json null or a list read as a file without configs; metadata.json [] and
    a build_config [1] raised AttributeError."""
    path = rewritten_keras(tmp_path, {member: content})
    match = rf"`path` lacks or garbles what a Keras file of its format holds \({holds}\)\. "
    with pytest.raises(ValueError, match=match + r"Received: path='.*garbled.keras'"):
        read_batch_norm_layers(path)
    model = nn.Sequential(BatchNormalization(3), BatchNormalization(5, scale=False))
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_weights(model, path, strict=False)
    assert_unchanged(model, before)


def test_a_model_config_attribute_of_another_structure_is_a_garbled_file(tmp_path):
    import shutil

    import h5py

    path = tmp_path / "garbled.h5"
    shutil.copy(GOLDEN / "tfk_model.h5", path)
    with h5py.File(path, "r+") as handle:
        handle.attrs["model_config"] = "[]"
    with pytest.raises(
        ValueError,
        match=r"garbles what a Keras file of its format holds \(the `model_config` attribute "
        r"must be a JSON object, as Keras writes it, but holds \[\]\)",
    ):
        read_batch_norm_layers(path)


@pytest.mark.parametrize("configure", [False, True])
@pytest.mark.parametrize("kind", ["ours", "torch"])
@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("momentum", True, "a number"),
        ("momentum", "0.5", "a number"),
        ("momentum", None, "a number"),
        ("epsilon", None, "a number"),
        ("epsilon", "abc", "a number"),
        ("renorm_momentum", [0.9], "a number"),
        ("axis", None, "an int or a non-empty list of ints"),
        ("axis", "x", "an int or a non-empty list of ints"),
        ("axis", 1.5, "an int or a non-empty list of ints"),
        ("axis", [], "an int or a non-empty list of ints"),
        ("axis", [True], "an int or a non-empty list of ints"),
        ("trainable", "no", "true or false"),
        ("center", 1, "true or false"),
        ("virtual_batch_size", "4", "an int or null"),
        ("renorm_clipping", [1, 2], "a JSON object or null"),
    ],
)
def test_config_values_of_another_type_are_refused_for_every_module(
    tmp_path, key, value, expected, kind, configure
):
    """Before: axis null / "x" / 1.5 raised TypeError or a bare ValueError from int() into our
    layers; epsilon null a TypeError into torch modules, even with configure=False; momentum
    true configured torch momentum 0.0 and "0.5" was taken as 0.5, where our layers refused
    both. Now every such value is refused before anything changes, naming layer, key and value."""
    path = rewritten_keras(tmp_path, {"config.json": k3_model_config(**{key: value})})
    if kind == "ours":
        model = nn.Sequential(BatchNormalization(3), BatchNormalization(5, scale=False))
    else:
        model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm1d(5))
    before = snapshot(model)
    match = (
        rf"Keras layer 'bn_dense' in the file has an invalid setting: `{key}` must be "
        rf"{re.escape(expected)}, as Keras writes it. Received: {key}={re.escape(repr(value))} "
        r"in path='.*garbled.keras'"
    )
    with pytest.raises(ValueError, match=match):
        load_weights(model, path, strict=False, configure=configure)
    assert_unchanged(model, before)
