"""The training backward of batch norm fused with its activation, in one kernel call.

With ``z = (x - mean) * factor + shift`` the batch-norm output (``factor = scale / sqrt(var +
epsilon)``, :func:`batchnorm.kernels._elementwise.affine_coefficients`) and ``y = f(z)``, the
gradient reaching batch norm is ``delta = dy * f'(z)``. Instead of a pass that writes ``delta``
(what the activation's own backward does), both passes of :data:`batchnorm.kernels.train_backward`
recompute ``z`` from ``x`` with the forward's coefficients and use ``delta`` where they used
``dy``:

.. math::
    S_\\delta = \\sum \\delta, \\quad S_{\\delta c} = \\sum \\delta (x - \\mu), \\quad
    dx = s \\big((\\delta - w S_\\delta / W) - w\\, inv^2 S_{\\delta c} / W\\, (x - \\mu)\\big)

(:func:`batchnorm.kernels._elementwise.gradient_coefficients`). ``f'`` follows torch's backward
of each activation at the kink: relu ``z > 0``, leaky_relu 1 or ``a``, elu 1 or
``a * exp(z)`` (1 for ``z > 0``). Two passes over the data, where batch norm then the activation
take four (the activation's forward and backward, then batch norm's two).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from batchnorm.kernels._elementwise import (
    ELU,
    LEAKY_RELU,
    RELU,
    affine_coefficients,
    gradient_coefficients,
    split_mean,
)
from batchnorm.kernels._jit import block_rows, by_layout, helper, kernel, setup_helper
from batchnorm.kernels._statistics import sum_blocks
from batchnorm.kernels._training import parameter_gradients


@setup_helper
def derivative_constants(parameter, dtype_example):  # type: ignore[no-untyped-def]
    """``[0, 1, parameter]`` in the compute dtype, so that ``f'`` does not promote to float64."""
    constants = np.empty(3, dtype_example.dtype)
    constants[0] = 0.0
    constants[1] = 1.0
    constants[2] = parameter
    return constants


@setup_helper
def derivative(z, activation, constants):  # type: ignore[no-untyped-def]
    """``f'(z)`` for an activation code (see the module docstring); 1 for none.
    ``constants``: :func:`derivative_constants`."""
    if activation == RELU:
        return constants[1] if z > 0 else constants[0]
    if activation == LEAKY_RELU:
        return constants[1] if z > 0 else constants[2]
    if activation == ELU:
        return constants[1] if z > 0 else constants[2] * np.exp(z)
    return constants[1]


@helper
def activated_sums_rows_block(  # type: ignore[no-untyped-def]
    dy2, x2, mean, high, factor, shift, activation, constants, groups, period, start, stop, sums
):
    """``S_delta``, ``S_delta_c`` of rows ``start:stop`` (channels last) added into ``sums``."""
    channels = x2.shape[1]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            z = (x2[o, c] - high[g, c]) * factor[g, c] + shift[g, c]
            d = np.float64(dy2[o, c] * derivative(z, activation, constants))
            sums[0, g, c] += d
            sums[1, g, c] += d * (np.float64(x2[o, c]) - mean[g, c])


@helper
def activated_sums_planes_block(  # type: ignore[no-untyped-def]
    dy, x, mean, high, factor, shift, activation, constants, groups, period, start, stop, sums
):
    """``S_delta``, ``S_delta_c`` of rows ``start:stop`` (channel planes) added into ``sums``."""
    channels, inner = x.shape[1], x.shape[2]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            m = mean[g, c]
            h = high[g, c]
            f = factor[g, c]
            b = shift[g, c]
            a0 = 0.0
            a1 = 0.0
            for i in range(inner):
                z = (x[o, c, i] - h) * f + b
                d = np.float64(dy[o, c, i] * derivative(z, activation, constants))
                a0 += d
                a1 += d * (np.float64(x[o, c, i]) - m)
            sums[0, g, c] += a0
            sums[1, g, c] += a1


