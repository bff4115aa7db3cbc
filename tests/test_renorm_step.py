"""Batch Renormalization's training step in one kernel call (issue 12): the layer's CPU path
against a float64 NumPy reference (SEMANTICS.md 10) and against the composed torch-op path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import BatchNormalization
from batchnorm.functional._cpu_training_call import TrainingCall
from tests.backends import assert_equal_to_reference, torch_ops_and_kernels
from tests.numpy_reference import reference_renorm_step

STATE = ("moving_mean", "moving_stddev", "moving_variance", "renorm_mean", "renorm_stddev")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("shape", "clipping"),
    [
        ((32, 6), {}),
        ((32, 6), {"rmin": 0.8, "rmax": 1.1, "dmax": 0.2}),
        ((4, 5, 7, 6), {"rmax": 1.5}),  # rows of channels last
        ((1 << 15, 16), {"dmax": 0.5}),  # threaded row blocks
    ],
)
def test_two_renorm_steps_follow_the_numpy_reference(shape, clipping, dtype):
    generator = torch.Generator().manual_seed(1)
    channels = shape[-1]
    layer = BatchNormalization(
        channels,
        renorm=True,
        renorm_clipping=clipping,
        renorm_momentum=0.7,
        momentum=0.6,
        dtype=dtype,
    )
    with torch.no_grad():
        layer.gamma.uniform_(0.5, 1.5, generator=generator)
        layer.beta.uniform_(-1, 1, generator=generator)
    state = {name: getattr(layer, name).double().numpy().copy() for name in STATE}
    for step in range(2):  # the second step's r and d come from the first step's renorm stats
        x = (torch.randn(shape, generator=generator) * (2 + step) + 3 - step).to(dtype)
        upstream = torch.randn(shape, generator=generator).to(dtype)
        x_grad = x.clone().requires_grad_()
        layer.gamma.grad = layer.beta.grad = None
        y = layer(x_grad, training=True)
        y.backward(upstream)
        expected = reference_renorm_step(
            x.double().numpy(),
            upstream.double().numpy(),
            state,
            layer.gamma.detach().double().numpy(),
            layer.beta.detach().double().numpy(),
            momentum=0.6,
            renorm_momentum=0.7,
            epsilon=1e-3,
            clipping=clipping,
        )
        y_ref, dx_ref, dgamma_ref, dbeta_ref, state = expected
        tolerance = {"rtol": 1e-11, "atol": 1e-11} if dtype == torch.float64 else {}
        for ours, reference in (
            (y.detach().reshape(-1, channels), y_ref),
            (x_grad.grad.reshape(-1, channels), dx_ref),
            (layer.gamma.grad, dgamma_ref),
            (layer.beta.grad, dbeta_ref),
            *((getattr(layer, name), state[name]) for name in STATE),
        ):
            assert ours.dtype == dtype
            torch.testing.assert_close(
                ours, torch.from_numpy(np.asarray(reference)).to(dtype), **tolerance
            )


OPTIONS = [
    {},
    {"moving_average": "debiased"},
    {"moving_variance_estimator": "unbiased"},
    {"virtual_batch_size": 4},
    {"center": False},
    {"scale": False},
    {"activation": "elu"},
    {"activation": "leaky_relu", "activation_param": 0.1},
    {"fused": False, "mask": True},
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.items())) or "plain")
@pytest.mark.parametrize(("shape", "axis"), [((16, 6), -1), ((8, 5, 6), 1)])
def test_one_call_renorm_equals_the_torch_op_path(shape, axis, options):
    """Three float64 steps with gradients and second-order gradients; the clipping is tightened
    in place before the third, as a schedule would (read on every call, as tf-keras does)."""
    options = dict(options)
    masked = options.pop("mask", False)
    generator = torch.Generator().manual_seed(2)
    inputs = [
        torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1 for _ in range(3)
    ]
    upstream = torch.randn(shape, generator=generator, dtype=torch.float64)
    mask = None
    if masked:
        kept = [size for i, size in enumerate(shape) if i != axis % len(shape)]  # one per position
        mask = torch.rand(kept, generator=generator) > 0.3

    def run():
        layer = BatchNormalization(
            shape[axis],
            axis=axis,
            renorm=True,
            renorm_clipping={"rmax": 3.0, "dmax": 5.0},
            renorm_momentum=0.5,
            momentum=0.7,
            dtype=torch.float64,
            **options,
        )
        outputs = []
        for step, x in enumerate(inputs):
            if step == 2:
                layer.renorm_clipping["rmax"] = 1.0
                layer.renorm_clipping["dmax"] = 0.1
            x_grad = x.clone().requires_grad_()
            y = layer(x_grad, training=True, mask=mask)
            wanted = [x_grad, *layer.parameters()]
            first = torch.autograd.grad((y * upstream).sum(), wanted, create_graph=True)
            second = torch.autograd.grad(
                sum((g * g).sum() for g in first), wanted, allow_unused=True
            )
            outputs += [y.detach(), *(g.detach() for g in first)]
            outputs += [torch.zeros(()) if g is None else g for g in second]
        return [*outputs, *(buffer.clone() for buffer in layer.buffers())]

    reference, ours = torch_ops_and_kernels(run)
    assert_equal_to_reference(ours, reference, 1e-12)


def test_renorm_training_is_one_kernel_call(monkeypatch):
    """Renorm steps take the one-call kernel path (the composed path ran two kernels and two
    dozen torch ops, 9x a plain step on small inputs), with and without a mask."""
    steps = []
    original = TrainingCall.forward

    def spy(self, *arguments, **options):
        steps.append(self.renorm is not None)
        return original(self, *arguments, **options)

    monkeypatch.setattr(TrainingCall, "forward", spy)
    layer = BatchNormalization(8, renorm=True)
    x = torch.randn(16, 8, requires_grad=True)
    layer(x, training=True).sum().backward()
    layer(x, training=True, mask=torch.rand(16) > 0.5).sum().backward()
    with torch.no_grad():
        layer(x, training=True)
    assert steps == [True, True, True]
