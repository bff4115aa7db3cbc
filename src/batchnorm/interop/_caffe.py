"""Caffe's BatchNorm (and Scale) blobs as a :class:`BatchNormalization`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from batchnorm.functional._validation import check_fraction
from batchnorm.layers import BatchNormalization


def from_caffe(
    mean_blob: Any,
    variance_blob: Any,
    scale_factor_blob: Any,
    gamma: Any = None,
    beta: Any = None,
    epsilon: float = 1e-5,
    *,
    moving_average_fraction: float = 0.999,
) -> BatchNormalization:
    """A layer equal to a Caffe BatchNorm layer (and its following Scale layer, if given).

    Caffe keeps the sums ``mean_blob = sum_k lambda^k mean_k``, ``variance_blob = sum_k lambda^k
    var_k`` (unbiased, ``m / (m - 1)``) and ``s = sum_k lambda^k`` and normalises at test time with

    .. math::
        y = \\gamma \\frac{x - \\text{mean\\_blob} / s}{\\sqrt{\\text{variance\\_blob} / s + \\epsilon}} + \\beta

    (statistics 0 when ``s = 0``). The layer gets ``moving_mean = mean_blob / s``,
    ``moving_variance = variance_blob / s`` and ``moving_average_weight = s``, so training on
    continues Caffe's averaging exactly (``moving_average="debiased"``,
    ``momentum = moving_average_fraction``, unbiased variance, ``axis=1``). ``gamma`` and ``beta``
    are the Scale layer's blobs (``beta`` is its optional bias); without them the layer has no
    scale / offset, like Caffe's BatchNorm alone.

    Args:
        mean_blob, variance_blob: shape ``(C,)`` arrays or tensors.
        scale_factor_blob: shape ``(1,)`` or a scalar.
        gamma, beta: shape ``(C,)`` or None.
        epsilon: Caffe's ``eps`` (default 1e-5).
        moving_average_fraction: Caffe's ``moving_average_fraction`` (default 0.999).

    Example:
        >>> layer = from_caffe(np.zeros(3), np.ones(3), np.ones(1))
    """
    # Checked under its own name: the layer's check named it `momentum`.
    moving_average_fraction = check_fraction(moving_average_fraction, "moving_average_fraction")
    mean = _blob(mean_blob, "mean_blob")
    variance = _blob(variance_blob, "variance_blob")
    if mean.ndim != 1 or variance.shape != mean.shape:
        raise ValueError(
            "`mean_blob` and `variance_blob` must both have shape (C,). "
            f"Received: mean_blob.shape={tuple(mean.shape)}, "
            f"variance_blob.shape={tuple(variance.shape)}"
        )
    factor = _blob(scale_factor_blob, "scale_factor_blob")
    if factor.numel() != 1:
        raise ValueError(
            "`scale_factor_blob` must hold one value (shape (1,)). "
            f"Received: scale_factor_blob.shape={tuple(factor.shape)}"
        )
    affine = {"gamma": gamma, "beta": beta}
    tensors = {name: _blob(value, name) for name, value in affine.items() if value is not None}
    for name, tensor in tensors.items():
        if tensor.shape != mean.shape:
            raise ValueError(
                f"`{name}` must have the shape of `mean_blob`, {tuple(mean.shape)}. "
                f"Received: {name}.shape={tuple(tensor.shape)}"
            )
    s = float(factor.reshape(()))
    if s < 0 or not np.isfinite(s):
        raise ValueError(
            f"`scale_factor_blob` must be finite and >= 0. Received: scale_factor_blob={s}"
        )
    layer = BatchNormalization.like(
        "caffe",
        int(mean.shape[0]),
        epsilon=epsilon,
        momentum=moving_average_fraction,
        scale="gamma" in tensors,
        center="beta" in tensors,
    )
    # Caffe: scale_factor = s == 0 ? 0 : 1 / s.
    inverse = 0.0 if s == 0 else 1.0 / s
    with torch.no_grad():
        layer.moving_mean.copy_(mean * inverse)
        layer.moving_variance.copy_(variance * inverse)
        layer.moving_average_weight.fill_(s)
        for name, tensor in tensors.items():
            getattr(layer, name).copy_(tensor)
    return layer


def _blob(value: Any, argument: str) -> torch.Tensor:
    try:
        array = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
        return torch.as_tensor(array, dtype=torch.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`{argument}` must be an array or tensor of numbers. Received: {value!r}"
        ) from error
