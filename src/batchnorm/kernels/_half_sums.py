"""One channel plane's float64 sums of half-precision data, in float32 arithmetic.

The channel-planes passes sum each plane (``x[o, c, :]``, contiguous) into float64 sums. On
float32 data each value is widened to float64 and summed there, at the memory's speed. On
float16/bfloat16 data, half the bytes, the float64 arithmetic was the limit instead (each value
converted twice, then four float64 operations: a bfloat16 training forward of 32x128x28x28
spent 0.44 ms of its 0.72 ms in the moments), so the half-planes build
(:func:`~batchnorm.kernels._jit.layout_for`) sums each plane in float32, in chunks of
:data:`CHUNK` values whose sums are added in float64:

- :func:`plane_moments_of_half`, about the plane's own float32 mean ``centre`` (a first pass
  over the plane, which then sits in the L1 cache): ``b1 = sum(v - centre)``,
  ``b2 = sum((v - centre)^2)``, then with ``d = centre - k``

  .. math::
      \\sum (v - k) = b_1 + n d, \\qquad \\sum (v - k)^2 = b_2 + d (2 b_1 + n d).

  Centred on the plane, no large terms cancel in float32: an outlier weighs only its own square,
  whatever value comes first.
- :func:`plane_gradient_sums_of_half`, with ``mean = high + low`` (``high`` its float32
  rounding): ``sum(dy (v - mean)) = sum(dy (v - high)) - low * sum(dy)``.

Where float32 could have lost or overflowed a square or a product (a sum of squares outside
``[1e-30, 1e30]``, a product sum below ``1e-25`` in magnitude, anything not finite: values near
1e-20 or 1e19, inf, NaN), the plane is summed again in float64, so every input keeps the float64
guarantees and only its time changes. The sums are then the float32 kernels' within float32
rounding (relative 1e-7 of the sums of magnitudes, 256 values a chunk) rather than equal to the
bit. Float data never compile these: their builds call the planes helpers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from batchnorm.kernels._half import widened
from batchnorm.kernels._jit import compiled

# Values summed in float32 before their sums are added in float64: rounding errors of at most
# 256 / 32 additions per lane (8-wide vectors, 4 interleaved) in each float32 sum. The chunks
# are counted (``range(count)``, ``values[start + i]``): with ``range(start, stop)`` LLVM left
# the loop scalar, 4x slower.
CHUNK = 256


# The float64 loops below are the planes helpers' own (moments_planes_block,
# gradient_sums_planes_block), here for the planes float32 cannot sum. The planes helpers keep
# theirs inline: a call per plane cost the 64x512x7x7 passes 8%, and one more compiled function
# a float32 planes kernel's cold compilation 0.1-0.2 s.
def _plane_moments_in_float64(values: Any, shift: Any) -> Any:
    a1 = 0.0
    a2 = 0.0
    for i in range(values.shape[0]):
        v = np.float64(widened(values[i])) - shift
        a1 += v
        a2 += v * v
    return a1, a2


def _plane_moments_of_half(values: Any, shift: Any) -> Any:
    """``(sum(v - shift), sum((v - shift)^2))`` in float64 over one plane of half ``values``."""
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
        return plane_moments_in_float64(values, shift)
    d = np.float64(centre) - shift
    return a1 + n * d, a2 + d * (2.0 * a1 + n * d)


def _plane_gradient_sums_in_float64(dy: Any, values: Any, mean: Any) -> Any:
    a0 = 0.0
    a1 = 0.0
    for i in range(values.shape[0]):
        d = np.float64(widened(dy[i]))
        a0 += d
        a1 += d * (np.float64(widened(values[i])) - mean)
    return a0, a1


def _plane_gradient_sums_of_half(dy: Any, values: Any, mean: Any) -> Any:
    """``(sum(dy), sum(dy * (v - mean)))`` in float64 over one plane of half ``dy`` and
    ``values`` (``mean`` float64)."""
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
        return plane_gradient_sums_in_float64(dy, values, mean)
    return a0, a1 - low * a0


plane_moments_in_float64 = compiled(_plane_moments_in_float64, from_python=False)
plane_gradient_sums_in_float64 = compiled(_plane_gradient_sums_in_float64, from_python=False)
plane_moments_of_half = compiled(_plane_moments_of_half, from_python=False)
plane_gradient_sums_of_half = compiled(_plane_gradient_sums_of_half, from_python=False)
