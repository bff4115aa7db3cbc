"""Every bad input gets a clear error naming the argument, and a call that raises changes no state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import BatchNormalization, constraints, initializers, regularizers
from batchnorm.functional import BatchNormStatistics, batch_norm, batch_normalization, moments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"axis": "1"},
            TypeError,
            r"`axis` must be an int or a list/tuple of ints. Received: axis='1'",
        ),
        ({"axis": [1.5]}, TypeError, r"`axis` must be an int or a non-empty list/tuple of ints"),
        ({"axis": []}, TypeError, r"non-empty list/tuple"),
        (
            {"momentum": 1.5},
            ValueError,
            r"`momentum` must be a number in \[0, 1\]. Received: momentum=1.5",
        ),
        ({"momentum": -0.1}, ValueError, r"Received: momentum=-0.1"),
        ({"renorm_momentum": 2}, ValueError, r"`renorm_momentum` must be a number in \[0, 1\]"),
        (
            {"epsilon": 0},
            ValueError,
            r"`epsilon` must be a finite number > 0. Received: epsilon=0",
        ),
        ({"epsilon": -1e-3}, ValueError, r"Received: epsilon=-0.001"),
        ({"epsilon": float("inf")}, ValueError, r"finite number > 0. Received: epsilon=inf"),
        ({"epsilon": float("nan")}, ValueError, r"Received: epsilon=nan"),
        ({"trainable": "False"}, TypeError, r"`trainable` must be True or False.*'False'"),
        ({"renorm": "False"}, TypeError, r"`renorm` must be True or False.*'False'"),
        ({"center": "no"}, TypeError, r"`center` must be True or False. Received: center='no'"),
        ({"scale": 1}, TypeError, r"`scale` must be True or False. Received: scale=1"),
        ({"name": 123}, TypeError, r"`name` must be a string or None. Received: name=123"),
        (
            {"renorm": True, "renorm_clipping": {"rmax": float("nan")}},
            ValueError,
            r"`renorm_clipping\['rmax'\]` must be a number",
        ),
        (
            {"renorm": True, "renorm_clipping": {"dmax": float("nan")}},
            ValueError,
            r"`renorm_clipping\['dmax'\]` must be a number",
        ),
        (
            {"gamma_initializer": "zeroz"},
            ValueError,
            r"Unknown initializer name for `gamma_initializer`.*zeroz",
        ),
        ({"beta_initializer": {"config": {}}}, ValueError, r"needs a 'class_name' key"),
        (
            {"moving_mean_initializer": 3},
            TypeError,
            r"`moving_mean_initializer` must be a initializer name",
        ),
        (
            {"gamma_regularizer": "l3"},
            ValueError,
            r"Unknown regularizer name for `gamma_regularizer`",
        ),
        (
            {"beta_regularizer": {"class_name": "L2", "config": {"l2": -1}}},
            ValueError,
            r"`l2` must be",
        ),
        (
            {"beta_constraint": "positive"},
            ValueError,
            r"Unknown constraint name for `beta_constraint`",
        ),
        (
            {"gamma_constraint": {"class_name": "MaxNorm", "config": {"bogus": 1}}},
            ValueError,
            r"Invalid config for constraint MaxNorm in `gamma_constraint`",
        ),
        (
            {"renorm": True, "renorm_clipping": {"rmax": 2, "r": 1}},
            ValueError,
            r"`renorm_clipping` accepts only the keys 'rmin', 'rmax' and 'dmax'",
        ),
        (
            {"renorm": True, "renorm_clipping": {"rmin": 2, "rmax": 1}},
            ValueError,
            r"needs rmax >= rmin",
        ),
        ({"renorm": True, "renorm_clipping": {"dmax": -1}}, ValueError, r"needs dmax >= 0"),
        (
            {"renorm": True, "renorm_clipping": [1, 2]},
            TypeError,
            r"`renorm_clipping` must be a dict",
        ),
        (
            {"virtual_batch_size": 0},
            ValueError,
            r"`virtual_batch_size` must be a positive integer.*=0",
        ),
        ({"virtual_batch_size": 2, "axis": 0}, ValueError, r"axis cannot include 0"),
        (
            {"virtual_batch_size": 2, "adjustment": lambda s: (1, 0)},
            ValueError,
            r"`adjustment` cannot be specified",
        ),
        ({"adjustment": 3}, TypeError, r"`adjustment` must be a callable"),
        ({"fused": True, "renorm": True}, ValueError, r"`fused=True` and `renorm=True`"),
        (
            {"fused": True, "axis": [1, 2]},
            ValueError,
            r"`fused=True` is only supported when axis is 1 or 3",
        ),
        ({"fused": True, "axis": 2}, ValueError, r"Received: axis=\[2\]"),
        (
            {"fused": True, "virtual_batch_size": 2},
            ValueError,
            r"`virtual_batch_size` is specified",
        ),
        ({"fused": True, "adjustment": lambda s: (1, 0)}, ValueError, r"`adjustment` is specified"),
        (
            {"fused": True, "dtype": "float64"},
            ValueError,
            r"compute dtype is float16, bfloat16 or float32",
        ),
        ({"fused": "yes"}, TypeError, r"`fused` must be None, True or False"),
        ({"dtype": "int8"}, ValueError, r"`dtype` must be None, a torch floating dtype.*'int8'"),
        ({"dtype": torch.int32}, ValueError, r"`dtype` must be a floating dtype"),
    ],
)
def test_constructor_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchNormalization(**kwargs)


@pytest.mark.parametrize("num_features", [0, -3, 2.5, "3", (), (2, 0), True])
def test_bad_num_features(num_features):
    with pytest.raises(ValueError, match=r"`num_features` must be a positive int or a tuple"):
        BatchNormalization(num_features)


def test_num_features_must_match_axis_count():
    with pytest.raises(ValueError, match=r"`num_features` needs one size per channel axis"):
        BatchNormalization((3, 4), axis=1)


@pytest.mark.parametrize("num_features", [None, (3, 3)])
def test_duplicate_axes_are_refused_at_construction(num_features):
    with pytest.raises(
        ValueError, match=r"`axis` contains duplicate axes. Received: axis=\[1, 1\]"
    ):
        BatchNormalization(num_features, axis=[1, 1])


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (
            torch.ones(7),
            ValueError,
            r"`mask` must have the shape of `x` without its channel axis, \(2, 3, 3\), or one "
            r"that broadcasts to \(2, 3, 3\). Received: mask.shape=\(7,\)",
        ),
        ([1.0, 0.0], TypeError, r"`mask` must be a torch.Tensor.*Received: mask of type list"),
    ],
)
@pytest.mark.parametrize("training", [True, False])
def test_fused_layer_checks_the_mask_before_ignoring_it(mask, error, match, training):
    fused = BatchNormalization(4, fused=True)
    fused(torch.randn(2, 3, 3, 4), training=True)
    before = state(fused)
    with pytest.raises(error, match=match):
        fused(torch.randn(2, 3, 3, 4), training=training, mask=mask)
    for key, value in before.items():
        assert torch.equal(value, fused.state_dict()[key]), key
    unbuilt = BatchNormalization(fused=True)
    with pytest.raises(error, match=match):
        unbuilt(torch.randn(2, 3, 3, 4), training=training, mask=mask)
    assert not unbuilt.built and unbuilt._input_rank is None
    with pytest.warns(UserWarning, match=r"Masking is not supported with `fused=True`"):
        unbuilt(torch.randn(2, 3, 3, 4), training=training, mask=torch.ones(2, 3, 3))


def trained_layer(**kwargs):
    layer = BatchNormalization(**kwargs)
    layer(torch.randn(12, 3, 4) if kwargs.get("axis") == 1 else torch.randn(12, 3), training=True)
    return layer


def state(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


@pytest.mark.parametrize(
    ("layer_kwargs", "call", "error", "match"),
    [
        (
            {},
            lambda layer: layer(torch.randn(8, 5), training=True),
            ValueError,
            r"was built for \(3,\) channels on axes \[1\] \(sizes in ascending axis order, as `num_features` takes them\), but the input has \(5,\). Received: x.shape=\(8, 5\)",
        ),
        (
            {},
            lambda layer: layer(torch.randn(8, 3, 1), training=True),
            ValueError,
            r"expects inputs of rank 2",
        ),
        (
            {},
            lambda layer: layer(torch.ones(8, 3, dtype=torch.int64), training=True),
            TypeError,
            r"`x` must be a floating-point tensor.*Received: x.dtype=torch.int64",
        ),
        (
            {},
            lambda layer: layer(torch.ones(8, 3).to(torch.float8_e4m3fn), training=True),
            TypeError,
            r"`x` must be a floating-point tensor \(float16, bfloat16, float32 or float64\)\. "
            r"Received: x.dtype=torch.float8_e4m3fn",
        ),
        (
            {},
            lambda layer: layer(torch.randn(8, 3, device="meta"), training=True),
            RuntimeError,
            r"`gamma` must be on the input's device, meta. Received: gamma.device=cpu",
        ),
        (
            {},
            lambda layer: layer([[1.0, 2.0, 3.0]], training=True),
            TypeError,
            r"`x` must be a torch.Tensor",
        ),
        (
            {},
            lambda layer: layer(torch.randn(8, 3), training=True, mask=torch.ones(7)),
            ValueError,
            r"`mask` must have the shape of `x` without its channel axis, \(8,\), or one that "
            r"broadcasts to \(8,\). Received: mask.shape=\(7,\)",
        ),
        (
            {},
            lambda layer: layer(torch.randn(8, 3), training="yes"),
            TypeError,
            r"`training` must be None, a bool",
        ),
        (
            {},
            lambda layer: layer(torch.randn(8, 3), training=torch.ones(2, dtype=torch.bool)),
            ValueError,
            r"`training` must be a Python bool or a 0-d bool tensor",
        ),
        (
            {},
            lambda layer: layer(torch.randn(8, 3), training=torch.tensor(0.3)),
            ValueError,
            r"0-d bool tensor. Received: training with shape \(\) and dtype torch.float32",
        ),
        (
            {},
            lambda layer: layer(torch.randn(8, 3), training=2),
            TypeError,
            r"`training` must be None, a bool or a 0-d bool tensor. Received: training=2",
        ),
        (
            {"virtual_batch_size": 3},
            lambda layer: layer(torch.randn(8, 3), training=True),
            ValueError,
            r"`virtual_batch_size` must divide the batch size. Received: virtual_batch_size=3 for a batch of 8",
        ),
        (
            {"renorm": True},
            lambda layer: layer(torch.randn(8, 3), training=True, mask=torch.ones(8, 3)),
            ValueError,
            r"`mask` must have the shape",
        ),
        (
            {"axis": 1},
            lambda layer: layer(torch.randn(8, 4, 4), training=True),
            ValueError,
            r"was built for \(3,\)",
        ),
    ],
)
def test_call_errors_leave_state_unchanged(layer_kwargs, call, error, match):
    layer = trained_layer(**layer_kwargs)
    before = state(layer)
    with pytest.raises(error, match=match):
        call(layer)
    after = layer.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_axis_out_of_range_for_input():
    with pytest.raises(
        ValueError, match=r"`axis` is out of range for an input of rank 2.*Received: axis=3"
    ):
        BatchNormalization(axis=3)(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"`axis` is out of range.*Received: axis=-3"):
        BatchNormalization(axis=-3).build((4, 3))
    with pytest.raises(ValueError, match=r"`axis` contains duplicate axes"):
        BatchNormalization(axis=[1, -1]).build((4, 3))


def test_a_0d_input_is_refused_by_name():
    with pytest.raises(ValueError, match=r"`x` must have at least one axis.*Received: an input"):
        BatchNormalization()(torch.tensor(1.0), training=True)


@pytest.mark.parametrize("built", [True, False])
def test_a_layer_left_on_the_meta_device_names_it_for_a_cpu_input(built):
    """A model made on the meta device and never materialised met a CPU input inside NumPy
    ("data is NULL but array contains data"); the layer stays as it was."""
    with torch.device("meta"):
        layer = BatchNormalization(3 if built else None)
    hint = r"to_empty\(device=\.\.\.\)" if built else r"build it there first"
    for training in (True, False):
        with pytest.raises(
            RuntimeError, match=rf"`gamma` must be on the input's device, cpu.*{hint}"
        ):
            layer(torch.randn(4, 3), training=training)
    assert layer.built is built and layer.moving_mean.device.type == "meta"
    with pytest.raises(RuntimeError, match=r"`statistics.moving_mean` must be on the input's"):
        batch_norm(
            torch.randn(4, 3),
            BatchNormStatistics(*(t.to("meta") for t in (torch.zeros(3), torch.ones(3)))),
        )


def test_fused_true_on_unsupported_rank_raises_at_build():
    layer = BatchNormalization(fused=True)
    with pytest.raises(ValueError, match=r"`fused=True` only support 4D or 5D input tensors"):
        layer.build((4, 3))


@pytest.mark.parametrize("build", ["build", "inference call"])
def test_ghost_batches_on_a_negative_axis_that_is_the_batch_axis_raise_at_build(build):
    """axis=-2 on rank 2 is axis 0: tf-keras' build refuses it with ghost batches; it was
    accepted until a training call (a frozen layer or inference calls never raised)."""
    layer = BatchNormalization(axis=-2, virtual_batch_size=2)
    with pytest.raises(ValueError, match=r"axis cannot include 0. Received: axis=-2 \(axis 0"):
        if build == "build":
            layer.build((4, 3))
        else:
            layer(torch.randn(4, 3), training=False)
    assert not layer.built and layer._input_rank is None


def test_fused_auto_on_rank4_batch_axis_raises_like_tf_keras():
    with pytest.raises(ValueError, match=r"Unsupported axis. The use of `fused=True`"):
        BatchNormalization(axis=-4).build((2, 3, 4, 5))


def test_set_weights_errors_write_nothing():
    layer = trained_layer()
    before = state(layer)
    good = layer.get_weights()
    with pytest.raises(
        ValueError,
        match=r"`weights` must hold 4 arrays \(gamma, beta, moving_mean, moving_variance\)",
    ):
        layer.set_weights(good[:3])
    with pytest.raises(
        ValueError, match=r"Weight `moving_variance` must have 3 values.*Received: shape \(4,\)"
    ):
        layer.set_weights([*good[:3], np.ones(4)])
    with pytest.raises(TypeError, match=r"`weights` must be a list of 4 arrays"):
        layer.set_weights("weights")
    for key, value in before.items():
        assert torch.equal(value, layer.state_dict()[key])
    with pytest.raises(ValueError, match=r"has no weights yet"):
        BatchNormalization().get_weights()


def test_from_config_errors():
    with pytest.raises(ValueError, match=r"Unknown BatchNormalization config keys \['bogus'\]"):
        BatchNormalization.from_config({"axis": -1, "bogus": 1})
    with pytest.raises(TypeError, match=r"`config` must be a dict"):
        BatchNormalization.from_config([("axis", -1)])
    with pytest.raises(ValueError, match=r"`fused=True` is not supported when `synchronized=True`"):
        BatchNormalization.from_config({"synchronized": True, "fused": True})


def test_functional_errors():
    x = torch.randn(4, 3)
    stats = BatchNormStatistics(torch.zeros(3), torch.ones(3))
    with pytest.raises(
        ValueError, match=r"`statistics.moving_variance` must have the per-channel shape \(3,\)"
    ):
        batch_norm(x, BatchNormStatistics(torch.zeros(3), torch.ones(2)))
    with pytest.raises(ValueError, match=r"`gamma` must have the per-channel shape \(3,\)"):
        batch_norm(x, stats, torch.ones(4))
    with pytest.raises(
        ValueError, match=r"`moving_variance_estimator` must be 'biased' or 'unbiased'"
    ):
        batch_norm(x, stats, moving_variance_estimator="bessel")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`epsilon` must be a finite number > 0"):
        batch_normalization(x, x.mean(0), x.var(0), None, None, 0.0)
    with pytest.raises(ValueError, match=r"`mask` must broadcast to the shape of `x`"):
        moments(x, [0], mask=torch.ones(5))
    with pytest.raises(TypeError, match=r"`x` must be a floating-point tensor"):
        moments(torch.ones(3, dtype=torch.int32), [0])


def test_keras_object_errors():
    with pytest.raises(
        ValueError, match=r"`initializer` must be an initializer name.*Received: initializer=None"
    ):
        initializers.get(None)
    with pytest.raises(ValueError, match=r"`mode` must be one of"):
        initializers.VarianceScaling(mode="fan_sum")
    with pytest.raises(ValueError, match=r"Unknown regularizer class for `regularizer`"):
        regularizers.get({"class_name": "L3", "config": {}})
    assert constraints.get(None) is None


def test_mask_error_names_both_accepted_shapes_when_they_differ():
    layer = BatchNormalization(axis=1)
    with pytest.raises(
        ValueError,
        match=r"without its last axis, \(2, 3\) \(as Keras\), or without its channel axes, "
        r"\(2, 4\), or one that broadcasts to \(2, 3\)\. Received: mask.shape=\(3, 4\)",
    ):
        layer(torch.randn(2, 3, 4), training=True, mask=torch.ones(3, 4, dtype=torch.bool))


def test_trainable_setter_rejects_non_bools():
    layer = BatchNormalization(3)
    with pytest.raises(
        TypeError, match=r"`trainable` must be True or False. Received: trainable='False'"
    ):
        layer.trainable = "False"
    assert layer.trainable is True and layer.gamma.requires_grad


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ((torch.ones(2), torch.zeros(3)), r"a scale that broadcasts against x of shape \(5, 3\)"),
        ((torch.ones(3), torch.zeros(5, 3, 1)), r"Received: offset of shape \(5, 3, 1\)"),
        (torch.ones(3), r"`adjustment` must return a pair \(scale, offset\). Received: Tensor"),
    ],
)
def test_an_adjustment_of_the_wrong_shape_is_named_and_changes_nothing(bad, match):
    def adjustment(shape):
        return (torch.ones(3), torch.zeros(3)) if shape[0] == 12 else bad

    layer = trained_layer(adjustment=adjustment)
    before = state(layer)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(5, 3), training=True)
    after = layer.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


@pytest.mark.parametrize(
    "entry_point",
    [
        batchnorm.convert,
        batchnorm.convert_sync,
        batchnorm.apply_constraints,
        lambda model: batchnorm.apply_constraints_after_step(
            torch.optim.SGD([torch.ones(1)]), model
        ),
    ],
    ids=["convert", "convert_sync", "apply_constraints", "apply_constraints_after_step"],
)
@pytest.mark.parametrize("model", [None, "model", [BatchNormalization(3)]])
def test_model_entry_points_name_a_model_that_is_not_a_module(entry_point, model):
    with pytest.raises(
        TypeError,
        match=rf"`model` must be an nn.Module. Received: model of type {type(model).__name__}",
    ):
        entry_point(model)


def test_apply_constraints_after_step_names_an_optimizer_that_is_not_one():
    with pytest.raises(
        TypeError,
        match=r"`optimizer` must be a torch.optim.Optimizer. Received: optimizer of type dict",
    ):
        batchnorm.apply_constraints_after_step({}, BatchNormalization(3))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"training": None},
            TypeError,
            r"`training` must be a bool or a 0-d bool tensor. Received: training=None",
        ),
        ({"training": 1}, TypeError, r"Received: training=1"),
        ({"training": "yes"}, TypeError, r"Received: training='yes'"),
        (
            {"synchronized": "no"},
            TypeError,
            r"`synchronized` must be True or False. Received: synchronized='no'",
        ),
    ],
)
def test_functional_batch_norm_names_a_bad_training_or_synchronized(kwargs, error, match):
    """torch's where() or a silent bool() took them before."""
    statistics = BatchNormStatistics(torch.zeros(3), torch.ones(3))
    with pytest.raises(error, match=match):
        batch_norm(torch.randn(4, 3), statistics, **kwargs)


