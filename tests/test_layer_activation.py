"""The layer's ``activation``, ``activation_param`` and ``memory`` arguments against oracles.

The oracle of ``BatchNormalization(activation=f)`` is the same layer without an activation
followed by torch's own ``F.relu`` / ``F.leaky_relu`` / ``F.elu`` with the parameter written out
here (not read from the layer): the forward, the gradients of x, gamma and beta (torch's backward
of the activation, then the layer's), and the buffers. On CPU the layer applies the activation in
the kernels' normalising pass and folds its derivative into the one-call training backward; the
calls after the first take the layer's cached direct calls, so every comparison runs over several
consecutive training calls. float64 is compared to a few roundings, float32 and float16 to
theirs.
"""

from __future__ import annotations

import copy
import json

import numba
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from batchnorm import BatchNormalization, fold
from batchnorm.functional._cpu_training_call import TrainingCall
from batchnorm.functional._direct_step import DirectCalls
from batchnorm.kernels import blocks_for

ACTIVATIONS = [
    pytest.param("identity", None, lambda z: z, id="identity"),
    pytest.param("relu", None, F.relu, id="relu"),
    pytest.param("leaky_relu", None, lambda z: F.leaky_relu(z, 0.01), id="leaky_relu"),
    pytest.param("leaky_relu", 0.2, lambda z: F.leaky_relu(z, 0.2), id="leaky_relu(0.2)"),
    pytest.param("leaky_relu", 0.0, lambda z: F.leaky_relu(z, 0.0), id="leaky_relu(0)"),
    pytest.param("leaky_relu", -0.2, lambda z: F.leaky_relu(z, -0.2), id="leaky_relu(-0.2)"),
    pytest.param("elu", None, F.elu, id="elu"),
    pytest.param("elu", 0.5, lambda z: F.elu(z, 0.5), id="elu(0.5)"),
]

# name: (shape, channel axis, memory format)
LAYOUTS = {
    "rows": ((32, 6), -1, torch.contiguous_format),
    "ncl": ((12, 6, 5), 1, torch.contiguous_format),
    "nchw": ((8, 6, 4, 5), 1, torch.contiguous_format),
    "nhwc": ((8, 4, 5, 6), -1, torch.contiguous_format),
    "channels_last": ((8, 6, 4, 5), 1, torch.channels_last),
}

# layout, layer options, mask: None, "positions" (x without its channel axis: one weight per
# position, the kernels' path) or "keras" (x without its last axis: with axis=1 the weights vary
# inside a channel, and the activation runs as a torch op after batch norm)
CASES = [
    *[pytest.param(name, {}, None, id=name) for name in LAYOUTS],
    *[pytest.param(name, {"virtual_batch_size": 4}, None, id=f"{name}-ghost") for name in LAYOUTS],
    pytest.param("rows", {"fused": False}, "positions", id="rows-mask"),
    pytest.param("nchw", {"fused": False}, "positions", id="nchw-mask"),
    pytest.param("channels_last", {"fused": False}, "positions", id="channels_last-mask"),
    pytest.param("nchw", {"fused": False}, "keras", id="nchw-mask-in-channel"),
    pytest.param("ncl", {"fused": False}, "keras", id="ncl-mask-in-channel"),
    pytest.param(
        "nhwc", {"fused": False, "virtual_batch_size": 4}, "positions", id="nhwc-ghost-mask"
    ),
]


def close(actual, expected, tol):
    """Equal to ``tol`` relative to each value and to the largest finite one; NaN where NaN."""
    expected = expected.detach()
    scale = max(1.0, expected.nan_to_num(0.0, 0.0, 0.0).abs().max().item())
    torch.testing.assert_close(
        actual.detach(), expected, rtol=tol, atol=tol * scale, equal_nan=True
    )


def pair(channels, axis, name, param, *, dtype="float64", momentum=0.6, seed=0, **options):
    """A layer with the activation and its oracle layer without, with the same gamma (negative
    on every third channel) and beta."""
    kwargs = {"axis": axis, "momentum": momentum, "dtype": dtype, **options}
    ours = BatchNormalization(channels, activation=name, activation_param=param, **kwargs)
    plain = BatchNormalization(channels, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.arange(channels) % 3 == 2, -1.0, 1.0)
    gamma = (torch.rand(channels, generator=generator) + 0.5) * sign
    beta = torch.randn(channels, generator=generator) * 0.5
    with torch.no_grad():
        for layer in (ours, plain):
            layer.gamma.copy_(gamma)
            layer.beta.copy_(beta)
    return ours, plain


def make_input(layout, generator, step, dtype=torch.float64):
    shape, _, memory_format = LAYOUTS[layout]
    x = torch.randn(shape, generator=generator, dtype=dtype) * (1 + step) + (step - 1)
    return x.contiguous(memory_format=memory_format)


def make_mask(kind, layout, generator, dtype=torch.float64):
    if kind is None:
        return None
    shape, axis, _ = LAYOUTS[layout]
    if kind == "keras":
        mask_shape = shape[:-1]
    else:
        mask_shape = tuple(s for i, s in enumerate(shape) if i != axis % len(shape))
    weights = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=dtype)
    return weights[torch.randint(0, 4, mask_shape, generator=generator)]


def assert_same_state(ours, plain, tol):
    theirs = plain.state_dict()
    for key, value in ours.state_dict().items():
        close(value, theirs[key], tol)


