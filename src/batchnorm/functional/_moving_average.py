"""The moving-average update of the inference statistics."""

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
    return moving - (moving - value.to(moving.dtype)) * (1.0 - momentum)
