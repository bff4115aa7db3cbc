"""Element-wise passes in canonical layout ``x[o, c, i]``, with per-(group, channel) statistics.

Each kernel first turns the float64 statistics into coefficients of the compute dtype (a short loop
over channels), then makes one pass over the data. The mean is split in two numbers of the compute
dtype, ``high + low``; subtracting ``high`` first and folding ``low`` into the additive term keeps
the digits a single rounded mean loses (data like 1000 + 0.01 * randn).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from batchnorm.kernels._half import compute_dtype, narrowed, widened
from batchnorm.kernels._jit import (
    block_rows,
    by_layout,
    elementwise_helper,
    group_run,
    kernel,
    rows_view,
    runner,
    setup_helper,
)
from batchnorm.kernels._narrow_rows import tiled, virtual_copies, virtual_rows


@setup_helper
def split_mean(mean, dtype_example):  # type: ignore[no-untyped-def]
    """``mean`` (float64) as ``high + low``, both of the compute dtype."""
    dtype = compute_dtype(dtype_example)
    high = np.empty(mean.size, dtype).reshape(mean.shape)
    low = np.empty(mean.size, dtype).reshape(mean.shape)
    for g in range(mean.shape[0]):
        for c in range(mean.shape[1]):
            high[g, c] = mean[g, c]
            low[g, c] = mean[g, c] - np.float64(high[g, c])
    return high, low


@setup_helper
def affine_coefficients(mean, variance, scale, offset, epsilon, dtype_example):  # type: ignore[no-untyped-def]
    """``y = (x - high) * factor + shift`` per group and channel, in the compute dtype.

    ``high`` is the mean rounded to the compute dtype and ``shift = offset - low * factor`` folds
    in the rounding residue ``low = mean - high``: no large terms cancel, unlike
    ``x * factor + (offset - mean * factor)``.
    """
    groups, channels = variance.shape
    dtype = compute_dtype(dtype_example)
    high = np.empty(groups * channels, dtype).reshape((groups, channels))
    factor = np.empty(groups * channels, dtype).reshape((groups, channels))
    shift = np.empty(groups * channels, dtype).reshape((groups, channels))
    for g in range(groups):
        for c in range(channels):
            m = np.float64(widened(mean[g, c]))
            high[g, c] = m
            f = np.float64(widened(scale[c])) / np.sqrt(
                np.float64(widened(variance[g, c])) + epsilon
            )
            factor[g, c] = f
            shift[g, c] = np.float64(widened(offset[c])) - (m - np.float64(high[g, c])) * f
    return high, factor, shift


# Activation codes of the fused normalising pass (batchnorm.functional._activation names them).
NO_ACTIVATION, RELU, LEAKY_RELU, ELU = 0, 1, 2, 3


@setup_helper
def activation_constants(parameter, dtype_example):  # type: ignore[no-untyped-def]
    """``(0, parameter)`` in the compute dtype: :func:`activated` then computes in it (a float64
    constant there made the kernels around it 3x slower, even without an activation)."""
    values = np.empty(2, compute_dtype(dtype_example))
    values[0] = 0.0
    values[1] = parameter
    return values[0], values[1]


_LOG2_E = 1.4426950408889634
_LN_2 = 0.6931471805599453


@setup_helper
def expm1_nonpositive(v):  # type: ignore[no-untyped-def]
    """``expm1(v)`` for ``v <= 0`` (float64; -1 below -60), in code that vectorises.

    NumPy's ``expm1`` is a call into the C library per value, which the compiler cannot turn
    into vector code: elu then cost 7x a vector pass, and the fused elu was slower than batch
    norm followed by torch's. Here ``v = k ln 2 + r`` with ``k`` the nearest integer to
    ``v / ln 2`` and ``|r| <= ln 2 / 2``; ``expm1(r)`` is its Taylor series to ``r^13 / 13!``
    (truncation below 2e-17 relative), ``s = 2^k`` is built exactly from the bits of ``-k``, and
    ``expm1(v) = s expm1(r) + (s - 1)``. The error of the rounded ``ln 2`` is scaled by ``s``,
    so no split constant is needed. Against the C library's expm1 on 3 million values from
    -10^2.5 to -10^-320: within 1 ulp in float64, and within half an ulp once rounded to
    float32 (the C library's float32 expm1: 0.76 ulp).
    """
    wide = np.float64(v)
    z = -60.0 if wide < -60.0 else wide  # expm1(-60) rounds to -1; also -inf
    k = np.floor(z * _LOG2_E + 0.5)
    r = z - k * _LN_2
    # Horner's rule for r (1 + r / 2! + r^2 / 3! + ... + r^12 / 13!)
    p = 1.0 / 6227020800
    p = p * r + 1.0 / 479001600
    p = p * r + 1.0 / 39916800
    p = p * r + 1.0 / 3628800
    p = p * r + 1.0 / 362880
    p = p * r + 1.0 / 40320
    p = p * r + 1.0 / 5040
    p = p * r + 1.0 / 720
    p = p * r + 1.0 / 120
    p = p * r + 1.0 / 24
    p = p * r + 1.0 / 6
    p = p * r + 1.0 / 2
    p = (p * r + 1.0) * r
    m = np.int64(-k)  # 0 to 87
    s = 1.0
    s *= 0.5 if m & 1 else 1.0
    s *= 0.25 if m & 2 else 1.0
    s *= 0.0625 if m & 4 else 1.0
    s *= 0.00390625 if m & 8 else 1.0
    s *= 1.52587890625e-05 if m & 16 else 1.0
    s *= 2.3283064365386963e-10 if m & 32 else 1.0
    s *= 5.421010862427522e-20 if m & 64 else 1.0
    return s * p + (s - 1.0)


@setup_helper
def activated(v, activation, constants):  # type: ignore[no-untyped-def]
    """``f(v)`` for an activation code: relu ``max(v, 0)``, leaky_relu ``v`` or ``a * v``, elu
    ``v`` or ``a * expm1(v)`` (:func:`expm1_nonpositive`), with ``(zero, a) = constants``
    (:func:`activation_constants`); NaN stays NaN, and relu's negative side is +0, also for -inf
    (as torch's)."""
    zero, a = constants
    if activation == RELU:
        return v if not v < 0 else zero
    if activation == LEAKY_RELU:
        return v if not v < 0 else v * a
    if activation == ELU:
        return v if not v < 0 else a * expm1_nonpositive(v)
    return v


@elementwise_helper
def normalize_rows_block(  # type: ignore[no-untyped-def]
    x, high, factor, shift, groups, period, start, stop, out, activation, constants
):
    """``out = f((x - high) * factor + shift)`` on rows ``start:stop`` (channels last), ``f``
    the activation of code ``activation`` (:func:`activated`, with ``constants``; none for None:
    Numba then compiles this without the activation's loops). ``out`` None: written over ``x``
    (see :func:`affine_normalize`).

    Indexed in 2-D, without a view per row: per-row views made this loop 1.7x slower on fresh
    output memory.
    """
    x2 = rows_view(x)
    out2 = x2 if out is None else rows_view(out)
    channels = x2.shape[1]
    if groups == 1:
        # The coefficients as one row each, loop-invariant: vectorised over the channels. Row
        # r of each half of the block side by side (rows r and r + q, then the last row if
        # the count is odd): each coefficient is loaded once for two values, and the halves
        # are two long sequential streams (two adjacent rows would be two short streams in one
        # page, which the hardware prefetcher does not follow). From memory, one thread, 256-1024
        # channels: 3.2-3.35 G values/s one row at a time, 3.8-4.0 so (a copy: 3.6-3.95).
        h = high[0]
        f = factor[0]
        b = shift[0]
        q = (stop - start) // 2  # rows per half
        if activation is None:
            for o in range(start, start + q):
                for c in range(channels):
                    hc, fc, bc = h[c], f[c], b[c]
                    out2[o, c] = narrowed((widened(x2[o, c]) - hc) * fc + bc, out2)
                    out2[o + q, c] = narrowed((widened(x2[o + q, c]) - hc) * fc + bc, out2)
            for o in range(start + 2 * q, stop):
                for c in range(channels):
                    out2[o, c] = narrowed((widened(x2[o, c]) - h[c]) * f[c] + b[c], out2)
        else:
            for o in range(start, start + q):
                for c in range(channels):
                    hc, fc, bc = h[c], f[c], b[c]
                    v0 = activated((widened(x2[o, c]) - hc) * fc + bc, activation, constants)
                    v1 = activated((widened(x2[o + q, c]) - hc) * fc + bc, activation, constants)
                    out2[o, c] = narrowed(v0, out2)
                    out2[o + q, c] = narrowed(v1, out2)
            for o in range(start + 2 * q, stop):
                for c in range(channels):
                    v = activated((widened(x2[o, c]) - h[c]) * f[c] + b[c], activation, constants)
                    out2[o, c] = narrowed(v, out2)
        return
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            v = (widened(x2[o, c]) - high[g, c]) * factor[g, c] + shift[g, c]
            v = v if activation is None else activated(v, activation, constants)
            out2[o, c] = narrowed(v, out2)


@elementwise_helper
def normalize_planes_block(  # type: ignore[no-untyped-def]
    x, high, factor, shift, groups, period, start, stop, out, activation, constants
):
    """``out = f((x - high) * factor + shift)`` on rows ``start:stop`` (channel planes); ``out``
    None: over ``x``."""
    channels, inner = x.shape[1], x.shape[2]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            h = high[g, c]
            f = factor[g, c]
            b = shift[g, c]
            row = x[o, c]
            target = row if out is None else out[o, c]
            if activation is None:
                for i in range(inner):
                    target[i] = narrowed((widened(row[i]) - h) * f + b, target)
            else:
                for i in range(inner):
                    v = activated((widened(row[i]) - h) * f + b, activation, constants)
                    target[i] = narrowed(v, target)


@elementwise_helper
def normalize_narrow_block(  # type: ignore[no-untyped-def]
    x, high, factor, shift, groups, period, start, stop, out, activation, constants
):
    """:func:`normalize_rows_block` for rows of a few channels (the narrow build): each run of
    rows of one group as virtual rows of ``copies * C`` values (batchnorm.kernels._narrow_rows),
    with its group's coefficients tiled; the rows left over one by one."""
    x2 = rows_view(x)
    out2 = x2 if out is None else rows_view(out)
    channels = x2.shape[1]
    copies = virtual_copies(channels)
    width = copies * channels
    o = start
    while o < stop:
        g, run_stop = group_run(o, stop, groups, period)
        h = tiled(high[g], copies)
        f = tiled(factor[g], copies)
        b = tiled(shift[g], copies)
        xv = virtual_rows(x2, o, run_stop, copies)
        ov = xv if out is None else virtual_rows(out2, o, run_stop, copies)
        for r in range(xv.shape[0]):
            for j in range(width):
                v = (widened(xv[r, j]) - h[j]) * f[j] + b[j]
                v = v if activation is None else activated(v, activation, constants)
                ov[r, j] = narrowed(v, ov)
        for r in range(o + xv.shape[0] * copies, run_stop):
            for c in range(channels):
                v = (widened(x2[r, c]) - h[c]) * f[c] + b[c]
                v = v if activation is None else activated(v, activation, constants)
                out2[r, c] = narrowed(v, out2)
        o = run_stop


normalize_block = by_layout(normalize_rows_block, normalize_planes_block, normalize_narrow_block)


@runner
def normalize_blocks(  # type: ignore[no-untyped-def]
    x, high, factor, shift, groups, period, blocks, out, activation, constants
):
    """The layout's :data:`normalize_block` on each row block."""
    for block in prange(blocks):
        start, stop = block_rows(x.shape[0], blocks, block)
        normalize_block(
            x, high, factor, shift, groups, period, start, stop, out, activation, constants
        )


@kernel
def affine_normalize(  # type: ignore[no-untyped-def]
    x, mean, variance, scale, offset, epsilon, groups, period, blocks, out, activation, parameter
):
    """``out = f((x - mean) / sqrt(variance + epsilon) * scale + offset)``, ``f`` the activation
    of code ``activation`` with ``parameter`` (:func:`activated`; None: none).

    ``out`` None writes over ``x`` (in-place training), not ``out=x``: with two arrays over the
    same memory the compiler's run-time overlap test fails and every loop runs its scalar
    version (the normalising pass with elu took 36 ms instead of 7 on a (64, 256, 512) input,
    2 threads); with one array each value is read, then written, at the same place, which
    the loops vectorise without a test.

    ``mean``, ``variance``: float64 ``[groups, C]``; ``scale``, ``offset``: ``[C]``.
    """
    high, factor, shift = affine_coefficients(mean, variance, scale, offset, epsilon, x)
    constants = activation_constants(parameter, x)
    normalize_blocks(x, high, factor, shift, groups, period, blocks, out, activation, constants)


@setup_helper
def gradient_coefficients(variance, total_weight, scale, sums, epsilon, dtype_example):  # type: ignore[no-untyped-def]
    """``k_dy = s = scale * inv``, ``mean_dy = Sdy / W``, ``k_normalised = inv Sdc / W`` and
    ``inv = 1 / sqrt(variance + epsilon)``, in the compute dtype, and the parameters'
    gradients ``dscale = sum_g inv Sdc`` and ``doffset = sum_g Sdy`` (float64 ``[C]``; the
    backward kernels return them), all from one ``inv`` per channel and group.

    The input gradient is ``s * ((dy - w * mean_dy) - w * k_normalised * x_hat)`` with
    ``x_hat = (x - mean) * inv``: with ``s`` factored out, a channel with one value per batch
    (``dy == mean_dy``, ``x_hat == 0``) gets exactly 0. ``inv^2 Sdc / W`` as one coefficient
    overflowed float32 where masked values lie far from a channel of tiny variance (``Sdc``
    sums over masked positions too), and ``0 * inf`` made every gradient of the channel NaN;
    ``inv Sdc / W`` is the mean of ``dy * x_hat``, of the size of the outputs' gradients.
    """
    groups, channels = variance.shape
    dtype = compute_dtype(dtype_example)
    k_dy = np.empty(groups * channels, dtype).reshape((groups, channels))
    mean_dy = np.empty(groups * channels, dtype).reshape((groups, channels))
    k_normalised = np.empty(groups * channels, dtype).reshape((groups, channels))
    inverse = np.empty(groups * channels, dtype).reshape((groups, channels))
    dscale = np.empty(channels, np.float64)
    doffset = np.empty(channels, np.float64)
    for c in range(channels):
        dscale[c] = 0.0
        doffset[c] = 0.0
    for g in range(groups):
        for c in range(channels):
            inv = 1.0 / np.sqrt(variance[g, c] + epsilon)
            per_weight = 1.0 / total_weight[g, c] if total_weight[g, c] > 0 else 0.0
            k_dy[g, c] = np.float64(widened(scale[c])) * inv
            mean_dy[g, c] = sums[0, g, c] * per_weight
            k_normalised[g, c] = inv * sums[1, g, c] * per_weight
            inverse[g, c] = inv
            dscale[c] += sums[1, g, c] * inv
            doffset[c] += sums[0, g, c]
    return k_dy, mean_dy, k_normalised, inverse, (dscale, doffset)


@elementwise_helper
def input_gradient_rows_block(  # type: ignore[no-untyped-def]
    dy,
    x,
    weights,
    masked,
    high,
    low,
    inverse,
    k_dy,
    mean_dy,
    k_normalised,
    groups,
    period,
    start,
    stop,
    out,
):
    """The input gradient on rows ``start:stop`` (channels last); see :func:`gradient_coefficients`."""
    dy2 = rows_view(dy)
    x2 = rows_view(x)
    out2 = rows_view(out)
    channels = x2.shape[1]
    # Runs of rows of one group (the whole block without ghost batches), each with its
    # coefficients as rows: vectorised over the channels, the run's two halves side by side as
    # in normalize_rows_block; with a mask, one weight per row (padded sequences). Without a
    # mask the weights are left out (a weight of 1 multiplies exactly: the same values).
    o = start
    while o < stop:
        g, run_stop = group_run(o, stop, groups, period)
        h = high[g]
        lo = low[g]
        i = inverse[g]
        a = k_dy[g]
        d = mean_dy[g]
        b = k_normalised[g]
        q = (run_stop - o) // 2  # rows per half
        if masked is None:
            for r in range(o, o + q):
                for c in range(channels):
                    hc, lc, ic, ac, dc, bc = h[c], lo[c], i[c], a[c], d[c], b[c]
                    normalised0 = ((widened(x2[r, c]) - hc) - lc) * ic
                    normalised1 = ((widened(x2[r + q, c]) - hc) - lc) * ic
                    v0 = ac * ((widened(dy2[r, c]) - dc) - bc * normalised0)
                    v1 = ac * ((widened(dy2[r + q, c]) - dc) - bc * normalised1)
                    out2[r, c] = narrowed(v0, out2)
                    out2[r + q, c] = narrowed(v1, out2)
            for r in range(o + 2 * q, run_stop):
                for c in range(channels):
                    normalised = ((widened(x2[r, c]) - h[c]) - lo[c]) * i[c]
                    v = a[c] * ((widened(dy2[r, c]) - d[c]) - b[c] * normalised)
                    out2[r, c] = narrowed(v, out2)
        else:
            for r in range(o, o + q):
                w0 = weights[r, 0]
                w1 = weights[r + q, 0]
                for c in range(channels):
                    hc, lc, ic, ac, dc, bc = h[c], lo[c], i[c], a[c], d[c], b[c]
                    normalised0 = ((widened(x2[r, c]) - hc) - lc) * ic
                    normalised1 = ((widened(x2[r + q, c]) - hc) - lc) * ic
                    v0 = ac * ((widened(dy2[r, c]) - w0 * dc) - w0 * bc * normalised0)
                    v1 = ac * ((widened(dy2[r + q, c]) - w1 * dc) - w1 * bc * normalised1)
                    out2[r, c] = narrowed(v0, out2)
                    out2[r + q, c] = narrowed(v1, out2)
            for r in range(o + 2 * q, run_stop):
                w = weights[r, 0]
                for c in range(channels):
                    normalised = ((widened(x2[r, c]) - h[c]) - lo[c]) * i[c]
                    v = a[c] * ((widened(dy2[r, c]) - w * d[c]) - w * b[c] * normalised)
                    out2[r, c] = narrowed(v, out2)
        o = run_stop


@elementwise_helper
def input_gradient_planes_block(  # type: ignore[no-untyped-def]
    dy,
    x,
    weights,
    masked,
    high,
    low,
    inverse,
    k_dy,
    mean_dy,
    k_normalised,
    groups,
    period,
    start,
    stop,
    out,
):
    """The input gradient on rows ``start:stop`` (channel planes)."""
    channels, inner = x.shape[1], x.shape[2]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            h = high[g, c]
            lo = low[g, c]
            r = inverse[g, c]
            a = k_dy[g, c]
            b = k_normalised[g, c]
            d = mean_dy[g, c]
            row = x[o, c]
            grad_row = dy[o, c]
            target = out[o, c]
            if masked is not None:
                weight_row = weights[o]
                for i in range(inner):
                    w = weight_row[i]
                    normalised = ((widened(row[i]) - h) - lo) * r
                    v = a * ((widened(grad_row[i]) - w * d) - w * b * normalised)
                    target[i] = narrowed(v, target)
            else:
                for i in range(inner):
                    normalised = ((widened(row[i]) - h) - lo) * r
                    v = a * ((widened(grad_row[i]) - d) - b * normalised)
                    target[i] = narrowed(v, target)


@elementwise_helper
def input_gradient_narrow_block(  # type: ignore[no-untyped-def]
    dy,
    x,
    weights,
    masked,
    high,
    low,
    inverse,
    k_dy,
    mean_dy,
    k_normalised,
    groups,
    period,
    start,
    stop,
    out,
):
    """:func:`input_gradient_rows_block` for rows of a few channels (the narrow build): each run
    of rows of one group as virtual rows, as in :func:`normalize_narrow_block`; with a mask,
    the rows block's loops."""
    if masked is not None:
        input_gradient_rows_block(
            dy,
            x,
            weights,
            masked,
            high,
            low,
            inverse,
            k_dy,
            mean_dy,
            k_normalised,
            groups,
            period,
            start,
            stop,
            out,
        )
        return
    dy2 = rows_view(dy)
    x2 = rows_view(x)
    out2 = rows_view(out)
    channels = x2.shape[1]
    copies = virtual_copies(channels)
    width = copies * channels
    o = start
    while o < stop:
        g, run_stop = group_run(o, stop, groups, period)
        h = tiled(high[g], copies)
        lo = tiled(low[g], copies)
        i = tiled(inverse[g], copies)
        a = tiled(k_dy[g], copies)
        d = tiled(mean_dy[g], copies)
        b = tiled(k_normalised[g], copies)
        xv = virtual_rows(x2, o, run_stop, copies)
        dyv = virtual_rows(dy2, o, run_stop, copies)
        ov = virtual_rows(out2, o, run_stop, copies)
        for r in range(xv.shape[0]):
            for j in range(width):
                normalised = ((widened(xv[r, j]) - h[j]) - lo[j]) * i[j]
                ov[r, j] = narrowed(a[j] * ((widened(dyv[r, j]) - d[j]) - b[j] * normalised), ov)
        for r in range(o + xv.shape[0] * copies, run_stop):
            for c in range(channels):
                normalised = ((widened(x2[r, c]) - h[c]) - lo[c]) * i[c]
                out2[r, c] = narrowed(
                    a[c] * ((widened(dy2[r, c]) - d[c]) - b[c] * normalised), out2
                )
        o = run_stop


input_gradient_block = by_layout(
    input_gradient_rows_block, input_gradient_planes_block, input_gradient_narrow_block
)


@runner
def input_gradient_blocks(  # type: ignore[no-untyped-def]
    dy,
    x,
    weights,
    masked,
    high,
    low,
    inverse,
    k_dy,
    mean_dy,
    k_normalised,
    groups,
    period,
    blocks,
    out,
):
    """The layout's :data:`input_gradient_block` on each row block."""
    for block in prange(blocks):
        start, stop = block_rows(x.shape[0], blocks, block)
        input_gradient_block(
            dy,
            x,
            weights,
            masked,
            high,
            low,
            inverse,
            k_dy,
            mean_dy,
            k_normalised,
            groups,
            period,
            start,
            stop,
            out,
        )


@kernel
def batch_norm_input_gradient(  # type: ignore[no-untyped-def]
    dy,
    x,
    weights,
    masked,
    mean,
    variance,
    total_weight,
    scale,
    sums,
    epsilon,
    groups,
    period,
    blocks,
    out,
):
    """The input gradient of batch norm with the batch's own statistics.

    With ``inv = 1 / sqrt(variance + epsilon)``, ``s = scale * inv``, ``W`` the total weight,
    ``Sdy = sums[0]``, ``Sdc = sums[1] = sum(dy * (x - mean))``:
    ``out = s * ((dy - w * Sdy / W) - w * (inv * Sdc / W) * (x - mean) * inv)`` (w = 1
    without weights; :func:`gradient_coefficients`).
    """
    high, low = split_mean(mean, x)
    k_dy, mean_dy, k_normalised, inverse, _ = gradient_coefficients(
        variance, total_weight, scale, sums, epsilon, x
    )
    input_gradient_blocks(
        dy,
        x,
        weights,
        masked,
        high,
        low,
        inverse,
        k_dy,
        mean_dy,
        k_normalised,
        groups,
        period,
        blocks,
        out,
    )
