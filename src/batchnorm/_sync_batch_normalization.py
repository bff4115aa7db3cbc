"""``SyncBatchNormalization`` and ``convert_sync``: batch statistics over a torch.distributed group."""

from __future__ import annotations

from typing import Any

from torch import nn

from batchnorm._batch_normalization import BatchNormalization
from batchnorm._torch_conversion import convert
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

    ``torch.nn.BatchNorm1d/2d/3d``, their Lazy versions and ``SyncBatchNorm`` are first replaced
    by :class:`BatchNormalization` layers with the same weights, statistics and conventions
    (:func:`batchnorm.from_torch`: ``axis=1``, Keras momentum ``1 - momentum``, the same ``eps``,
    the unbiased moving variance torch stores, ``affine=False`` as ``center=scale=False``,
    ``momentum=None`` as ``moving_average="debiased"``, ``track_running_stats=False`` as
    ``use_global_stats=False``). Then every :class:`BatchNormalization` is switched in place to
    ``synchronized=True`` (same parameters and buffers; a layer that resolved to tf-keras' fused
    path keeps storing the Bessel-corrected variance). State-dict keys become ours (``gamma``,
    ``beta``, ``moving_mean``, ``moving_variance``).

    Args:
        model: any module; a batch-norm module itself is converted and returned.
        process_group: the group to synchronize over, None for the default group.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> model = convert_sync(model)  # then wrap it in DistributedDataParallel
    """
    check_synchronized(True, process_group, None)
    model = convert(model, to="batchnorm")
    for module in model.modules():
        if isinstance(module, BatchNormalization):
            _synchronize_in_place(module, process_group)
    return model


def _synchronize_in_place(layer: BatchNormalization, process_group: Any) -> None:
    if layer.moving_variance_estimator == "auto" and layer.fused:
        layer.moving_variance_estimator = "unbiased"
    layer.synchronized, layer.process_group = True, process_group
    layer.fused = False
    if layer._fused_argument:
        layer._fused_argument = False
