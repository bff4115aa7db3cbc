"""Batch moments with tf.nn semantics."""

from __future__ import annotations

from typing import Any

import torch

from batchnorm.functional._torch_ops import reduced_moments
from batchnorm.functional._validation import (
    check_bool,
    check_broadcasts,
    check_floating_input,
    check_mask_values,
    reduction_axes,
)


def moments(
    x: torch.Tensor, axes: Any, mask: torch.Tensor | None = None, keepdims: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of ``x`` over ``axes`` (tf.nn.moments / tf.nn.weighted_moments).

    .. math::
        \\mu = \\frac{\\sum w x}{\\sum w}, \\qquad \\sigma^2 = \\frac{\\sum w (x - \\mu)^2}{\\sum w}

    with ``w = mask`` (frequency weights broadcastable to ``x``) or 1. Where the weights of a
    channel sum to 0 the mean and variance are 0, not NaN (tf.math.divide_no_nan).

    Args:
        x: floating tensor.
        axes: int or sequence of ints, the axes reduced (negative allowed); empty reduces
            nothing (mean ``x``, variance 0, as tf.nn.moments).
        mask: optional weights broadcastable to ``x`` (bool or float).
        keepdims: keep the reduced axes with size 1.

    Example:
        >>> mean, variance = moments(torch.randn(8, 3), axes=[0])
    """
    check_floating_input(x)
    keepdims = check_bool(keepdims, "keepdims")
    dims = reduction_axes(axes, x.ndim)
    weights = None
    if mask is not None:
        check_mask_values(mask, x)
        check_broadcasts(mask, x, "mask", "broadcast to the shape of")
        weights = mask
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    result = reduced_moments(x.to(compute_dtype), dims, weights)
    mean, variance = result.mean, result.variance
    if not keepdims:
        mean, variance = (
            mean.squeeze(dims) if dims else mean,
            variance.squeeze(dims) if dims else variance,
        )
    return mean.to(x.dtype), variance.to(x.dtype)