@helper
def activated_gradient_rows_block(  # type: ignore[no-untyped-def]
    dy2, x2, weights, has_weights, coefficients, activation, constants, period, start, stop, out2
):
    """``dx`` on rows ``start:stop`` (channels last); ``coefficients`` as the kernels make them."""
    high, low, factor, shift, k_dy, mean_dy, k_centred = coefficients
    groups, channels = high.shape[0], x2.shape[1]
    for o in range(start, stop):
        g = (o // period) % groups
        w = weights[o, 0] if has_weights else constants[1]
        for c in range(channels):
            z = (x2[o, c] - high[g, c]) * factor[g, c] + shift[g, c]
            d = dy2[o, c] * derivative(z, activation, constants)
            centred = (x2[o, c] - high[g, c]) - low[g, c]
            out2[o, c] = k_dy[g, c] * ((d - w * mean_dy[g, c]) - w * k_centred[g, c] * centred)


@helper
def activated_gradient_planes_block(  # type: ignore[no-untyped-def]
    dy, x, weights, has_weights, coefficients, activation, constants, period, start, stop, out
):
    """``dx`` on rows ``start:stop`` (channel planes)."""
    high, low, factor, shift, k_dy, mean_dy, k_centred = coefficients
    groups = high.shape[0]
    channels, inner = x.shape[1], x.shape[2]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            h = high[g, c]
            lo = low[g, c]
            f = factor[g, c]
            b = shift[g, c]
            a = k_dy[g, c]
            k = k_centred[g, c]
            m = mean_dy[g, c]
            row = x[o, c]
            grad_row = dy[o, c]
            target = out[o, c]
            if has_weights:
                weight_row = weights[o]
                for i in range(inner):
                    w = weight_row[i]
                    d = grad_row[i] * derivative((row[i] - h) * f + b, activation, constants)
                    target[i] = a * ((d - w * m) - w * k * ((row[i] - h) - lo))
            else:
                for i in range(inner):
                    d = grad_row[i] * derivative((row[i] - h) * f + b, activation, constants)
                    target[i] = a * ((d - m) - k * ((row[i] - h) - lo))


@kernel
def _activated_backward_rows(  # type: ignore[no-untyped-def]
    dy,
    x,
    weights,
    has_weights,
    mean,
    variance,
    total,
    scale,
    offset,
    epsilon,
    activation,
    parameter,
    groups,
    period,
    blocks,
    out,
):
    """:data:`train_backward_activated` for ``inner == 1`` (channels last)."""
    rows, channels, _ = x.shape
    x2 = x.reshape((rows, channels))
    dy2 = dy.reshape((rows, channels))
    out2 = out.reshape((rows, channels))
    high, factor, shift = affine_coefficients(mean, variance, scale, offset, epsilon, x)
    constants = derivative_constants(parameter, x)
    partial = np.zeros((blocks, 2, groups, channels), np.float64)
    for block in prange(blocks):
        start, stop = block_rows(rows, blocks, block)
        activated_sums_rows_block(
            dy2,
            x2,
            mean,
            high,
            factor,
            shift,
            activation,
            constants,
            groups,
            period,
            start,
            stop,
            partial[block],
        )
    sums = sum_blocks(partial)
    _, low = split_mean(mean, x)
    k_dy, mean_dy, k_centred = gradient_coefficients(variance, total, scale, sums, epsilon, x)
    coefficients = (high, low, factor, shift, k_dy, mean_dy, k_centred)
    for block in prange(blocks):
        start, stop = block_rows(rows, blocks, block)
        activated_gradient_rows_block(
            dy2,
            x2,
            weights,
            has_weights,
            coefficients,
            activation,
            constants,
            period,
            start,
            stop,
            out2,
        )
    return parameter_gradients(sums, variance, epsilon)


@kernel
def _activated_backward_planes(  # type: ignore[no-untyped-def]
    dy,
    x,
    weights,
    has_weights,
    mean,
    variance,
    total,
    scale,
    offset,
    epsilon,
    activation,
    parameter,
    groups,
    period,
    blocks,
    out,
):
    """The backward of ``f(batch norm)`` with the batch's own statistics, in one call:
    ``out = dL/dx``, returns ``(dscale, doffset)`` ``[C]`` float64 (see the module docstring).

    ``mean``, ``variance``, ``total``: float64 ``[groups, C]``; ``scale``, ``offset``: ``[C]``;
    ``activation``, ``parameter``: the code and parameter of the forward's activation.
    """
    rows, channels, _ = x.shape
    high, factor, shift = affine_coefficients(mean, variance, scale, offset, epsilon, x)
    constants = derivative_constants(parameter, x)
    partial = np.zeros((blocks, 2, groups, channels), np.float64)
    for block in prange(blocks):
        start, stop = block_rows(rows, blocks, block)
        activated_sums_planes_block(
            dy,
            x,
            mean,
            high,
            factor,
            shift,
            activation,
            constants,
            groups,
            period,
            start,
            stop,
            partial[block],
        )
    sums = sum_blocks(partial)
    _, low = split_mean(mean, x)
    k_dy, mean_dy, k_centred = gradient_coefficients(variance, total, scale, sums, epsilon, x)
    coefficients = (high, low, factor, shift, k_dy, mean_dy, k_centred)
    for block in prange(blocks):
        start, stop = block_rows(rows, blocks, block)
        activated_gradient_planes_block(
            dy,
            x,
            weights,
            has_weights,
            coefficients,
            activation,
            constants,
            period,
            start,
            stop,
            out,
        )
    return parameter_gradients(sums, variance, epsilon)


train_backward_activated = by_layout(_activated_backward_rows, _activated_backward_planes)
