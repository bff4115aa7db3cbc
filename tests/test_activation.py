"""Batch norm fused with an activation, and in-place training (functional core)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchnorm import BatchNormalization
from batchnorm.functional import (
    NATIVE,
    NUMBA_CPU,
    BatchNormStatistics,
    batch_norm,
    register_backend,
)

ACTIVATIONS = [
    ("identity", None, lambda z: z),
    ("relu", None, F.relu),
    ("leaky_relu", None, lambda z: F.leaky_relu(z, 0.01)),
    ("leaky_relu", 0.2, lambda z: F.leaky_relu(z, 0.2)),
    ("elu", None, F.elu),
    ("elu", 0.5, lambda z: F.elu(z, 0.5)),
]


def _state(channels, dtype=torch.float64):
    return BatchNormStatistics(
        torch.linspace(-1, 1, channels, dtype=dtype), torch.linspace(0.5, 2, channels, dtype=dtype)
    )


@pytest.fixture(params=["numba", "torch", "native"])
def cpu_backend(request):
    register_backend("cpu", {"numba": NUMBA_CPU, "torch": None, "native": NATIVE}[request.param])
    yield request.param
    register_backend("cpu", NUMBA_CPU)


@pytest.mark.parametrize(("name", "param", "reference"), ACTIVATIONS)
def test_activation_follows_batch_norm_then_torch_activation(cpu_backend, name, param, reference):
    torch.manual_seed(0)
    x = (torch.randn(16, 3, 5, dtype=torch.float64) * 2 + 1).requires_grad_()
    gamma = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(3, dtype=torch.float64).requires_grad_()
    upstream = torch.randn(16, 3, 5, dtype=torch.float64)
    kwargs = {"axis": 1, "momentum": 0.5}
    for training in (True, False):
        fused, fused_state = batch_norm(
            x,
            _state(3),
            gamma,
            beta,
            training=training,
            activation=name,
            activation_param=param,
            **kwargs,
        )
        plain, plain_state = batch_norm(x, _state(3), gamma, beta, training=training, **kwargs)
        expected = reference(plain)
        torch.testing.assert_close(fused, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(fused_state.moving_variance, plain_state.moving_variance)
        got = torch.autograd.grad((fused * upstream).sum(), (x, gamma, beta))
        want = torch.autograd.grad((expected * upstream).sum(), (x, gamma, beta))
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _in_place_step(x, gamma, beta, **kwargs):
    # A copy that is not a leaf: in-place training may overwrite it.
    y, _ = batch_norm(
        x * 1,
        _state(x.shape[1], x.dtype),
        gamma,
        beta,
        training=True,
        axis=1,
        memory="in_place",
        **kwargs,
    )
    return y


@pytest.mark.parametrize(
    ("name", "param"), [(None, None), ("identity", None), ("leaky_relu", 0.1), ("elu", 1.0)]
)
@pytest.mark.parametrize(("ghost", "masked"), [(None, False), (None, True), (2, False), (2, True)])
def test_in_place_training_gradcheck(name, param, ghost, masked):
    torch.manual_seed(1)
    x = (torch.randn(8, 3, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
    gamma = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(3, dtype=torch.float64).requires_grad_()
    mask = (torch.rand(8, 4) > 0.3).double() if masked else None
    kwargs = {
        "activation": name,
        "activation_param": param,
        "virtual_batch_size": ghost,
        "mask": mask,
    }
    assert torch.autograd.gradcheck(lambda *t: _in_place_step(*t, **kwargs), (x, gamma, beta))


@pytest.mark.parametrize(
    ("name", "param"), [("identity", None), ("leaky_relu", 0.01), ("elu", 1.0)]
)
def test_in_place_overwrites_its_input_and_matches_the_plain_path_in_float32(name, param):
    torch.manual_seed(2)
    source = torch.randn(32, 8, 6, 6) * 3 + 2
    gamma = (torch.rand(8) + 0.5).requires_grad_()
    beta = torch.randn(8).requires_grad_()
    upstream = torch.randn_like(source)
    results = []
    for memory in ("default", "in_place"):
        leaf = source.clone().requires_grad_()
        x = leaf * 1
        y, state = batch_norm(
            x,
            _state(8, torch.float32),
            gamma,
            beta,
            axis=1,
            training=True,
            activation=name,
            activation_param=param,
            memory=memory,
        )
        if memory == "in_place":
            assert y.data_ptr() == x.data_ptr()
        grads = torch.autograd.grad((y * upstream).sum(), (leaf, gamma, beta))
        results.append((y.detach(), state.moving_variance, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_in_place_refusals_change_nothing():
    x = torch.randn(8, 3)
    state = _state(3, torch.float32)
    before = [t.clone() for t in state if t is not None]
    cases = [
        (
            {"activation": "relu"},
            x * 1,
            torch.ones(3),
            r"'relu' .* is not invertible: use 'identity', 'leaky_relu'",
        ),
        (
            {"activation": "leaky_relu", "activation_param": 0.0},
            x * 1,
            torch.ones(3),
            r"not invertible",
        ),
        ({}, x.clone().requires_grad_(), torch.ones(3), r"must not be a leaf that requires grad"),
        ({}, x * 1, torch.tensor([1.0, 0.0, 1.0]), r"every gamma must be nonzero"),
    ]
    for kwargs, source, gamma, match in cases:
        copy = source.detach().clone()
        with pytest.raises(ValueError, match=match):
            batch_norm(source, state, gamma, training=True, memory="in_place", **kwargs)
        assert torch.equal(source.detach(), copy)
    with pytest.raises(ValueError, match=r"needs a Python bool `training`.*Received: .* on meta"):
        batch_norm(x * 1, state, training=torch.tensor(True, device="meta"), memory="in_place")
    with pytest.raises(
        ValueError, match=r"`memory` must be 'default' or 'in_place'. Received: memory='inplace'"
    ):
        batch_norm(x, state, training=True, memory="inplace")  # type: ignore[arg-type]
    for old, new in zip(before, [t for t in state if t is not None], strict=True):
        assert torch.equal(old, new)


def test_in_place_input_needed_elsewhere_fails_at_backward():
    # sin saves its input for its backward: overwriting that input must not pass silently.
    leaf = torch.randn(8, 3, requires_grad=True)
    x = leaf * 1
    other = x.sin()
    y, _ = batch_norm(x, _state(3, torch.float32), training=True, memory="in_place")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + other.sum()).backward()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"activation": "gelu"},
            r"`activation` must be None or one of .* Received: activation='gelu'",
        ),
        ({"activation": "relu", "activation_param": 0.1}, r"does not apply to activation='relu'"),
        ({"activation": "elu", "activation_param": -1.0}, r"alpha\) must be > 0"),
        (
            {"activation": "leaky_relu", "activation_param": float("nan")},
            r"must be a finite number",
        ),
        ({"activation_param": 0.1}, r"`activation_param` needs an `activation`"),
    ],
)
def test_bad_activation_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        batch_norm(torch.randn(4, 3), _state(3, torch.float32), training=True, **kwargs)


@pytest.mark.parametrize(("name", "param", "reference"), ACTIVATIONS)
@pytest.mark.parametrize(
    ("shape", "axis", "ghost"),
    [((64, 6), -1, None), ((16, 6, 5), 1, None), ((8, 5, 5, 6), -1, 2), ((16, 6, 5), 1, 4)],
)
def test_activation_in_the_kernels_normalising_pass(name, param, reference, shape, axis, ghost):
    # Without autograd the CPU kernels apply the activation in their normalising pass.
    torch.manual_seed(3)
    x = torch.randn(shape) * 2 + 0.5
    channels = shape[axis]
    gamma, beta = torch.rand(channels) + 0.5, torch.randn(channels)
    kwargs = {"axis": axis, "momentum": 0.5, "virtual_batch_size": ghost}
    with torch.no_grad():
        for training in (True, False):
            fused, fused_state = batch_norm(
                x,
                _state(channels, torch.float32),
                gamma,
                beta,
                training=training,
                activation=name,
                activation_param=param,
                **kwargs,
            )
            plain, plain_state = batch_norm(
                x, _state(channels, torch.float32), gamma, beta, training=training, **kwargs
            )
            torch.testing.assert_close(fused, reference(plain), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(fused_state.moving_mean, plain_state.moving_mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elu_exponential_is_accurate_over_its_whole_range(dtype):
    # The kernels' elu computes expm1 with vector code of their own (not the C library's):
    # within 2 ulp of NumPy's float64 expm1 in float64 and 1 ulp in float32, from -1e-300 to
    # -300, and -alpha, NaN and 0 where torch's elu gives them. With a mean of 0 and variance
    # + epsilon = 1 (powers of two), the normalised value is x itself.
    rng = np.random.default_rng(0)
    magnitudes = 10.0 ** rng.uniform(-300 if dtype == torch.float64 else -40, 2.5, 200_000)
    values = np.concatenate([-magnitudes, -rng.exponential(3.0, 200_000), [-0.3466, -0.6932]])
    x = torch.from_numpy(values).to(dtype).reshape(-1, 1)
    statistics = BatchNormStatistics(
        torch.zeros(1, dtype=dtype), torch.full((1,), 1 - 2.0**-10, dtype=dtype)
    )
    y, _ = batch_norm(
        x, statistics, training=False, epsilon=2.0**-10, activation="elu", activation_param=0.5
    )
    expected = 0.5 * np.expm1(x.double().numpy())
    ulp = np.spacing(np.abs(expected).astype(x.numpy().dtype)).astype(np.float64)
    error = np.abs(y.double().numpy() - expected) / ulp
    assert error.max() <= (2.0 if dtype == torch.float64 else 1.0), error.max()
    special = torch.tensor([-float("inf"), float("nan"), -0.0, -1e4, 3.0], dtype=dtype)
    y, _ = batch_norm(
        special.reshape(-1, 1),
        statistics,
        training=False,
        epsilon=2.0**-10,
        activation="elu",
        activation_param=0.5,
    )
    torch.testing.assert_close(y.flatten(), F.elu(special, 0.5), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_in_place_half_precision_on_the_torch_ops_keeps_the_signs_near_zero(dtype):
    """A strided half-precision input takes the torch-op in-place step: it normalised in three
    half-precision roundings, outputs near 0 came out 0 or of the other sign, and leaky_relu's
    gradients (its slope read from the output's sign) were 30-60% off in dx, 7-18% in dbeta."""
    torch.manual_seed(0)
    rows, channels = 64, 100
    x0 = torch.randn(rows, channels).to(dtype)
    dy = torch.randn(rows, channels).to(dtype)
    beta = torch.randn(channels) * 0.5

    def gradients(memory: str, tensor_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        layer_dtype = str(tensor_dtype).removeprefix("torch.")
        layer = BatchNormalization(
            axis=-1, activation="leaky_relu", memory=memory, dtype=layer_dtype
        )
        layer.build((rows, channels))
        with torch.no_grad():
            layer.beta.copy_(beta)
        leaf = torch.stack([x0, torch.zeros_like(x0)], -1).to(tensor_dtype).requires_grad_()
        x = leaf.clone()[..., 0]  # strided: the kernels do not read it
        layer(x, training=True).backward(dy.to(tensor_dtype))
        return leaf.grad[..., 0].double(), layer.beta.grad.double()

    dx_ref, dbeta_ref = gradients("default", torch.float64)
    dx, dbeta = gradients("in_place", dtype)
    assert (dx - dx_ref).abs().max() / dx_ref.abs().max() < 0.01
    assert (dbeta - dbeta_ref).abs().max() / dbeta_ref.abs().max() < 0.01