def compare_training_steps(ours, plain, reference, layout, mask_kind, *, dtype, tol, steps=3):
    """``steps`` training calls with gradients, then one under no_grad, each against the oracle."""
    shape = LAYOUTS[layout][0]
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = make_input(layout, generator, step, dtype)
        mask = make_mask(mask_kind, layout, generator, dtype)
        upstream = torch.randn(shape, generator=generator, dtype=dtype)
        ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(ours_x, training=True, mask=mask)
        expected = reference(plain(plain_x, training=True, mask=mask))
        assert y.dtype == x.dtype and y.shape == x.shape
        close(y, expected, tol)
        (y * upstream).sum().backward()
        (expected * upstream).sum().backward()
        close(ours_x.grad, plain_x.grad, tol)
        close(ours.gamma.grad, plain.gamma.grad, tol)
        close(ours.beta.grad, plain.beta.grad, tol)
        assert_same_state(ours, plain, tol)
        ours.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
    x = make_input(layout, generator, steps, dtype)
    mask = make_mask(mask_kind, layout, generator, dtype)
    with torch.no_grad():
        close(ours(x, training=True, mask=mask), reference(plain(x, training=True, mask=mask)), tol)
    assert_same_state(ours, plain, tol)


def compare_inference(ours, plain, reference, layout, *, dtype, tol):
    """training=False with and without gradients, and trainable=False (inference, buffers kept)."""
    shape = LAYOUTS[layout][0]
    generator = torch.Generator().manual_seed(2)
    x = make_input(layout, generator, 1, dtype)
    upstream = torch.randn(shape, generator=generator, dtype=dtype)
    with torch.no_grad():
        close(ours(x, training=False), reference(plain(x, training=False)), tol)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for trainable in (True, False):
        ours.trainable = plain.trainable = trainable
        for layer in (ours, plain):
            layer.zero_grad(set_to_none=True)
        ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        # trainable=False forces inference even for training=True (tf-keras 2)
        y = ours(ours_x, training=not trainable)
        expected = reference(plain(plain_x, training=not trainable))
        close(y, expected, tol)
        (y * upstream).sum().backward()
        (expected * upstream).sum().backward()
        close(ours_x.grad, plain_x.grad, tol)
        if trainable:
            close(ours.gamma.grad, plain.gamma.grad, tol)
            close(ours.beta.grad, plain.beta.grad, tol)
        else:
            assert ours.gamma.grad is None and ours.beta.grad is None
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize(("layout", "options", "mask_kind"), CASES)
@pytest.mark.parametrize(("name", "param", "reference"), ACTIVATIONS)
def test_layer_follows_the_plain_layer_then_torch_activation(
    layout, options, mask_kind, name, param, reference
):
    shape, axis, _ = LAYOUTS[layout]
    ours, plain = pair(shape[axis], axis, name, param, **options)
    compare_training_steps(
        ours, plain, reference, layout, mask_kind, dtype=torch.float64, tol=1e-10
    )
    compare_inference(ours, plain, reference, layout, dtype=torch.float64, tol=1e-10)


@pytest.mark.parametrize(
    ("layout", "options", "mask_kind"),
    [
        pytest.param("nchw", {}, None, id="nchw"),
        pytest.param("nhwc", {"virtual_batch_size": 4}, None, id="nhwc-ghost"),
        pytest.param("channels_last", {"fused": False}, "positions", id="channels_last-mask"),
    ],
)
@pytest.mark.parametrize(("name", "param", "reference"), ACTIVATIONS)
def test_layer_follows_the_oracle_in_float32(layout, options, mask_kind, name, param, reference):
    shape, axis, _ = LAYOUTS[layout]
    ours, plain = pair(shape[axis], axis, name, param, dtype="float32", **options)
    compare_training_steps(ours, plain, reference, layout, mask_kind, dtype=torch.float32, tol=2e-5)
    compare_inference(ours, plain, reference, layout, dtype=torch.float32, tol=2e-5)


@pytest.mark.parametrize(
    ("name", "param"), [("relu", None), ("leaky_relu", 0.2), ("elu", 0.5), ("identity", None)]
)
def test_repeated_calls_take_the_direct_calls_and_the_fused_backward(monkeypatch, name, param):
    # What the oracle tests above compare: the cached direct calls, and the kernels' backward
    # with the activation folded in (not a torch op after batch norm).
    direct, fused = [], []
    original_call, original_backward = DirectCalls.__call__, TrainingCall.backward

    def call(self, x, training, mask=None):
        y = original_call(self, x, training, mask)
        direct.append(y is not None)
        return y

    def backward(self, grad, training_pass, *saved):
        fused.append(self.activation)
        return original_backward(self, grad, training_pass, *saved)

    monkeypatch.setattr(DirectCalls, "__call__", call)
    monkeypatch.setattr(TrainingCall, "backward", backward)
    ours, _ = pair(6, 1, name, param)
    for step in range(3):
        x = (torch.randn(8, 6, 5, dtype=torch.float64) + step).requires_grad_()
        ours(x, training=True).sum().backward()
    assert direct == [True, True, True]  # the first call builds the shortcut and takes it
    assert len(fused) == 3
    assert all(a is not None and a.name == name for a in fused)


