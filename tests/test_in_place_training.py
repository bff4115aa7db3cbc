"""The layer's one-call training step (moving statistics stepped in place) against the stateless step.

The stateless :func:`batchnorm.functional.batch_norm` runs the moments, the moving-average
arithmetic (torch ops) and the normalisation as separate calls; the layer's plain training steps
take :mod:`batchnorm.functional._direct_step`. Both must agree to rounding: the kernels
share their loops, but the compiler may contract (fuse multiply-adds) differently in each; the
moving statistics are float64 arithmetic rounded once, against torch ops rounded at each step.

The update is one step per layer at a time: threads training one layer lose no update.
"""

from __future__ import annotations

import threading

import pytest
import torch

from batchnorm import BatchNormalization
from batchnorm.functional import BatchNormStatistics, batch_norm
from tests.backends import torch_ops_and_kernels

CASES = [
    # shape, axis, layer options, mask
    ((32, 64), -1, {}, False),
    ((6, 5, 7, 3), 1, {}, False),
    ((6, 7, 3, 5), -1, {"moving_variance_estimator": "unbiased"}, False),
    ((8, 10, 4), -1, {"virtual_batch_size": 2}, False),
    ((8, 5, 9), 1, {"virtual_batch_size": 4, "moving_average": "debiased"}, False),
    ((4, 12, 6), -1, {"fused": False}, True),
    ((64, 40, 110), 1, {"moving_average": "debiased", "momentum": 1.0}, False),  # threaded
    ((600, 600), -1, {}, False),  # threaded, rows
]


def close(actual, expected, ulp):
    # A few roundings of values of the size of the largest one.
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=4 * ulp, atol=8 * ulp * scale)


def _stateless(layer: BatchNormalization, x, mask, statistics):
    average = layer.moving_average_weight if layer.moving_average == "debiased" else None
    state = BatchNormStatistics(
        statistics.moving_mean.clone(),
        statistics.moving_variance.clone(),
        moving_average_weight=None if average is None else average.clone(),
    )
    y, new = batch_norm(
        x,
        state,
        layer.gamma,
        layer.beta,
        axis=layer.axis,
        training=True,
        momentum=layer.momentum,
        epsilon=layer.epsilon,
        moving_variance_estimator="unbiased" if layer._stores_unbiased_variance() else "biased",
        virtual_batch_size=layer.virtual_batch_size,
        mask=mask,
    )
    return y, new


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("shape", "axis", "options", "masked"), CASES)
def test_in_place_step_matches_the_stateless_step(shape, axis, options, masked, dtype):
    torch.manual_seed(0)
    channels = shape[axis]
    layer = BatchNormalization(
        channels, axis=axis, momentum=options.pop("momentum", 0.7), dtype=dtype, **options
    )
    with torch.no_grad():
        layer.gamma.copy_(torch.rand(channels) + 0.5)
        layer.beta.copy_(torch.randn(channels))
    x = (torch.randn(shape) * 2 + 3).to(dtype)
    mask = None
    if masked:
        mask = (torch.rand(shape[:-1]) > 0.3).to(dtype)
    upstream = torch.randn(shape).to(dtype)
    layer.build(shape)  # resolves fused=None, and with it the stored variance estimator
    for _ in range(2):  # the second step starts from stepped statistics (and weight)
        before = layer.statistics()
        before = BatchNormStatistics(*(None if t is None else t.clone() for t in before))
        expected_y, expected = _stateless(layer, x, mask, before)
        x_ours = x.clone().requires_grad_()
        y = layer(x_ours, training=True, mask=mask)
        ulp = torch.finfo(dtype).eps
        close(y, expected_y, ulp)
        torch.testing.assert_close(
            layer.moving_mean, expected.moving_mean, rtol=2 * ulp, atol=4 * ulp
        )
        torch.testing.assert_close(
            layer.moving_variance, expected.moving_variance, rtol=2 * ulp, atol=0
        )
        if expected.moving_average_weight is not None:
            torch.testing.assert_close(
                layer.moving_average_weight, expected.moving_average_weight, rtol=ulp, atol=0
            )
        # Gradients: the same sums in the same order as the stateless step's two kernels.
        x_ref = x.clone().requires_grad_()
        gamma = layer.gamma.detach().clone().requires_grad_()
        beta = layer.beta.detach().clone().requires_grad_()
        y_ref, _ = batch_norm(
            x_ref,
            before,
            gamma,
            beta,
            axis=layer.axis,
            training=True,
            momentum=layer.momentum,
            epsilon=layer.epsilon,
            virtual_batch_size=layer.virtual_batch_size,
            mask=mask,
        )
        y_ref.backward(upstream)
        layer.zero_grad()
        y.backward(upstream)
        close(x_ours.grad, x_ref.grad, ulp)
        close(layer.gamma.grad, gamma.grad, ulp)
        close(layer.beta.grad, beta.grad, ulp)


