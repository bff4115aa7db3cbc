"""The moving-average updates of the inference statistics: exponential and debiased."""

from __future__ import annotations

import torch


def moving_average_update(
    moving: torch.Tensor, value: torch.Tensor, momentum: float
) -> torch.Tensor:
    """One exponential-moving-average step in the Keras convention.

    .. math::
        m \\leftarrow m - (m - v)(1 - \\text{momentum}) = \\text{momentum}\\, m + (1 - \\text{momentum})\\, v

    Keras' ``momentum`` weights the old value; PyTorch's ``momentum`` weights the new one, so
    ``momentum_torch = 1 - momentum_keras`` (0.99 here is 0.01 there). Written as tf-keras'
    ``assign_sub((variable - value) * (1 - momentum))`` so results round the same way.
    """
    value = value if value.dtype == moving.dtype else value.to(moving.dtype)
    return moving - (moving - value) * (1.0 - momentum)


def debiased_weight_update(weight: torch.Tensor, momentum: float) -> torch.Tensor:
    """The total weight of a debiased average after one more step: ``s <- momentum * s + 1``.

    This is Caffe's ``scale_factor`` blob (``moving_average_fraction`` = ``momentum``); with
    ``momentum = 1`` it counts the batches, like PyTorch's ``num_batches_tracked``.
    """
    return weight * momentum + 1.0


def debiased_average_update(
    moving: torch.Tensor, value: torch.Tensor, new_weight: torch.Tensor
) -> torch.Tensor:
    """One step of Caffe's bias-corrected moving average, kept in its debiased form.

    Caffe stores ``sum_k lambda^k v_k`` and the weight ``s = sum_k lambda^k`` and divides at
    inference; this keeps ``m = sum / s`` itself, updated with the new weight ``s'``:

    .. math::
        m \\leftarrow m + (v - m) / s', \\qquad s' = \\lambda s + 1

    which equals ``(v + lambda * s * m) / s'``. With ``lambda = momentum = 1`` it is the plain
    cumulative average of every batch (PyTorch's ``momentum=None``); the first step (``s = 0``)
    replaces the initial value by the batch statistic.
    """
    step = (value.to(moving.dtype) - moving) / new_weight.to(moving.dtype)
    return moving + step
