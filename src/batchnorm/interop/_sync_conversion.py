"""``convert_sync``: every batch norm of a model made synchronized over a torch.distributed group."""

from __future__ import annotations

from typing import Any

from torch import nn

from batchnorm.functional._synchronized import check_synchronized
from batchnorm.functional._validation import check_module
from batchnorm.interop._torch_conversion import convert
from batchnorm.layers import BatchNormalization


def convert_sync(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Make every batch norm in ``model`` synchronized; returns the model (or its replacement).

    ``torch.nn.BatchNorm1d/2d/3d``, their Lazy versions and ``SyncBatchNorm`` are first replaced
    by :class:`BatchNormalization` layers with the same weights, statistics and conventions
    (:func:`batchnorm.from_torch`: ``axis=1``, Keras momentum ``1 - momentum``, the same ``eps``,
    the unbiased moving variance torch stores, ``affine=False`` as ``center=scale=False``,
    ``momentum=None`` as ``moving_average="debiased"``, ``track_running_stats=False`` as
    ``use_global_stats=False``). Then every :class:`BatchNormalization` is switched in place to
    ``synchronized=True`` (same parameters and buffers; a layer that resolved to tf-keras' fused
    path keeps storing the Bessel-corrected variance; an in-place layer, e.g. a converted
    ``InPlaceABN``, trains with ``memory="default"``, since in-place training does not
    synchronize: same numbers, its input no longer overwritten). State-dict keys become ours (``gamma``,
    ``beta``, ``moving_mean``, ``moving_variance``).

    Args:
        model: any module; a batch-norm module itself is converted and returned.
        process_group: the group to synchronize over, None for the default group.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> model = convert_sync(model)  # then wrap it in DistributedDataParallel
    """
    check_module(model)
    check_synchronized(True, process_group, None)
    model = convert(model, to="batchnorm")
    for module in model.modules():
        if isinstance(module, BatchNormalization):
            _synchronize_in_place(module, process_group)
    return model


def _synchronize_in_place(layer: BatchNormalization, process_group: Any) -> None:
    # What the layer stores keeps being stored: tf-keras' fused path (decided, or recorded by a
    # checkpoint loaded before the first call) stores the unbiased variance, a synchronized
    # layer's non-fused path the biased one (the first training call raised on such a load).
    loaded = vars(layer).get("_loaded_estimator")
    if layer.moving_variance_estimator == "auto" and (layer.fused or loaded == "unbiased"):
        layer.moving_variance_estimator = "unbiased"
    given = layer._fused_argument
    layer.fused = False  # first: a synchronized layer is unfused (checked on assignment)
    layer.memory = "default"  # and does not train in place (checked on assignment too)
    layer.synchronized, layer.process_group = True, process_group
    # The config keeps no fused argument where none was given (synchronized implies False).
    layer._fused_argument = None if given is None else False
