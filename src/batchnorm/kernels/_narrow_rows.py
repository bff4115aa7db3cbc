"""Channels-last rows of a few channels, read as wide virtual rows.

A rows pass loops over the channels of each row. With 3 to a few dozen channels (an image's RGB
stored channels last, ``(32, 112, 112, 3)``; a table of 8 features) that inner loop is a few
values long, and the passes ran at a fraction of the memory's speed: a (32, 112, 112, 8)
training forward took 1.7 ms, 8 copies' time. Here ``copies`` consecutive rows (contiguous in
memory) are one virtual row of ``copies * C`` values, about :data:`VIRTUAL_WIDTH`: element ``j``
of a virtual row is channel ``j % C``. Per-channel coefficients are tiled ``copies`` times; sums
are taken per virtual element and folded back into the ``C`` channels at the end of the block
(the rows left over, fewer than ``copies``, run one by one). The order of additions depends on
the shape alone, so results stay the same for any thread count.

Used by the narrow build's block helpers (:func:`batchnorm.kernels._jit.layout_for`) of the
moments, gradient sums, normalising, input-gradient and inference-backward passes without a mask
(:mod:`batchnorm.kernels._statistics`, :mod:`batchnorm.kernels._elementwise`,
:mod:`batchnorm.kernels._inference_backward`), run by run of rows of one ghost batch.
"""

from __future__ import annotations

import numpy as np

from batchnorm.kernels._half import compute_dtype, widened
from batchnorm.kernels._jit import NARROW_CHANNELS, setup_helper

# Rows of fewer than NARROW_CHANNELS channels (the "narrow" build, batchnorm.kernels._jit.layout_for)
# are read as virtual rows of about VIRTUAL_WIDTH values.
VIRTUAL_WIDTH = 64


@setup_helper
def virtual_copies(channels):  # type: ignore[no-untyped-def]
    """Rows per virtual row: ``VIRTUAL_WIDTH // C`` for narrow rows, 1 (none) otherwise."""
    if channels >= NARROW_CHANNELS:
        return 1
    return VIRTUAL_WIDTH // channels


@setup_helper
def tiled(values, copies):  # type: ignore[no-untyped-def]
    """``values`` (``[C]``) repeated ``copies`` times, in their compute dtype (half bits
    widened)."""
    channels = values.shape[0]
    result = np.empty(copies * channels, compute_dtype(values))
    for k in range(copies):
        for c in range(channels):
            result[k * channels + c] = widened(values[c])
    return result


@setup_helper
def virtual_rows(x2, start, stop, copies):  # type: ignore[no-untyped-def]
    """Rows ``start:stop`` of ``x2[o, c]`` (contiguous), up to the last whole virtual row, as
    ``[virtual rows, copies * C]`` (a view). Indexed in 2-D: flat indices ``base + j`` kept
    the loops scalar (Numba's negative-index test on a sum it cannot bound), 4x slower."""
    count = (stop - start) // copies
    return x2[start : start + count * copies].reshape((count, copies * x2.shape[1]))


@setup_helper
def fold(virtual, totals):  # type: ignore[no-untyped-def]
    """Adds the virtual elements' sums (``[copies * C]``) into the channels' (``[C]``)."""
    channels = totals.shape[0]
    for j in range(virtual.shape[0]):
        totals[j % channels] += virtual[j]


@setup_helper
def narrow_moments(x2, shift, start, stop, copies, t1, t2):  # type: ignore[no-untyped-def]
    """``t1 += sum(x - shift)``, ``t2 += sum((x - shift)^2)`` over rows ``start:stop``, in
    float64, as :func:`batchnorm.kernels._statistics.moments_rows_block`."""
    channels = x2.shape[1]
    width = copies * channels
    k = tiled(shift, copies)
    a1 = np.zeros(width, np.float64)
    a2 = np.zeros(width, np.float64)
    xv = virtual_rows(x2, start, stop, copies)
    for r in range(xv.shape[0]):
        for j in range(width):
            v = np.float64(widened(xv[r, j])) - k[j]
            a1[j] += v
            a2[j] += v * v
    for o in range(start + xv.shape[0] * copies, stop):
        for c in range(channels):
            v = np.float64(widened(x2[o, c])) - shift[c]
            a1[c] += v
            a2[c] += v * v
    fold(a1, t1)
    fold(a2, t2)


@setup_helper
def narrow_gradient_sums(dy2, x2, mean, start, stop, copies, u0, u1):  # type: ignore[no-untyped-def]
    """``u0 += sum(dy)``, ``u1 += sum(dy * (x - mean))`` over rows ``start:stop``, in float64,
    as :func:`batchnorm.kernels._statistics.gradient_sums_rows_block`."""
    channels = x2.shape[1]
    width = copies * channels
    m = tiled(mean, copies)
    a0 = np.zeros(width, np.float64)
    a1 = np.zeros(width, np.float64)
    xv = virtual_rows(x2, start, stop, copies)
    dyv = virtual_rows(dy2, start, stop, copies)
    for r in range(xv.shape[0]):
        for j in range(width):
            d = np.float64(widened(dyv[r, j]))
            a0[j] += d
            a1[j] += d * (np.float64(widened(xv[r, j])) - m[j])
    for o in range(start + xv.shape[0] * copies, stop):
        for c in range(channels):
            d = np.float64(widened(dy2[o, c]))
            a0[c] += d
            a1[c] += d * (np.float64(widened(x2[o, c])) - widened(mean[c]))
    fold(a0, u0)
    fold(a1, u1)