def test_functional_batch_norm_names_statistics_that_are_not_batch_norm_statistics():
    with pytest.raises(
        TypeError,
        match=r"`statistics` must be a batchnorm.functional.BatchNormStatistics.*Received: statistics of type tuple",
    ):
        batch_norm(torch.randn(4, 3), (torch.zeros(3), torch.ones(3)), training=True)
    statistics = BatchNormStatistics(torch.zeros(3), torch.ones(3))
    _, new = batch_norm(torch.randn(4, 3), statistics, training=np.bool_(True))
    assert not torch.equal(new.moving_mean, statistics.moving_mean)


def _trained_layer(**kwargs):
    layer = BatchNormalization(3, axis=1, **kwargs)
    layer(torch.randn(16, 3, 4, 4) * 2 + 5, training=True)
    return layer


@pytest.mark.parametrize(
    ("kwargs", "setting", "value", "error", "match"),
    [
        ({}, "momentum", 2.0, ValueError, r"`momentum` must be a number in \[0, 1\]"),
        ({}, "momentum", float("nan"), ValueError, r"Received: momentum=nan"),
        ({}, "momentum", "0.9", ValueError, r"Received: momentum='0.9'"),
        ({}, "renorm_momentum", -1, ValueError, r"`renorm_momentum` must be a number"),
        ({}, "epsilon", "1e-3", ValueError, r"`epsilon` must be a finite number > 0"),
        ({}, "virtual_batch_size", 0, ValueError, r"`virtual_batch_size` must be a positive"),
        ({}, "adjustment", 5, TypeError, r"`adjustment` must be a callable"),
        ({}, "use_global_stats", "no", TypeError, r"`use_global_stats` must be None, True"),
        ({}, "moving_variance_estimator", "bogus", ValueError, r"must be one of 'auto'"),
        ({}, "moving_average", "sma", ValueError, r"`moving_average` must be one of"),
        ({}, "renorm_clipping", {"rmax": "x"}, ValueError, r"`renorm_clipping\['rmax'\]`"),
        ({}, "renorm", True, ValueError, r"`renorm` cannot change once the layer is built"),
        ({}, "center", False, ValueError, r"`center` cannot change once the layer is built"),
        ({}, "scale", "no", TypeError, r"`scale` must be True or False"),
        ({}, "axis", 2, ValueError, r"`axis` cannot change once the layer is built"),
        ({}, "gamma_regularizer", "l3", ValueError, r"gamma_regularizer"),
        ({"fused": True}, "virtual_batch_size", 8, ValueError, r"set `fused = False` first"),
        ({"renorm": True}, "fused", True, ValueError, r"`fused=True` and `renorm=True`"),
        ({"virtual_batch_size": 8}, "adjustment", lambda s: s, ValueError, r"virtual_batch_size"),
    ],
)
def test_a_setting_assigned_later_is_checked_as_the_constructor_checks_it(
    kwargs, setting, value, error, match
):
    """``layer.momentum = 2.0`` on a trained layer was taken as it came: the moving mean
    diverged, ``use_global_stats = "no"`` froze the layer, ``epsilon = "1e-3"`` reached the
    kernels as a Numba typing error, ``renorm = True`` was ignored (no buffers). Now the
    assignment raises the constructor's error and nothing changes."""
    layer = _trained_layer(**kwargs)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    old = getattr(layer, setting)
    with pytest.raises(error, match=match):
        setattr(layer, setting, value)
    assert getattr(layer, setting) is old
    for key, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[key]), key


