"""The backward of in-place training (InPlace-ABN) from the output alone, in one kernel call.

The forward wrote ``y = f(z)``, ``z = gamma * x_hat + beta``, over its input. With ``f``
invertible (identity, leaky_relu with slope ``a > 0``, elu with ``alpha > 0``) each element gives
back

.. math::
    z = f^{-1}(y), \\quad \\hat x = (z - \\beta) / \\gamma, \\quad \\delta = dy\\, f'(z)

(leaky_relu: ``z = y / a``, ``f' = a`` where ``y <= 0``; elu: ``z = log1p(y / alpha)``,
``f' = y + alpha``; identity: ``a = 1``), and, per ghost batch and channel, with ``w`` the mask
weight of a position, ``W`` their sum and ``s = gamma / sqrt(var + epsilon)``:

.. math::
    S_0 = \\sum \\delta, \\quad S_1 = \\sum \\delta \\hat x, \\quad
    dx = s \\big(\\delta - w S_0 / W - w \\hat x S_1 / W\\big), \\quad
    d\\gamma = \\sum_g S_1, \\quad d\\beta = \\sum_g S_0.

Two passes, sums in float64, as :data:`batchnorm.kernels.train_backward`. elu's inverse is -inf
where ``y`` rounded to ``-alpha``; there ``f' = 0`` and ``z`` is clamped to ``floor`` (see
:func:`batchnorm.functional._activation.invert`).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from batchnorm.kernels._elementwise import ELU
from batchnorm.kernels._half import compute_dtype, narrowed, widened
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
def log1p_nonpositive(u):  # type: ignore[no-untyped-def]
    """``log1p(u)`` for ``-1 <= u <= 0`` (float64; -inf at -1, NaN below), in code that
    vectorises (NumPy's ``log1p`` is a call into the C library per value: the in-place elu
    backward took 4.5x the leaky_relu one).

    ``log1p(u) = log(w) = 2 atanh(s)`` with ``s = (w - 1) / (w + 1)``: for ``u >= -1/2``,
    ``s = u / (2 + u)`` (no rounding of ``1 + u`` enters); below, ``w = 1 + u`` is exact
    (Sterbenz) and is scaled by ``2^e`` into ``m`` in ``[1, 2)``, exactly (powers of two), so that
    ``log(w) = log(m) - e ln 2`` with ``s = (m - 1) / (m + 1)``. Then ``|s| <= 1/3`` and
    ``atanh(s) = s + s^3 / 3 + ... + s^35 / 35`` (truncation below 2e-18 relative). Against
    the C library's log1p on 4 million values from -1 + 1e-16 to -1e-300: within 3 ulp (the
    rounding of ``2 + u`` and of the division), 4.3x faster on one thread.
    """
    wide = np.float64(u)
    w = 1.0 + wide
    m = w
    e = 0.0
    # w >= 2^-53 where w > 0 (u >= -1 + 2^-53): six halvings of the gap reach [1, 2)
    m, e = (m * 4294967296.0, e + 32.0) if m * 4294967296.0 < 2.0 else (m, e)
    m, e = (m * 65536.0, e + 16.0) if m * 65536.0 < 2.0 else (m, e)
    m, e = (m * 256.0, e + 8.0) if m * 256.0 < 2.0 else (m, e)
    m, e = (m * 16.0, e + 4.0) if m * 16.0 < 2.0 else (m, e)
    m, e = (m * 4.0, e + 2.0) if m * 4.0 < 2.0 else (m, e)
    m, e = (m * 2.0, e + 1.0) if m * 2.0 < 2.0 else (m, e)
    near = wide >= -0.5
    # one division (selected operands): two selected quotients cost two vector divisions
    s = (wide if near else m - 1.0) / (2.0 + wide if near else m + 1.0)
    t = s * s
    # Horner's rule for 1 + t / 3 + t^2 / 5 + ... + t^17 / 35
    p = 1.0 / 35
    for odd in range(33, 1, -2):
        p = p * t + 1.0 / odd
    p = p * t + 1.0
    result = 2.0 * s * p - (0.0 if near else e * 0.6931471805599453)
    if w == 0.0:
        return -np.inf
    return np.nan if w < 0.0 else result


@setup_helper
def recovered(output, dy, exponential, slope, inverse_slope, floor):  # type: ignore[no-untyped-def]
    """``(z, delta)`` from the loaded output and gradient elements (half precision widened,
    :mod:`batchnorm.kernels._half`); see the module docstring."""
    y = widened(output)
    g = widened(dy)
    if y > 0:
        return y, g
    if exponential:
        # y / alpha is >= -1 but for the rounding of y and of 1 / alpha (log1p gave NaN there)
        u = y * inverse_slope
        z = log1p_nonpositive(-1.0 if u < -1.0 else u)  # NaN kept, as below
        return floor if floor > z else z, g * (y + slope)  # max(z, floor), NaN kept
    return y * inverse_slope, g * slope


@setup_helper
def inverse_constants(activation, parameter, floor, dtype_example):  # type: ignore[no-untyped-def]
    """``(exponential, slope, 1 / slope, floor)`` in the compute dtype (identity: slope 1)."""
    constants = np.empty(3, compute_dtype(dtype_example))
    constants[0] = parameter
    constants[1] = 1.0 / parameter
    constants[2] = floor
    return activation == ELU, constants[0], constants[1], constants[2]


@setup_helper
def channel_coefficients(scale, offset, dtype_example):  # type: ignore[no-untyped-def]
    """``(1 / gamma, beta)`` per channel in the compute dtype."""
    channels = scale.shape[0]
    dtype = compute_dtype(dtype_example)
    reciprocal = np.empty(channels, dtype)
    shift = np.empty(channels, dtype)
    for c in range(channels):
        reciprocal[c] = 1.0 / np.float64(widened(scale[c]))
        shift[c] = widened(offset[c])
    return reciprocal, shift


@setup_helper
def gradient_factors(variance, total, scale, sums, epsilon, dtype_example):  # type: ignore[no-untyped-def]
    """``(s, S_0 / W, S_1 / W)`` per group and channel in the compute dtype."""
    groups, channels = variance.shape
    dtype = compute_dtype(dtype_example)
    factor = np.empty(groups * channels, dtype).reshape((groups, channels))
    mean_delta = np.empty(groups * channels, dtype).reshape((groups, channels))
    mean_product = np.empty(groups * channels, dtype).reshape((groups, channels))
    for g in range(groups):
        for c in range(channels):
            per_weight = 1.0 / total[g, c] if total[g, c] > 0 else 0.0
            factor[g, c] = np.float64(widened(scale[c])) / np.sqrt(variance[g, c] + epsilon)
            mean_delta[g, c] = sums[0, g, c] * per_weight
            mean_product[g, c] = sums[1, g, c] * per_weight
    return factor, mean_delta, mean_product


@helper
def sums_rows_block(dy, y, channel, inverse, groups, period, start, stop, sums):  # type: ignore[no-untyped-def]
    """``S_0``, ``S_1`` of rows ``start:stop`` (channels last) added into ``sums``."""
    dy2, y2 = rows_view(dy), rows_view(y)
    reciprocal, shift = channel
    exponential, slope, inverse_slope, floor = inverse
    channels = y2.shape[1]
    u0, u1 = sums[0, 0], sums[1, 0]
    for o in range(start, stop):
        if groups > 1:
            g = (o // period) % groups
            u0, u1 = sums[0, g], sums[1, g]
        for c in range(channels):
            z, d = recovered(y2[o, c], dy2[o, c], exponential, slope, inverse_slope, floor)
            d64 = np.float64(d)
            u0[c] += d64
            u1[c] += d64 * np.float64((z - shift[c]) * reciprocal[c])


@helper
def sums_planes_block(dy, y, channel, inverse, groups, period, start, stop, sums):  # type: ignore[no-untyped-def]
    """``S_0``, ``S_1`` of rows ``start:stop`` (channel planes) added into ``sums``."""
    reciprocal, shift = channel
    exponential, slope, inverse_slope, floor = inverse
    channels, inner = y.shape[1], y.shape[2]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            r = reciprocal[c]
            b = shift[c]
            output_row = y[o, c]
            grad_row = dy[o, c]
            a0 = 0.0
            a1 = 0.0
            for i in range(inner):
                z, d = recovered(
                    output_row[i], grad_row[i], exponential, slope, inverse_slope, floor
                )
                d64 = np.float64(d)
                a0 += d64
                a1 += d64 * np.float64((z - b) * r)
            sums[0, g, c] += a0
            sums[1, g, c] += a1


@elementwise_helper
def gradient_rows_block(  # type: ignore[no-untyped-def]
    dy, y, weights, masked, channel, inverse, factors, period, start, stop, out
):
    """``dx`` on rows ``start:stop`` (channels last)."""
    dy2, y2, out2 = rows_view(dy), rows_view(y), rows_view(out)
    reciprocal, shift = channel
    exponential, slope, inverse_slope, floor = inverse
    factor, mean_delta, mean_product = factors
    groups, channels = factor.shape[0], y2.shape[1]
    s, m0, m1 = factor[0], mean_delta[0], mean_product[0]
    for o in range(start, stop):
        if groups > 1:
            g = (o // period) % groups
            s, m0, m1 = factor[g], mean_delta[g], mean_product[g]
        if masked is not None:
            w = weights[o, 0]
            for c in range(channels):
                z, d = recovered(y2[o, c], dy2[o, c], exponential, slope, inverse_slope, floor)
                x_hat = (z - shift[c]) * reciprocal[c]
                out2[o, c] = narrowed(s[c] * ((d - w * m0[c]) - w * x_hat * m1[c]), out2)
        else:
            for c in range(channels):
                z, d = recovered(y2[o, c], dy2[o, c], exponential, slope, inverse_slope, floor)
                x_hat = (z - shift[c]) * reciprocal[c]
                out2[o, c] = narrowed(s[c] * ((d - m0[c]) - x_hat * m1[c]), out2)


@elementwise_helper
def gradient_planes_block(  # type: ignore[no-untyped-def]
    dy, y, weights, masked, channel, inverse, factors, period, start, stop, out
):
    """``dx`` on rows ``start:stop`` (channel planes)."""
    reciprocal, shift = channel
    exponential, slope, inverse_slope, floor = inverse
    factor, mean_delta, mean_product = factors
    groups = factor.shape[0]
    channels, inner = y.shape[1], y.shape[2]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            r = reciprocal[c]
            b = shift[c]
            s = factor[g, c]
            m0 = mean_delta[g, c]
            m1 = mean_product[g, c]
            output_row = y[o, c]
            grad_row = dy[o, c]
            target = out[o, c]
            if masked is not None:
                weight_row = weights[o]
                for i in range(inner):
                    w = weight_row[i]
                    z, d = recovered(
                        output_row[i], grad_row[i], exponential, slope, inverse_slope, floor
                    )
                    target[i] = narrowed(s * ((d - w * m0) - w * ((z - b) * r) * m1), target)
            else:
                for i in range(inner):
                    z, d = recovered(
                        output_row[i], grad_row[i], exponential, slope, inverse_slope, floor
                    )
                    target[i] = narrowed(s * ((d - m0) - ((z - b) * r) * m1), target)


@setup_helper
def in_place_parameter_gradients(sums):  # type: ignore[no-untyped-def]
    """``dgamma = sum_g S_1``, ``dbeta = sum_g S_0`` per channel (float64)."""
    groups, channels = sums.shape[1], sums.shape[2]
    dscale = np.empty(channels, np.float64)
    doffset = np.empty(channels, np.float64)
    for c in range(channels):
        dscale[c] = 0.0
        doffset[c] = 0.0
    for g in range(groups):
        for c in range(channels):
            dscale[c] += sums[1, g, c]
            doffset[c] += sums[0, g, c]
    return dscale, doffset


sums_block = by_layout(sums_rows_block, sums_planes_block)
gradient_block = by_layout(gradient_rows_block, gradient_planes_block)


@runner
def sums_blocks(dy, y, channel, inverse, groups, period, blocks, sums):  # type: ignore[no-untyped-def]
    """The layout's :data:`sums_block` on each row block, into ``sums[block]``."""
    for block in prange(blocks):
        start, stop = block_rows(y.shape[0], blocks, block)
        sums_block(dy, y, channel, inverse, groups, period, start, stop, sums[block])


