"""tf-keras' weights: their order and shapes, so that ``get_weights`` / ``set_weights`` exchange
arrays with Keras as they are, and the penalties and constraints Keras applies to them.

One channel axis gives ``(C,)``; several give a full-rank shape with 1 on the reduced axes
(axis [1, 3] on (N, C, H, W) gives (1, C, 1, W)); ghost batches insert one more leading 1
((1, 1, C) for 2-D input). Inside the module every weight is kept in its per-channel shape.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol

import numpy as np
import torch

from batchnorm.functional._validation import check_axis_type
from batchnorm.layers._parametrized import check_writable, parameters_behind, write_weight


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


def _check_array_list(arrays: Any, names: list[str]) -> None:
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


def channel_shape_of_arrays(
    arrays: Sequence[Any], names: list[str], axis: list[int], virtual_batch_size: int | None
) -> tuple[int, ...]:
    """The per-channel shape that an unbuilt layer with channel axes ``axis`` takes from arrays
    in tf-keras order: ``moving_mean``'s size for one axis; for several, its per-channel shape
    or tf-keras' full-rank shape (with the ghost-batch dimension when ``virtual_batch_size``)."""
    _check_array_list(arrays, names)
    reference = names.index("moving_mean")
    array = arrays[reference]
    shape = tuple(array.shape if isinstance(array, torch.Tensor) else np.shape(array))
    if 0 in shape:  # as num_features=0 and load_state_dict refuse them
        raise ValueError(
            "`weights` cannot build a layer with no channels. "
            f"Received: moving_mean of shape {shape}"
        )
    if len(axis) == 1:
        return (math.prod(shape),)
    if len(shape) == len(axis):
        return shape
    rank = len(shape) - (virtual_batch_size is not None)
    ghost = int(virtual_batch_size is not None)
    if len(shape) > len(axis) and all(-rank <= a < rank for a in axis):
        # in ascending axis order, as the layer keeps its channels (axis=[3, 1]: axis 1 first)
        return tuple(shape[p + ghost * (p > 0)] for p in sorted(a % rank for a in axis))
    raise ValueError(
        f"`weights` cannot give the channel shape of a layer with axis={axis} that is not built: "
        "pass the arrays in tf-keras' full-rank shape or the per-channel shape, or build the "
        f"layer first. Received: moving_mean of shape {shape}"
    )


def weights_from_arrays(
    arrays: Sequence[Any], names: list[str], channel_shape: tuple[int, ...]
) -> list[torch.Tensor]:
    """Validate every array before anything is written, so a bad list changes nothing."""
    _check_array_list(arrays, names)
    size = math.prod(channel_shape)
    tensors = []
    for name, array in zip(names, arrays, strict=True):
        tensor = torch.as_tensor(
            np.asarray(array) if not isinstance(array, torch.Tensor) else array
        )
        # The sizes in order: a (6, 3) array is not the (3, 6) channels reshaped (tf-keras
        # refuses it too; it was taken, its values scrambled across channels).
        if tensor.numel() != size or (
            tensor.ndim > 1
            and [d for d in tensor.shape if d != 1] != [d for d in channel_shape if d != 1]
        ):
            raise ValueError(
                f"Weight `{name}` must have {size} values in the per-channel shape {channel_shape} "
                f"or tf-keras' shape. Received: shape {tuple(tensor.shape)}"
            )
        tensors.append(tensor.reshape(channel_shape))
    return tensors


class WeightedLayer(Protocol):
    """What the functions below read from a :class:`~batchnorm.BatchNormalization` layer."""

    name: str
    built: bool
    axis: list[int] | int
    renorm: bool
    virtual_batch_size: int | None
    moving_mean: torch.Tensor
    gamma_regularizer: Any
    beta_regularizer: Any
    gamma_constraint: Any
    beta_constraint: Any
    _axes: tuple[int, ...] | None
    _input_rank: int | None
    _update_lock: Any

    def _create_weights(
        self, channel_shape: tuple[int, ...], keras_shape: tuple[int, ...] | None = None
    ) -> list[str]: ...


def weight_names(layer: WeightedLayer) -> list[str]:
    """The layer's weights in tf-keras' order (gamma/beta where present, renorm's last)."""
    names = [n for n in ("gamma", "beta") if getattr(layer, n, None) is not None]
    names += ["moving_mean", "moving_variance"]
    if layer.renorm:
        names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    return names


class ShapedLayer(Protocol):
    """What :func:`layer_keras_shape` reads from a layer."""

    virtual_batch_size: int | None
    moving_mean: torch.Tensor
    _axes: tuple[int, ...] | None
    _input_rank: int | None


def layer_keras_shape(layer: ShapedLayer) -> tuple[int, ...]:
    """The shape Keras gives the layer's weights: the per-channel shape placed in the built
    input's rank (:func:`keras_parameter_shape`), or the per-channel shape itself before the
    layer has seen an input."""
    channel_shape = tuple(layer.moving_mean.shape)
    if layer._axes is None or layer._input_rank is None:
        return channel_shape
    return keras_parameter_shape(
        channel_shape, layer._axes, layer._input_rank, layer.virtual_batch_size
    )


