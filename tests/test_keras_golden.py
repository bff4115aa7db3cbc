"""BatchNormalization against outputs, gradients and moving statistics recorded from real tf-keras.

The golden files come from tools/make_keras_golden.py (tensorflow-cpu 2.20.0, tf-keras 2.20.1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import BatchNormalization
from tests.numpy_reference import reference_train_step

FORWARD_RTOL = 1e-5
GRADIENT_RTOL = 1e-4
DTYPES = {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}


def assert_close(actual, expected, rtol, what):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    # Relative to the magnitude of the whole tensor, so values that cancel to ~0 do not demand
    # digits that float32 cannot hold.
    scale = max(np.max(np.abs(expected)), 1e-12)
    error = np.max(np.abs(actual - expected)) / scale if expected.size else 0.0
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:.1g}"


def build_layer(spec, arrays):
    kwargs = dict(spec["layer"])
    name = spec["name"]
    if spec["adjustment"]:
        # saved in the shape they broadcast from against x (per channel, per sample, ...)
        scale = torch.tensor(arrays[f"{name}/adjustment_scale"])
        bias = torch.tensor(arrays[f"{name}/adjustment_bias"])
        kwargs["adjustment"] = lambda shape: (scale, bias)
    layer = BatchNormalization(**kwargs)
    layer.build(spec["input_shape"])
    initial = [arrays[f"{name}/initial_{i}"] for i in range(len(spec["weight_names"]))]
    layer.set_weights(initial)
    return layer


def golden_cases():
    import json
    from pathlib import Path

    document = json.loads((Path(__file__).parent / "golden" / "keras_cases.json").read_text())
    return [pytest.param(spec, id=spec["name"]) for spec in document["cases"]]


@pytest.fixture(params=["numba", "torch", "native"])
def cpu_backend(request):
    """Every golden case runs through the Numba kernels, the composed torch ops and torch's own
    batch-norm kernels (the native backend, the default on GPUs; on the CPU it runs here only)."""
    from batchnorm.functional import NATIVE, NUMBA_CPU, register_backend

    register_backend("cpu", {"numba": NUMBA_CPU, "torch": None, "native": NATIVE}[request.param])
    yield request.param
    register_backend("cpu", NUMBA_CPU)


@pytest.mark.parametrize("spec", golden_cases())
def test_layer_matches_tf_keras(spec, keras_golden, cpu_backend):
    _, arrays = keras_golden
    name = spec["name"]
    layer = build_layer(spec, arrays)
    assert bool(layer.fused) == spec["fused_resolved"]
    assert layer._weight_names() == spec["weight_names"]
    initial = [arrays[f"{name}/initial_{i}"] for i in range(len(spec["weight_names"]))]
    assert [w.shape for w in layer.get_weights()] == [w.shape for w in initial]
    half = spec["input_dtype"] == "float16"
    forward_rtol = 2e-3 if half else FORWARD_RTOL
    gradient_rtol = 4e-3 if half else GRADIENT_RTOL
    ill = spec["data"] == "ill"
    for step in range(spec["steps"]):
        x = torch.tensor(arrays[f"{name}/x_{step}"], requires_grad=True)
        mask = arrays.get(f"{name}/mask_{step}")
        y = layer(
            x, training=spec["call_training"], mask=None if mask is None else torch.tensor(mask)
        )
        assert y.dtype == x.dtype
        loss = (y.float() * torch.tensor(arrays[f"{name}/dy_{step}"])).sum()
        loss.backward()
        if x.shape[0] == 1 and not layer.fused:
            # One value per channel: y is exactly beta here; tf's x * inv + (beta - mean * inv)
            # leaves a cancellation residue of ~1e-5 relative, so compare it more loosely.
            beta = layer.get_weights()[1].reshape(1, -1)
            np.testing.assert_array_equal(y.detach().numpy(), beta)
            assert_close(y.detach(), arrays[f"{name}/y_{step}"], 1e-4, f"y step {step}")
        elif not ill:
            assert_close(y.detach(), arrays[f"{name}/y_{step}"], forward_rtol, f"y step {step}")
            assert_close(x.grad, arrays[f"{name}/dx_{step}"], gradient_rtol, f"dx step {step}")
        for weight_name in [] if ill else spec["trainable_names"]:
            grad = getattr(layer, weight_name).grad
            expected = arrays[f"{name}/grad_{weight_name}_{step}"]
            assert_close(
                grad.reshape(expected.shape), expected, gradient_rtol, f"d{weight_name} {step}"
            )
            getattr(layer, weight_name).grad = None
        for i, (ours, theirs) in enumerate(
            zip(
                layer.get_weights(),
                [arrays[f"{name}/weights_{step}_{i}"] for i in range(len(spec["weight_names"]))],
                strict=True,
            )
        ):
            assert_close(
                ours, theirs, forward_rtol, f"weight {spec['weight_names'][i]} step {step}"
            )
    y = layer(torch.tensor(arrays[f"{name}/x_infer"]), training=False)
    assert_close(y.detach(), arrays[f"{name}/y_infer"], forward_rtol, "inference")


@pytest.mark.parametrize("name", ["ill_conditioned_dense", "ill_conditioned_fused"])
def test_ill_conditioned_data_at_least_as_accurate_as_tf_keras(name, keras_golden, cpu_backend):
    if cpu_backend == "native":
        pytest.skip("torch's CPU kernel sums float32 in float32: not chosen for float32 on the CPU")
    document, arrays = keras_golden
    spec = next(s for s in document["cases"] if s["name"] == name)
    layer = build_layer(spec, arrays)
    axes = (len(spec["input_shape"]) - 1,)
    for step in range(spec["steps"]):
        weights = [w.reshape(-1).astype(np.float64) for w in layer.get_weights()]
        gamma, beta, moving_mean, moving_variance = weights
        x = arrays[f"{name}/x_{step}"]
        y = layer(torch.tensor(x), training=True).detach().numpy()
        expected, _, _ = reference_train_step(
            x,
            moving_mean,
            moving_variance,
            gamma,
            beta,
            axes=axes,
            momentum=layer.momentum,
            epsilon=layer.epsilon,
            unbiased=bool(layer.fused),
        )
        ours = np.max(np.abs(y - expected))
        theirs = np.max(np.abs(arrays[f"{name}/y_{step}"] - expected))
        # The floor any float32 batch mean shares: rounding the mean (~1000) to float32 moves it by
        # up to half an ulp, which the normalisation divides by the tiny std.
        mean = x.astype(np.float64).reshape(-1, x.shape[-1]).mean(axis=0)
        variance = x.astype(np.float64).reshape(-1, x.shape[-1]).var(axis=0)
        half_ulp = 0.5 * np.spacing(mean.astype(np.float32)).astype(np.float64)
        floor = np.max(half_ulp * np.abs(gamma) / np.sqrt(variance + layer.epsilon))
        floor += np.finfo(np.float32).eps * np.max(np.abs(expected))
        assert ours <= max(theirs, floor), f"step {step}: ours {ours:.3g}, tf-keras {theirs:.3g}"
        assert ours <= 1.5 * floor, (
            f"step {step}: ours {ours:.3g} vs float32-mean floor {floor:.3g}"
        )


def test_regularization_losses_match_tf_keras(keras_golden):
    document, arrays = keras_golden
    for spec in document["cases"]:
        if not spec["losses"]:
            continue
        layer = build_layer(spec, arrays)
        losses = [loss.item() for loss in layer.losses]
        np.testing.assert_allclose(losses, spec["losses"], rtol=1e-5, err_msg=spec["name"])
        assert all(loss.requires_grad for loss in layer.losses)


def test_from_tf_keras_config_rebuilds_equivalent_layer(keras_golden):
    document, _ = keras_golden
    for spec in document["cases"]:
        config = spec["keras_config"]
        layer = BatchNormalization.from_config(config)
        layer.build(spec["input_shape"])
        assert layer.momentum == pytest.approx(config["momentum"])
        assert layer.epsilon == pytest.approx(config["epsilon"])
        shift = 1 if spec["layer"].get("virtual_batch_size") else 0
        assert layer.axis == [a - shift for a in config["axis"]]
        assert layer.renorm == config.get("renorm", False)
        assert layer.trainable == config["trainable"]
        for key in ("gamma_regularizer", "beta_regularizer", "gamma_constraint", "beta_constraint"):
            ours = layer.get_config()[key]
            theirs = config[key]
            assert (ours is None) == (theirs is None), (spec["name"], key)
            if ours is not None:
                assert ours["class_name"] == theirs["class_name"]
                for k, v in theirs["config"].items():
                    assert ours["config"][k] == pytest.approx(v)


def test_constraints_match_tf_keras(keras_golden):
    from batchnorm import constraints

    document, arrays = keras_golden
    for index, entry in enumerate(document["constraints"]):
        for identifier in (entry["identifier"], entry["config"]):
            constraint = constraints.get(identifier)
            for key in ("vector", "full_rank"):
                w = torch.tensor(arrays[f"constraints/{key}"])
                np.testing.assert_allclose(
                    constraint(w).numpy(),
                    arrays[f"constraints/{index}/{key}"],
                    rtol=1e-6,
                    atol=1e-7,
                    err_msg=f"{identifier} on {key}",
                )