def test_a_graph_that_saved_the_buffers_sees_the_in_place_step():
    # Inference saves the moving statistics for its backward; a training step then changes them
    # in place through NumPy. Autograd must notice, as it does for torch's own in-place ops.
    layer = BatchNormalization(4)
    x = torch.randn(8, 4, requires_grad=True)
    y_inference = layer(x, training=False)
    layer(torch.randn(8, 4), training=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y_inference.sum().backward()


def test_double_backward_through_the_in_place_step():
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    layer = BatchNormalization(3, dtype="float64")

    def through_layer(inputs):
        return layer(inputs, training=True)

    assert torch.autograd.gradgradcheck(through_layer, (x,))


def test_settings_and_buffers_changed_between_calls_take_effect():
    # The layer remembers its step options, statistics and accepted input between calls: each
    # must follow a change of attribute, of dtype (new buffers) and of input shape.
    torch.manual_seed(0)
    layer = BatchNormalization(3, momentum=0.9)
    layer(torch.randn(8, 3), training=True)
    layer.momentum = 0.0
    x = torch.randn(8, 3) + 5
    layer(x, training=True)
    torch.testing.assert_close(layer.moving_mean, x.mean(0))
    layer.to(torch.float64)
    x64 = torch.randn(5, 3, dtype=torch.float64) - 2
    layer(x64, training=True)
    assert layer.moving_mean.dtype == torch.float64
    torch.testing.assert_close(layer.moving_mean, x64.mean(0))
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(5, 4, dtype=torch.float64), training=True)


