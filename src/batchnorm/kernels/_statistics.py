"""Per-channel sums for batch statistics, in one pass, with float64 accumulators.

Inputs are in canonical layout ``x[o, c, i]`` (rows, channels, inner elements). Row ``o`` belongs to
group ``(o // period) % groups`` (ghost batches; ``groups = 1`` otherwise). Each channel is shifted by
its first element with non-zero weight ``k`` before summing, so

    mean = k + S1 / S0,   variance = S2 / S0 - (S1 / S0)^2

with ``S0 = sum(w)``, ``S1 = sum(w (x - k))``, ``S2 = sum(w (x - k)^2)`` stays accurate where
``E[x^2] - E[x]^2`` cancels (data like 1000 + 0.01 * randn).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from batchnorm.kernels._jit import by_layout, helper, kernel


@helper
def _first_values(x, weights, has_weights):  # type: ignore[no-untyped-def]
    """Each channel's first element with a non-zero weight (float64): the shift that keeps the
    sums well conditioned. A masked element (padding far from the data) must not be the shift.
    """
    rows, channels, inner = x.shape
    shift = np.zeros(channels, np.float64)
    for o in range(rows):
        for i in range(inner):
            if not has_weights or weights[o, i] != 0:
                for c in range(channels):
                    shift[c] = x[o, c, i]
                return shift
    return shift


@helper
def _sum_blocks(partial):  # type: ignore[no-untyped-def]
    """The per-thread partial sums ``[blocks, ...]`` added in block order (deterministic)."""
    sums = partial[0].copy()
    for block in range(1, partial.shape[0]):
        sums += partial[block]
    return sums


@helper
def _moments_from_sums(partial, shift, has_weights, rows, inner, groups, period):  # type: ignore[no-untyped-def]
    """Mean, variance and total weight from the per-block shifted sums ``[blocks, 3, groups, C]``."""
    sums = _sum_blocks(partial)
    channels = shift.shape[0]
    if not has_weights:
        rows_in_group = np.zeros(groups, np.float64)
        for o in range(rows):
            rows_in_group[(o // period) % groups] += 1.0
        for g in range(groups):
            sums[0, g, :] = rows_in_group[g] * inner
    mean = np.zeros((groups, channels), np.float64)
    variance = np.zeros((groups, channels), np.float64)
    for g in range(groups):
        for c in range(channels):
            total = sums[0, g, c]
            if total > 0:
                centred = sums[1, g, c] / total
                mean[g, c] = shift[c] + centred
                variance[g, c] = max(sums[2, g, c] / total - centred * centred, 0.0)
    return mean, variance, sums[0].copy()


@kernel
def _batch_moments_rows(x, weights, has_weights, groups, period, blocks):  # type: ignore[no-untyped-def]
    """:data:`batch_moments` for ``inner == 1``: rows of C contiguous values (channels last).

    Each row block adds its rows straight into its float64 sums. ``x - shift`` is taken in float64: in float32 an outlier as the shift cost
    the variance 4e-4 relative error, and float32 squares of values near 3e18 overflowed.
    Rows with zero weight are skipped, whatever their values.
    """
    rows, channels, _ = x.shape
    shift = _first_values(x, weights, has_weights)
    partial = np.zeros((blocks, 3, groups, channels), np.float64)
    rows_per_block = (rows + blocks - 1) // blocks
    x2 = x.reshape((rows, channels))
    for block in prange(blocks):
        start = block * rows_per_block
        stop = min(rows, start + rows_per_block)
        s0 = partial[block, 0]
        s1 = partial[block, 1]
        s2 = partial[block, 2]
        for o in range(start, stop):
            g = (o // period) % groups
            if has_weights:
                w = np.float64(weights[o, 0])
                if w != 0:
                    for c in range(channels):
                        v = np.float64(x2[o, c]) - shift[c]
                        s0[g, c] += w
                        s1[g, c] += w * v
                        s2[g, c] += w * v * v
            else:
                for c in range(channels):
                    v = np.float64(x2[o, c]) - shift[c]
                    s1[g, c] += v
                    s2[g, c] += v * v
    return _moments_from_sums(partial, shift, has_weights, rows, 1, groups, period)


@kernel
def _batch_moments_planes(x, weights, has_weights, groups, period, blocks):  # type: ignore[no-untyped-def]
    """``(mean, variance, total_weight)``, each ``[groups, C]`` float64; 0 where no weight."""
    rows, channels, inner = x.shape
    shift = _first_values(x, weights, has_weights)
    partial = np.zeros((blocks, 3, groups, channels), np.float64)
    rows_per_block = (rows + blocks - 1) // blocks
    for block in prange(blocks):
        start = block * rows_per_block
        stop = min(rows, start + rows_per_block)
        s0 = partial[block, 0]
        s1 = partial[block, 1]
        s2 = partial[block, 2]
        for o in range(start, stop):
            g = (o // period) % groups
            for c in range(channels):
                k = shift[c]
                a0 = 0.0
                a1 = 0.0
                a2 = 0.0
                if has_weights:
                    for i in range(inner):
                        w = np.float64(weights[o, i])
                        v = np.float64(x[o, c, i]) - k
                        a0 += w
                        a1 += w * v
                        a2 += w * v * v
                else:
                    for i in range(inner):
                        v = np.float64(x[o, c, i]) - k
                        a1 += v
                        a2 += v * v
                s0[g, c] += a0
                s1[g, c] += a1
                s2[g, c] += a2
    return _moments_from_sums(partial, shift, has_weights, rows, inner, groups, period)


batch_moments = by_layout(_batch_moments_rows, _batch_moments_planes)


@kernel
def _gradient_sums_rows(dy, x, mean, groups, period, blocks):  # type: ignore[no-untyped-def]
    """:data:`gradient_sums` for ``inner == 1`` (channels last).

    Products and sums are float64, as in the moments: float32 partial sums of
    ``dy * (x - mean)`` overflowed where the data are near 1e18 although the sums fit.
    """
    rows, channels, _ = x.shape
    partial = np.zeros((blocks, 2, groups, channels), np.float64)
    rows_per_block = (rows + blocks - 1) // blocks
    x2 = x.reshape((rows, channels))
    dy2 = dy.reshape((rows, channels))
    for block in prange(blocks):
        start = block * rows_per_block
        stop = min(rows, start + rows_per_block)
        t0 = partial[block, 0]
        t1 = partial[block, 1]
        for o in range(start, stop):
            g = (o // period) % groups
            for c in range(channels):
                d = np.float64(dy2[o, c])
                t0[g, c] += d
                t1[g, c] += d * (np.float64(x2[o, c]) - mean[g, c])
    return _sum_blocks(partial)


@kernel
def _gradient_sums_planes(dy, x, mean, groups, period, blocks):  # type: ignore[no-untyped-def]
    """``sums[0] = sum(dy)`` and ``sums[1] = sum(dy * (x - mean))`` per group and channel (float64).

    ``mean`` is float64 ``[groups, C]``.
    """
    rows, channels, inner = x.shape
    partial = np.zeros((blocks, 2, groups, channels), np.float64)
    rows_per_block = (rows + blocks - 1) // blocks
    for block in prange(blocks):
        start = block * rows_per_block
        stop = min(rows, start + rows_per_block)
        t0 = partial[block, 0]
        t1 = partial[block, 1]
        for o in range(start, stop):
            g = (o // period) % groups
            for c in range(channels):
                m = mean[g, c]
                a0 = 0.0
                a1 = 0.0
                for i in range(inner):
                    d = np.float64(dy[o, c, i])
                    a0 += d
                    a1 += d * (np.float64(x[o, c, i]) - m)
                t0[g, c] += a0
                t1[g, c] += a1
    return _sum_blocks(partial)


gradient_sums = by_layout(_gradient_sums_rows, _gradient_sums_planes)
