"""Per-channel sums for batch statistics, in one pass, with float64 accumulators.

Inputs are in canonical layout ``x[o, c, i]`` (rows, channels, inner elements). Row ``o`` belongs to
group ``(o // period) % groups`` (ghost batches; ``groups = 1`` otherwise). Each group's channel is
shifted by its first element with non-zero weight ``k`` before summing, so

    mean = k + S1 / S0,   variance = S2 / S0 - (S1 / S0)^2

with ``S0 = sum(w)``, ``S1 = sum(w (x - k))``, ``S2 = sum(w (x - k)^2)`` stays accurate where
``E[x^2] - E[x]^2`` cancels (data like 1000 + 0.01 * randn).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from batchnorm.kernels._half import widened
from batchnorm.kernels._half_sums import plane_gradient_sums_of_half, plane_moments_of_half
from batchnorm.kernels._jit import (
    block_rows,
    by_layout,
    group_run,
    helper,
    kernel,
    rows_view,
    runner,
    setup_helper,
)
from batchnorm.kernels._narrow_rows import narrow_gradient_sums, narrow_moments, virtual_copies


@setup_helper
def first_values(x, weights, masked, groups, period):  # type: ignore[no-untyped-def]
    """Each group's first element with a non-zero weight, per channel (``[groups, C]``
    float64): the shift that keeps the group's sums well conditioned. A masked element (padding
    far from the data) must not be the shift, and neither may another ghost batch's value: a
    group one row long has sums of exactly 0 (variance 0, output beta, gradient 0), and
    groups far apart keep their variance's precision. 0 for a group without weight.
    """
    rows, channels, inner = x.shape
    shift = np.empty(groups * channels, np.float64).reshape((groups, channels))
    # 1.0 once group g has its shift: float64 rather than bool, an array type the kernels
    # allocate anyway (each dtype of np.empty is one more function Numba compiles cold).
    found = np.empty(groups, np.float64)
    for g in range(groups):
        found[g] = 0.0
        for c in range(channels):
            shift[g, c] = 0.0
    missing = groups
    for o in range(rows):
        g = (o // period) % groups
        if found[g] != 0.0:
            continue
        for i in range(inner):
            if masked is None or weights[o, i] != 0:
                for c in range(channels):
                    shift[g, c] = widened(x[o, c, i])
                found[g] = 1.0
                missing -= 1
                break
        if missing == 0:
            break
    return shift


@setup_helper
def sum_blocks(partial):  # type: ignore[no-untyped-def]
    """The per-thread partial sums ``[blocks, k, groups, C]`` added in block order
    (deterministic). Plain loops: array expressions here cost a second of JIT compilation.

    Block by block over each block's sums as one contiguous row, which vectorises: with the
    blocks innermost (one strided load per block and value) adding two blocks of 3 x 4096 sums
    took 17 us, then 4.6, the same bits. One flat loop rather than one per kind and group: 48
    fewer statements for Numba to compile in each kernel that inlines it.
    """
    blocks, kinds, groups, channels = partial.shape
    size = kinds * groups * channels
    flat = partial.reshape((blocks, size))  # each block's sums, contiguous
    sums = np.empty(size, np.float64)
    first = flat[0]
    for i in range(size):
        sums[i] = first[i]
    for block in range(1, blocks):
        part = flat[block]
        for i in range(size):
            sums[i] += part[i]
    return sums.reshape((kinds, groups, channels))


@setup_helper
def moments_from_sums(partial, shift, masked, rows, inner, groups, period):  # type: ignore[no-untyped-def]
    """Mean, variance and total weight from the per-block shifted sums ``[blocks, 3, groups, C]``
    and the shifts ``[groups, C]``."""
    sums = sum_blocks(partial)
    channels = shift.shape[1]
    mean = np.empty(groups * channels, np.float64).reshape((groups, channels))
    variance = np.empty(groups * channels, np.float64).reshape((groups, channels))
    total_weight = np.empty(groups * channels, np.float64).reshape((groups, channels))
    # Row o is in group (o // period) % groups: whole cycles of period * groups rows, then the
    # rest (a loop over the rows cost 0.8 ms for 200,000 rows, half the moments pass).
    rows_in_group = np.empty(groups, np.float64)
    cycle = period * groups
    for g in range(groups):
        rest = rows % cycle - g * period
        rest = 0 if rest < 0 else rest  # min(max(rest, 0), period), without the builtins
        rows_in_group[g] = (rows // cycle) * period + (period if period < rest else rest)
    for g in range(groups):
        for c in range(channels):
            total = sums[0, g, c] if masked is not None else rows_in_group[g] * inner
            total_weight[g, c] = total
            mean[g, c] = 0.0
            variance[g, c] = 0.0
            if total > 0:
                centred = sums[1, g, c] / total
                mean[g, c] = shift[g, c] + centred
                spread = sums[2, g, c] / total - centred * centred
                variance[g, c] = 0.0 if spread < 0.0 else spread  # max(spread, 0.0), NaN kept
    return mean, variance, total_weight


@setup_helper
def weighted_row(x2, o, w, shift, t1, t2):  # type: ignore[no-untyped-def]
    """Row ``o`` with weight ``w`` added into ``t1``, ``t2`` (nothing, whatever its values, for
    ``w == 0``); returns the weight counted."""
    if w == 0:
        return 0.0
    for c in range(x2.shape[1]):
        v = np.float64(widened(x2[o, c])) - shift[c]
        t1[c] += w * v
        t2[c] += w * v * v
    return w


@helper
def moments_rows_block(x, weights, masked, shift, groups, period, start, stop, sums):  # type: ignore[no-untyped-def]
    """Rows ``start:stop`` of ``x[o, c, 0]`` (channels last) added into ``sums[3, groups, C]``.

    ``x - shift`` is taken in float64: in float32 an outlier as the shift cost the variance 4e-4
    relative error, and float32 squares of values near 3e18 overflowed. Rows with zero weight are
    skipped, whatever their values.
    """
    x2 = rows_view(x)
    channels = x2.shape[1]
    if masked is None:
        # Without a mask, runs of rows of one group (the whole block, or `period` rows of a
        # ghost batch) each with its row of accumulators, updated once per four rows (they
        # otherwise cost a load and a store per element). The four rows are the same row of
        # the run's four quarters (rows r, r + q, r + 2q, r + 3q, then the last few rows one
        # by one): four long sequential streams, which the hardware prefetcher follows. Four
        # adjacent rows are four short streams in one page, which it does not: from memory
        # that ran at 2.7 G values/s for 512 channels and 2.4 for 256, against 6.3 and 7.2
        # (one thread).
        o = start
        while o < stop:
            g, run_stop = group_run(o, stop, groups, period)
            t1 = sums[1, g]
            t2 = sums[2, g]
            kg = shift[g]
            q = (run_stop - o) // 4  # rows per quarter
            for r in range(o, o + q):
                for c in range(channels):
                    k = kg[c]
                    v0 = np.float64(widened(x2[r, c])) - k
                    v1 = np.float64(widened(x2[r + q, c])) - k
                    v2 = np.float64(widened(x2[r + 2 * q, c])) - k
                    v3 = np.float64(widened(x2[r + 3 * q, c])) - k
                    t1[c] += (v0 + v1) + (v2 + v3)
                    t2[c] += (v0 * v0 + v1 * v1) + (v2 * v2 + v3 * v3)
            for r in range(o + 4 * q, run_stop):
                for c in range(channels):
                    v = np.float64(widened(x2[r, c])) - kg[c]
                    t1[c] += v
                    t2[c] += v * v
            o = run_stop
        return
    if masked is not None and groups == 1:
        # A mask with one weight per row (padded sequences): four rows (one per quarter, as
        # above) per update, the total weight summed once per row rather than per channel. A
        # row of weight 0 adds exactly 0, whatever its values (inf or NaN padding too): its
        # values are replaced by 0 before they are weighted, a select on a test that is the
        # same for the whole row, so the loop stays vector code. (Updating per row wherever
        # one of the four had weight 0 made a random 80% mask cost 1.5x this.) Each value is
        # loaded whatever its weight, then selected: with the load inside the select
        # (``x - k if w != 0 else 0``) LLVM could not vectorise the conditional loads, and a
        # random 80% mask took 1.9-2.6x the plain pass (AMD EPYC, 2 threads; 1.1-1.4x since).
        t1 = sums[1, 0]
        t2 = sums[2, 0]
        k0 = shift[0]
        total = 0.0
        q = (stop - start) // 4  # rows per quarter
        for o in range(start, start + q):
            w0 = np.float64(weights[o, 0])
            w1 = np.float64(weights[o + q, 0])
            w2 = np.float64(weights[o + 2 * q, 0])
            w3 = np.float64(weights[o + 3 * q, 0])
            if w0 == 0 and w1 == 0 and w2 == 0 and w3 == 0:
                continue
            total += (w0 + w1) + (w2 + w3)
            for c in range(channels):
                k = k0[c]
                u0 = np.float64(widened(x2[o, c])) - k
                u1 = np.float64(widened(x2[o + q, c])) - k
                u2 = np.float64(widened(x2[o + 2 * q, c])) - k
                u3 = np.float64(widened(x2[o + 3 * q, c])) - k
                v0 = u0 if w0 != 0 else 0.0
                v1 = u1 if w1 != 0 else 0.0
                v2 = u2 if w2 != 0 else 0.0
                v3 = u3 if w3 != 0 else 0.0
                t1[c] += (w0 * v0 + w1 * v1) + (w2 * v2 + w3 * v3)
                t2[c] += (w0 * v0 * v0 + w1 * v1 * v1) + (w2 * v2 * v2 + w3 * v3 * v3)
        for o in range(start + 4 * q, stop):
            total += weighted_row(x2, o, np.float64(weights[o, 0]), k0, t1, t2)
        t0 = sums[0, 0]
        for c in range(channels):
            t0[c] += total
        return
    s0 = sums[0]
    s1 = sums[1]
    s2 = sums[2]
    for o in range(start, stop):  # a mask and ghost batches
        g = (o // period) % groups
        w = np.float64(weights[o, 0])
        if w != 0:
            for c in range(channels):
                v = np.float64(widened(x2[o, c])) - shift[g, c]
                s0[g, c] += w
                s1[g, c] += w * v
                s2[g, c] += w * v * v


@helper
def moments_planes_block(x, weights, masked, shift, groups, period, start, stop, sums):  # type: ignore[no-untyped-def]
    """Rows ``start:stop`` of ``x[o, c, i]`` (channel planes) added into ``sums[3, groups, C]``.

    A value of weight 0 adds exactly 0, whatever it is: inf or NaN padding made ``0 * v`` NaN
    and the channel's statistics with it (the rows helpers skip or select such values too)."""
    channels, inner = x.shape[1], x.shape[2]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            k = shift[g, c]
            a0 = 0.0
            a1 = 0.0
            a2 = 0.0
            if masked is not None:
                for i in range(inner):
                    w = np.float64(weights[o, i])
                    u = np.float64(widened(x[o, c, i])) - k
                    v = u if w != 0 else 0.0
                    a0 += w
                    a1 += w * v
                    a2 += w * v * v
            else:
                for i in range(inner):
                    v = np.float64(widened(x[o, c, i])) - k
                    a1 += v
                    a2 += v * v
            sums[0, g, c] += a0
            sums[1, g, c] += a1
            sums[2, g, c] += a2


