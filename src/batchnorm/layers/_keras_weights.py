"""tf-keras' weight shapes, so that ``get_weights`` / ``set_weights`` exchange arrays with Keras as they are.

One channel axis gives ``(C,)``; several give a full-rank shape with 1 on the reduced axes
(axis [1, 3] on (N, C, H, W) gives (1, C, 1, W)); ghost batches insert one more leading 1
((1, 1, C) for 2-D input). Inside the module every weight is kept in its per-channel shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def keras_parameter_shape(
    channel_shape: tuple[int, ...],
    axes: tuple[int, ...],
    rank: int,
    virtual_batch_size: int | None,
) -> tuple[int, ...]:
    if len(axes) == 1 and virtual_batch_size is None:
        return channel_shape
    sizes = dict(zip(axes, channel_shape, strict=True))
    shape = [sizes.get(i, 1) for i in range(rank)]
    if virtual_batch_size is not None:
        shape.insert(1, 1)
    return tuple(shape)


def weights_from_arrays(
    arrays: Sequence[Any], names: list[str], channel_shape: tuple[int, ...]
) -> list[torch.Tensor]:
    """Validate every array before anything is written, so a bad list changes nothing."""
    if isinstance(arrays, (str, bytes)) or not isinstance(arrays, Sequence):
        raise TypeError(
            f"`weights` must be a list of {len(names)} arrays ({', '.join(names)}). "
            f"Received: weights of type {type(arrays).__name__}"
        )
    if len(arrays) != len(names):
        raise ValueError(
            f"`weights` must hold {len(names)} arrays ({', '.join(names)}). "
            f"Received: {len(arrays)} arrays"
        )
    size = math.prod(channel_shape)
    tensors = []
    for name, array in zip(names, arrays, strict=True):
        tensor = torch.as_tensor(
            np.asarray(array) if not isinstance(array, torch.Tensor) else array
        )
        if tensor.numel() != size or (
            tensor.ndim > 1
            and sorted(d for d in tensor.shape if d != 1)
            != sorted(d for d in channel_shape if d != 1)
        ):
            raise ValueError(
                f"Weight `{name}` must have {size} values in the per-channel shape {channel_shape} "
                f"or tf-keras' shape. Received: shape {tuple(tensor.shape)}"
            )
        tensors.append(tensor.reshape(channel_shape))
    return tensors
