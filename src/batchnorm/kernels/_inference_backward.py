"""The backward of inference ``y = (x - M) / sqrt(V + epsilon) * gamma + beta`` in one kernel call.

A batch norm kept in inference while the model around it trains (fine-tuning with frozen
statistics) runs this on every step. With ``inv = 1 / sqrt(V + epsilon)`` and the per-channel
sums ``S_0 = sum(dy)``, ``S_1 = sum(dy (x - M))`` (float64):

.. math::
    dx = dy\\, \\gamma\\, inv, \\quad d\\gamma = S_1\\, inv, \\quad d\\beta = S_0, \\quad
    dM = -S_0\\, \\gamma\\, inv, \\quad dV = -\\tfrac12 \\gamma\\, inv^3 S_1.

When both are wanted (a batch norm in inference inside a model that trains: the usual case),
one pass reads ``dy`` and ``x`` once and writes ``dx`` beside the sums
(:data:`input_gradient_and_sums_block`): 0.72-0.74x the two passes' time on channel planes,
0.83-0.92x on channels-last and dense inputs, 0.86x on (32, 4096) (one process, 2 threads,
interleaved). Alone, ``dx`` is the normalising pass run on ``dy`` with mean 0 and offset 0,
and the sums the gradient-sums pass. Rows of a few channels (the narrow build's virtual rows,
:mod:`batchnorm.kernels._narrow_rows`) run the two passes block by block.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from batchnorm.kernels._elementwise import (
    activation_constants,
    normalize_blocks,
    normalize_narrow_block,
)
from batchnorm.kernels._half import compute_dtype, narrowed, widened
from batchnorm.kernels._half_sums import plane_gradient_sums_of_half
from batchnorm.kernels._jit import (
    block_rows,
    by_layout,
    helper,
    kernel,
    rows_view,
    runner,
    setup_helper,
)
from batchnorm.kernels._statistics import (
    gradient_sums_blocks,
    gradient_sums_narrow_block,
    sum_blocks,
)


@setup_helper
def channel_roots(variance, epsilon):  # type: ignore[no-untyped-def]
    """``sqrt(V + epsilon)`` per channel, float64 ``[C]`` (``variance`` ``[1, C]``): computed
    once for the input gradient's factor and the statistics' gradients, which both divide by
    it (a float64 square root costs about a nanosecond a channel, as much as the pass over a
    row of the input)."""
    channels = variance.shape[1]
    roots = np.empty(channels, np.float64)
    for c in range(channels):
        roots[c] = np.sqrt(np.float64(widened(variance[0, c])) + epsilon)
    return roots


@setup_helper
def input_gradient_factor(roots, scale, dtype_example):  # type: ignore[no-untyped-def]
    """``(0, scale / roots, 0)`` as ``[1, C]`` rows of the compute dtype: the normalising pass's
    ``(high, factor, shift)`` that turn it into ``dx = dy * scale * inv``."""
    channels = scale.shape[0]
    dtype = compute_dtype(dtype_example)
    zero = np.empty(channels, dtype).reshape((1, channels))
    factor = np.empty(channels, dtype).reshape((1, channels))
    for c in range(channels):
        zero[0, c] = 0.0
        factor[0, c] = np.float64(widened(scale[c])) / roots[c]
    return zero, factor


@setup_helper
def statistic_gradients(sums, roots, scale):  # type: ignore[no-untyped-def]
    """``[dM, dV, dgamma, dbeta]`` per channel (float64 ``[4, C]``) from the sums, with
    ``inv = 1 / roots``."""
    channels = scale.shape[0]
    gradients = np.empty(4 * channels, np.float64).reshape((4, channels))
    for c in range(channels):
        inv = 1.0 / roots[c]
        gamma = np.float64(widened(scale[c]))
        gradients[0, c] = -sums[0, 0, c] * gamma * inv
        gradients[1, c] = -0.5 * gamma * inv * inv * inv * sums[1, 0, c]
        gradients[2, c] = sums[1, 0, c] * inv
        gradients[3, c] = sums[0, 0, c]
    return gradients


@helper
def input_gradient_and_sums_rows_block(  # type: ignore[no-untyped-def]
    dy, x, mean, zero, factor, period, start, stop, sums, out, constants
):
    """Rows ``start:stop`` (channels last): ``out = dy * factor`` and ``sums[0] += dy``,
    ``sums[1] += dy * (x - mean)`` (float64, ``sums[2, 1, C]``).

    Row r of each half of the block side by side, as in the normalising pass: six streams
    (dy, x and dx, two each). Four rows per update as in the gradient-sums pass made twelve,
    and on 64 channels (NHWC) the fused pass ran 1.25x the two passes' time; with two per update
    it runs 0.83-0.92x on channels-last and dense inputs. The sums are the gradient-sums
    pass's added two rows at a time instead of four (equal but for the last bits). ``dx`` is
    the normalising pass's ``(dy - 0) * factor + 0``, the same value."""
    dy2 = rows_view(dy)
    x2 = rows_view(x)
    out2 = rows_view(out)
    channels = x2.shape[1]
    u0 = sums[0, 0]
    u1 = sums[1, 0]
    m = mean[0]
    f = factor[0]
    q = (stop - start) // 2  # rows per half
    for o in range(start, start + q):
        for c in range(channels):
            k = widened(m[c])
            fc = f[c]
            e0 = widened(dy2[o, c])
            e1 = widened(dy2[o + q, c])
            out2[o, c] = narrowed(e0 * fc, out2)
            out2[o + q, c] = narrowed(e1 * fc, out2)
            d0 = np.float64(e0)
            d1 = np.float64(e1)
            u0[c] += d0 + d1
            u1[c] += d0 * (np.float64(widened(x2[o, c])) - k) + d1 * (
                np.float64(widened(x2[o + q, c])) - k
            )
    for o in range(start + 2 * q, stop):
        for c in range(channels):
            e = widened(dy2[o, c])
            out2[o, c] = narrowed(e * f[c], out2)
            d = np.float64(e)
            u0[c] += d
            u1[c] += d * (np.float64(widened(x2[o, c])) - widened(m[c]))