@helper
def moments_narrow_block(x, weights, masked, shift, groups, period, start, stop, sums):  # type: ignore[no-untyped-def]
    """:func:`moments_rows_block` for rows of a few channels (the narrow build): each run of
    rows of one group read as virtual rows (:func:`narrow_moments`); with a mask, the rows
    block's loops."""
    if masked is not None:
        moments_rows_block(x, weights, masked, shift, groups, period, start, stop, sums)
        return
    x2 = rows_view(x)
    copies = virtual_copies(x2.shape[1])
    o = start
    while o < stop:
        g, run_stop = group_run(o, stop, groups, period)
        narrow_moments(x2, shift[g], o, run_stop, copies, sums[1, g], sums[2, g])
        o = run_stop


@helper
def moments_half_planes_block(x, weights, masked, shift, groups, period, start, stop, sums):  # type: ignore[no-untyped-def]
    """:func:`moments_planes_block` for float16/bfloat16 data: each plane summed in float32
    (:func:`~batchnorm.kernels._half_sums.plane_moments_of_half`); with a mask, the float64
    loops of :func:`moments_planes_block`."""
    if masked is not None:
        moments_planes_block(x, weights, masked, shift, groups, period, start, stop, sums)
        return
    channels = x.shape[1]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            a1, a2 = plane_moments_of_half(x[o, c], shift[g, c])
            sums[1, g, c] += a1
            sums[2, g, c] += a2