@runner
def gradient_blocks(  # type: ignore[no-untyped-def]
    dy, y, weights, masked, channel, inverse, factors, period, blocks, out
):
    """The layout's :data:`gradient_block` on each row block."""
    for block in prange(blocks):
        start, stop = block_rows(y.shape[0], blocks, block)
        gradient_block(dy, y, weights, masked, channel, inverse, factors, period, start, stop, out)


@kernel
def in_place_backward(  # type: ignore[no-untyped-def]
    dy,
    y,
    weights,
    masked,
    variance,
    total,
    scale,
    offset,
    epsilon,
    activation,
    parameter,
    floor,
    groups,
    period,
    blocks,
    out,
):
    """The in-place backward (see the module docstring): ``out = dL/dx`` from the output ``y``
    and its gradient ``dy``; returns ``(dgamma, dbeta)`` ``[C]`` float64.

    ``variance``, ``total``: float64 ``[groups, C]``; ``scale`` (nonzero), ``offset``: ``[C]``;
    ``activation``, ``parameter``: the forward's activation code and parameter (identity: code
    0 and parameter 1); ``floor``: the smallest ``z`` elu's inverse returns.
    """
    channels = y.shape[1]
    channel = channel_coefficients(scale, offset, y)
    inverse = inverse_constants(activation, parameter, floor, y)
    partial = np.zeros((blocks, 2, groups, channels), np.float64)
    sums_blocks(dy, y, channel, inverse, groups, period, blocks, partial)
    sums = sum_blocks(partial)
    factors = gradient_factors(variance, total, scale, sums, epsilon, y)
    gradient_blocks(dy, y, weights, masked, channel, inverse, factors, period, blocks, out)
    return in_place_parameter_gradients(sums)
