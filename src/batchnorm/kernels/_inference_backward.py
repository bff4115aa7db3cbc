"""The backward of inference ``y = (x - M) / sqrt(V + epsilon) * gamma + beta`` in one kernel call.

A batch norm kept in inference while the model around it trains (fine-tuning with frozen
statistics) runs this on every step. With ``inv = 1 / sqrt(V + epsilon)`` and the per-channel
sums ``S_0 = sum(dy)``, ``S_1 = sum(dy (x - M))`` (float64):

.. math::
    dx = dy\\, \\gamma\\, inv, \\quad d\\gamma = S_1\\, inv, \\quad d\\beta = S_0, \\quad
    dM = -S_0\\, \\gamma\\, inv, \\quad dV = -\\tfrac12 \\gamma\\, inv^3 S_1.

``dx`` is the normalising pass run on ``dy`` with mean 0 and offset 0; the sums are the
gradient-sums pass. Either is skipped when nothing needs it.
"""

from __future__ import annotations

import numpy as np

from batchnorm.kernels._elementwise import activation_constants, normalize_blocks
from batchnorm.kernels._half import compute_dtype, widened
from batchnorm.kernels._jit import kernel, setup_helper
from batchnorm.kernels._statistics import gradient_sums_blocks, sum_blocks


@setup_helper
def input_gradient_factor(variance, scale, epsilon, dtype_example):  # type: ignore[no-untyped-def]
    """``(0, scale * inv, 0)`` as ``[1, C]`` rows of the compute dtype: the normalising pass's
    ``(high, factor, shift)`` that turn it into ``dx = dy * scale * inv``."""
    channels = scale.shape[0]
    dtype = compute_dtype(dtype_example)
    zero = np.empty(channels, dtype).reshape((1, channels))
    factor = np.empty(channels, dtype).reshape((1, channels))
    for c in range(channels):
        zero[0, c] = 0.0
        gamma = np.float64(widened(scale[c]))
        factor[0, c] = gamma / np.sqrt(np.float64(widened(variance[0, c])) + epsilon)
    return zero, factor


@setup_helper
def statistic_gradients(sums, variance, scale, epsilon):  # type: ignore[no-untyped-def]
    """``[dM, dV, dgamma, dbeta]`` per channel (float64 ``[4, C]``) from the sums."""
    channels = scale.shape[0]
    gradients = np.empty(4 * channels, np.float64).reshape((4, channels))
    for c in range(channels):
        inv = 1.0 / np.sqrt(np.float64(widened(variance[0, c])) + epsilon)
        gamma = np.float64(widened(scale[c]))
        gradients[0, c] = -sums[0, 0, c] * gamma * inv
        gradients[1, c] = -0.5 * gamma * inv * inv * inv * sums[1, 0, c]
        gradients[2, c] = sums[1, 0, c] * inv
        gradients[3, c] = sums[0, 0, c]
    return gradients


@kernel
def inference_backward(  # type: ignore[no-untyped-def]
    dy, x, mean, variance, scale, epsilon, sums_wanted, period, blocks, out
):
    """``out = dx`` (skipped when ``out`` is None) and, when ``sums_wanted`` is not None, the
    per-channel ``[dM, dV, dgamma, dbeta]`` (float64 ``[4, C]``; ``[0, C]`` otherwise).

    ``mean``, ``variance``: ``[1, C]``; ``scale``: ``[C]``.
    """
    channels = x.shape[1]
    if out is not None:
        zero, factor = input_gradient_factor(variance, scale, epsilon, dy)
        constants = activation_constants(0.0, dy)
        normalize_blocks(dy, zero, factor, zero, 1, period, blocks, out, None, constants)
    if sums_wanted is None:
        return np.empty(0, np.float64).reshape((0, channels))
    partial = np.zeros((blocks, 2, 1, channels), np.float64)
    gradient_sums_blocks(dy, x, mean, 1, period, blocks, partial)
    return statistic_gradients(sum_blocks(partial), variance, scale, epsilon)
