"""Channels-last rows of a few channels, read as virtual rows (batchnorm.kernels._narrow_rows),
against the composed torch-op path in float64 and the plain float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import BatchNormalization, kernels
from batchnorm.functional._cpu_plan import prepare
from batchnorm.kernels._narrow_rows import NARROW_CHANNELS, VIRTUAL_WIDTH
from tests.backends import assert_equal_to_reference, torch_ops_and_kernels
from tests.numpy_reference import reference_train_step

SHAPES = [
    (2, 3),  # fewer rows than one virtual row: all left over
    (37, 3),  # 21 rows per virtual row, 16 left over
    (4, 5, 6, 3),
    (1000, 5),
    (50, NARROW_CHANNELS - 1),
    (33007, 5),  # threaded row blocks, rows left over in each
    (8, 56, 56, 3),  # an RGB image batch stored channels last, threaded
    (1 << 16, 8),  # 8 rows per virtual row exactly
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", [None, "elu"])
def test_narrow_rows_equal_the_torch_op_path(shape, activation):
    """Training forward and backward, inference and its backward, the buffers: float64 results
    equal the composed torch ops' to 1e-12."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 50
    upstream = torch.randn(shape, generator=generator, dtype=torch.float64)

    def run():
        layer = BatchNormalization(
            shape[-1], momentum=0.5, dtype=torch.float64, activation=activation
        )
        outputs = []
        for training in (True, False, True):
            x_grad = x.clone().requires_grad_()
            y = layer(x_grad, training=training)
            y.backward(upstream)
            outputs += [y.detach(), x_grad.grad, layer.gamma.grad, layer.beta.grad]
            layer.gamma.grad = layer.beta.grad = None
        return [*outputs, layer.moving_mean.clone(), layer.moving_variance.clone()]

    reference, ours = torch_ops_and_kernels(run)
    assert_equal_to_reference(ours, reference, 1e-12)


@pytest.mark.parametrize("channels", [1, 2, 3, 7, NARROW_CHANNELS - 1])
def test_narrow_rows_in_float32_follow_the_float64_reference(channels):
    """float32 data with a mean far from 0 (|mean| / std = 1e4): the moments still come out of
    float64 sums with the per-channel shift, tiled across the virtual row."""
    rng = np.random.default_rng(channels)
    rows = 3 * VIRTUAL_WIDTH + 5
    x = (rng.normal(0.0, 1.0, (rows, channels)) + 1e4).astype(np.float32)
    layer = BatchNormalization(channels, momentum=0.0)
    y = layer(torch.from_numpy(x), training=True)
    expected, mean, variance = reference_train_step(
        x, np.zeros(channels), np.ones(channels), None, None, axes=(1,), momentum=0.0, epsilon=1e-3
    )
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-7)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-5)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-4, atol=1e-4)


def test_narrow_and_rows_builds_agree_on_ghost_batches():
    """The narrow build's block helpers take any ghost-batch grouping, run by run of rows of one
    group (the layer sends ghost batches to the rows build, but a direct kernel call on narrow
    rows takes the narrow one): every pass equals the rows build's in float64, and the moments
    the per-group float64 reference."""
    rng = np.random.default_rng(5)
    rows, channels, groups, period = 1003, 3, 4, 7  # row o is in group (o // 7) % 4
    x = rng.normal(20.0, 3.0, (rows, channels, 1))
    dy = rng.normal(0.0, 1.0, (rows, channels, 1))
    scale, offset = rng.normal(1.0, 0.1, channels), rng.normal(0.0, 0.1, channels)
    no_weights = np.zeros((1, 1))
    group_of_row = (np.arange(rows) // period) % groups

    def passes(build: str) -> list[np.ndarray]:
        moments = kernels.batch_moments.for_layout(build).serial
        mean, variance, total = moments(x, no_weights, None, groups, period, 1)
        sums = kernels.gradient_sums.for_layout(build).serial(dy, x, mean, groups, period, 1)
        y = np.empty_like(x)
        kernels.affine_normalize.for_layout(build).serial(
            x, mean, variance, scale, offset, 1e-3, groups, period, 1, y, None, 0.0
        )
        dx = np.empty_like(x)
        kernels.batch_norm_input_gradient.for_layout(build).serial(
            dy,
            x,
            no_weights,
            None,
            mean,
            variance,
            total,
            scale,
            sums,
            1e-3,
            groups,
            period,
            1,
            dx,
        )
        return [mean, variance, total, sums, y, dx]

    narrow, wide = passes("narrow"), passes("rows")
    for ours, theirs in zip(narrow, wide, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    for g in range(groups):
        values = x[group_of_row == g, :, 0]
        np.testing.assert_allclose(narrow[0][g], values.mean(0), rtol=1e-13)
        np.testing.assert_allclose(narrow[1][g], values.var(0), rtol=1e-12)


@pytest.mark.parametrize(
    ("shape", "ghost_batches", "build"),
    [
        ((64, NARROW_CHANNELS - 1), False, "narrow"),
        ((64, NARROW_CHANNELS), False, "rows"),
        ((64, 3), True, "rows"),  # ghost batches: the rows build
        ((8, 3, 5), False, "planes"),  # channels first
    ],
)
def test_a_plan_takes_the_build_of_its_layout(shape, ghost_batches, build):
    x = torch.zeros(shape)
    plan = prepare(x, [1], None, ghost_batches).plan
    assert plan.train_forward is kernels.train_forward.for_layout(build)
    assert plan.inference_backward is kernels.inference_backward.for_layout(build)