def _train_from_threads(layer, x, calls, threads, mask=None):
    barrier = threading.Barrier(threads)

    def train():
        barrier.wait()
        for _ in range(calls):
            layer(x, training=True, mask=mask)

    workers = [threading.Thread(target=train) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


THREADED_CASES = [
    # shape, layer options, input dtype, mask: the direct calls, the in-place step, the
    # threaded kernels and the one-call step's variants (renorm, half-precision input, a mask)
    ((32, 6), {}, torch.float32, False),
    ((64, 4096), {}, torch.float32, False),
    ((16, 6), {"renorm": True}, torch.float32, False),
    ((16, 6), {}, torch.bfloat16, False),
    ((16, 5, 6), {"fused": False}, torch.float32, True),
]


@pytest.mark.parametrize(("shape", "options", "dtype", "masked"), THREADED_CASES)
def test_two_threads_training_one_layer_lose_no_update(shape, options, dtype, masked):
    # Every call sees the same batch, so the result does not depend on the order of the calls:
    # 2 threads x N calls must equal 2N calls on one thread. A lost update shows as a shorter
    # exponential average (momentum 0.999) and a smaller batch count (the debiased average with
    # momentum 1 counts batches in moving_average_weight).
    calls = 1000 if shape[0] * shape[-1] < 10_000 else 300
    torch.manual_seed(0)
    x = (torch.randn(shape) + 3).to(dtype)
    mask = (torch.rand(shape[:-1]) > 0.3).float() if masked else None
    for average, momentum in (("ema", 0.999), ("debiased", 1.0)):
        threaded, serial = (
            BatchNormalization(shape[-1], momentum=momentum, moving_average=average, **options)
            for _ in range(2)
        )
        _train_from_threads(threaded, x, calls, threads=2, mask=mask)
        _train_from_threads(serial, x, 2 * calls, threads=1, mask=mask)
        torch.testing.assert_close(threaded.moving_mean, serial.moving_mean, rtol=0, atol=0)
        torch.testing.assert_close(threaded.moving_variance, serial.moving_variance, rtol=0, atol=0)
        if average == "debiased":
            assert threaded.moving_average_weight.item() == 2 * calls


@pytest.mark.parametrize(
    ("dtype", "alpha", "beta"),
    [
        (torch.float32, 0.85, -18.0),  # -alpha rounds below alpha in float32
        (torch.float32, 1.7, -30.0),
        (torch.bfloat16, 0.2, -3.0),  # half precision saturates at moderate z
        (torch.float16, 0.3, -6.0),
    ],
)
def test_in_place_elu_backward_through_saturated_outputs_is_finite(dtype, alpha, beta):
    """Where elu's output rounded to exactly -alpha and that is below alpha in x's dtype,
    ``y / alpha`` fell below -1 and the inverse's log1p gave NaN, which filled the channel's
    dx and dgamma (kernels and torch ops); ``memory="default"`` was finite. Now both memories
    agree, on both backends."""
    torch.manual_seed(0)
    x = (torch.randn(32, 4, 3, 3) * 2).to(dtype)

    def gradients(memory):
        layer = BatchNormalization(
            4, axis=1, activation="elu", activation_param=alpha, memory=memory, fused=False
        )
        with torch.no_grad():
            layer.beta.copy_(torch.tensor([beta, beta / 3, 0.0, beta]))
        source = x.clone().requires_grad_()
        y = layer(source * 1, training=True)
        weights = torch.linspace(-1, 1, y.numel()).view_as(y).to(dtype)
        return list(torch.autograd.grad(y, [source, layer.gamma, layer.beta], weights))

    for backend_results in torch_ops_and_kernels(
        lambda: gradients("in_place") + gradients("default")
    ):
        in_place, default = backend_results[:3], backend_results[3:]
        for ours, expected in zip(in_place, default, strict=True):
            assert torch.isfinite(ours).all()
            tolerance = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(
                ours.float(), expected.float(), rtol=tolerance, atol=tolerance * 10
            )


@pytest.mark.parametrize("activation", ["leaky_relu", "elu", None])
def test_in_place_double_backward_raises_on_every_path(activation):
    torch.manual_seed(0)

    def second_order(layer, x):
        y = layer(x * 1, training=True)
        (dx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(dx.square().sum(), x)

    def run():
        layer = BatchNormalization(6, activation=activation, memory="in_place", dtype="float64")
        x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
        with pytest.raises(RuntimeError, match="no double backward"):
            second_order(layer, x)
        return []

    torch_ops_and_kernels(run)  # the composed path's backward recorded a wrong graph
    layer = BatchNormalization(axis=[1, 3], memory="in_place", dtype="float64")  # x copied
    x = torch.randn(4, 3, 2, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        second_order(layer, x)


def test_half_precision_in_place_on_the_torch_ops_overwrites_x_with_the_default_gradients():
    from batchnorm.functional import register_backend
    from batchnorm.functional._cpu_backend import NUMBA_CPU

    torch.manual_seed(0)
    source = torch.randn(16, 8, 4, 4) * 2 + 1
    results = {}
    register_backend("cpu", None)
    try:
        for memory in ("default", "in_place"):
            torch.manual_seed(1)
            layer = BatchNormalization(8, axis=1, activation="leaky_relu", memory=memory)
            leaf = source.clone().requires_grad_()
            x = leaf.to(torch.bfloat16)  # a non-leaf half input requiring grad
            y = layer(x, training=True)
            if memory == "in_place":
                assert y.data_ptr() == x.data_ptr()  # written over x, not a float32 copy
            y.float().mul(torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
            results[memory] = (y.detach().float(), leaf.grad, layer.gamma.grad, layer.beta.grad)
    finally:
        register_backend("cpu", NUMBA_CPU)
    for ours, reference in zip(results["in_place"], results["default"], strict=True):
        torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2)


def test_in_place_layers_run_under_fake_tensor_mode_and_on_the_meta_device():
    from torch._subclasses.fake_tensor import FakeTensorMode

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), BatchNormalization(4, axis=1, memory="in_place")
    ).train()
    model(torch.randn(8, 3, 8, 8))
    # Fake and meta tensors have no storage address (0 for all): every input read as saved
    # by its producer, and gamma's zero check read a value they do not have.
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        assert model(mode.from_tensor(torch.randn(8, 3, 8, 8))).shape == (8, 4, 6, 6)
    with torch.device("meta"):
        dry = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), BatchNormalization(4, axis=1, memory="in_place")
        ).train()
        assert dry(torch.randn(8, 3, 8, 8)).shape == (8, 4, 6, 6)


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_a_traced_in_place_layer_runs_and_saves():
    """torch.jit.trace records the torch ops, as for memory="default" (the README's promise): it
    recorded the in-place autograd.Function as a Python op, which the traced module could
    neither run ("not supported in the JIT") nor save."""
    import io

    torch.manual_seed(0)
    in_place = BatchNormalization(4, activation="leaky_relu", memory="in_place")
    default = BatchNormalization(4, activation="leaky_relu")
    x = torch.randn(8, 4)
    traced = torch.jit.trace(in_place, (x.clone(),), check_trace=False)
    reference = torch.jit.trace(default, (x.clone(),), check_trace=False)
    torch.testing.assert_close(traced(x.clone()), reference(x.clone()))
    torch.testing.assert_close(in_place.moving_mean, default.moving_mean)
    torch.jit.save(traced, io.BytesIO())