# ---------------------------------------------------------------------------- edge values
KINKS = [
    pytest.param("relu", None, F.relu, 0.0, id="relu"),
    pytest.param("leaky_relu", None, lambda z: F.leaky_relu(z, 0.01), 0.01, id="leaky_relu"),
    pytest.param("leaky_relu", 0.2, lambda z: F.leaky_relu(z, 0.2), 0.2, id="leaky_relu(0.2)"),
    pytest.param("leaky_relu", -0.2, lambda z: F.leaky_relu(z, -0.2), -0.2, id="leaky_relu(-0.2)"),
    pytest.param("elu", None, F.elu, 1.0, id="elu"),
    pytest.param("elu", 0.5, lambda z: F.elu(z, 0.5), 0.5, id="elu(0.5)"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("name", "param", "reference", "slope_at_zero"), KINKS)
def test_fused_backward_at_the_kink_follows_torch(name, param, reference, slope_at_zero, dtype):
    # Channel 0: data with an exact mean, beta 0: z is exactly 0 where x is the mean. Channel 1:
    # constant (variance 0): z = beta = 0 everywhere. Channel 2: gamma 0: z = beta = 0
    # everywhere. Channel 3: an exact mean of 7, negative gamma. torch's derivative at 0 is
    # relu 0, leaky_relu its slope, elu alpha.
    column = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 0.0, -1.0, 1.0], dtype=dtype)
    x = torch.stack([column, torch.full_like(column, 3.0), column * 3 + 1, column * 4 + 7], 1)
    ours, plain = pair(4, -1, name, param, dtype=str(dtype).removeprefix("torch."))
    with torch.no_grad():
        for layer in (ours, plain):
            layer.gamma.copy_(torch.tensor([1.3, 0.7, 0.0, -1.5]))
            layer.beta.zero_()
    upstream = torch.arange(1.0, 33.0, dtype=dtype).reshape(8, 4) * torch.tensor([1, -1, 1, -1])
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for _ in range(3):
        ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, z = ours(ours_x, training=True), plain(plain_x, training=True)
        assert int((z == 0).sum()) == 2 + 8 + 8 + 2  # the kink is hit
        expected = reference(z)
        close(y, expected, tol)
        (y * upstream).sum().backward()
        (expected * upstream).sum().backward()
        for got, want in [
            (ours_x.grad, plain_x.grad),
            (ours.gamma.grad, plain.gamma.grad),
            (ours.beta.grad, plain.beta.grad),
        ]:
            close(got, want, tol)
        # Where z = 0 on the whole channel, d beta = f'(0) * sum(upstream) (and d x = 0 where
        # gamma = 0), written out.
        for channel in (1, 2):
            close(ours.beta.grad[channel], slope_at_zero * upstream[:, channel].sum(), tol)
        assert torch.equal(ours_x.grad[:, 2], torch.zeros(8, dtype=dtype))
        ours.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("name", "param", "reference"), ACTIVATIONS[1:])
def test_large_values_follow_the_oracle(name, param, reference, dtype):
    # Large offsets (the mean split in two), a large gamma (z beyond +-800: elu's exp
    # underflows, its output is -alpha and its derivative 0), and a large upstream gradient.
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(64, 3, generator=generator, dtype=torch.float64)
    # float32 offsets smaller, so that the spread survives rounding the input
    offset = [1e6, -1e8, 0.0] if dtype == torch.float64 else [1e3, -1e6, 0.0]
    x = (x * torch.tensor([1e-2, 1e3, 1.0]) + torch.tensor(offset)).to(dtype)
    upstream = torch.randn(64, 3, generator=generator, dtype=dtype)
    upstream *= 1e30 if dtype == torch.float64 else 1e20
    ours, plain = pair(3, -1, name, param, dtype=str(dtype).removeprefix("torch."))
    with torch.no_grad():
        for layer in (ours, plain):
            layer.gamma.copy_(torch.tensor([1e4, -2.0, 50.0]))
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for _ in range(2):
        ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, z = ours(ours_x, training=True), plain(plain_x, training=True)
        assert z.min() < -800 and z.max() > 800  # exp(z) underflows, even in float64
        expected = reference(z)
        close(y, expected, tol)
        (y * upstream).sum().backward()
        (expected * upstream).sum().backward()
        for got, want in [
            (ours_x.grad, plain_x.grad),
            (ours.gamma.grad, plain.gamma.grad),
            (ours.beta.grad, plain.beta.grad),
        ]:
            assert torch.isfinite(got).all()
            close(got, want, tol)
        ours.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    ("name", "param", "reference"),
    [
        pytest.param("relu", None, F.relu, id="relu"),
        pytest.param("leaky_relu", 0.0, lambda z: F.leaky_relu(z, 0.0), id="leaky_relu(0)"),
    ],
)
def test_infinite_gradient_where_the_output_is_flat(name, param, reference):
    # torch's relu backward gives exactly 0 where its output is 0, even for an infinite
    # gradient; leaky_relu with slope 0 multiplies (inf * 0 = NaN, poisoning the channel).
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ours, plain = pair(3, -1, name, param)
    for _ in range(2):
        ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, z = ours(ours_x, training=True), plain(plain_x, training=True)
        upstream = torch.ones_like(x)
        flat = (z < 0).nonzero()[0]
        upstream[flat[0], flat[1]] = float("inf")
        expected = reference(z)
        (y * upstream).sum().backward()
        (expected * upstream).sum().backward()
        if name == "relu":
            assert torch.isfinite(plain_x.grad).all()
        for got, want in [
            (ours_x.grad, plain_x.grad),
            (ours.gamma.grad, plain.gamma.grad),
            (ours.beta.grad, plain.beta.grad),
        ]:
            close(got, want, 1e-10)
        ours.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)


@pytest.mark.parametrize("layout", ["rows", "nchw", "channels_last"])
@pytest.mark.parametrize(("name", "param", "reference"), ACTIVATIONS)
def test_nan_propagates(layout, name, param, reference):
    # A NaN poisons its channel's batch statistics (training) or only itself (inference); the
    # other channels are untouched.
    shape, axis, _ = LAYOUTS[layout]
    channels = shape[axis]
    generator = torch.Generator().manual_seed(7)
    x = make_input(layout, generator, 0)
    index = [0] * len(shape)
    index[axis] = 1
    x[tuple(index)] = float("nan")
    ours, plain = pair(channels, axis, name, param)
    for _ in range(2):
        ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(ours_x, training=True)
        expected = reference(plain(plain_x, training=True))
        close(y, expected, 1e-10)
        assert y.select(axis, 1).isnan().all()
        assert not y.select(axis, 0).isnan().any()
        y.sum().backward()
        expected.sum().backward()
        close(ours_x.grad, plain_x.grad, 1e-10)
        assert ours.moving_mean[1].isnan() and not ours.moving_mean[0].isnan()
    with torch.no_grad():
        y = ours(x, training=True)
        close(y, reference(plain(x, training=True)), 1e-10)
        assert_same_state(ours, plain, 1e-10)
    fresh, fresh_plain = pair(channels, axis, name, param)
    with torch.no_grad():
        y = fresh(x, training=False)
        close(y, reference(fresh_plain(x, training=False)), 1e-10)
    assert int(y.isnan().sum()) == 1 and y[tuple(index)].isnan()