def test_settings_assigned_later_are_kept_as_the_constructor_keeps_them():
    """Valid assignments still work, normalised as the constructor normalises them."""
    layer = _trained_layer(fused=False)
    layer.momentum, layer.epsilon = np.float32(0.5), 1e-5
    layer.axis = -3  # the same axis on the built rank
    layer.gamma_regularizer = "l2"
    layer.virtual_batch_size = 8
    layer.use_global_stats = False
    assert type(layer.momentum) is float and layer.momentum == 0.5
    assert layer.axis == [1]
    assert isinstance(layer.gamma_regularizer, regularizers.L2)
    x = torch.randn(16, 3, 4, 4)
    expected = BatchNormalization(3, axis=1, momentum=0.5, epsilon=1e-5, virtual_batch_size=8)
    expected.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x, training=True), expected(x, training=True))
    torch.testing.assert_close(layer.moving_mean, expected.moving_mean)


@pytest.mark.parametrize("built", [True, False])
def test_set_weights_that_fails_on_a_conversion_writes_nothing(built):
    """An array that passes the shape checks but cannot be converted (a meta tensor) raised
    after gamma, beta and the moving mean were written, or after an unbuilt layer was built
    (which then refused an input of another channel count)."""
    layer = _trained_layer() if built else BatchNormalization(axis=1)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    arrays = [np.full(3, value, np.float32) for value in (7.0, 8.0, 9.0)]
    with pytest.raises(NotImplementedError, match="meta"):
        layer.set_weights([*arrays, torch.ones(3, device="meta")])
    assert layer.built is built
    for key, tensor in layer.state_dict().items():
        assert torch.equal(tensor, before[key]), key
    if not built:
        layer(torch.randn(4, 5, 2), training=True)
        assert layer.num_features == 5


