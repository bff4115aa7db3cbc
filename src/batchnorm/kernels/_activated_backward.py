"""The training backward of batch norm fused with its activation, in one kernel call.

With ``z = (x - mean) * factor + shift`` the batch-norm output (``factor = scale / sqrt(var +
epsilon)``, :func:`batchnorm.kernels._elementwise.affine_coefficients`) and ``y = f(z)``, the
gradient reaching batch norm is ``delta = dy * f'(z)``. Instead of a pass that writes ``delta``
(what the activation's own backward does), both passes of :data:`batchnorm.kernels.train_backward`
recompute ``z`` from ``x`` with the forward's coefficients (elu reads its output ``y`` instead:
``f'(z) = y + alpha`` where ``z <= 0`` spares an exp per element, which made the passes
compute-bound; not for half precision, whose rounded ``y`` loses ``alpha * exp(z)`` to the
cancellation: at ``z = -6`` a bfloat16 ``y`` is one ulp, 3.9e-3, from ``-alpha``, where the
derivative is 2.5e-3, and gamma's gradient was 194% off until session 53) and use ``delta``
where they used ``dy``:

.. math::
    S_\\delta = \\sum \\delta, \\quad S_{\\delta c} = \\sum \\delta (x - \\mu), \\quad
    dx = s \\big((\\delta - w S_\\delta / W) - w\\, (inv S_{\\delta c} / W)\\, (x - \\mu)\\, inv\\big)

(:func:`batchnorm.kernels._elementwise.gradient_coefficients`). ``f'`` follows torch's backward
of each activation at the kink: relu ``z > 0``, leaky_relu 1 or ``a``, elu 1 or
``a * exp(z)`` (1 for ``z > 0``); relu's is exactly 0 on the negative side, also for an infinite
``dy``. Two passes over the data, where batch norm then the activation
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
from batchnorm.kernels._half import compute_dtype, holds_half, narrowed, widened
from batchnorm.kernels._jit import (
    block_rows,
    by_layout,
    elementwise_helper,
    helper,
    kernel,
    rows_view,
    runner,
    setup_helper,
)
from batchnorm.kernels._statistics import sum_blocks


@setup_helper
def derivative_constants(activation, parameter, dtype_example):  # type: ignore[no-untyped-def]
    """``(exponential, leaky, slope, zero)``: ``f'(z) = 1`` for ``z > 0``, else ``slope *
    exp(z)`` (elu, read as ``y + slope``, or computed from ``z`` for half precision: see
    :func:`delta`), ``slope`` (leaky_relu) or exactly 0 (relu, so that an infinite gradient where
    the output is 0 gives 0, as torch's); ``slope`` and ``zero`` in the compute dtype."""
    constants = np.empty(2, compute_dtype(dtype_example))
    constants[0] = parameter if activation != RELU else 0.0
    constants[1] = 0.0
    return activation == ELU, activation == LEAKY_RELU, constants[0], constants[1]


@setup_helper
def delta(dy, z, y, exponential, leaky, slope, zero):  # type: ignore[no-untyped-def]
    """``dy * f'(z)`` for the loaded gradient and output elements ``dy``, ``y`` (half precision
    widened, :mod:`batchnorm.kernels._half`), elu's from its output (``f'(z) = y + alpha`` for
    ``z <= 0``: an exp per element would make the pass compute-bound), or from ``z`` for half
    precision (:func:`~batchnorm.kernels._half.holds_half` is a compile-time constant; see the
    module docstring); the flags are the same for a whole kernel call, so the compiler hoists
    their tests out of the loops."""
    g = widened(dy)
    if exponential and holds_half(y):
        return g if z > 0 else g * (slope * np.exp(z))
    output = widened(y)
    if exponential:
        return g if output > 0 else g * (output + slope)
    if leaky:
        return g if z > 0 else g * slope
    return g if z > 0 else zero


@helper
def activated_sums_rows_block(  # type: ignore[no-untyped-def]
    dy, x, y, mean, coefficients, derivative, groups, period, start, stop, sums
):
    """``S_delta``, ``S_delta_c`` of rows ``start:stop`` (channels last) added into ``sums``."""
    dy2, x2, y2 = rows_view(dy), rows_view(x), rows_view(y)
    high, factor, shift = coefficients
    exponential, leaky, slope, zero = derivative
    channels = x2.shape[1]
    # Per-channel rows, made again only where the group changes (a view per row of a long
    # loop is what slows these passes).
    h, f, b, m, u0, u1 = high[0], factor[0], shift[0], mean[0], sums[0, 0], sums[1, 0]
    if groups == 1:
        # Row r of each half of the block side by side, the accumulators updated once for both
        # (see batchnorm.kernels._statistics.moments_rows_block).
        q = (stop - start) // 2  # rows per half
        for o in range(start, start + q):
            for c in range(channels):
                hc, fc, bc, mc = h[c], f[c], b[c], m[c]
                v0 = widened(x2[o, c])
                v1 = widened(x2[o + q, c])
                d0 = np.float64(
                    delta(dy2[o, c], (v0 - hc) * fc + bc, y2[o, c], exponential, leaky, slope, zero)
                )
                d1 = np.float64(
                    delta(
                        dy2[o + q, c],
                        (v1 - hc) * fc + bc,
                        y2[o + q, c],
                        exponential,
                        leaky,
                        slope,
                        zero,
                    )
                )
                u0[c] += d0 + d1
                u1[c] += d0 * (np.float64(v0) - mc) + d1 * (np.float64(v1) - mc)
        start = start + 2 * q  # the last row, if the count is odd, below
    for o in range(start, stop):
        if groups > 1:
            g = (o // period) % groups
            h, f, b, m, u0, u1 = high[g], factor[g], shift[g], mean[g], sums[0, g], sums[1, g]
        for c in range(channels):
            v = widened(x2[o, c])
            d = np.float64(
                delta(
                    dy2[o, c], (v - h[c]) * f[c] + b[c], y2[o, c], exponential, leaky, slope, zero
                )
            )
            u0[c] += d
            u1[c] += d * (np.float64(v) - m[c])


@helper
def activated_sums_planes_block(  # type: ignore[no-untyped-def]
    dy, x, y, mean, coefficients, derivative, groups, period, start, stop, sums
):
    """``S_delta``, ``S_delta_c`` of rows ``start:stop`` (channel planes) added into ``sums``."""
    high, factor, shift = coefficients
    exponential, leaky, slope, zero = derivative
    channels, inner = x.shape[1], x.shape[2]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            m = mean[g, c]
            h = high[g, c]
            f = factor[g, c]
            b = shift[g, c]
            row = x[o, c]
            grad_row = dy[o, c]
            output_row = y[o, c]
            a0 = 0.0
            a1 = 0.0
            for i in range(inner):
                v = widened(row[i])
                d = np.float64(
                    delta(
                        grad_row[i], (v - h) * f + b, output_row[i], exponential, leaky, slope, zero
                    )
                )
                a0 += d
                a1 += d * (np.float64(v) - m)
            sums[0, g, c] += a0
            sums[1, g, c] += a1


@elementwise_helper
def activated_gradient_rows_block(  # type: ignore[no-untyped-def]
    dy, x, y, weights, masked, coefficients, derivative, period, start, stop, out
):
    """``dx`` on rows ``start:stop`` (channels last); ``coefficients`` as the kernels make them."""
    dy2, x2, y2, out2 = rows_view(dy), rows_view(x), rows_view(y), rows_view(out)
    high, low, inverse, factor, shift, k_dy, mean_dy, k_normalised = coefficients
    exponential, leaky, slope, zero = derivative
    groups, channels = high.shape[0], x2.shape[1]
    h, lo, r, f, b = high[0], low[0], inverse[0], factor[0], shift[0]
    a, m, k = k_dy[0], mean_dy[0], k_normalised[0]
    if groups == 1 and masked is None:
        # The block's halves side by side: each coefficient loaded once for two values.
        q = (stop - start) // 2  # rows per half
        for o in range(start, start + q):
            for c in range(channels):
                hc, lc, rc, fc, bc = h[c], lo[c], r[c], f[c], b[c]
                ac, mc, kc = a[c], m[c], k[c]
                v0 = widened(x2[o, c])
                v1 = widened(x2[o + q, c])
                d0 = delta(
                    dy2[o, c], (v0 - hc) * fc + bc, y2[o, c], exponential, leaky, slope, zero
                )
                d1 = delta(
                    dy2[o + q, c],
                    (v1 - hc) * fc + bc,
                    y2[o + q, c],
                    exponential,
                    leaky,
                    slope,
                    zero,
                )
                out2[o, c] = narrowed(ac * ((d0 - mc) - kc * (((v0 - hc) - lc) * rc)), out2)
                out2[o + q, c] = narrowed(ac * ((d1 - mc) - kc * (((v1 - hc) - lc) * rc)), out2)
        start = start + 2 * q  # the last row, if the count is odd, below
    for o in range(start, stop):
        if groups > 1:
            g = (o // period) % groups
            h, lo, r, f, b = high[g], low[g], inverse[g], factor[g], shift[g]
            a, m, k = k_dy[g], mean_dy[g], k_normalised[g]
        if masked is not None:
            w = weights[o, 0]
            for c in range(channels):
                v = widened(x2[o, c])
                d = delta(
                    dy2[o, c], (v - h[c]) * f[c] + b[c], y2[o, c], exponential, leaky, slope, zero
                )
                out2[o, c] = narrowed(
                    a[c] * ((d - w * m[c]) - w * k[c] * (((v - h[c]) - lo[c]) * r[c])), out2
                )
        else:
            for c in range(channels):
                v = widened(x2[o, c])
                d = delta(
                    dy2[o, c], (v - h[c]) * f[c] + b[c], y2[o, c], exponential, leaky, slope, zero
                )
                out2[o, c] = narrowed(
                    a[c] * ((d - m[c]) - k[c] * (((v - h[c]) - lo[c]) * r[c])), out2
                )


@elementwise_helper
def activated_gradient_planes_block(  # type: ignore[no-untyped-def]
    dy, x, y, weights, masked, coefficients, derivative, period, start, stop, out
):
    """``dx`` on rows ``start:stop`` (channel planes)."""
    high, low, inverse, factor, shift, k_dy, mean_dy, k_normalised = coefficients
    exponential, leaky, slope, zero = derivative
    groups = high.shape[0]
    channels, inner = x.shape[1], x.shape[2]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            h = high[g, c]
            lo = low[g, c]
            r = inverse[g, c]
            f = factor[g, c]
            b = shift[g, c]
            a = k_dy[g, c]
            k = k_normalised[g, c]
            m = mean_dy[g, c]
            row = x[o, c]
            grad_row = dy[o, c]
            output_row = y[o, c]
            target = out[o, c]
            if masked is not None:
                weight_row = weights[o]
                for i in range(inner):
                    w = weight_row[i]
                    v = widened(row[i])
                    d = delta(
                        grad_row[i], (v - h) * f + b, output_row[i], exponential, leaky, slope, zero
                    )
                    target[i] = narrowed(a * ((d - w * m) - w * k * (((v - h) - lo) * r)), target)
            else:
                for i in range(inner):
                    v = widened(row[i])
                    d = delta(
                        grad_row[i], (v - h) * f + b, output_row[i], exponential, leaky, slope, zero
                    )
                    target[i] = narrowed(a * ((d - m) - k * (((v - h) - lo) * r)), target)


activated_sums_block = by_layout(activated_sums_rows_block, activated_sums_planes_block)
activated_gradient_block = by_layout(activated_gradient_rows_block, activated_gradient_planes_block)


@runner
def activated_sums_blocks(  # type: ignore[no-untyped-def]
    dy, x, y, mean, coefficients, derivative, groups, period, blocks, sums
):
    """The layout's :data:`activated_sums_block` on each row block, into ``sums[block]``."""
    for block in prange(blocks):
        start, stop = block_rows(x.shape[0], blocks, block)
        activated_sums_block(
            dy, x, y, mean, coefficients, derivative, groups, period, start, stop, sums[block]
        )


@runner
def activated_gradient_blocks(  # type: ignore[no-untyped-def]
    dy, x, y, weights, masked, coefficients, derivative, period, blocks, out
):
    """The layout's :data:`activated_gradient_block` on each row block."""
    for block in prange(blocks):
        start, stop = block_rows(x.shape[0], blocks, block)
        activated_gradient_block(
            dy, x, y, weights, masked, coefficients, derivative, period, start, stop, out
        )


@kernel
def train_backward_activated(  # type: ignore[no-untyped-def]
    dy,
    x,
    y,
    weights,
    masked,
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
    ``activation``, ``parameter``: the code and parameter of the forward's activation; ``y``:
    the forward's output (read for elu only; any array shaped like ``x`` otherwise).
    """
    channels = x.shape[1]
    high, factor, shift = affine_coefficients(mean, variance, scale, offset, epsilon, x)
    derivative = derivative_constants(activation, parameter, x)
    partial = np.zeros((blocks, 2, groups, channels), np.float64)
    activated_sums_blocks(
        dy, x, y, mean, (high, factor, shift), derivative, groups, period, blocks, partial
    )
    sums = sum_blocks(partial)
    _, low = split_mean(mean, x)
    k_dy, mean_dy, k_normalised, inverse, parameter_gradients = gradient_coefficients(
        variance, total, scale, sums, epsilon, x
    )
    coefficients = (high, low, inverse, factor, shift, k_dy, mean_dy, k_normalised)
    activated_gradient_blocks(
        dy, x, y, weights, masked, coefficients, derivative, period, blocks, out
    )
    return parameter_gradients