# ---------------------------------------------------------------------------- autograd
GRADCHECK_ACTIVATIONS = [
    ("identity", None),
    ("relu", None),
    ("leaky_relu", None),
    ("leaky_relu", -0.2),
    ("elu", None),
    ("elu", 0.5),
]


@pytest.mark.parametrize(
    ("options", "masked"),
    [
        pytest.param({}, False, id="plain"),
        pytest.param({"virtual_batch_size": 2, "fused": False}, True, id="ghost-mask"),
    ],
)
@pytest.mark.parametrize(("name", "param"), GRADCHECK_ACTIVATIONS)
def test_gradcheck_and_gradgradcheck_through_the_layer(name, param, options, masked):
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(6, 3, 4, generator=generator, dtype=torch.float64) * 2 + 1
    gamma = torch.tensor([1.2, -0.7, 0.9], dtype=torch.float64)
    beta = torch.tensor([0.3, -0.1, 0.0], dtype=torch.float64)
    mask = (torch.rand(6, 4, generator=generator) > 0.3).double() if masked else None
    layer = BatchNormalization(
        3,
        axis=1,
        momentum=0.5,
        dtype="float64",
        activation=name,
        activation_param=param,
        **options,
    )

    def step(x, gamma, beta):
        return functional_call(
            layer, {"gamma": gamma, "beta": beta}, (x,), {"training": True, "mask": mask}
        )

    inputs = tuple(t.clone().requires_grad_() for t in (x, gamma, beta))
    assert torch.autograd.gradcheck(step, inputs)
    assert torch.autograd.gradgradcheck(step, inputs)
    # The layer's own parameters, on its direct calls.
    with torch.no_grad():
        layer.gamma.copy_(gamma)
        layer.beta.copy_(beta)
    x_only = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: layer(x, training=True, mask=mask), (x_only,))
    assert torch.autograd.gradgradcheck(lambda x: layer(x, training=True, mask=mask), (x_only,))
    assert torch.autograd.gradcheck(lambda x: layer(x, training=False), (x_only,))
    assert torch.autograd.gradgradcheck(lambda x: layer(x, training=False), (x_only,))


@pytest.mark.parametrize(("name", "param"), [("relu", None), ("leaky_relu", 0.2), ("elu", 0.5)])
def test_double_backward_matches_the_oracle(name, param):
    # create_graph=True: the gradient is itself differentiated (a gradient penalty).
    reference = {"relu": F.relu, "leaky_relu": F.leaky_relu, "elu": F.elu}[name]
    arguments = () if param is None else (param,)
    ours, plain = pair(3, 1, name, param)
    generator = torch.Generator().manual_seed(9)
    for _ in range(2):
        x = torch.randn(8, 3, 5, generator=generator, dtype=torch.float64)
        ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(ours_x, training=True)
        expected = reference(plain(plain_x, training=True), *arguments)
        (grad,) = torch.autograd.grad((y**2).sum(), ours_x, create_graph=True)
        (want,) = torch.autograd.grad((expected**2).sum(), plain_x, create_graph=True)
        close(grad, want, 1e-10)
        (grad**2).sum().backward()
        (want**2).sum().backward()
        close(ours_x.grad, plain_x.grad, 1e-9)
        close(ours.gamma.grad, plain.gamma.grad, 1e-9)
        close(ours.beta.grad, plain.beta.grad, 1e-9)
        ours.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("name", "param"), [("relu", None), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("elu", 0.5)]
)
def test_inference_with_gradients_gives_the_output_and_gradients_of_the_oracle(name, param, dtype):
    # A batch norm kept in inference while gamma and beta learn: the activation runs in the
    # inference kernel, so the output is the no-grad call's, bit for bit (torch's elu there
    # differed in the last bit, and in the last bit between thread counts), and the gradients
    # are those of batch norm then torch's activation, in float64.
    reference = {"relu": F.relu, "leaky_relu": F.leaky_relu, "elu": F.elu}[name]
    arguments = () if param is None else (param,)
    ours, plain = pair(5, -1, name, param, dtype=dtype)
    generator = torch.Generator().manual_seed(16)
    x = (torch.randn(12, 777, 5, generator=generator) * 2 + 0.5).to(getattr(torch, dtype))
    upstream = torch.randn(x.shape, generator=generator).to(x.dtype)
    with torch.no_grad():
        ours(x, training=True)
        plain(x, training=True)
        expected_output = ours(x, training=False)
    ours_x = x.clone().requires_grad_()
    y = ours(ours_x, training=False)
    assert torch.equal(y.detach(), expected_output)
    (y * upstream).sum().backward()
    plain64 = BatchNormalization(5, momentum=0.6, dtype="float64")
    plain64.load_state_dict({k: v.double() for k, v in plain.state_dict().items()})
    plain_x = x.double().requires_grad_()
    (reference(plain64(plain_x, training=False), *arguments) * upstream.double()).sum().backward()
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    close(ours_x.grad.double(), plain_x.grad, tolerance)
    close(ours.gamma.grad.double(), plain64.gamma.grad, tolerance)
    close(ours.beta.grad.double(), plain64.beta.grad, tolerance)


