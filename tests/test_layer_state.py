"""state_dict, set_weights and get_config: what a layer saves and what it agrees to load.

A load that fails writes nothing, into a built layer or an unbuilt one; a checkpoint whose
buffers mean something else (the other variance estimator, torch's conventions) is refused with
a message that says what to do; another dtype is cast with a warning.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from batchnorm import BatchNormalization, SampleNormalization


def trained(**kwargs):
    torch.manual_seed(0)
    layer = BatchNormalization(**kwargs)
    shape = (8, 3, 4, 4) if kwargs.get("axis") == 1 else (16, 3)
    for _ in range(2):
        layer(torch.randn(shape).to(layer.dtype_policy.parameter_dtype) * 2 + 1, training=True)
    return layer


def snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_unchanged(layer, before):
    after = layer.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def assert_unbuilt(layer):
    assert not layer.built and layer.num_features is None and layer._input_rank is None
    assert all(is_lazy(t) for t in [*layer._parameters.values(), *layer._buffers.values()])


# ------------------------------------------------------------------ the recorded estimator
@pytest.mark.parametrize(
    ("kwargs", "recorded"),
    [
        ({"axis": 1}, "unbiased"),  # tf-keras' fused path for rank 4
        ({"axis": -1}, "biased"),
        ({"axis": -1, "moving_variance_estimator": "unbiased"}, "unbiased"),
    ],
)
def test_state_dict_records_which_variance_it_holds(kwargs, recorded):
    state = trained(**kwargs).state_dict()
    assert state._metadata[""]["moving_variance_estimator"] == recorded
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)._metadata[""]["moving_variance_estimator"] == (
        recorded
    )


def test_a_layer_that_has_not_decided_its_variance_records_nothing():
    state = BatchNormalization(3, axis=1).state_dict()  # fused=None, no input seen
    assert "moving_variance_estimator" not in state._metadata[""]


def test_checkpoint_of_the_other_estimator_is_refused_and_nothing_is_written():
    source = trained(axis=-1, moving_variance_estimator="unbiased")
    target = trained(axis=-1)  # biased
    before = snapshot(target)
    with pytest.raises(
        RuntimeError,
        match=r"moving_variance_estimator='auto' stores the biased moving variance .*"
        r"checkpoint's moving_variance is the unbiased one.*"
        r"Received: a state_dict recording moving_variance_estimator='unbiased'",
    ):
        target.load_state_dict(source.state_dict())
    assert_unchanged(target, before)
    unbuilt = BatchNormalization(moving_variance_estimator="biased")
    with pytest.raises(RuntimeError, match=r"Create the layer with moving_variance_estimator="):
        unbuilt.load_state_dict(source.state_dict())
    assert_unbuilt(unbuilt)


def test_an_auto_layer_checks_the_recorded_estimator_when_it_builds():
    source = trained(axis=1)  # fused: unbiased
    layer = BatchNormalization(axis=1)
    layer.load_state_dict(source.state_dict())  # the path is not decided yet
    assert layer.built and layer._input_rank is None
    assert layer.state_dict()._metadata[""]["moving_variance_estimator"] == "unbiased"
    before = snapshot(layer)
    with pytest.raises(ValueError, match=r"stores the biased moving variance \(tf-keras' rule"):
        layer(torch.randn(8, 3), training=True)  # rank 2: non-fused, biased
    assert layer._input_rank is None and layer.axis == 1
    assert_unchanged(layer, before)
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(layer(x, training=False), source(x, training=False))
    assert layer.fused is True


def test_checkpoints_without_the_record_load_unchecked():
    source = trained(axis=-1, moving_variance_estimator="unbiased")
    plain = dict(source.state_dict())  # a dict rebuilt key by key keeps no metadata
    target = BatchNormalization(axis=-1)
    target.load_state_dict(plain)
    assert_unchanged(target, source.state_dict())


# ------------------------------------------------------------------ what else is refused
def test_a_torch_batchnorm_state_dict_points_to_from_torch_and_convert():
    state = torch.nn.BatchNorm2d(3).state_dict()
    for layer in (BatchNormalization(axis=1), trained(axis=1)):
        before = snapshot(layer)
        with pytest.raises(
            RuntimeError,
            match=r"was given a torch.nn.BatchNorm state_dict.*`batchnorm.from_torch\(module\)`.*"
            r"`batchnorm.convert\(model\)`.*Received: keys \['bias', 'num_batches_tracked', "
            r"'running_mean', 'running_var', 'weight'\]",
        ):
            layer.load_state_dict(state)
        assert_unchanged(layer, before)
    with pytest.raises(RuntimeError, match=r"`batchnorm.from_torch"):
        BatchNormalization(axis=1).load_state_dict(state, strict=False)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            lambda state: state.update(beta=torch.zeros(4)),
            r"size mismatch for beta: copying a param with shape \(4,\) from checkpoint, "
            r"the (shape in current model|layer's channel shape) is \(3,\)",
        ),
        (
            lambda state: state.update(moving_mean=torch.zeros(3, 1)),
            r"size mismatch for moving_mean|must have 1 non-empty dims",
        ),
        (
            lambda state: state.update(gamma=[1.0, 2.0, 3.0]),
            r"While copying the parameter named \"gamma\", expected torch.Tensor",
        ),
    ],
)
def test_a_load_that_raises_writes_nothing(change, match):
    state = trained().state_dict()
    change(state)
    for layer in (BatchNormalization(), trained(momentum=0.5)):
        before = snapshot(layer)
        for strict in (True, False):
            with pytest.raises(RuntimeError, match=match):
                layer.load_state_dict(state, strict=strict)
            assert_unchanged(layer, before)
        if not before:
            assert_unbuilt(layer)


def test_an_unbuilt_layer_missing_some_of_its_keys_stays_unbuilt():
    state = trained().state_dict()
    state.pop("moving_variance")
    layer = BatchNormalization()
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*moving_variance"):
        layer.load_state_dict(state)
    assert_unbuilt(layer)
    result = layer.load_state_dict(state, strict=False)  # reported, and still nothing written
    assert result.missing_keys == ["moving_variance"]
    assert_unbuilt(layer)


@pytest.mark.parametrize(
    "extra",
    [{"extra": torch.ones(3)}, {"moving_average_weight": torch.ones((), dtype=torch.float64)}],
)
def test_an_unbuilt_layer_loads_its_keys_beside_unexpected_ones_as_torch_modules_do(extra):
    source = trained()
    state = {**source.state_dict(), **extra}
    layer = BatchNormalization()
    result = layer.load_state_dict(state, strict=False)
    assert result.unexpected_keys == list(extra) and result.missing_keys == []
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):  # before: nothing loaded
        torch.testing.assert_close(getattr(layer, name), getattr(source, name), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\)"):
        BatchNormalization().load_state_dict(state)  # strict: listed, as torch lists them


def test_an_unbuilt_layer_given_none_of_its_keys_lists_them_as_missing():
    source = nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormalization(axis=1))
    source.train()(torch.randn(4, 3, 2, 2))
    conv_only = {k: v for k, v in source.state_dict().items() if k.startswith("0.")}
    model = nn.Sequential(nn.Conv2d(3, 3, 1), BatchNormalization(axis=1))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*1\.gamma.*1\.moving_mean"):
        model.load_state_dict(conv_only)  # before: "All keys matched", statistics lost
    result = model.load_state_dict(conv_only, strict=False)
    assert "1.moving_mean" in result.missing_keys


def test_an_unbuilt_layer_needs_one_dim_per_channel_axis():
    state = trained().state_dict()
    layer = BatchNormalization(axis=[1, 2])
    with pytest.raises(
        RuntimeError, match=r"has 2 channel axes, so `moving_mean` must have 2 non-empty dims"
    ):
        layer.load_state_dict(state)
    assert_unbuilt(layer)


def test_a_built_layer_loads_what_fits_when_not_strict():
    source = trained()
    state = source.state_dict()
    del state["gamma"]
    layer = BatchNormalization(3)
    result = layer.load_state_dict(state, strict=False)
    assert result.missing_keys == ["gamma"]
    assert torch.equal(layer.gamma, torch.ones(3))
    assert torch.equal(layer.moving_mean, source.moving_mean)


def test_another_dtype_is_cast_with_a_warning():
    source = trained(dtype="float64")
    layer = BatchNormalization()
    with pytest.warns(
        UserWarning,
        match=r"the checkpoint's gamma \(torch.float64 -> torch.float32\), .* are cast to the "
        r"layer's dtype on loading",
    ):
        layer.load_state_dict(source.state_dict())
    assert layer.moving_mean.dtype == torch.float32
    torch.testing.assert_close(layer.moving_mean, source.moving_mean.float())
    assigned = BatchNormalization()
    assigned.load_state_dict(source.state_dict(), assign=True)  # takes the tensors: no cast
    assert assigned.moving_mean.dtype == torch.float64


# ------------------------------------------------------------------ set_weights
def test_from_config_then_set_weights_builds_the_layer():
    source = trained(axis=-1, renorm=True)
    config = BatchNormalization(axis=-1, renorm=True, name="bn").get_config()
    layer = BatchNormalization.from_config(config)
    parameters = list(layer.parameters())
    layer.set_weights(source.get_weights())
    assert layer.num_features == 3
    assert all(a is b for a, b in zip(layer.parameters(), parameters, strict=True))
    for ours, theirs in zip(layer.get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize(
    ("axis", "virtual_batch_size", "shape", "expected"),
    [
        ([1, 3], None, (1, 3, 1, 5), (3, 5)),  # tf-keras' full-rank shape
        ([1, 3], None, (3, 5), (3, 5)),  # per-channel
        ([-3, -1], None, (1, 3, 1, 5), (3, 5)),
        ([1, 2], 2, (1, 1, 3, 4), (3, 4)),  # ghost batches add a leading 1
        (1, None, (6,), 6),
    ],
)
def test_set_weights_on_an_unbuilt_layer_takes_the_arrays_shape(
    axis, virtual_batch_size, shape, expected
):
    layer = BatchNormalization(axis=axis, virtual_batch_size=virtual_batch_size)
    arrays = [np.full(shape, value, np.float32) for value in (2.0, 0.5, -1.0, 3.0)]
    layer.set_weights(arrays)
    assert layer.num_features == expected
    assert torch.equal(layer.moving_variance, torch.full(layer.moving_mean.shape, 3.0))


def test_set_weights_that_cannot_give_a_shape_leave_the_layer_unbuilt():
    layer = BatchNormalization(axis=[1, 3])
    with pytest.raises(
        ValueError,
        match=r"`weights` cannot give the channel shape of a layer with axis=\[1, 3\] that is "
        r"not built.*Received: moving_mean of shape \(15,\)",
    ):
        layer.set_weights([np.ones(15)] * 4)
    assert_unbuilt(layer)
    with pytest.raises(ValueError, match=r"Weight `moving_variance` must have 3 values"):
        BatchNormalization().set_weights([np.ones(3)] * 3 + [np.ones(4)])
    with pytest.raises(ValueError, match=r"`weights` must hold 4 arrays"):
        layer.set_weights([np.ones(3)] * 3)
    assert_unbuilt(layer)


# ------------------------------------------------------------------ get_config
def test_get_config_warns_that_adjustment_is_left_out_as_tf_keras_does():
    def adjustment(shape):
        return torch.ones(()), torch.zeros(())

    layer = BatchNormalization(3, adjustment=adjustment)
    with pytest.warns(
        UserWarning,
        match=r"The `adjustment` function of this `BatchNormalization` layer cannot be "
        r"serialized and has been omitted from the layer config. It will not be included when "
        r"re-creating the layer from the saved config.",
    ):
        config = layer.get_config()
    assert "adjustment" not in config
    assert BatchNormalization.from_config(config).adjustment is None


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        ({"axis": 1, "renorm": True}, (8, 3, 4, 4)),
        ({"axis": -1, "dtype": "bfloat16"}, (16, 3)),
        ({"axis": [1, 2], "virtual_batch_size": 4}, (8, 3, 2)),
    ],
)
def test_parameters_and_buffers_stay_resizable(kwargs, shape):
    """FSDP frees an unsharded parameter's memory after the forward and refills it for the
    backward by resizing its storage; ``Tensor.numpy()`` forbids that for good, and the kernels
    once viewed gamma, beta and the buffers through it ("Trying to resize storage that is not
    resizable")."""
    torch.manual_seed(0)
    layer = BatchNormalization(**kwargs)
    x = torch.randn(shape).to(layer.dtype_policy.compute_dtype).requires_grad_()
    layer(x, training=True).sum().backward()
    layer(x, training=False).sum().backward()
    layer.get_weights()
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        storage = tensor.untyped_storage()
        size = storage.nbytes()
        storage.resize_(0)  # raised RuntimeError
        storage.resize_(size)
        assert tensor.untyped_storage().nbytes() == size, name
    # Memory refilled at another address: the kernels read the new memory, not a stale view.
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.fill_(2.0)
        layer.moving_mean.fill_(0.0)
        layer.moving_variance.fill_(1.0)
    expected = 2.0 * x.detach().float() / (1.0 + layer.epsilon) ** 0.5 + 2.0
    actual = layer(x, training=False).detach().float()
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("operation", ["load_state_dict", "double", "swap_tensors"])
def test_torch_swap_tensors_path_works_on_a_layer_that_has_run(operation):
    """With torch.__future__.set_swap_module_params_on_conversion(True), load_state_dict and
    .to() swap each parameter's tensor in place, which torch.utils.swap_tensors refuses for a
    tensor with a weak reference: the kernels' view cache held one on every parameter and
    buffer of a layer that had run once."""
    layer = BatchNormalization(3, axis=1, fused=False)
    x = torch.randn(8, 3, 4, 4)
    layer(x, training=True)
    layer(x, training=False)
    source = BatchNormalization(3, axis=1, fused=False)
    source(x * 2 + 1, training=True)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        if operation == "load_state_dict":
            layer.load_state_dict(source.state_dict())
            for key, value in source.state_dict().items():
                assert torch.equal(layer.state_dict()[key], value), key
        elif operation == "double":
            layer.double()
            assert layer.gamma.dtype == torch.float64
            x = x.double()
        else:
            torch.utils.swap_tensors(layer.gamma, torch.nn.Parameter(torch.full((3,), 2.0)))
            assert torch.equal(layer.gamma, torch.full((3,), 2.0))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    reference = torch.nn.BatchNorm2d(3, eps=layer.epsilon).to(x.dtype).eval()
    with torch.no_grad():
        reference.weight.copy_(layer.gamma)
        reference.bias.copy_(layer.beta)
        reference.running_mean.copy_(layer.moving_mean)
        reference.running_var.copy_(layer.moving_variance)
    torch.testing.assert_close(layer(x, training=False), reference(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_lazy_debiased_layer_converted_to_half_precision_keeps_a_float64_scale_factor(dtype):
    """A built layer kept Caffe's scale factor float64 through .half(); an unbuilt one's
    placeholder was converted, so it was built float16 and the kernels read its bits (s =
    5.96e-08 after 4 steps instead of 3.439, the moving mean off by 80%)."""
    torch.manual_seed(0)
    batches = [torch.randn(16, 3) * 2 + 1 for _ in range(4)]
    lazy = BatchNormalization(moving_average="debiased", momentum=0.9).to(dtype)
    built = BatchNormalization(3, moving_average="debiased", momentum=0.9).to(dtype)
    for batch in batches:
        lazy(batch.to(lazy.gamma.dtype), training=True)
        built(batch.to(built.gamma.dtype), training=True)
    assert lazy.moving_average_weight.dtype == torch.float64
    expected = sum(0.9**i for i in range(4))
    assert lazy.moving_average_weight.item() == pytest.approx(expected, rel=1e-12)
    assert torch.equal(lazy.moving_mean, built.moving_mean)


def test_config_with_numpy_numbers_is_json_ready():
    """activation_param was kept as given: np.float32(0.2) made get_config() fail json.dumps
    (momentum, epsilon and the others were already written as Python floats)."""
    import json

    layer = BatchNormalization(
        3, momentum=np.float32(0.9), activation="leaky_relu", activation_param=np.float32(0.2)
    )
    config = json.loads(json.dumps(layer.get_config()))
    assert config["activation_param"] == pytest.approx(0.2)
    assert BatchNormalization.from_config(config).activation_param == pytest.approx(0.2)


def test_a_wider_dtype_takes_the_checkpoint_without_a_warning():
    source = trained()
    layer = BatchNormalization(dtype="float64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 into float64 loses nothing
        layer.load_state_dict(source.state_dict())
    torch.testing.assert_close(layer.moving_mean, source.moving_mean.double(), rtol=0, atol=0)


def test_a_biased_checkpoint_refused_names_the_non_fused_path():
    source = trained(moving_variance_estimator="biased")
    layer = BatchNormalization(moving_variance_estimator="unbiased")
    with pytest.raises(RuntimeError, match=r"or tf-keras' non-fused path\)"):
        layer.load_state_dict(source.state_dict())


def test_set_weights_on_a_debiased_layer_warns_that_its_weight_is_not_among_them():
    source = BatchNormalization(3, moving_average="debiased", momentum=0.9)
    for _ in range(3):
        source(torch.randn(8, 3) + 1, training=True)
    copy_ = BatchNormalization.from_config(source.get_config())
    with pytest.warns(UserWarning, match="moving_average_weight .* is 0"):
        copy_.set_weights(source.get_weights())
    copy_.moving_average_weight.copy_(source.moving_average_weight)  # as the warning says
    x = torch.randn(8, 3)
    source(x, training=True)
    copy_(x, training=True)
    torch.testing.assert_close(copy_.moving_mean, source.moving_mean, rtol=0, atol=0)


def _renaming_hook(renames):
    """A load pre-hook fixing up a legacy checkpoint's keys, as torch modules use them."""

    def hook(module, state_dict, prefix, *rest):
        for old, new in renames:
            if prefix + old in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)

    return hook


def _flattening_hook(module, state_dict, prefix, *rest):
    for key in list(state_dict):
        if key.startswith(prefix) and state_dict[key].ndim == 2:
            state_dict[key] = state_dict[key].reshape(-1)


def test_load_pre_hooks_run_before_the_checks_as_torch_runs_them():
    """torch.nn.BatchNorm2d loads through a renaming pre-hook; the layer refused the keys as
    missing, then ran the hook inside the copy anyway (gamma written by a load that raised)."""
    torch_bn = nn.BatchNorm2d(4)
    torch_bn.register_load_state_dict_pre_hook(_renaming_hook([("gamma", "weight")]))
    checkpoint = dict(torch_bn.state_dict())
    checkpoint["gamma"] = checkpoint.pop("weight") + 1
    torch_bn.load_state_dict(checkpoint)
    assert torch.equal(torch_bn.weight.detach(), torch.full((4,), 2.0))

    layer = BatchNormalization(4, axis=1)
    layer(torch.randn(8, 4, 3, 3), training=True)
    calls = []
    layer.register_load_state_dict_pre_hook(_renaming_hook([("weight", "gamma")]))
    layer.register_load_state_dict_pre_hook(lambda *args: calls.append(args[2]))
    checkpoint = dict(layer.state_dict())
    checkpoint["weight"] = checkpoint.pop("gamma") + 1
    result = layer.load_state_dict(checkpoint)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.gamma.detach(), torch.full((4,), 2.0))
    assert calls == [""]  # once, and kept


@pytest.mark.parametrize(
    "make", [lambda: SampleNormalization(num_features=4), lambda: BatchNormalization(4, axis=1)]
)
def test_a_reshaping_load_pre_hook_makes_the_checkpoint_fit(make):
    """As torch.nn.LayerNorm with the same hook: the tensors are checked as the hook left them."""
    torch_norm = nn.LayerNorm(4)
    torch_norm.register_load_state_dict_pre_hook(_flattening_hook)
    torch_norm.load_state_dict({"weight": torch.full((1, 4), 2.0), "bias": torch.zeros(1, 4)})
    layer = make()
    layer.register_load_state_dict_pre_hook(_flattening_hook)
    checkpoint = {key: value.reshape(1, -1) + 2 for key, value in layer.state_dict().items()}
    layer.load_state_dict(checkpoint)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, checkpoint[key].reshape(-1)), key


@pytest.mark.parametrize(
    ("make", "source"),
    [
        (lambda: BatchNormalization(axis=1), lambda: BatchNormalization(3, axis=1)),
        (lambda: SampleNormalization(), lambda: SampleNormalization(num_features=3)),
    ],
)
def test_an_unbuilt_layer_runs_its_load_pre_hooks_once_built_as_torch_lazy_modules(make, source):
    """torch's LazyBatchNorm1d runs a user's pre-hook after its own materialises the weights, so
    the hook can read them; running every hook before the checks broke that for unbuilt layers."""
    lazy = nn.LazyBatchNorm1d()
    seen = []
    lazy.register_load_state_dict_pre_hook(lambda m, *rest: seen.append(tuple(m.weight.shape)))
    lazy.load_state_dict(nn.BatchNorm1d(3).state_dict())
    layer = make()
    layer.register_load_state_dict_pre_hook(lambda m, *rest: seen.append(tuple(m.gamma.shape)))
    checkpoint = source().state_dict()
    layer.load_state_dict(checkpoint)
    assert seen == [(3,), (3,)]
    for key, value in checkpoint.items():
        assert torch.equal(layer.state_dict()[key], value)
