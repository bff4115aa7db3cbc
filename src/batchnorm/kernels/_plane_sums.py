"""One channel plane's float64 sums, in float32 arithmetic where the data are half precision.

The channel-planes passes sum each plane (``x[o, c, :]``, contiguous) into float64 results:

- :func:`add_moments`: ``sum(v - k)`` and ``sum((v - k)^2)`` about the channel's shift ``k``;
- :func:`add_gradient_sums`: ``sum(dy)`` and ``sum(dy * (v - mean))``;
- :func:`add_input_gradient_and_sums`: the same, with ``dx = dy * factor`` written beside them
  (the inference backward).

Each takes one sample's planes (``[C, inner]``) and adds into per-channel float64 sums.

On float32 and float64 data each value is widened to float64 and summed there: one pass, which
on float32 data runs at the memory's speed. On float16/bfloat16 data, which take half the bytes,
the float64 arithmetic was the limit instead (each value converted twice, four float64
operations per value: a bfloat16 training forward of 32x128x28x28 spent 0.44 ms of its 0.72 ms
in the moments), so half data are summed in float32, in chunks of :data:`CHUNK` values whose
sums are added in float64:

- moments about the plane's own float32 mean ``centre`` (a first pass over the plane, which
  then sits in the L1 cache): ``b1 = sum(v - centre)``, ``b2 = sum((v - centre)^2)``, then
  ``d = centre - k``, ``sum(v - k) = b1 + n d`` and ``sum((v - k)^2) = b2 + d (2 b1 + n d)``.
  Centred on the plane, no large terms cancel in float32: an outlier in the plane weighs only
  its own square, whatever value comes first.
- gradient sums with ``mean = high + low`` (``high`` its float32 rounding):
  ``sum(dy (v - mean)) = sum(dy (v - high)) - low * sum(dy)``.

Where float32 could have lost or overflowed a square or a product (a sum of squares outside
``[1e-30, 1e30]``, a product sum below ``1e-25`` in magnitude, anything not finite: values near
1e-20 or 1e19, inf, NaN), the plane is summed again in float64, so every input keeps the float64
guarantees; only its time changes. A plane's sums are then the float32 kernels' within float32
rounding (relative 1e-7 of the sums of magnitudes, 256 values a chunk), where float32 data give
the float64 sums.

The two cases are one name, picked by Numba from the data's dtype when it compiles a caller
(``overload``), so a float32 kernel compiles no half loops and a half kernel no float ones. The
float64 plane loops are inlined into the loop over the planes (``inline="always"``): a call per
plane cost the 64x512x7x7 (49 values a plane) passes 8%.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import types
from numba.core.extending import overload, register_jitable

from batchnorm.kernels._half import BFLOAT16_BITS, FLOAT16_BITS, narrowed, widened
from batchnorm.kernels._jit import OVERLOAD_OPTIONS as _OPTIONS

# Values summed in float32 before their sums are added in float64: rounding errors of at most
# 256 / 32 additions per lane (8-wide vectors, 4 interleaved) in each float32 sum. The chunks
# are counted (``range(count)``, ``values[start + i]``): with ``range(start, stop)`` LLVM left
# the loop scalar, 4x slower.
CHUNK = 256


def add_moments(planes: Any, shift: Any, s1: Any, s2: Any) -> Any:
    """``s1[c] += sum(v - shift[c])``, ``s2[c] += sum((v - shift[c])^2)`` over each plane
    ``planes[c]`` (one sample's ``[C, inner]``), in float64."""
    raise NotImplementedError("compiled by Numba only (overload)")


def add_gradient_sums(dy: Any, planes: Any, mean: Any, s0: Any, s1: Any) -> Any:
    """``s0[c] += sum(dy[c])``, ``s1[c] += sum(dy[c] * (v - mean[c]))`` over each plane
    ``planes[c]``, in float64 (``mean`` float64)."""
    raise NotImplementedError("compiled by Numba only (overload)")


def add_input_gradient_and_sums(
    dy: Any, planes: Any, mean: Any, factor: Any, out: Any, s0: Any, s1: Any
) -> Any:
    """``out[c] = dy[c] * factor[c]`` and :func:`add_gradient_sums` (``mean`` of any float
    dtype, widened)."""
    raise NotImplementedError("compiled by Numba only (overload)")


def _is_half(array: types.Array) -> bool:
    return array.dtype in (BFLOAT16_BITS, FLOAT16_BITS)


@register_jitable(inline="always", **_OPTIONS)
def _plane_moments_in_float64(values: Any, shift: Any) -> Any:
    a1 = 0.0
    a2 = 0.0
    for i in range(values.shape[0]):
        v = np.float64(widened(values[i])) - shift
        a1 += v
        a2 += v * v
    return a1, a2


@register_jitable(**_OPTIONS)
def _plane_moments_of_half(values: Any, shift: Any) -> Any:
    n = values.shape[0]
    total = np.float32(0.0)
    for i in range(n):
        total += widened(values[i])
    centre = total / np.float32(n)
    a1 = 0.0
    a2 = 0.0
    full = n // CHUNK
    for chunk in range(full + 1):
        start = chunk * CHUNK
        count = CHUNK if chunk < full else n - start
        b1 = np.float32(0.0)
        b2 = np.float32(0.0)
        for i in range(count):
            u = widened(values[start + i]) - centre
            b1 += u
            b2 += u * u
        a1 += np.float64(b1)
        a2 += np.float64(b2)
    if not (a2 >= 1e-30 and a2 <= 1e30):  # squares float32 may have lost, inf or NaN
        return _plane_moments_in_float64(values, shift)
    d = np.float64(centre) - shift
    return a1 + n * d, a2 + d * (2.0 * a1 + n * d)


@overload(add_moments, jit_options=_OPTIONS)
def _add_moments(planes: Any, shift: Any, s1: Any, s2: Any) -> Any:
    plane_moments = _plane_moments_of_half if _is_half(planes) else _plane_moments_in_float64

    def add(planes: Any, shift: Any, s1: Any, s2: Any) -> None:
        for c in range(planes.shape[0]):
            a1, a2 = plane_moments(planes[c], shift[c])
            s1[c] += a1
            s2[c] += a2

    return add


@register_jitable(inline="always", **_OPTIONS)
def _plane_gradient_sums_in_float64(dy: Any, values: Any, mean: Any) -> Any:
    a0 = 0.0
    a1 = 0.0
    for i in range(values.shape[0]):
        d = np.float64(widened(dy[i]))
        a0 += d
        a1 += d * (np.float64(widened(values[i])) - mean)
    return a0, a1


@register_jitable(**_OPTIONS)
def _plane_gradient_sums_of_half(dy: Any, values: Any, mean: Any) -> Any:
    n = values.shape[0]
    high = np.float32(mean)
    low = mean - np.float64(high)
    a0 = 0.0
    a1 = 0.0
    full = n // CHUNK
    for chunk in range(full + 1):
        start = chunk * CHUNK
        count = CHUNK if chunk < full else n - start
        b0 = np.float32(0.0)
        b1 = np.float32(0.0)
        for i in range(count):
            d = widened(dy[start + i])
            b0 += d
            b1 += d * (widened(values[start + i]) - high)
        a0 += np.float64(b0)
        a1 += np.float64(b1)
    # Products float32 may have lost (tiny) or overflowed, and inf or NaN: again in float64.
    if not (abs(a1) >= 1e-25 and abs(a1) <= 1e30 and abs(a0) <= 1e30):
        return _plane_gradient_sums_in_float64(dy, values, mean)
    return a0, a1 - low * a0


@overload(add_gradient_sums, jit_options=_OPTIONS)
def _add_gradient_sums(dy: Any, planes: Any, mean: Any, s0: Any, s1: Any) -> Any:
    half = _is_half(planes)
    plane_sums = _plane_gradient_sums_of_half if half else _plane_gradient_sums_in_float64

    def add(dy: Any, planes: Any, mean: Any, s0: Any, s1: Any) -> None:
        for c in range(planes.shape[0]):
            a0, a1 = plane_sums(dy[c], planes[c], mean[c])
            s0[c] += a0
            s1[c] += a1

    return add


def _input_gradient_and_sums_in_float64(
    dy: Any, planes: Any, mean: Any, factor: Any, out: Any, s0: Any, s1: Any
) -> Any:
    # One loop per plane: on float32 data it runs at the memory's speed, and a second loop
    # for the sums made a 64x64x56x56 inference forward+backward 10% slower.
    for c in range(planes.shape[0]):
        m = np.float64(widened(mean[c]))
        f = factor[c]
        target = out[c]
        a0 = 0.0
        a1 = 0.0
        for i in range(planes.shape[1]):
            e = widened(dy[c, i])
            target[i] = narrowed(e * f, target)
            d = np.float64(e)
            a0 += d
            a1 += d * (np.float64(widened(planes[c, i])) - m)
        s0[c] += a0
        s1[c] += a1


def _input_gradient_and_sums_of_half(
    dy: Any, planes: Any, mean: Any, factor: Any, out: Any, s0: Any, s1: Any
) -> Any:
    for c in range(planes.shape[0]):
        f = factor[c]
        target = out[c]
        for i in range(planes.shape[1]):
            target[i] = narrowed(widened(dy[c, i]) * f, target)
        m = np.float64(widened(mean[c]))
        a0, a1 = _plane_gradient_sums_of_half(dy[c], planes[c], m)
        s0[c] += a0
        s1[c] += a1


@overload(add_input_gradient_and_sums, jit_options=_OPTIONS)
def _add_input_gradient_and_sums(
    dy: Any, planes: Any, mean: Any, factor: Any, out: Any, s0: Any, s1: Any
) -> Any:
    if _is_half(planes):
        return _input_gradient_and_sums_of_half
    return _input_gradient_and_sums_in_float64