@pytest.mark.parametrize(
    ("shape", "axis", "channels"),
    [((None, 28, 28, 16), -1, 16), ([None, 16], -1, 16), ((None, 3, None, None), 1, 3)],
)
def test_build_takes_keras_shapes_with_unknown_sizes(shape, axis, channels):
    """Keras builds with None for the batch size; ``int(None)`` raised a TypeError."""
    layer = BatchNormalization(axis=axis)
    layer.build(shape)
    assert layer.num_features == channels
    x = torch.randn(2, *(channels if s == channels else 3 for s in shape[1:]))
    assert layer(x, training=True).shape == x.shape


@pytest.mark.parametrize(
    ("shape", "error", "match"),
    [
        ("abc", TypeError, r"`input_shape` must be a sequence of non-negative ints"),
        (None, TypeError, r"Received: input_shape=None"),
        ((8, -3), TypeError, r"Received: input_shape=\(8, -3\)"),
        ((8, 3.5), TypeError, r"Received: input_shape=\(8, 3.5\)"),  # built 3 channels before
        ((None, None), ValueError, r"needs a known size on the channel axis 1"),
        ((8, 0), ValueError, r"no channels"),
    ],
)
def test_build_refuses_shapes_it_cannot_build_from(shape, error, match):
    layer = BatchNormalization()
    with pytest.raises(error, match=match):
        layer.build(shape)
    assert not layer.built


