"""Per-channel sums for batch statistics, in one pass, with float64 accumulators.

Inputs are in canonical layout ``x[o, c, i]`` (rows, channels, inner elements). Row ``o`` belongs to
group ``(o // period) % groups`` (ghost batches; ``groups = 1`` otherwise). Each channel is shifted by
its first element ``k`` before summing, so

    mean = k + S1 / S0,   variance = S2 / S0 - (S1 / S0)^2

with ``S0 = sum(w)``, ``S1 = sum(w (x - k))``, ``S2 = sum(w (x - k)^2)`` stays accurate where
``E[x^2] - E[x]^2`` cancels (data like 1000 + 0.01 * randn).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from batchnorm.kernels._jit import kernel


@kernel
def batch_moments(x, weights, has_weights, groups, period, blocks):  # type: ignore[no-untyped-def]
    """``(mean, variance, total_weight)``, each ``[groups, C]`` float64; 0 where no weight."""
    rows, channels, inner = x.shape
    shift = np.zeros(channels, np.float64)
    if rows * inner > 0:
        for c in range(channels):
            shift[c] = x[0, c, 0]
    partial = np.zeros((blocks, 3, groups, channels), np.float64)
    rows_per_block = (rows + blocks - 1) // blocks
    x2 = x.reshape((rows, channels * inner))
    for block in prange(blocks):
        start = block * rows_per_block
        stop = min(rows, start + rows_per_block)
        s0 = partial[block, 0]
        s1 = partial[block, 1]
        s2 = partial[block, 2]
        for o in range(start, stop):
            g = (o // period) % groups
            if inner == 1:
                # Channels last: a row is C contiguous values, accumulated into C-vectors.
                w = np.float64(weights[o, 0]) if has_weights else 1.0
                row, a1, a2 = x2[o], s1[g], s2[g]
                for c in range(channels):
                    v = np.float64(row[c]) - shift[c]
                    a1[c] += w * v
                    a2[c] += w * v * v
                if has_weights:
                    a0 = s0[g]
                    for c in range(channels):
                        a0[c] += w
            else:
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
    sums = partial[0].copy()
    for block in range(1, blocks):
        sums += partial[block]
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
def gradient_sums(dy, x, mean, groups, period, blocks):  # type: ignore[no-untyped-def]
    """``sums[0] = sum(dy)`` and ``sums[1] = sum(dy * (x - mean))`` per group and channel (float64).

    ``mean`` is float64 ``[groups, C]``.
    """
    rows, channels, inner = x.shape
    partial = np.zeros((blocks, 2, groups, channels), np.float64)
    rows_per_block = (rows + blocks - 1) // blocks
    x2 = x.reshape((rows, channels * inner))
    dy2 = dy.reshape((rows, channels * inner))
    for block in prange(blocks):
        start = block * rows_per_block
        stop = min(rows, start + rows_per_block)
        t0 = partial[block, 0]
        t1 = partial[block, 1]
        for o in range(start, stop):
            g = (o // period) % groups
            if inner == 1:
                row, grad_row, a0, a1, m = x2[o], dy2[o], t0[g], t1[g], mean[g]
                for c in range(channels):
                    d = np.float64(grad_row[c])
                    a0[c] += d
                    a1[c] += d * (np.float64(row[c]) - m[c])
            else:
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
    sums = np.zeros((2, groups, channels), np.float64)
    for block in range(blocks):
        sums += partial[block]
    return sums