# ---------------------------------------------------------------------------- threads
def threaded_run(threads, name, param, memory_format, ghost, masked):
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(10)
    layer = BatchNormalization(
        16,
        axis=1,
        momentum=0.5,
        activation=name,
        activation_param=param,
        virtual_batch_size=ghost,
        fused=False if masked else None,
    )
    with torch.no_grad():
        layer.gamma.copy_(torch.rand(16, generator=generator) + 0.5)
        layer.beta.copy_(torch.randn(16, generator=generator))
    results = []
    for _ in range(2):
        x = torch.randn(64, 16, 16, 16, generator=generator) * 2 + 1
        x = x.contiguous(memory_format=memory_format).requires_grad_()
        upstream = torch.randn(64, 16, 16, 16, generator=generator)
        mask = (torch.rand(64, 16, 16, generator=generator) > 0.3).float() if masked else None
        y = layer(x, training=True, mask=mask)
        (y * upstream).sum().backward()
        results += [y.detach(), x.grad, layer.gamma.grad, layer.beta.grad]
        results += [layer.moving_mean.clone(), layer.moving_variance.clone()]
        layer.zero_grad(set_to_none=True)
    # Inference with gradients (frozen statistics, gamma and beta learning): the activation
    # runs in the kernel, whose elu does not depend on the thread count (torch's elu differs in
    # the last bit at its threads' chunk boundaries).
    x_inference = x.detach().clone().requires_grad_()
    y = layer(x_inference, training=False)
    (y * upstream).sum().backward()
    results += [y.detach(), x_inference.grad, layer.gamma.grad, layer.beta.grad]
    with torch.no_grad():
        results.append(layer(x.detach(), training=True))
        results.append(layer(x.detach(), training=False))
    return results


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has one thread")
@pytest.mark.parametrize(
    ("memory_format", "ghost", "masked"),
    [
        pytest.param(torch.contiguous_format, None, False, id="nchw"),
        pytest.param(torch.channels_last, None, False, id="channels_last"),
        pytest.param(torch.contiguous_format, 4, False, id="nchw-ghost"),
        pytest.param(torch.channels_last, None, True, id="channels_last-mask"),
    ],
)
@pytest.mark.parametrize(("name", "param"), [("relu", None), ("leaky_relu", 0.1), ("elu", 0.5)])
def test_thread_count_does_not_change_results(name, param, memory_format, ghost, masked):
    assert (
        blocks_for(64 * 16 * 16 * 16, 64, 16 * 16) > 1
    )  # several row blocks: the threaded kernels
    threads = torch.get_num_threads()
    try:
        one = threaded_run(1, name, param, memory_format, ghost, masked)
        two = threaded_run(2, name, param, memory_format, ghost, masked)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("name", "param"), [("elu", 0.5), ("leaky_relu", 0.1)])
def test_backwards_after_later_forwards_of_the_same_shape(name, param):
    # Outputs of 1 MiB or more reuse the memory of outputs nothing refers to; elu's fused
    # backward reads its output. Several forwards whose outputs only the graph keeps, then
    # their backwards, must give each forward's own gradients.
    reference = {"elu": F.elu, "leaky_relu": F.leaky_relu}[name]
    ours, plain = pair(16, 1, name, param, dtype=None)
    generator = torch.Generator().manual_seed(15)
    shape = (64, 16, 16, 16)  # 1 MiB of float32
    pending = []
    for step in range(3):
        x = torch.randn(shape, generator=generator) * (1 + step) + step
        upstream = torch.randn(shape, generator=generator)
        ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        loss = (ours(ours_x, training=True) * upstream).sum()
        expected = (reference(plain(plain_x, training=True), param) * upstream).sum()
        pending.append((loss, expected, ours_x, plain_x))
    for loss, expected, ours_x, plain_x in pending:
        loss.backward()
        expected.backward()
        close(ours_x.grad, plain_x.grad, 2e-5)


# ---------------------------------------------------------------------------- other paths
def _adjustment(shape):
    return (
        torch.tensor([1.3, 0.8, 1.1], dtype=torch.float64),
        torch.tensor([0.2, -0.1, 0.0], dtype=torch.float64),
    )


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(
            {"renorm": True, "renorm_clipping": {"rmin": 0.7, "rmax": 1.4, "dmax": 0.5}},
            id="renorm",
        ),
        pytest.param({"adjustment": _adjustment}, id="adjustment"),
        pytest.param({"use_global_stats": False}, id="use_global_stats-False"),
    ],
)
@pytest.mark.parametrize(("name", "param", "reference"), ACTIVATIONS)
def test_composed_paths_follow_the_oracle(options, name, param, reference):
    ours, plain = pair(3, -1, name, param, **options)
    generator = torch.Generator().manual_seed(11)
    for step in range(3):
        x = torch.randn(16, 3, generator=generator, dtype=torch.float64) * (1 + step) + step
        upstream = torch.randn(16, 3, generator=generator, dtype=torch.float64)
        ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(ours_x, training=True)
        expected = reference(plain(plain_x, training=True))
        close(y, expected, 1e-10)
        (y * upstream).sum().backward()
        (expected * upstream).sum().backward()
        close(ours_x.grad, plain_x.grad, 1e-10)
        close(ours.gamma.grad, plain.gamma.grad, 1e-10)
        close(ours.beta.grad, plain.beta.grad, 1e-10)
        assert_same_state(ours, plain, 1e-10)
        ours.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
    with torch.no_grad():
        close(ours(x, training=False), reference(plain(x, training=False)), 1e-10)