def test_nothing_builds_a_layer_without_channels():
    """``num_features=0`` and ``load_state_dict`` refused zero channels; a first call on an
    (8, 0) input and ``set_weights`` with empty arrays built such a layer."""
    layer = BatchNormalization()
    with pytest.raises(ValueError, match="no channels"):
        layer(torch.randn(8, 0), training=True)
    with pytest.raises(ValueError, match="no channels"):
        layer.set_weights([np.zeros(0, np.float32)] * 4)
    assert not layer.built


@pytest.mark.parametrize("fused", [1, 0.0, "True"])
def test_fused_takes_only_none_or_a_bool(fused):
    """``fused=1`` passed the ``in (None, True, False)`` test and was kept as 1."""
    with pytest.raises(TypeError, match=r"`fused` must be None, True or False"):
        BatchNormalization(3, fused=fused)
    assert BatchNormalization(3, fused=np.bool_(False)).get_config()["fused"] is False


@pytest.mark.parametrize("path", ["plain", "float64", "masked"])
@pytest.mark.parametrize("bad", [None, [1.0, 2.0], 3.0])
def test_a_built_layer_answers_a_non_tensor_with_the_input_error(path, bad):
    """After a call through the checked path, the remembered-signature test read ``x.shape``
    first: an AttributeError on None."""
    layer = BatchNormalization(axis=1, fused=False)
    layer(torch.randn(8, 3, 4, 4), training=True)
    if path == "float64":
        layer(torch.randn(8, 3, 4, 4, dtype=torch.float64), training=True)
    elif path == "masked":
        layer(torch.randn(8, 3, 4, 4), training=True, mask=torch.ones(8, 3, 4))
    with pytest.raises(TypeError, match=r"`x` must be a torch.Tensor"):
        layer(bad, training=True)


