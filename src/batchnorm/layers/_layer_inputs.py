"""What a BatchNormalization call accepts: the input tensor against what the build fixed, and
the ``training`` argument against the layer's mode.

These checks run before anything is built or written, so a call they reject changes nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from batchnorm.functional._cpu_plan import storageless
from batchnorm.functional._validation import (
    check_floating_input,
    check_same_device,
    normalize_axes,
    training_flag,
)


class CalledLayer(Protocol):
    """What :func:`check_input` reads from a :class:`~batchnorm.BatchNormalization` layer."""

    name: str
    axis: list[int] | int
    built: bool
    moving_mean: torch.Tensor
    _axes: tuple[int, ...] | None
    _input_rank: int | None
    _parameters: dict[str, Any]
    _buffers: dict[str, Any]


def resolve_training(training: Any, trainable: bool, module_training: bool) -> bool | torch.Tensor:
    """The mode of a call: ``trainable=False`` forces inference (tf-keras 2); None follows the
    module's mode; a 0-d bool tensor is read as a bool where that is free and safe, and stays a
    tensor otherwise (both branches run: :func:`training_flag`)."""
    if not trainable:
        return False
    if training is None:
        return bool(module_training)
    if isinstance(training, torch.Tensor):
        return training_flag(training)
    if isinstance(training, (bool, np.bool_)):
        return bool(training)
    raise TypeError(
        f"`training` must be None, a bool or a 0-d bool tensor. Received: training={training!r}"
    )


def check_input(layer: CalledLayer, x: torch.Tensor, remember: bool = True) -> None:
    """A floating tensor of the built rank with the built channels (axes valid for its rank), on
    the device of the layer's tensors.

    ``remember=False`` (a call that ``torch.compile``, ``torch.export`` or ``torch.jit.trace``
    traces) leaves the layer as it was: the remembered signature holds a buffer, and ``torch.export`` warned that a
    tensor attribute was assigned during export."""
    # The checks depend only on x's shape, dtype and device and on what the build fixed: a built
    # layer remembers the last signature it accepted (they cost microseconds per call).
    memory = vars(layer)
    accepted = memory.get("_accepted_input")
    moving_mean = layer._buffers.get("moving_mean")
    if (
        accepted is not None
        and accepted[0] is moving_mean
        and isinstance(x, torch.Tensor)  # else the check's own error, not an AttributeError
        and accepted[1] == x.shape
        and accepted[2] == x.dtype
        and accepted[3] == x.device
    ):
        return
    _check_new_input(layer, x)
    # Not a functorch wrapper that functional_call swapped in under vmap or jacrev: deepcopy
    # and torch.save of the layer failed on it ever after ("Cannot access storage").
    if (
        remember
        and layer._input_rank is not None
        and moving_mean is not None
        and not storageless(moving_mean)
    ):
        memory["_accepted_input"] = (moving_mean, x.shape, x.dtype, x.device)


def _check_new_input(layer: CalledLayer, x: torch.Tensor) -> None:
    check_floating_input(x, "x")
    rank = layer._input_rank
    if rank is not None and x.ndim != rank:
        raise ValueError(
            f"Layer {layer.name} expects inputs of rank {rank}. Received: x.shape={tuple(x.shape)}"
        )
    axes = layer._axes if rank is not None else normalize_axes(layer.axis, x.ndim)
    assert axes is not None
    channel_shape = tuple(x.shape[a] for a in axes)
    if layer.built and channel_shape != tuple(layer.moving_mean.shape):
        raise ValueError(
            f"Layer {layer.name} was built for {tuple(layer.moving_mean.shape)} channels on "
            f"axes {list(axes)} (sizes in ascending axis order, as `num_features` takes them), "
            f"but the input has {channel_shape}. Received: x.shape={tuple(x.shape)}"
        )
    tensors = layer._parameters | layer._buffers  # placeholders too
    check_same_device(x, tensors.keys(), tensors.values())