moments_block = by_layout(
    moments_rows_block, moments_planes_block, moments_narrow_block, moments_half_planes_block
)


@runner
def moments_blocks(x, weights, masked, shift, groups, period, blocks, partial):  # type: ignore[no-untyped-def]
    """The layout's :data:`moments_block` on each row block, into ``partial[block]``."""
    for block in prange(blocks):
        start, stop = block_rows(x.shape[0], blocks, block)
        moments_block(x, weights, masked, shift, groups, period, start, stop, partial[block])


@kernel
def batch_moments(x, weights, masked, groups, period, blocks):  # type: ignore[no-untyped-def]
    """``(mean, variance, total_weight)``, each ``[groups, C]`` float64; 0 where no weight.

    Each row block adds its rows straight into its float64 sums (:func:`moments_rows_block`,
    :func:`moments_planes_block`).
    """
    rows, channels, inner = x.shape
    shift = first_values(x, weights, masked, groups, period)
    partial = np.zeros((blocks, 3, groups, channels), np.float64)
    moments_blocks(x, weights, masked, shift, groups, period, blocks, partial)
    return moments_from_sums(partial, shift, masked, rows, inner, groups, period)


# A run of rows of one group (channels last) whose dy and x take more bytes than this is summed
# two rows per accumulator update rather than four (gradient_sums_rows_block). On the AMD EPYC
# (Zen 5) machine, 2 threads, standalone copies of both loops: (16384, 512) 1.21 -> 0.93 ms,
# (8192, 1024) 1.28 -> 1.12, (200704, 64) 2.05 -> 1.75 (blocks of 4-6.4 MB); in blocks that fit
# the caches four are faster: (64, 1000) 4 -> 5 us, (32, 4096) 7 -> 10, (1024, 256) 15 -> 17.
STREAMED_RUN_BYTES = 1 << 21


