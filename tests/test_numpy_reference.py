"""Random configurations against the plain float64 NumPy reference (tests/numpy_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchnorm import BatchNormalization
from batchnorm.functional import NATIVE, NUMBA_CPU, register_backend
from tests.numpy_reference import (
    reference_inference,
    reference_train_gradients,
    reference_train_step,
)


@st.composite
def configurations(draw):
    rank = draw(st.integers(2, 5))
    shape = [draw(st.integers(1, 4)) for _ in range(rank)]
    ghost = draw(st.sampled_from([None, 1, 2]))
    shape[0] = draw(st.integers(2, 6)) * (ghost or 1)
    candidates = list(range(1, rank)) if ghost else list(range(rank))
    count = draw(st.integers(1, min(2, len(candidates))))
    axes = sorted(draw(st.permutations(candidates))[:count])
    signed = [a - rank if draw(st.booleans()) else a for a in axes]
    return {
        "shape": shape,
        "axis": signed[0] if len(signed) == 1 and draw(st.booleans()) else signed,
        "axes": tuple(axes),
        "momentum": draw(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0])),
        "epsilon": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        "center": draw(st.booleans()),
        "scale": draw(st.booleans()),
        "virtual_batch_size": ghost,
        "mask": ghost is None and len(axes) == 1 and draw(st.booleans()),
        "mask_style": draw(st.sampled_from(["keras", "per_position"])),
        "fused": draw(st.sampled_from([None, False])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


_KERAS_MASK_ONE_CHANNEL = {
    "shape": [2, 1, 2],
    "axis": [1],
    "axes": (1,),
    "momentum": 0.0,
    "epsilon": 1e-05,
    "center": False,
    "scale": False,
    "virtual_batch_size": None,
    "mask": True,
    "mask_style": "keras",
    "fused": None,
    "seed": 0,
}


@pytest.fixture(params=["default", "native"])
def cpu_backend(request):
    """The CPU's default backends (Numba kernels, composed ops where they do not reach), then
    torch's own kernels (the native backend, default on GPUs) for what they express."""
    if request.param == "native":
        register_backend("cpu", NATIVE)
    yield request.param
    register_backend("cpu", NUMBA_CPU)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(config=configurations())
@example(config=_KERAS_MASK_ONE_CHANNEL)
def test_train_and_inference_match_float64_reference(config, cpu_backend):
    rng = np.random.default_rng(config["seed"])
    kwargs = {k: config[k] for k in ("axis", "momentum", "epsilon", "center", "scale", "fused")}
    layer = BatchNormalization(
        virtual_batch_size=config["virtual_batch_size"], dtype="float64", **kwargs
    )
    shape = config["shape"]
    layer.build(shape)
    channel_shape = tuple(shape[a] for a in config["axes"])
    weights = []
    if config["scale"]:
        weights.append(rng.uniform(0.5, 2.0, channel_shape))
    if config["center"]:
        weights.append(rng.normal(size=channel_shape))
    weights += [rng.normal(size=channel_shape), rng.uniform(0.5, 2.0, channel_shape)]
    layer.set_weights(weights)
    gamma = weights[0] if config["scale"] else None
    beta = weights[int(config["scale"])] if config["center"] else None
    mean_state, var_state = weights[-2], weights[-1]
    x = rng.normal(1.0, 3.0, shape)
    mask = None
    # Keras' mask: x without its last axis, broadcast along it. A mask of x without the channel
    # axes is one weight per position; where both shapes coincide, the layer reads Keras'.
    keras_shape = shape[:-1]
    per_position = [s for i, s in enumerate(shape) if i not in config["axes"]]
    keras_style = config["mask_style"] == "keras" or per_position == keras_shape
    if config["mask"]:
        mask = rng.uniform(size=keras_shape if keras_style else per_position) > 0.4
    y = layer(torch.tensor(x), training=True, mask=None if mask is None else torch.tensor(mask))
    weights_for_reference = None
    if mask is not None and not layer.fused:
        expand_at = -1 if keras_style else config["axes"][0]
        weights_for_reference = np.expand_dims(mask, expand_at).astype(np.float64)
    expected_y, expected_mean, expected_var = reference_train_step(
        x,
        mean_state,
        var_state,
        gamma,
        beta,
        axes=config["axes"],
        momentum=config["momentum"],
        epsilon=config["epsilon"],
        unbiased=bool(layer.fused),
        virtual_batch_size=config["virtual_batch_size"],
        weights=weights_for_reference,
    )
    np.testing.assert_allclose(y.detach().numpy(), expected_y, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected_var, rtol=1e-9, atol=1e-12)

    test_batch = shape[0] if 0 in config["axes"] else 3
    x_test = rng.normal(size=[test_batch, *shape[1:]])
    y_test = layer(torch.tensor(x_test), training=False)
    expected_test = reference_inference(
        x_test,
        expected_mean,
        expected_var,
        gamma,
        beta,
        axes=config["axes"],
        epsilon=config["epsilon"],
    )
    np.testing.assert_allclose(y_test.detach().numpy(), expected_test, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    ("shape", "axes", "ghost", "masked"),
    [
        ((5, 3), (1,), None, False),
        ((4, 3, 2), (1,), None, True),
        ((6, 2, 3), (2,), 3, False),
        ((6, 2, 3), (1,), 2, True),
        ((3, 2, 2), (1, 2), None, False),
    ],
)
def test_the_gradient_reference_matches_central_differences(shape, axes, ghost, masked):
    # The closed form of reference_train_gradients against central differences of
    # reference_train_step's sum(dy * y), independent of any derivation.
    rng = np.random.default_rng(7)
    x = rng.normal(0.5, 2.0, shape)
    dy = rng.normal(size=shape)
    channel_shape = tuple(shape[a] for a in axes)
    gamma, beta = rng.uniform(0.5, 2.0, channel_shape), rng.normal(size=channel_shape)
    weights = None
    if masked:
        weights = rng.uniform(size=[s if i not in axes else 1 for i, s in enumerate(shape)]) > 0.3
        weights = weights.astype(np.float64)
        weights[0] = 1.0  # every channel of every ghost batch keeps a value
    options = {"axes": axes, "epsilon": 1e-3, "virtual_batch_size": ghost, "weights": weights}

    def loss(x, gamma, beta):
        y = reference_train_step(
            x, np.zeros(channel_shape), np.ones(channel_shape), gamma, beta, momentum=0.5, **options
        )[0]
        return float((dy * y).sum())

    def central_differences(values, evaluate):
        gradient = np.empty_like(values)
        for index in np.ndindex(values.shape):
            step = 1e-6 * max(1.0, abs(values[index]))
            up, down = values.copy(), values.copy()
            up[index] += step
            down[index] -= step
            gradient[index] = (evaluate(up) - evaluate(down)) / (2 * step)
        return gradient

    dx, dgamma, dbeta = reference_train_gradients(x, dy, gamma, **options)
    expected = (
        central_differences(x, lambda v: loss(v, gamma, beta)),
        central_differences(gamma, lambda v: loss(x, v, beta)),
        central_differences(beta, lambda v: loss(x, gamma, v)),
    )
    for actual, numeric in zip((dx, dgamma, dbeta), expected, strict=True):
        np.testing.assert_allclose(actual, numeric, rtol=1e-6, atol=1e-7)
