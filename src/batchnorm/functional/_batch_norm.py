"""The stateless batch-norm step: output and new statistics, nothing mutated."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree

from batchnorm.functional._backend import backend_for
from batchnorm.functional._moving_average import moving_average_update
from batchnorm.functional._renorm import renorm_correction
from batchnorm.functional._validation import (
    check_floating_input,
    check_fraction,
    check_positive,
    check_renorm_clipping,
    check_tensor_shape,
    check_virtual_batch_size,
    normalize_axes,
)

VarianceEstimator = Literal["biased", "unbiased"]
Adjustment = Callable[[torch.Size], tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class BatchNormStatistics:
    """The state of a batch-norm layer, per channel (shape = the input's sizes on the channel axes).

    ``moving_stddev``, ``renorm_mean`` and ``renorm_stddev`` are present with Batch
    Renormalization only; their presence switches it on in :func:`batch_norm`. It is a pytree
    whose leaves are the tensors present, so ``torch.func.vmap`` and ``torch.compile`` take it.
    """

    moving_mean: torch.Tensor
    moving_variance: torch.Tensor
    moving_stddev: torch.Tensor | None = None
    renorm_mean: torch.Tensor | None = None
    renorm_stddev: torch.Tensor | None = None

    _fields = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean", "renorm_stddev")

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        return iter([getattr(self, name) for name in self._fields])

    @property
    def renorm(self) -> bool:
        return self.renorm_mean is not None


def _flatten_statistics(
    statistics: BatchNormStatistics,
) -> tuple[list[torch.Tensor], tuple[str, ...]]:
    present = tuple(n for n in BatchNormStatistics._fields if getattr(statistics, n) is not None)
    return [getattr(statistics, n) for n in present], present


def _unflatten_statistics(values: Any, present: tuple[str, ...]) -> BatchNormStatistics:
    return BatchNormStatistics(**dict(zip(present, values, strict=True)))


pytree.register_pytree_node(
    BatchNormStatistics,
    _flatten_statistics,
    _unflatten_statistics,
    serialized_type_name="batchnorm.functional.BatchNormStatistics",
)


def _compose(
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    then_scale: torch.Tensor | None,
    then_offset: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Apply ``(scale, offset)`` first, then ``(then_scale, then_offset)``: tf-keras' _compose_transforms."""
    if then_scale is not None:
        scale = then_scale if scale is None else scale * then_scale
        offset = None if offset is None else offset * then_scale
    if then_offset is not None:
        offset = then_offset if offset is None else offset + then_offset
    return scale, offset


def _select(training: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    return torch.where(training, if_true, if_false)


def _check_mask(mask: torch.Tensor, x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    expected = tuple(size for i, size in enumerate(x.shape) if i not in axes)
    if tuple(mask.shape) != expected:
        raise ValueError(
            f"`mask` must have the shape of `x` without its channel axes, {expected}. "
            f"Received: mask.shape={tuple(mask.shape)} for x.shape={tuple(x.shape)}"
        )
    weights = mask
    for a in axes:
        weights = weights.unsqueeze(a)
    return weights


def batch_norm(
    x: torch.Tensor,
    statistics: BatchNormStatistics,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    axis: Any = -1,
    training: bool | torch.Tensor = False,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    moving_variance_estimator: VarianceEstimator = "biased",
    renorm_clipping: dict[str, float] | None = None,
    renorm_momentum: float = 0.99,
    virtual_batch_size: int | None = None,
    adjustment: Adjustment | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BatchNormStatistics]:
    """One batch-norm call without side effects: returns ``(y, new_statistics)``.

    Training (per channel, over every axis but ``axis``):

    .. math::
        \\mu_B = E[x], \\quad \\sigma_B^2 = E[(x - \\mu_B)^2], \\quad
        y = \\gamma \\frac{x - \\mu_B}{\\sqrt{\\sigma_B^2 + \\epsilon}} + \\beta

    and the moving statistics step ``m <- momentum * m + (1 - momentum) * batch`` (Keras'
    convention; PyTorch's momentum is ``1 - momentum``). ``moving_variance_estimator="biased"``
    stores ``sigma_B^2`` (tf-keras' non-fused path), ``"unbiased"`` stores
    ``sigma_B^2 * n / (n - 1)`` (its fused path, and PyTorch); normalisation always uses the biased
    one. Inference uses the moving statistics and returns them unchanged.

    Options, with tf-keras semantics: Batch Renormalization when ``statistics`` carries the renorm
    buffers (``renorm_clipping`` keys rmin/rmax/dmax, ``renorm_momentum``); ``virtual_batch_size``
    (ghost batches ``{j, j + B/v, ...}``, one moving update with the mean of the ghost statistics);
    ``adjustment(x.shape) -> (a, b)`` making the training scale ``a * gamma`` and offset
    ``b * gamma + beta``; ``mask`` (shape of ``x`` without the channel axes) for weighted moments.
    An empty batch updates nothing.

    Args:
        x: input, any floating dtype; float16/bfloat16 are computed in float32.
        statistics: per-channel state (:class:`BatchNormStatistics`).
        gamma, beta: per-channel scale and offset, or None.
        training: Python bool, or a 0-d bool tensor (both branches are computed and selected,
            so the call traces without a graph break).

    Returns:
        ``y`` in ``x.dtype`` and the new statistics (detached).

    Shape:
        ``x``: any rank >= 1; statistics, gamma, beta: ``tuple(x.shape[a] for a in axes)``.

    Example:
        >>> x = torch.randn(16, 4)
        >>> state = BatchNormStatistics(torch.zeros(4), torch.ones(4))
        >>> y, state = batch_norm(x, state, training=True)
    """
    check_floating_input(x)
    axes = normalize_axes(axis, x.ndim)
    channel_shape = tuple(x.shape[a] for a in axes)
    for name, tensor in zip(BatchNormStatistics._fields, statistics, strict=True):
        check_tensor_shape(tensor, channel_shape, f"statistics.{name}")
    check_tensor_shape(gamma, channel_shape, "gamma")
    check_tensor_shape(beta, channel_shape, "beta")
    momentum = check_fraction(momentum, "momentum")
    renorm_momentum = check_fraction(renorm_momentum, "renorm_momentum")
    epsilon = check_positive(epsilon, "epsilon")
    clipping = check_renorm_clipping(renorm_clipping)
    virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
    if moving_variance_estimator not in ("biased", "unbiased"):
        raise ValueError(
            "`moving_variance_estimator` must be 'biased' or 'unbiased'. "
            f"Received: moving_variance_estimator={moving_variance_estimator!r}"
        )
    if isinstance(training, torch.Tensor) and (training.ndim != 0 or training.dtype != torch.bool):
        raise ValueError(
            "`training` must be a Python bool or a 0-d bool tensor. "
            f"Received: training with shape {tuple(training.shape)} and dtype {training.dtype}"
        )
    weights = None if mask is None else _check_mask(mask, x, axes)
    may_train = training is not False
    if may_train and virtual_batch_size is not None:
        if 0 in axes:
            raise ValueError(
                "With `virtual_batch_size` the batch axis 0 cannot be a channel axis. "
                f"Received: axis={axis!r}"
            )
        if x.shape[0] % virtual_batch_size != 0:
            raise ValueError(
                "`virtual_batch_size` must divide the batch size. "
                f"Received: virtual_batch_size={virtual_batch_size} for a batch of {x.shape[0]}"
            )

    backend = backend_for(x)
    compute_dtype = torch.promote_types(
        x.dtype, torch.promote_types(statistics.moving_mean.dtype, torch.float32)
    )
    xc = x.to(compute_dtype)
    param_view = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]

    def view(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(param_view).to(compute_dtype)

    def optional_view(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else view(tensor)

    def inference_output() -> torch.Tensor:
        return backend.normalize(
            xc,
            view(statistics.moving_mean),
            view(statistics.moving_variance),
            optional_view(gamma),
            optional_view(beta),
            epsilon,
        )

    if training is False:
        return inference_output().to(x.dtype), statistics

    scale, offset = optional_view(gamma), optional_view(beta)
    if adjustment is not None:
        adjust_scale, adjust_offset = adjustment(x.shape)
        scale, offset = _compose(
            adjust_scale.to(compute_dtype), adjust_offset.to(compute_dtype), scale, offset
        )

    reduce_dims = tuple(i for i in range(x.ndim) if i not in axes)
    grouped, group_weights = xc, weights
    if virtual_batch_size is not None:
        # Ghost batch j holds samples {j, j + B/v, ...}: tf-keras reshapes to [v, B/v, ...].
        grouped = xc.reshape(virtual_batch_size, -1, *x.shape[1:])
        if weights is not None:
            group_weights = weights.reshape(virtual_batch_size, -1, *weights.shape[1:])
        reduce_dims = (0, *(i + 1 for i in reduce_dims if i != 0))
    batch = backend.moments(grouped, reduce_dims, group_weights)
    mean, variance, count = batch.mean, batch.variance, batch.total_weight
    if virtual_batch_size is not None:
        mean, variance = mean.mean(dim=1), variance.mean(dim=1)
        count = count.mean(dim=1)
    batch_mean = mean.reshape(channel_shape)
    batch_variance = variance.reshape(channel_shape)
    count = count.reshape(channel_shape)

    def group_view(tensor: torch.Tensor) -> torch.Tensor:
        shaped = tensor.reshape(param_view)
        return shaped.unsqueeze(0) if virtual_batch_size is not None else shaped

    new_statistics = _updated_statistics(
        statistics,
        batch_mean.detach(),
        batch_variance.detach(),
        count,
        momentum=momentum,
        renorm_momentum=renorm_momentum,
        epsilon=epsilon,
        unbiased=moving_variance_estimator == "unbiased",
    )
    if statistics.renorm_mean is not None and statistics.renorm_stddev is not None:
        correction = renorm_correction(
            batch_mean,
            batch_variance,
            statistics.renorm_mean,
            statistics.renorm_stddev,
            epsilon,
            clipping,
        )
        scale, offset = _compose(
            group_view(correction.r),
            group_view(correction.d),
            None if scale is None else group_view(scale),
            None if offset is None else group_view(offset),
        )
    elif virtual_batch_size is not None:
        scale = None if scale is None else group_view(scale)
        offset = None if offset is None else group_view(offset)
    y_train = backend.normalize(
        grouped, batch.mean, batch.variance, scale, offset, epsilon
    ).reshape(x.shape)
    if x.shape[0] == 0 or math.prod(x.shape) == 0:
        new_statistics = statistics
    if training is True:
        return y_train.to(x.dtype), new_statistics

    assert isinstance(training, torch.Tensor)
    y = _select(training, y_train, inference_output())
    selected = {
        name: _select(training, new, old)
        for name, new, old in zip(
            BatchNormStatistics._fields, new_statistics, statistics, strict=True
        )
        if new is not None and old is not None
    }
    return y.to(x.dtype), BatchNormStatistics(**selected)


def _updated_statistics(
    statistics: BatchNormStatistics,
    batch_mean: torch.Tensor,
    batch_variance: torch.Tensor,
    count: torch.Tensor,
    *,
    momentum: float,
    renorm_momentum: float,
    epsilon: float,
    unbiased: bool,
) -> BatchNormStatistics:
    """Moving averages after one training step, as tf-keras' mean_update / variance_update."""
    stored_variance = batch_variance
    if unbiased:
        # tf's fused kernel: factor n / (n - 1), and 1 when a channel has a single element.
        bessel = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.ones_like(count))
        stored_variance = batch_variance * bessel
    moving_mean = moving_average_update(statistics.moving_mean, batch_mean, momentum)
    if not statistics.renorm:
        moving_variance = moving_average_update(
            statistics.moving_variance, stored_variance, momentum
        )
        return BatchNormStatistics(moving_mean, moving_variance)
    assert statistics.moving_stddev is not None and statistics.renorm_stddev is not None
    assert statistics.renorm_mean is not None
    stddev = torch.sqrt(stored_variance + epsilon)
    moving_stddev = moving_average_update(statistics.moving_stddev, stddev, momentum)
    # Epsilon lives inside moving_stddev; the variance used at inference takes it back out.
    moving_variance = torch.relu(moving_stddev * moving_stddev - epsilon)
    renorm_mean = moving_average_update(statistics.renorm_mean, batch_mean, renorm_momentum)
    renorm_stddev = moving_average_update(
        statistics.renorm_stddev, torch.sqrt(batch_variance + epsilon), renorm_momentum
    )
    return BatchNormStatistics(
        moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev
    )