def _flag_calls():
    from pathlib import Path

    from batchnorm.interop.keras import load_weights
    from batchnorm.tools._fold_weights import fold_weights

    golden = Path(__file__).parent / "golden" / "tfk_model.h5"
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), BatchNormalization(3))
    return [
        ("statistics", lambda v: batchnorm.freeze(model, statistics=v)),
        ("affine", lambda v: batchnorm.freeze(model, affine=v)),
        ("configure", lambda v: load_weights(model, golden, configure=v)),
        ("strict", lambda v: load_weights(model, golden, strict=v)),
        (
            "transposed",
            lambda v: fold_weights(torch.ones(3, 2), None, *torch.ones(4, 3), 1e-3, transposed=v),
        ),
        ("keepdims", lambda v: moments(torch.randn(4, 3), [0], keepdims=v)),
        ("progress", lambda v: batchnorm.recalibrate(model, [torch.randn(2, 4)], progress=v)),
        ("progress", lambda v: batchnorm.diagnose(model, [torch.randn(2, 4)], progress=v)),
    ]


@pytest.mark.parametrize("index", range(8))
@pytest.mark.parametrize("value", ["False", None, 0])
def test_yes_no_options_of_the_tools_take_only_bools(index, value):
    """A string "False" read as True: ``freeze(statistics="False")`` froze the statistics,
    ``load_weights(configure="False")`` configured, ``strict=None`` loaded non-strictly."""
    name, call = _flag_calls()[index]
    with pytest.raises(TypeError, match=rf"`{name}` must be True or False. Received: {name}="):
        call(value)


