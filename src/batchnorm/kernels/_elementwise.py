"""Element-wise passes in canonical layout ``x[o, c, i]``, coefficients per (group, channel).

The mean is split in two numbers of the compute dtype, ``mean_high + mean_low``, so that
``(x - mean_high) - mean_low`` keeps the digits a single rounded mean would lose.
"""

from __future__ import annotations

from numba import prange

from batchnorm.kernels._jit import kernel


@kernel
def affine_normalize(x, mean_high, mean_low, factor, offset, groups, period, blocks, out):  # type: ignore[no-untyped-def]
    """``out = ((x - mean_high) - mean_low) * factor + offset``."""
    rows, channels, inner = x.shape
    rows_per_block = (rows + blocks - 1) // blocks
    for block in prange(blocks):
        start = block * rows_per_block
        stop = min(rows, start + rows_per_block)
        for o in range(start, stop):
            g = (o // period) % groups
            if inner == 1:
                for c in range(channels):
                    out[o, c, 0] = ((x[o, c, 0] - mean_high[g, c]) - mean_low[g, c]) * factor[
                        g, c
                    ] + offset[g, c]
            else:
                for c in range(channels):
                    high = mean_high[g, c]
                    low = mean_low[g, c]
                    f = factor[g, c]
                    b = offset[g, c]
                    for i in range(inner):
                        out[o, c, i] = ((x[o, c, i] - high) - low) * f + b


@kernel
def batch_norm_input_gradient(  # type: ignore[no-untyped-def]
    dy,
    x,
    weights,
    has_weights,
    mean_high,
    mean_low,
    k_dy,
    k_centred,
    k_constant,
    groups,
    period,
    blocks,
    out,
):
    """``out = k_dy * dy + w * (k_centred * (x - mean) + k_constant)`` (w = 1 without weights)."""
    rows, channels, inner = x.shape
    rows_per_block = (rows + blocks - 1) // blocks
    for block in prange(blocks):
        start = block * rows_per_block
        stop = min(rows, start + rows_per_block)
        for o in range(start, stop):
            g = (o // period) % groups
            if inner == 1:
                w = weights[o, 0] if has_weights else 1.0
                for c in range(channels):
                    centred = (x[o, c, 0] - mean_high[g, c]) - mean_low[g, c]
                    out[o, c, 0] = k_dy[g, c] * dy[o, c, 0] + w * (
                        k_centred[g, c] * centred + k_constant[g, c]
                    )
            else:
                for c in range(channels):
                    high = mean_high[g, c]
                    low = mean_low[g, c]
                    a = k_dy[g, c]
                    b = k_centred[g, c]
                    d = k_constant[g, c]
                    if has_weights:
                        for i in range(inner):
                            centred = (x[o, c, i] - high) - low
                            out[o, c, i] = a * dy[o, c, i] + weights[o, i] * (b * centred + d)
                    else:
                        for i in range(inner):
                            out[o, c, i] = a * dy[o, c, i] + (b * ((x[o, c, i] - high) - low) + d)