@helper
def gradient_sums_rows_block(dy, x, mean, groups, period, start, stop, sums):  # type: ignore[no-untyped-def]
    """Rows ``start:stop`` (channels last) added into ``sums[2, groups, C]``.

    Products and sums are float64, as in the moments: float32 partial sums of
    ``dy * (x - mean)`` overflowed where the data are near 1e18 although the sums fit.
    """
    dy2 = rows_view(dy)
    x2 = rows_view(x)
    channels = x2.shape[1]
    # Runs of rows of one group (the whole block without ghost batches), each with its row of
    # accumulators. A run that fits the core's caches updates them once per four rows (one per
    # quarter of the run, as in moments_rows_block); a longer one, streamed from memory, once
    # per two (one per half): four rows of dy and x each are eight streams, which the hardware
    # prefetchers of the AMD EPYC (Zen 5) machine did not keep fed (see STREAMED_RUN_BYTES).
    streamed = STREAMED_RUN_BYTES // (2 * channels * x2.itemsize)  # rows
    o = start
    while o < stop:
        g, run_stop = group_run(o, stop, groups, period)
        u0 = sums[0, g]
        u1 = sums[1, g]
        m = mean[g]
        if run_stop - o > streamed:
            q = (run_stop - o) // 2  # rows per half
            for r in range(o, o + q):
                for c in range(channels):
                    k = widened(m[c])
                    d0 = np.float64(widened(dy2[r, c]))
                    d1 = np.float64(widened(dy2[r + q, c]))
                    u0[c] += d0 + d1
                    u1[c] += d0 * (np.float64(widened(x2[r, c])) - k) + d1 * (
                        np.float64(widened(x2[r + q, c])) - k
                    )
            done = o + 2 * q
        else:
            q = (run_stop - o) // 4  # rows per quarter
            for r in range(o, o + q):
                for c in range(channels):
                    k = widened(m[c])
                    d0 = np.float64(widened(dy2[r, c]))
                    d1 = np.float64(widened(dy2[r + q, c]))
                    d2 = np.float64(widened(dy2[r + 2 * q, c]))
                    d3 = np.float64(widened(dy2[r + 3 * q, c]))
                    u0[c] += (d0 + d1) + (d2 + d3)
                    u1[c] += (
                        d0 * (np.float64(widened(x2[r, c])) - k)
                        + d1 * (np.float64(widened(x2[r + q, c])) - k)
                    ) + (
                        d2 * (np.float64(widened(x2[r + 2 * q, c])) - k)
                        + d3 * (np.float64(widened(x2[r + 3 * q, c])) - k)
                    )
            done = o + 4 * q
        for r in range(done, run_stop):
            for c in range(channels):
                d = np.float64(widened(dy2[r, c]))
                u0[c] += d
                u1[c] += d * (np.float64(widened(x2[r, c])) - widened(m[c]))
        o = run_stop