@pytest.mark.parametrize("layout", ["rows", "channels_last"])
@pytest.mark.parametrize(("name", "param", "reference"), ACTIVATIONS)
def test_float16_input_follows_the_oracle(layout, name, param, reference):
    # float32 parameters, float16 input and output: equal to float16 rounding.
    shape, axis, _ = LAYOUTS[layout]
    ours, plain = pair(shape[axis], axis, name, param, dtype=None)
    generator = torch.Generator().manual_seed(12)
    for step in range(2):
        x = make_input(layout, generator, step, torch.float32).half()
        upstream = torch.randn(shape, generator=generator).half()
        ours_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(ours_x, training=True)
        expected = reference(plain(plain_x, training=True))
        assert y.dtype == torch.float16
        close(y.float(), expected.float(), 2e-3)
        (y * upstream).float().sum().backward()
        (expected * upstream).float().sum().backward()
        assert ours_x.grad.dtype == torch.float16
        close(ours_x.grad.float(), plain_x.grad.float(), 4e-3)
        close(ours.gamma.grad, plain.gamma.grad, 4e-3)
        close(ours.beta.grad, plain.beta.grad, 4e-3)
        assert_same_state(ours, plain, 1e-6)
        ours.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
    with torch.no_grad():
        close(ours(x, training=False).float(), reference(plain(x, training=False)).float(), 2e-3)


# ---------------------------------------------------------------------------- in place
IN_PLACE = [
    pytest.param(None, None, id="none"),
    pytest.param("identity", None, id="identity"),
    pytest.param("leaky_relu", None, id="leaky_relu"),
    pytest.param("leaky_relu", 0.2, id="leaky_relu(0.2)"),
    pytest.param("elu", None, id="elu"),
    pytest.param("elu", 0.5, id="elu(0.5)"),
]


@pytest.mark.parametrize(
    ("layout", "ghost"),
    [("rows", None), ("nchw", None), ("channels_last", 2), ("ncl", 4)],
)
@pytest.mark.parametrize(("name", "param"), IN_PLACE)
def test_in_place_layer_matches_the_default_layer(layout, ghost, name, param):
    shape, axis, _ = LAYOUTS[layout]
    channels = shape[axis]
    in_place, _ = pair(channels, axis, name, param, virtual_batch_size=ghost, memory="in_place")
    default, _ = pair(channels, axis, name, param, virtual_batch_size=ghost)
    generator = torch.Generator().manual_seed(13)
    for step in range(3):
        source = make_input(layout, generator, step)
        upstream = torch.randn(shape, generator=generator, dtype=torch.float64)
        leaf, default_x = source.clone().requires_grad_(), source.clone().requires_grad_()
        x = leaf * 1  # not a leaf: in-place training may overwrite it
        y = in_place(x, training=True)
        expected = default(default_x, training=True)
        assert y.data_ptr() == x.data_ptr() and y.stride() == x.stride()
        assert torch.equal(x.detach(), y.detach())  # x now holds the output
        close(y, expected, 1e-10)
        (y * upstream).sum().backward()
        (expected * upstream).sum().backward()
        close(leaf.grad, default_x.grad, 1e-8)
        close(in_place.gamma.grad, default.gamma.grad, 1e-8)
        close(in_place.beta.grad, default.beta.grad, 1e-8)
        assert_same_state(in_place, default, 1e-10)
        in_place.zero_grad(set_to_none=True)
        default.zero_grad(set_to_none=True)
    source = make_input(layout, generator, 3)
    x = source.clone()
    with torch.no_grad():
        y = in_place(x, training=True)
        assert y.data_ptr() == x.data_ptr()
        close(y, default(source, training=True), 1e-10)
    assert_same_state(in_place, default, 1e-10)
    # Inference is not affected: the input stays.
    for call in (
        lambda x: in_place(x, training=False),
        lambda x: in_place.eval()(x),
    ):
        x = source.clone()
        y = call(x)
        assert y.data_ptr() != x.data_ptr() and torch.equal(x, source)
        close(y, default(source, training=False), 1e-10)
    in_place.train()
    in_place.trainable = False
    x = source.clone()
    y = in_place(x, training=True)
    assert torch.equal(x, source)
    close(y, default(source, training=False), 1e-10)


def test_in_place_input_needed_elsewhere_fails_at_backward():
    layer = BatchNormalization(3, axis=1, activation="elu", memory="in_place")
    leaf = torch.randn(8, 3, 4, requires_grad=True)
    x = leaf * 1
    other = x.sin()  # sin saves x for its backward
    y = layer(x, training=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y.sum() + other.sum()).backward()


def test_output_modified_in_place_before_the_backward_is_refused():
    # elu's fused backward reads its output: changing it must not give a wrong gradient.
    layer = BatchNormalization(3, activation="elu")
    x = torch.randn(16, 3, requires_grad=True)
    for _ in range(2):
        y = layer(x, training=True)
        y.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


