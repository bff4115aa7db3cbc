"""``SyncBatchNormalization`` and ``convert_sync``: batch statistics over a torch.distributed group."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from batchnorm._batch_normalization import BatchNormalization
from batchnorm.functional._synchronized import check_synchronized


class SyncBatchNormalization(BatchNormalization):
    """:class:`BatchNormalization` with ``synchronized=True``: statistics of the global batch.

    In training, every rank of ``process_group`` (default: the WORLD group of torch.distributed)
    contributes its per-channel count, mean and centred sum of squares; they are combined with
    the parallel variance formula

    .. math::
        \\mu = \\frac{\\sum_r n_r \\mu_r}{N}, \\quad
        \\sigma^2 = \\frac{\\sum_r M2_r + n_r (\\mu_r - \\mu)^2}{N}, \\quad N = \\sum_r n_r,

    so uneven and empty local batches are exact, and the backward all-reduces the two
    per-channel gradient sums: outputs, gradients and moving statistics equal those of one process
    running the concatenated batch. The moving statistics (Keras' update
    ``moving = momentum * moving + (1 - momentum) * batch``, biased variance as tf-keras'
    non-fused path) are identical on every rank. Inference communicates nothing. Without an
    initialised process group, or with a group of one, it computes as ``BatchNormalization``
    with ``fused=False``.

    Args:
        num_features: channel count, as :class:`BatchNormalization`.
        process_group: a ``torch.distributed.ProcessGroup``, or None for the default group.
        **kwargs: every other :class:`BatchNormalization` argument (``fused=True`` is refused).

    Example:
        >>> layer = SyncBatchNormalization(16, axis=1)  # launched with torchrun
        >>> y = layer(torch.randn(8, 16, 5, 5), training=True)
    """

    def __init__(
        self,
        num_features: Any = None,
        *,
        process_group: Any = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("synchronized", True) is not True:
            raise ValueError(
                "SyncBatchNormalization is always synchronized. Received: synchronized=False"
            )
        super().__init__(num_features, synchronized=True, process_group=process_group, **kwargs)


def convert_sync(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every batch norm in ``model`` synchronized; returns the model (or its replacement).

    Our :class:`BatchNormalization` layers are switched in place (same parameters, buffers and
    moving-variance convention: a layer that resolved to tf-keras' fused path keeps storing the
    Bessel-corrected variance). ``torch.nn.BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` are replaced
    by a :class:`SyncBatchNormalization` with the same weights, statistics and conventions:
    ``axis=1``, Keras momentum ``1 - momentum``, the same ``eps``, the unbiased moving variance
    torch stores, ``affine=False`` as ``center=scale=False``. State-dict keys become ours
    (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``).

    Args:
        model: any module; a batch-norm module itself is converted and returned.
        process_group: the group to synchronize over, None for the default group.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> model = convert_sync(model)  # then wrap in DistributedDataParallel
    """
    check_synchronized(True, process_group, None)
    if isinstance(model, BatchNormalization):
        _synchronize_in_place(model, process_group)
        return model
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return _from_torch(model, process_group)
    for name, child in model.named_children():
        converted = convert_sync(child, process_group)
        if converted is not child:
            model.add_module(name, converted)
    return model


def _synchronize_in_place(layer: BatchNormalization, process_group: Any) -> None:
    layer._unbiased_moving_variance = layer._unbiased_moving_variance or bool(layer.fused)
    layer.synchronized, layer.process_group = True, process_group
    layer.fused = False
    if layer._fused_argument:
        layer._fused_argument = False


def _from_torch(module: nn.modules.batchnorm._BatchNorm, process_group: Any) -> nn.Module:
    kind = type(module).__name__
    if not module.track_running_stats or module.running_mean is None:
        raise NotImplementedError(
            f"convert_sync cannot convert {kind}(track_running_stats=False) yet: it needs "
            "BatchNormalization's `use_global_stats=False` option (batch statistics in "
            "inference). Received: track_running_stats=False"
        )
    if module.momentum is None:
        raise NotImplementedError(
            f"convert_sync cannot convert {kind}(momentum=None) yet: the cumulative average needs "
            "BatchNormalization's `moving_average='debiased'` option. Received: momentum=None"
        )
    if isinstance(module.running_mean, nn.parameter.UninitializedBuffer):
        raise ValueError(
            f"convert_sync needs the channel count: run {kind} once (or build it) before "
            "converting. Received: an uninitialised lazy batch norm"
        )
    running_mean = module.running_mean
    assert module.running_var is not None
    dtype = running_mean.dtype
    layer = SyncBatchNormalization(
        module.num_features,
        process_group=process_group,
        axis=1,
        momentum=1.0 - float(module.momentum),
        epsilon=float(module.eps),
        center=module.affine,
        scale=module.affine,
        dtype=None if dtype == torch.float32 else str(dtype).removeprefix("torch."),
        device=running_mean.device,
    )
    layer._unbiased_moving_variance = True
    with torch.no_grad():
        layer.moving_mean.copy_(running_mean)
        layer.moving_variance.copy_(module.running_var)
        if module.affine:
            layer.gamma.copy_(module.weight)
            layer.beta.copy_(module.bias)
            layer.gamma.requires_grad_(module.weight.requires_grad)
            layer.beta.requires_grad_(module.bias.requires_grad)
    layer.train(module.training)
    return layer
