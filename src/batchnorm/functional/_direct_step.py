"""The layer's direct calls: a training step in one native call with the moving statistics
updated in place, and inference straight to the backend.

:func:`batchnorm.functional._batch_norm.batch_norm_step` is stateless: it returns new statistics,
which the layer copies into its buffers, and it runs the moments, the moving-average arithmetic
and the normalisation as separate operations. On small inputs that Python and dispatch work cost
several times the kernel itself. Where a backend provides ``train_in_place`` (the Numba CPU one)
and the call is a plain training step, this runs it instead: the same statistics and output
(:mod:`batchnorm.kernels._training`), the buffers stepped in place as ``F.batch_norm`` steps
``running_mean`` and ``running_var``.

A plain step: a Python ``training=True``, one channel axis, x, the buffers and gamma/beta of one
float32/float64 dtype, a non-empty batch, exponential or debiased moving averages (no renorm), no
adjustment, no synchronization, no ``use_global_stats``, a mask with one weight per position, and
not inside ``torch.compile`` (which traces the stateless step's custom operators).

Inference (:func:`infer`) has nothing to update; it skips only the stateless step's general
checks and casts when x, the buffers and gamma/beta share one float32/float64 dtype.
"""

from __future__ import annotations

import torch

from batchnorm.functional._batch_norm import (
    BatchNormOptions,
    BatchNormStatistics,
    check_ghost_batches,
    check_mask,
)
from batchnorm.functional._dispatch import backend_for


def _one_kernel_dtype(
    x: torch.Tensor,
    statistics: BatchNormStatistics,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> bool:
    """x, the moving statistics and gamma/beta all float32, or all float64: nothing to cast."""
    dtype = x.dtype
    return (
        dtype in (torch.float32, torch.float64)
        and statistics.moving_mean.dtype == dtype
        and statistics.moving_variance.dtype == dtype
        and all(p is None or p.dtype == dtype for p in (gamma, beta))
    )


def train_in_place(
    x: torch.Tensor,
    statistics: BatchNormStatistics,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    axes: tuple[int, ...],
    options: BatchNormOptions,
    mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """The training output, with ``statistics``' tensors stepped in place; None (nothing done)
    when the call is not a plain step (see the module docstring) and the caller must take the
    stateless step.

    Same checks and errors as the stateless step for what a plain step reads (the mask, ghost
    batches); the caller has checked the shapes of x against the statistics.
    """
    if (
        len(axes) != 1
        or statistics.renorm
        or options.adjustment is not None
        or options.synchronized
        or options.use_global_stats is not None
        or not _one_kernel_dtype(x, statistics, gamma, beta)
        or x.numel() == 0
        or torch.compiler.is_compiling()
    ):
        return None
    backend = backend_for(x)
    fused = getattr(backend, "train_in_place", None)
    if fused is None:
        return None
    weights = None
    if mask is not None:
        weights = check_mask(mask, x, axes)
        if weights.shape[axes[0]] != 1:
            return None  # weights that vary inside a channel: the composed path
        weights = weights.expand([1 if i == axes[0] else size for i, size in enumerate(x.shape)])
    ghost_batches = check_ghost_batches(x, axes, options.virtual_batch_size)
    moving = (
        statistics.moving_mean,
        statistics.moving_variance,
        statistics.moving_average_weight,
    )
    if any(t is not None and (not t.is_contiguous() or t.requires_grad) for t in moving):
        return None
    y: torch.Tensor = fused(
        x,
        axes[0],
        moving,
        gamma,
        beta,
        weights,
        ghost_batches,
        options.momentum,
        options.epsilon,
        options.unbiased_moving_variance,
    )
    return y


def infer(
    x: torch.Tensor,
    statistics: BatchNormStatistics,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    axes: tuple[int, ...],
    epsilon: float,
    mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """The inference output ``(x - M) / sqrt(V + epsilon) * gamma + beta`` with the moving
    statistics; None when dtypes differ (the caller takes the stateless step, which casts).

    The mask is checked (its shape) and, as in tf-keras' inference, does not change the output.
    """
    if not _one_kernel_dtype(x, statistics, gamma, beta):
        return None
    if mask is not None:
        check_mask(mask, x, axes)
    return backend_for(x).normalize(
        x, axes, statistics.moving_mean, statistics.moving_variance, gamma, beta, epsilon
    )