# ---------------------------------------------------------------------------- arguments, config
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"activation": "gelu"},
            r"`activation` must be None or one of \['identity', 'relu', 'leaky_relu', 'elu'\]\. "
            r"Received: activation='gelu'",
        ),
        ({"activation": "ReLU"}, r"Received: activation='ReLU'"),
        (
            {"activation": "relu", "activation_param": 0.1},
            r"`activation_param` does not apply to activation='relu'\. "
            r"Received: activation_param=0\.1",
        ),
        (
            {"activation": "identity", "activation_param": 1.0},
            r"does not apply to activation='identity'",
        ),
        (
            {"activation": "elu", "activation_param": 0.0},
            r"`activation_param` \(elu's alpha\) must be > 0\. Received: activation_param=0\.0",
        ),
        ({"activation": "elu", "activation_param": -1.0}, r"Received: activation_param=-1\.0"),
        (
            {"activation": "leaky_relu", "activation_param": float("inf")},
            r"`activation_param` must be a finite number for activation='leaky_relu'",
        ),
        ({"activation": "leaky_relu", "activation_param": True}, r"must be a finite number"),
        ({"activation": "elu", "activation_param": "1.0"}, r"must be a finite number"),
        (
            {"activation_param": 0.1},
            r"`activation_param` needs an `activation`\. "
            r"Received: activation=None, activation_param=0\.1",
        ),
        (
            {"memory": "x"},
            r"`memory` must be 'default' or 'in_place'\. Received: memory='x'",
        ),
        (
            {"memory": "in_place", "activation": "relu"},
            r"memory='in_place' .* 'relu' .* is not invertible.* Received: activation='relu'",
        ),
        (
            {"memory": "in_place", "activation": "leaky_relu", "activation_param": 0.0},
            r"'leaky_relu' \(with activation_param=0\.0\) is not invertible",
        ),
        (
            {"memory": "in_place", "activation": "leaky_relu", "activation_param": -0.2},
            r"'leaky_relu' \(with activation_param=-0\.2\) is not invertible",
        ),
        (
            {"memory": "in_place", "synchronized": True},
            r"memory='in_place' does not combine with `synchronized=True` .*"
            r"Received: synchronized=True",
        ),
    ],
)
@pytest.mark.parametrize("num_features", [3, None])
def test_bad_arguments_raise_at_construction(kwargs, match, num_features):
    with pytest.raises(ValueError, match=match):
        BatchNormalization(num_features, **kwargs)
    config = BatchNormalization(3).get_config()
    with pytest.raises(ValueError, match=match):
        BatchNormalization.from_config({**config, **kwargs})


def test_config_round_trip_with_the_new_keys():
    layer = BatchNormalization(
        4, axis=1, activation="leaky_relu", activation_param=0.2, memory="in_place"
    )
    config = layer.get_config()
    assert (config["activation"], config["activation_param"], config["memory"]) == (
        "leaky_relu",
        0.2,
        "in_place",
    )
    rebuilt = BatchNormalization.from_config(json.loads(json.dumps(config)))
    assert rebuilt.get_config() == config
    assert (rebuilt.activation, rebuilt.activation_param, rebuilt.memory) == (
        "leaky_relu",
        0.2,
        "in_place",
    )
    rebuilt.load_state_dict(layer.state_dict())
    source = torch.randn(8, 4, 3) - 1
    close(rebuilt(source.clone(), training=True), layer(source.clone(), training=True), 0)
    plain = BatchNormalization(4, axis=1)
    plain.load_state_dict(rebuilt.state_dict())
    with torch.no_grad():
        inferred = rebuilt(source, training=False)
        close(inferred, F.leaky_relu(plain(source, training=False), 0.2), 1e-6)
        assert (inferred < 0).any()
    # Parameters left at their default are not written.
    elu = BatchNormalization(4, activation="elu").get_config()
    assert elu["activation"] == "elu" and "activation_param" not in elu and "memory" not in elu
    assert BatchNormalization.from_config(elu).activation_param is None
    in_place = BatchNormalization(4, memory="in_place").get_config()
    assert in_place["memory"] == "in_place" and "activation" not in in_place


def test_config_without_the_new_keys_loads_as_before():
    config = BatchNormalization(4, axis=1).get_config()
    assert not {"activation", "activation_param", "memory"} & set(config)
    layer = BatchNormalization.from_config(config)
    assert (layer.activation, layer.activation_param, layer.memory) == (None, None, "default")
    assert layer.get_config() == config
    x = torch.randn(8, 4, 3) - 2
    # Without an activation the output keeps its negative values (nothing was applied).
    assert (layer(x, training=True) < 0).any()


def test_repr_shows_the_new_arguments_when_set():
    assert repr(
        BatchNormalization(
            4, axis=1, activation="leaky_relu", activation_param=0.2, memory="in_place"
        )
    ) == (
        "BatchNormalization(num_features=4, axis=1, momentum=0.99, epsilon=0.001, "
        "activation='leaky_relu', activation_param=0.2, memory='in_place')"
    )
    assert repr(BatchNormalization(4, activation="elu")).endswith(
        "epsilon=0.001, activation='elu')"
    )
    shown = repr(BatchNormalization(4))
    assert "activation" not in shown and "memory" not in shown


def test_refused_calls_change_nothing():
    layer = BatchNormalization(3, axis=1, momentum=0.5, activation="elu", memory="in_place")
    layer(torch.randn(8, 3, 4) * 2 + 1, training=True)  # a state that is not the initial one

    def snapshot():
        return {k: v.clone() for k, v in layer.state_dict().items()}

    def unchanged(before):
        after = layer.state_dict()
        return all(torch.equal(v, after[k]) for k, v in before.items())

    source = torch.randn(8, 3, 4)
    before = snapshot()
    leaf = source.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"must not be a leaf that requires grad"):
        layer(leaf, training=True)
    assert torch.equal(leaf.detach(), source) and unchanged(before)
    with pytest.raises(ValueError, match=r"`mask` must have the shape of `x`"):
        layer(source * 1, training=True, mask=torch.ones(8, 5))
    assert unchanged(before)
    with torch.no_grad():
        layer.gamma[1] = 0.0
    before = snapshot()
    x = source.clone()
    with pytest.raises(ValueError, match=r"every gamma must be nonzero"):
        layer(x, training=True)
    assert torch.equal(x, source) and unchanged(before)
    # A failed first call of an unbuilt layer leaves it unbuilt.
    lazy = BatchNormalization(axis=1, activation="leaky_relu", memory="in_place")
    with pytest.raises(ValueError, match=r"must not be a leaf that requires grad"):
        lazy(source.clone().requires_grad_(), training=True)
    assert not lazy.built and lazy.num_features is None