@helper
def gradient_sums_planes_block(dy, x, mean, groups, period, start, stop, sums):  # type: ignore[no-untyped-def]
    """Rows ``start:stop`` (channel planes) added into ``sums[2, groups, C]``."""
    channels, inner = x.shape[1], x.shape[2]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            m = widened(mean[g, c])
            a0 = 0.0
            a1 = 0.0
            for i in range(inner):
                d = np.float64(widened(dy[o, c, i]))
                a0 += d
                a1 += d * (np.float64(widened(x[o, c, i])) - m)
            sums[0, g, c] += a0
            sums[1, g, c] += a1


@helper
def gradient_sums_narrow_block(dy, x, mean, groups, period, start, stop, sums):  # type: ignore[no-untyped-def]
    """:func:`gradient_sums_rows_block` for rows of a few channels (the narrow build): each run
    of rows of one group read as virtual rows (:func:`narrow_gradient_sums`)."""
    dy2 = rows_view(dy)
    x2 = rows_view(x)
    copies = virtual_copies(x2.shape[1])
    o = start
    while o < stop:
        g, run_stop = group_run(o, stop, groups, period)
        narrow_gradient_sums(dy2, x2, mean[g], o, run_stop, copies, sums[0, g], sums[1, g])
        o = run_stop


@helper
def gradient_sums_half_planes_block(dy, x, mean, groups, period, start, stop, sums):  # type: ignore[no-untyped-def]
    """:func:`gradient_sums_planes_block` for float16/bfloat16 data: each plane summed in
    float32 (:func:`~batchnorm.kernels._half_sums.plane_gradient_sums_of_half`)."""
    channels = x.shape[1]
    for o in range(start, stop):
        g = (o // period) % groups
        for c in range(channels):
            a0, a1 = plane_gradient_sums_of_half(dy[o, c], x[o, c], mean[g, c])
            sums[0, g, c] += a0
            sums[1, g, c] += a1


gradient_sums_block = by_layout(
    gradient_sums_rows_block,
    gradient_sums_planes_block,
    gradient_sums_narrow_block,
    gradient_sums_half_planes_block,
)


@runner
def gradient_sums_blocks(dy, x, mean, groups, period, blocks, partial):  # type: ignore[no-untyped-def]
    """The layout's :data:`gradient_sums_block` on each row block, into ``partial[block]``."""
    for block in prange(blocks):
        start, stop = block_rows(x.shape[0], blocks, block)
        gradient_sums_block(dy, x, mean, groups, period, start, stop, partial[block])


@kernel
def gradient_sums(dy, x, mean, groups, period, blocks):  # type: ignore[no-untyped-def]
    """``sums[0] = sum(dy)`` and ``sums[1] = sum(dy * (x - mean))`` per group and channel (float64).

    ``mean`` is float64 ``[groups, C]``.
    """
    channels = x.shape[1]
    partial = np.zeros((blocks, 2, groups, channels), np.float64)
    gradient_sums_blocks(dy, x, mean, groups, period, blocks, partial)
    return sum_blocks(partial)
