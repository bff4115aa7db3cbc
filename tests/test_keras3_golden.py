"""BatchNormalization configured like Keras 3 against outputs, gradients and moving statistics
recorded from real Keras 3 (tools/make_keras3_golden.py: keras 3.15.1, TensorFlow backend).

Keras 3 always stores the biased batch variance in ``moving_variance`` (``ops.moments``), which is
tf-keras' non-fused path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm import BatchNormalization
from tests.test_keras_golden import FORWARD_RTOL, GRADIENT_RTOL, assert_close

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def keras3_golden() -> tuple[dict, dict]:
    document = json.loads((GOLDEN / "keras3_cases.json").read_text())
    with np.load(GOLDEN / "keras3_cases.npz") as data:
        arrays = {key: data[key] for key in data.files}
    return document, arrays


def golden_cases():
    document = json.loads((GOLDEN / "keras3_cases.json").read_text())
    return [pytest.param(spec, id=spec["name"]) for spec in document["cases"]]


def build_layer(spec, arrays):
    layer = BatchNormalization.like("keras3", **spec["layer"])
    layer.build(spec["input_shape"])
    initial = [arrays[f"{spec['name']}/initial_{i}"] for i in range(len(spec["weight_names"]))]
    layer.set_weights(initial)
    return layer


@pytest.mark.parametrize("spec", golden_cases())
def test_layer_matches_keras3(spec, keras3_golden):
    run_case(spec, keras3_golden[1])


@pytest.mark.parametrize("spec", [s for s in golden_cases() if s.values[0]["mask"]])
def test_a_float_mask_counts_as_keras3_casts_it_to_bool(spec, keras3_golden):
    """Keras 3 casts the mask to bool (``_moments``), so its recorded steps are its steps for
    any non-zero values in place of True: ``like("keras3")`` (``mask_weights=False``) gives
    them; before, the layer weighed positions by the values, as tf-keras does."""
    rng = np.random.default_rng(0)

    def weights(mask: np.ndarray) -> np.ndarray:
        return np.where(mask, rng.choice(np.array([0.3, 2.5], np.float32), mask.shape), 0.0)

    run_case(spec, keras3_golden[1], weights)


def run_case(spec, arrays, mask_as=None):
    """Our layer through the golden case's steps (the mask replaced by ``mask_as(mask)``)."""
    name = spec["name"]
    layer = build_layer(spec, arrays)
    assert layer._weight_names() == spec["weight_names"]
    half = spec["input_dtype"] == "float16"
    forward_rtol = 2e-3 if half else FORWARD_RTOL
    gradient_rtol = 4e-3 if half else GRADIENT_RTOL
    for step in range(spec["steps"]):
        x = torch.tensor(arrays[f"{name}/x_{step}"], requires_grad=True)
        mask = arrays.get(f"{name}/mask_{step}")
        if mask is not None and mask_as is not None:
            mask = mask_as(mask).astype(np.float32)
        y = layer(
            x, training=spec["call_training"], mask=None if mask is None else torch.tensor(mask)
        )
        assert y.dtype == x.dtype
        (y.float() * torch.tensor(arrays[f"{name}/dy_{step}"])).sum().backward()
        assert_close(y.detach(), arrays[f"{name}/y_{step}"], forward_rtol, f"y step {step}")
        assert_close(x.grad, arrays[f"{name}/dx_{step}"], gradient_rtol, f"dx step {step}")
        for weight_name in spec["trainable_names"]:
            parameter = getattr(layer, weight_name)
            expected = arrays[f"{name}/grad_{weight_name}_{step}"]
            assert_close(parameter.grad, expected, gradient_rtol, f"d{weight_name} {step}")
            parameter.grad = None
        expected_weights = [
            arrays[f"{name}/weights_{step}_{i}"] for i in range(len(spec["weight_names"]))
        ]
        for weight_name, ours, theirs in zip(
            spec["weight_names"], layer.get_weights(), expected_weights, strict=True
        ):
            assert_close(ours, theirs, forward_rtol, f"weight {weight_name} step {step}")
    y = layer(torch.tensor(arrays[f"{name}/x_infer"]), training=False)
    assert_close(y.detach(), arrays[f"{name}/y_infer"], forward_rtol, "inference")


def test_keras3_stores_the_biased_variance(keras3_golden):
    """The independent check of the convention: one step from known statistics, in float64."""
    document, arrays = keras3_golden
    spec = next(s for s in document["cases"] if s["name"] == "rank4_nchw")
    x = arrays["rank4_nchw/x_0"].astype(np.float64)
    old_variance = arrays["rank4_nchw/initial_3"].astype(np.float64)
    batch_variance = x.var(axis=(0, 2, 3))
    momentum = spec["keras_config"]["momentum"]
    expected = momentum * old_variance + (1 - momentum) * batch_variance
    np.testing.assert_allclose(arrays["rank4_nchw/weights_0_3"], expected, rtol=1e-5)


def test_from_keras3_config_rebuilds_equivalent_layer(keras3_golden):
    document, _ = keras3_golden
    for spec in document["cases"]:
        config = spec["keras_config"]
        layer = BatchNormalization.from_config(config)
        layer.build(spec["input_shape"])
        rank = len(spec["input_shape"])
        assert layer.axis == [config["axis"] % rank], spec["name"]
        assert layer.momentum == pytest.approx(config["momentum"])
        assert layer.epsilon == pytest.approx(config["epsilon"])
        assert (layer.center, layer.scale) == (config["center"], config["scale"])
        assert layer.renorm == config["renorm"]
        assert layer.trainable == config["trainable"]
        assert layer._weight_names() == spec["weight_names"]