def get_layer_weights(layer: WeightedLayer) -> list[np.ndarray]:
    shape = layer_keras_shape(layer)
    return [
        # A copy before NumPy sees it: Tensor.numpy() would leave the weight's storage unresizable
        # (see batchnorm.functional._cpu_plan.resizable_array).
        getattr(layer, n).detach().to("cpu", copy=True).numpy().reshape(shape)
        for n in weight_names(layer)
    ]


def set_layer_weights(layer: WeightedLayer, weights: Sequence[Any]) -> None:
    """Check every array, then (an unbuilt layer taking moving_mean's channel shape) copy them."""
    names = weight_names(layer)
    if layer.built:
        channel_shape = tuple(layer.moving_mean.shape)
    else:
        channel_shape = channel_shape_of_arrays(
            weights, names, check_axis_type(layer.axis), layer.virtual_batch_size
        )
    tensors = weights_from_arrays(weights, names, channel_shape)
    for name in names:
        check_writable(layer, name)
    # Converted before anything is built or written (a meta tensor cannot be copied): the
    # placeholders of an unbuilt layer have the dtype and device its weights will have.
    targets = [getattr(layer, name) for name in names]
    converted = [
        value.to(dtype=target.dtype, device=target.device)
        for value, target in zip(tensors, targets, strict=True)
    ]
    with layer._update_lock, torch.no_grad():
        if not layer.built:
            layer._create_weights(channel_shape)
        for name, value in zip(names, converted, strict=True):
            write_weight(layer, name, value)
    average_weight = getattr(layer, "moving_average_weight", None)
    if average_weight is not None and float(average_weight) == 0.0:
        warnings.warn(
            f"Layer {layer.name} averages with moving_average='debiased', and its "
            "moving_average_weight (not a Keras weight) is 0: its next training step replaces "
            "the moving statistics just set with the batch's. To continue the average, set "
            "`layer.moving_average_weight` too (e.g. the source layer's), or copy the state_dict.",
            UserWarning,
            stacklevel=3,
        )


def regularization_losses(layer: WeightedLayer) -> list[torch.Tensor]:
    """gamma's then beta's penalty, on the weights in tf-keras' shape; none before the build."""
    penalties: list[torch.Tensor] = []
    for name in ("gamma", "beta") if layer.built else ():
        regularizer = getattr(layer, f"{name}_regularizer")
        weight = getattr(layer, name, None)
        if regularizer is not None and weight is not None:
            penalties.append(regularizer(weight.reshape(layer_keras_shape(layer))))
    return penalties


def check_updated(updated: Any) -> AbstractSet[int] | None:
    """``updated`` as :func:`apply_layer_constraints` takes it: None, or a set of parameter ids.
    A set of the parameters themselves raised "Boolean value of Tensor ... is ambiguous" (an
    id and its tensor share a hash, so the set compared them)."""
    if updated is not None and not isinstance(updated, AbstractSet):
        raise TypeError(
            "`updated` must be a set of the ids of the parameters a step changed, or None. "
            f"Received: updated of type {type(updated).__name__}"
        )
    for item in updated or ():
        if type(item) is not int:
            raise TypeError(
                "`updated` must hold parameter ids (`id(parameter)`, ints). "
                f"Received: updated holding a {type(item).__name__}"
            )
    return updated


@torch.no_grad()
def layer_constraint_projections(
    layer: WeightedLayer, updated: AbstractSet[int] | None = None
) -> dict[str, torch.Tensor]:
    """gamma/beta projected by their constraints (nothing before the build), each checked
    writable, without writing them; with ``updated`` (checked by :func:`check_updated`), only a
    weight whose parameters are among those ids."""
    projected: dict[str, torch.Tensor] = {}
    for name in ("gamma", "beta") if layer.built else ():
        constraint = getattr(layer, f"{name}_constraint")
        weight = getattr(layer, name, None)
        if updated is not None and not any(
            id(p) in updated
            for _, p in parameters_behind(layer, name)  # type: ignore[arg-type]
        ):
            continue
        if constraint is not None and weight is not None:
            constrained = constraint(weight.reshape(layer_keras_shape(layer)))
            projected[name] = constrained.reshape(weight.shape)
    for name in projected:
        check_writable(layer, name)
    return projected


@torch.no_grad()
def write_constraint_projections(layer: WeightedLayer, projected: dict[str, torch.Tensor]) -> None:
    """Write what :func:`layer_constraint_projections` computed."""
    for name, value in projected.items():
        write_weight(layer, name, value)


def apply_layer_constraints(layer: WeightedLayer, updated: AbstractSet[int] | None = None) -> None:
    """Project gamma/beta in place with their constraints; nothing before the build. Both
    projections are computed and checked writable before either is written. With ``updated``
    (the ids of the parameters an optimizer step changed), only a weight whose parameters are
    among them, as Keras constrains only the variables its optimizer updates."""
    projected = layer_constraint_projections(layer, check_updated(updated))
    write_constraint_projections(layer, projected)
