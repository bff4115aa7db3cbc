"""Arguments refused with errors that name them, and refused calls that leave the state as it was:
SampleNormalization, SyncBatchNormalization, fold_weights, apply_constraints, from_caffe, to_torch
and the demo's --seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import batchnorm
from batchnorm.__main__ import main


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def _assert_same_state(module: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert sorted(after) == sorted(before)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


# ---------------------------------------------------------------- SampleNormalization
@pytest.mark.parametrize("argument", ["center", "scale", "epsilon_in_sqrt"])
@pytest.mark.parametrize("value", ["False", None, 0])
def test_sample_normalization_flags_must_be_bools(argument, value):
    with pytest.raises(
        TypeError, match=rf"`{argument}` must be True or False. Received: {argument}="
    ):
        batchnorm.SampleNormalization(**{argument: value})


def test_sample_normalization_flags_take_numpy_bools():
    layer = batchnorm.SampleNormalization(center=np.bool_(False), scale=np.bool_(True))
    assert layer.center is False and layer.scale is True


@pytest.mark.parametrize("value", [True, False, 2.0, "3"])
def test_sample_normalization_num_features_must_be_a_positive_int(value):
    with pytest.raises(
        ValueError,
        match=rf"`num_features` must be a positive int. Received: num_features={value!r}",
    ):
        batchnorm.SampleNormalization(num_features=value)


@pytest.mark.parametrize(
    ("checkpoint", "match"),
    [
        ({"gamma": torch.ones(3), "beta": torch.zeros(5)}, r"size mismatch for beta: .* has 3 "),
        ({"gamma": torch.ones(3, 4), "beta": torch.zeros(3, 4)}, r"`gamma` must be 1-D"),
        ({"gamma": torch.tensor(1.0), "beta": torch.tensor(0.0)}, r"`gamma` must be 1-D"),
        (
            {"gamma": torch.ones(3, dtype=torch.long), "beta": torch.zeros(3, dtype=torch.long)},
            r"`gamma` must be a floating-point torch.Tensor. Received: gamma.dtype=torch.int64",
        ),
        ({"gamma": [1.0, 1.0], "beta": torch.zeros(2)}, r"Received: gamma of type list"),
    ],
)
def test_sample_normalization_failed_load_leaves_it_unbuilt(checkpoint, match):
    layer = batchnorm.SampleNormalization()
    with pytest.raises(RuntimeError, match=match):
        layer.load_state_dict(checkpoint)
    assert layer.num_features is None
    assert list(layer.named_parameters()) == []
    layer.load_state_dict({"gamma": torch.ones(4), "beta": torch.zeros(4)})
    assert layer.num_features == 4


def test_sample_normalization_failed_copy_unbuilds():
    """A value torch cannot copy (a meta tensor has no data) fails after the build: undone."""
    layer = batchnorm.SampleNormalization()
    meta = {"gamma": torch.ones(3, device="meta"), "beta": torch.zeros(3, device="meta")}
    with pytest.raises(RuntimeError, match="meta"):
        layer.load_state_dict(meta)
    assert layer.num_features is None and list(layer.parameters()) == []


def test_sample_normalization_failed_load_on_built_layer_changes_nothing():
    layer = batchnorm.SampleNormalization(num_features=3)
    with torch.no_grad():
        layer.gamma.fill_(2.0)
    before = _state(layer)
    with pytest.raises(RuntimeError, match=r"size mismatch for beta"):
        layer.load_state_dict({"gamma": torch.full((3,), 7.0), "beta": torch.zeros(5)})
    _assert_same_state(layer, before)


def test_sample_normalization_unbuilt_layer_refuses_a_first_meta_input():
    layer = batchnorm.SampleNormalization()
    with pytest.raises(
        RuntimeError, match=r"meta tensor holds no values .* Received: x.device=meta"
    ):
        layer(torch.ones(2, 3, device="meta"))
    assert layer.num_features is None and list(layer.parameters()) == []
    assert layer(torch.ones(2, 3)).shape == (2, 3)
    assert layer.gamma.device.type == "cpu"


def test_sample_normalization_built_on_meta_takes_meta_inputs():
    with torch.device("meta"):
        layer = batchnorm.SampleNormalization(num_features=3)
    assert layer(torch.ones(2, 3, device="meta")).device.type == "meta"


# ---------------------------------------------------------------- SyncBatchNormalization
def test_sync_batch_normalization_synchronized_is_checked_as_a_bool():
    with pytest.raises(
        TypeError, match=r"`synchronized` must be True or False. Received: synchronized='yes'"
    ):
        batchnorm.SyncBatchNormalization(3, synchronized="yes")
    assert batchnorm.SyncBatchNormalization(3, synchronized=np.bool_(True)).synchronized
    with pytest.raises(ValueError, match=r"always synchronized. Received: synchronized=np.False_"):
        batchnorm.SyncBatchNormalization(3, synchronized=np.bool_(False))


# ---------------------------------------------------------------- fold_weights
def _fold_arguments(**changes):
    arguments = {
        "weight": torch.randn(2, 3, 1, 1),
        "bias": torch.randn(2),
        "mean": torch.randn(2),
        "variance": torch.rand(2) + 0.5,
        "gamma": torch.randn(2),
        "beta": torch.randn(2),
        "epsilon": 1e-3,
    }
    arguments.update(changes)
    return arguments


@pytest.mark.parametrize("name", ["weight", "bias", "mean", "variance", "gamma", "beta"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_fold_weights_refuses_non_floating_tensors(name, dtype):
    arguments = _fold_arguments()
    arguments[name] = arguments[name].to(dtype)
    with pytest.raises(
        TypeError, match=rf"`{name}` must be a floating-point tensor. Received: {name}.dtype="
    ):
        batchnorm.fold_weights(**arguments)


@pytest.mark.parametrize("groups", [True, False, 2.0])
def test_fold_weights_refuses_non_int_groups(groups):
    arguments = _fold_arguments(weight=torch.randn(4, 1, 3, 3), bias=None, gamma=None, beta=None)
    with pytest.raises(ValueError, match=rf"`groups` must be a positive int .* groups={groups!r}"):
        batchnorm.fold_weights(**arguments, transposed=True, groups=groups)


def test_fold_weights_takes_numpy_int_groups():
    weight = torch.randn(4, 1, 3, 3)
    stats = {"mean": torch.zeros(2), "variance": torch.ones(2)}
    folded, _ = batchnorm.fold_weights(
        weight,
        None,
        **stats,
        gamma=None,
        beta=None,
        epsilon=1e-3,
        transposed=True,
        groups=np.int64(2),
    )
    torch.testing.assert_close(folded, weight / (1 + 1e-3) ** 0.5)


@pytest.mark.parametrize("name", ["weight", "bias", "mean", "variance", "gamma", "beta"])
def test_fold_weights_never_carries_gradients(name):
    arguments = _fold_arguments()
    arguments[name] = arguments[name].requires_grad_()
    folded_weight, folded_bias = batchnorm.fold_weights(**arguments)
    assert not folded_weight.requires_grad and not folded_bias.requires_grad


@pytest.mark.parametrize("name", ["bias", "mean", "variance", "gamma", "beta"])
def test_fold_weights_refuses_tensors_on_another_device(name):
    arguments = _fold_arguments(weight=torch.randn(2, 3, 1, 1, device="meta"))
    for other in ("bias", "mean", "variance", "gamma", "beta"):
        if other != name:
            arguments[other] = arguments[other].to("meta")
    with pytest.raises(
        ValueError,
        match=rf"`{name}` must be on the device of `weight`, meta. Received: {name}.device=cpu",
    ):
        batchnorm.fold_weights(**arguments)


# ---------------------------------------------------------------- apply_constraints
class _Double(nn.Module):
    def forward(self, tensor):
        return tensor * 2


def _constrained_model(layers=2):
    model = nn.Sequential(
        *(batchnorm.BatchNormalization(3, gamma_constraint="non_neg") for _ in range(layers))
    )
    for layer in model:
        with torch.no_grad():
            layer.gamma.fill_(-1.0)
    return model


def test_apply_constraints_writes_no_layer_when_one_cannot_take_its_projection():
    model = _constrained_model()
    parametrize.register_parametrization(model[1], "gamma", _Double())
    before = _state(model)
    with pytest.raises(
        ValueError, match=r"`gamma` is parametrized by _Double, which has no right_inverse"
    ):
        batchnorm.apply_constraints(model)
    _assert_same_state(model, before)
    assert model[0].gamma.tolist() == [-1.0, -1.0, -1.0]


@pytest.mark.parametrize("call", ["model", "layer"])
def test_apply_constraints_updated_must_hold_ids(call):
    model = _constrained_model(layers=1)
    before = _state(model)
    apply = (
        batchnorm.apply_constraints
        if call == "model"
        else lambda _, u: model[0].apply_constraints(u)
    )
    with pytest.raises(
        TypeError,
        match=r"`updated` must hold parameter ids .* Received: updated holding a Parameter",
    ):
        apply(model, {model[0].gamma})
    _assert_same_state(model, before)
    apply(model, {id(model[0].gamma)})
    assert model[0].gamma.tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------- from_caffe, to_torch
@pytest.mark.parametrize("value", [2.0, -0.5, "0.9", True])
def test_from_caffe_names_moving_average_fraction(value):
    with pytest.raises(
        ValueError,
        match=rf"`moving_average_fraction` must be a number in \[0, 1\]. "
        rf"Received: moving_average_fraction={value!r}",
    ):
        batchnorm.from_caffe(np.zeros(3), np.ones(3), np.ones(1), moving_average_fraction=value)


@pytest.mark.parametrize("dims", [True, 2.0, 0, 4, "2"])
def test_to_torch_dims_must_be_the_int_1_2_or_3(dims):
    layer = batchnorm.BatchNormalization(3, axis=1, moving_variance_estimator="unbiased")
    with pytest.raises(ValueError, match=rf"`dims` must be 1, 2 or 3. Received: dims={dims!r}"):
        batchnorm.to_torch(layer, dims=dims)


def test_to_torch_takes_numpy_int_dims():
    layer = batchnorm.BatchNormalization(3, axis=1, moving_variance_estimator="unbiased")
    assert type(batchnorm.to_torch(layer, dims=np.int64(2))) is nn.BatchNorm2d


# ---------------------------------------------------------------- demo --seed
@pytest.mark.parametrize("seed", ["99999999999999999999", str(2**64), "-1", "1.5"])
def test_demo_seed_out_of_torch_range_is_a_usage_error(seed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "modes", "--steps", "2", "--seed", seed, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "argument --seed: must be" in capsys.readouterr().err
    assert not (tmp_path / "modes.png").exists()


def test_demo_seed_takes_the_largest_torch_seed(tmp_path):
    assert (
        main(["demo", "modes", "--steps", "2", "--seed", str(2**64 - 1), "--out", str(tmp_path)])
        == 0
    )


def test_sample_normalization_resets_as_built_after_the_meta_recipe():
    with torch.device("meta"):
        layer = batchnorm.SampleNormalization(num_features=4)
    layer.to_empty(device="cpu")
    layer.reset_parameters()  # missing before: gamma/beta kept uninitialised memory
    assert torch.equal(layer.gamma.detach(), torch.ones(4))
    assert torch.equal(layer.beta.detach(), torch.zeros(4))
    batchnorm.SampleNormalization().reset_parameters()  # unbuilt: nothing to reset


def test_sample_normalization_given_only_beta_stays_unbuilt():
    layer = batchnorm.SampleNormalization()
    with pytest.raises(RuntimeError, match=r'Missing key.*"gamma"'):
        layer.load_state_dict({"beta": torch.zeros(5)})
    assert layer.num_features is None and list(layer.parameters()) == []