@helper
def input_gradient_and_sums_planes_block(  # type: ignore[no-untyped-def]
    dy, x, mean, zero, factor, period, start, stop, sums, out, constants
):
    """Rows ``start:stop`` (channel planes): ``out = dy * factor`` and the sums of
    :func:`~batchnorm.kernels._statistics.gradient_sums_planes_block`, plane by plane."""
    channels, inner = x.shape[1], x.shape[2]
    for o in range(start, stop):
        for c in range(channels):
            m = widened(mean[0, c])
            f = factor[0, c]
            dy_row = dy[o, c]
            x_row = x[o, c]
            target = out[o, c]
            a0 = 0.0
            a1 = 0.0
            for i in range(inner):
                e = widened(dy_row[i])
                target[i] = narrowed(e * f, target)
                d = np.float64(e)
                a0 += d
                a1 += d * (np.float64(widened(x_row[i])) - m)
            sums[0, 0, c] += a0
            sums[1, 0, c] += a1


@helper
def input_gradient_and_sums_narrow_block(  # type: ignore[no-untyped-def]
    dy, x, mean, zero, factor, period, start, stop, sums, out, constants
):
    """:func:`input_gradient_and_sums_rows_block` for rows of a few channels (the narrow build):
    the narrow normalising and gradient-sums passes, each on virtual rows."""
    normalize_narrow_block(dy, zero, factor, zero, 1, period, start, stop, out, None, constants)
    gradient_sums_narrow_block(dy, x, mean, 1, period, start, stop, sums)


@helper
def input_gradient_and_sums_half_planes_block(  # type: ignore[no-untyped-def]
    dy, x, mean, zero, factor, period, start, stop, sums, out, constants
):
    """:func:`input_gradient_and_sums_planes_block` for float16/bfloat16 data: ``out`` plane by
    plane, then the plane's sums in float32
    (:func:`~batchnorm.kernels._half_sums.plane_gradient_sums_of_half`), while it is in cache."""
    channels, inner = x.shape[1], x.shape[2]
    for o in range(start, stop):
        for c in range(channels):
            f = factor[0, c]
            dy_row = dy[o, c]
            target = out[o, c]
            for i in range(inner):
                target[i] = narrowed(widened(dy_row[i]) * f, target)
            m = np.float64(widened(mean[0, c]))
            a0, a1 = plane_gradient_sums_of_half(dy_row, x[o, c], m)
            sums[0, 0, c] += a0
            sums[1, 0, c] += a1


input_gradient_and_sums_block = by_layout(
    input_gradient_and_sums_rows_block,
    input_gradient_and_sums_planes_block,
    input_gradient_and_sums_narrow_block,
    input_gradient_and_sums_half_planes_block,
)


@runner
def input_gradient_and_sums_blocks(  # type: ignore[no-untyped-def]
    dy, x, mean, zero, factor, period, blocks, partial, out, constants
):
    """The layout's :data:`input_gradient_and_sums_block` on each row block, its sums into
    ``partial[block]``."""
    for block in prange(blocks):
        start, stop = block_rows(x.shape[0], blocks, block)
        input_gradient_and_sums_block(
            dy, x, mean, zero, factor, period, start, stop, partial[block], out, constants
        )


@kernel
def inference_backward(  # type: ignore[no-untyped-def]
    dy, x, mean, variance, scale, epsilon, sums_wanted, period, blocks, out
):
    """``out = dx`` (skipped when ``out`` is None) and, when ``sums_wanted`` is not None, the
    per-channel ``[dM, dV, dgamma, dbeta]`` (float64 ``[4, C]``; ``[0, C]`` otherwise).

    ``mean``, ``variance``: ``[1, C]``; ``scale``: ``[C]``.
    """
    channels = x.shape[1]
    roots = channel_roots(variance, epsilon)
    if out is not None:
        zero, factor = input_gradient_factor(roots, scale, dy)
        constants = activation_constants(0.0, dy)
    if sums_wanted is None:
        if out is not None:
            normalize_blocks(dy, zero, factor, zero, 1, period, blocks, out, None, constants)
        return np.empty(0, np.float64).reshape((0, channels))
    partial = np.zeros((blocks, 2, 1, channels), np.float64)
    if out is None:
        gradient_sums_blocks(dy, x, mean, 1, period, blocks, partial)
    else:
        input_gradient_and_sums_blocks(
            dy, x, mean, zero, factor, period, blocks, partial, out, constants
        )
    return statistic_gradients(sum_blocks(partial), roots, scale)