@pytest.mark.parametrize("tool", ["recalibrate", "diagnose"])
def test_a_forward_that_is_not_callable_is_named(tool):
    model = torch.nn.Sequential(BatchNormalization(3))
    with pytest.raises(TypeError, match=r"`forward` must be a callable forward\(model, batch\)"):
        getattr(batchnorm, tool)(model, [torch.randn(2, 3)], forward=5)


@pytest.mark.parametrize(
    ("statistics", "gamma", "match"),
    [
        (
            BatchNormStatistics(torch.zeros(3, dtype=torch.int64), torch.ones(3)),
            None,
            r"`statistics.moving_mean` must be a floating-point torch.Tensor.*int64",
        ),
        (
            BatchNormStatistics(torch.zeros(3), torch.ones(3, dtype=torch.complex64)),
            None,
            r"`statistics.moving_variance` must be a floating-point",
        ),
        (BatchNormStatistics(None, torch.ones(3)), None, r"`statistics.moving_mean`.*None"),
        (BatchNormStatistics(torch.zeros(3), torch.ones(3)), np.ones(3), r"`gamma`.*ndarray"),
        (BatchNormStatistics(torch.zeros(3), torch.ones(3)), 2.0, r"`gamma`.*float"),
    ],
)
def test_functional_statistics_and_parameters_must_be_floating_tensors(statistics, gamma, match):
    """Integer statistics were taken: the moving statistics came back truncated (moving mean
    [2.5, 2.0, 2.5] for [2.519, 2.248, 2.768]); torch's batch_norm refuses them."""
    with pytest.raises(TypeError, match=match):
        batch_norm(torch.randn(8, 3) + 2, statistics, gamma, training=True, momentum=0.5)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"adjustment": lambda s: s, "virtual_batch_size": 2}, ValueError, "adjustment"),
        ({"adjustment": 5}, TypeError, r"`adjustment` must be a callable"),
        ({"process_group": object()}, ValueError, r"only used with `synchronized=True`"),
    ],
)
def test_functional_batch_norm_checks_the_combinations_the_layer_checks(kwargs, error, match):
    statistics = BatchNormStatistics(torch.zeros(3), torch.ones(3))
    with pytest.raises(error, match=match):
        batch_norm(torch.randn(8, 3), statistics, training=True, **kwargs)