def test_state_dict_round_trip_of_a_layer_with_an_activation():
    trained, _ = pair(4, 1, "elu", 0.5, momentum=0.5)
    for step in range(2):
        trained(torch.randn(8, 4, 3, dtype=torch.float64) + step, training=True)
    state = trained.state_dict()
    assert set(state) == set(BatchNormalization(4, axis=1).state_dict())  # no new entries
    x = torch.randn(8, 4, 3, dtype=torch.float64) - 1
    for loaded in (
        BatchNormalization(4, axis=1, dtype="float64", activation="elu", activation_param=0.5),
        BatchNormalization(axis=1, dtype="float64", activation="elu", activation_param=0.5),
        copy.deepcopy(trained),
    ):
        loaded.load_state_dict(state)
        with torch.no_grad():
            expected = trained(x, training=False)
            assert torch.equal(loaded(x, training=False), expected)
            assert (expected < 0).any() and (expected >= -0.5).all()
    plain = BatchNormalization(4, axis=1, dtype="float64")
    plain.load_state_dict(state)
    with torch.no_grad():
        close(trained(x, training=False), F.elu(plain(x, training=False), 0.5), 1e-12)


def test_activation_assigned_after_construction_is_what_the_layer_computes():
    layer = BatchNormalization(3)
    x = torch.randn(16, 3)
    layer(x, training=True)
    layer.activation = "relu"
    assert "activation='relu'" in repr(layer) and layer.get_config()["activation"] == "relu"
    assert (layer(x, training=False) >= 0).all()


def test_assigned_settings_are_checked_and_a_refused_one_changes_nothing():
    layer = BatchNormalization(3, activation="leaky_relu", activation_param=0.2)
    with pytest.raises(ValueError, match="`activation` must be None or one of"):
        layer.activation = "gelu"
    with pytest.raises(ValueError, match="does not apply to activation='relu'"):
        layer.activation = "relu"  # the slope 0.2 stays given
    with pytest.raises(ValueError, match="not invertible"):
        layer.activation_param = 0.0
        layer.memory = "in_place"
    assert (layer.activation, layer.activation_param) == ("leaky_relu", 0.0)
    assert layer.memory == "default"
    layer.activation_param = 0.2
    layer.memory = "in_place"
    x = torch.randn(8, 3) * 1.0
    y = layer(x, training=True)
    assert y.data_ptr() == x.data_ptr()
    assert bool((y < 0).any())  # leaky_relu with slope 0.2 applied


@pytest.mark.parametrize(
    ("name", "param", "reference"),
    [
        pytest.param("leaky_relu", 0.2, lambda z: F.leaky_relu(z, 0.2), id="leaky_relu(0.2)"),
        pytest.param("elu", 0.5, lambda z: F.elu(z, 0.5), id="elu(0.5)"),
        pytest.param("relu", None, F.relu, id="relu"),
    ],
)
def test_fold_keeps_the_activation(name, param, reference):
    torch.manual_seed(14)
    norm = BatchNormalization(6, axis=1, epsilon=1e-5, activation=name, activation_param=param)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm)
    with torch.no_grad():
        norm.moving_mean.copy_(torch.randn(6))
        norm.moving_variance.copy_(torch.rand(6) * 2 + 0.3)
        norm.gamma.copy_(torch.randn(6))
        norm.beta.copy_(torch.randn(6))
    model.eval()
    plain = BatchNormalization(6, axis=1, epsilon=1e-5).eval()
    plain.load_state_dict(norm.state_dict())
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
        without_activation = plain(model[0](x))
        close(expected, reference(without_activation), 1e-6)
        result = fold(model, x)
        assert result.folded == [("0", "1")]
        got = result.model(x)
    close(got, expected, 1e-5)
    assert not torch.allclose(got, without_activation, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_fused_elu_parameter_gradients_on_half_precision_against_float64(dtype, training):
    """elu's derivative below 0, ``alpha * exp(z)``, is not read as ``y + alpha`` from a half
    output: at z ~ -6 a bfloat16 y is one ulp (3.9e-3) from -alpha where the derivative is
    2.5e-3, and gamma's gradient was 194% off (float16 32%). The reference is float64 on the
    same half values."""
    torch.manual_seed(0)
    x = torch.randn(4096, 2, dtype=torch.float64).to(dtype)
    dy = torch.randn(4096, 2, dtype=torch.float64).to(dtype)
    gamma, beta = torch.tensor([1.0, 1.0]), torch.tensor([-4.0, -6.0])
    wide = x.double().requires_grad_()
    wide_gamma = gamma.double().requires_grad_()
    wide_beta = beta.double().requires_grad_()
    mean, variance = wide.mean(0), wide.var(0, unbiased=False)
    z = (wide - (mean if training else mean.detach())) / torch.sqrt(
        (variance if training else variance.detach()) + 1e-3
    ) * wide_gamma + wide_beta
    F.elu(z).backward(dy.double())

    layer = BatchNormalization(2, activation="elu")
    with torch.no_grad():
        layer.gamma.copy_(gamma)
        layer.beta.copy_(beta)
        layer.moving_mean.copy_(mean.detach())
        layer.moving_variance.copy_(variance.detach())
    layer(x.clone().requires_grad_(), training=training).backward(dy)
    torch.testing.assert_close(layer.gamma.grad.double(), wide_gamma.grad, rtol=2e-2, atol=0)
    torch.testing.assert_close(layer.beta.grad.double(), wide_beta.grad, rtol=2e-2, atol=0)
