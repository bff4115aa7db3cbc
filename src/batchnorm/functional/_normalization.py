"""The normalising transform with tf.nn.batch_normalization semantics."""

from __future__ import annotations

import torch

from batchnorm.functional._torch_ops import affine_normalize
from batchnorm.functional._validation import (
    check_broadcasts,
    check_floating_input,
    check_positive,
    check_tensor,
)


def batch_normalization(
    x: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    offset: torch.Tensor | None,
    scale: torch.Tensor | None,
    epsilon: float,
) -> torch.Tensor:
    """Normalise ``x`` with given statistics, as tf.nn.batch_normalization.

    .. math::
        y = \\frac{\\gamma (x - \\mu)}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta

    computed as ``inv = rsqrt(variance + epsilon) * scale``, ``y = (x - mean) * inv + offset``
    (tf writes ``x * inv + (offset - mean * inv)``, which loses digits when ``|mean| >> std``). ``mean``, ``variance``, ``offset`` and ``scale``
    broadcast against ``x``; ``offset`` / ``scale`` may be None (0 / 1).

    Example:
        >>> x = torch.randn(8, 3)
        >>> y = batch_normalization(x, x.mean(0), x.var(0, unbiased=False), None, None, 1e-3)
    """
    check_floating_input(x)
    check_positive(epsilon, "epsilon")
    for name, tensor in (
        ("mean", mean),
        ("variance", variance),
        ("offset", offset),
        ("scale", scale),
    ):
        check_tensor(tensor, name, optional=name in ("offset", "scale"))
        if tensor is not None:
            check_broadcasts(tensor, x, name, "broadcast against")
    return affine_normalize(x, mean, variance, scale, offset, epsilon)