def _unclear_before():
    from batchnorm.tools._fold_weights import fold_weights

    bn = torch.nn.BatchNorm2d(3)
    bn.momentum = 2.0
    wrong_shape = lambda s, dtype=None, device=None: torch.ones(5)  # noqa: E731
    constant = {"class_name": "Constant", "config": {"value": "x"}}
    return [
        (lambda: BatchNormalization(3, beta_initializer=constant), r"`value` must be a number"),
        (
            lambda: BatchNormalization(
                3, gamma_regularizer={"class_name": "L2", "config": {"l2": "a"}}
            ),
            r"`l2` must be a non-negative number. Received: l2='a'",
        ),
        (
            lambda: BatchNormalization(axis=1, gamma_initializer=wrong_shape)(torch.randn(8, 3)),
            r"An initializer must return a tensor of shape \(3,\). Received: shape \(5,\)",
        ),
        (lambda: batchnorm.from_torch(bn), r"Received: momentum=2.0"),  # not the complement -1.0
        (lambda: BatchNormalization.like(["torch"], 3), r"`framework` must be one of"),
        (
            lambda: BatchNormalization(3, gamma_constraint="non_neg").apply_constraints(
                updated="x"
            ),
            r"`updated` must be a set",
        ),
        (
            lambda: batch_normalization(
                torch.randn(8, 3), np.zeros(3), torch.ones(3), None, None, 1e-3
            ),
            r"`mean` must be a torch.Tensor",
        ),
        (
            lambda: batch_normalization(
                torch.randn(8, 3), torch.zeros(4), torch.ones(3), None, None, 1e-3
            ),
            r"`mean` must broadcast against `x` of shape \(8, 3\)",
        ),
        (
            lambda: fold_weights(
                np.ones((4, 3)), None, torch.zeros(4), torch.ones(4), None, None, 1e-3
            ),
            r"`weight` must be a torch.Tensor",
        ),
        (
            lambda: batchnorm.diagnose(
                torch.nn.Sequential(BatchNormalization(3)), [torch.randn(16, 3)], steps={"bn": 3}
            ),
            r"`steps` names layers the model does not hold: \['bn'\]",
        ),
    ]


@pytest.mark.parametrize("index", range(10))
def test_errors_that_named_nothing_now_name_the_argument(index):
    """Before: "could not convert string to float", "shape '[3]' is invalid for input of size
    5", "unhashable type: 'list'", numpy's AttributeError, torch's broadcast error, a
    from_torch error quoting the converted momentum, an unknown layer in diagnose's steps
    ignored."""
    call, match = _unclear_before()[index]
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_fold_weights_still_takes_none_for_the_optional_tensors():
    from batchnorm.tools._fold_weights import fold_weights

    mean, variance = torch.zeros(4), torch.full((4,), 3.0)
    weight, bias = fold_weights(torch.ones(4, 3), None, mean, variance, None, None, 1.0)
    torch.testing.assert_close(weight, torch.full((4, 3), 0.5))
    torch.testing.assert_close(bias, torch.zeros(4))


@pytest.mark.parametrize(
    "shape",
    [
        np.array([2, 3]),
        torch.tensor([2, 3]),
        (torch.tensor(2), torch.tensor(3)),
        (2, 3.0),
        (np.int64(2), np.int32(3)),
    ],
    ids=["numpy array", "tensor", "0-d tensors", "whole float", "numpy ints"],
)
def test_build_takes_the_shapes_it_took_before(shape):
    """This session's shape check took only sequences of Python or NumPy ints: a NumPy array,
    an integer tensor, 0-d tensors or a whole float, all built before, were refused."""
    layer = BatchNormalization()
    layer.build(shape)
    assert layer.num_features == 3


def test_constant_takes_a_zero_dimensional_array_or_tensor():
    """Constant(torch.tensor(0.5)) and Constant(np.array(0.5)) built gamma = 0.5 before this
    session's value check refused them."""
    for value in (torch.tensor(0.5), np.array(0.5), np.float32(0.5)):
        layer = BatchNormalization(3, gamma_initializer=initializers.Constant(value))
        assert torch.equal(layer.gamma, torch.full((3,), 0.5))
