"""Building a BatchNormalization layer: its weights' initial values, Keras' ``build`` and the
first call, which undoes the build when it raises.

``build`` fixes what the first input decides: the input rank, the channel axes (negative ones made
positive, as Keras keeps them in ``axis``), tf-keras' fused-or-not path for ``fused=None`` (and with
it which variance an "auto" layer stores) and, for a lazy layer, the weights' shape. A first call
that raises after its build (a mask or an ``adjustment`` that does not fit, say) leaves the layer
as before the call: placeholders again, no rank fixed, as if never called.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from batchnorm.functional._validation import check_axis_type, normalize_axes
from batchnorm.layers._dtype_policy import DTypePolicy
from batchnorm.layers._fused import built_path
from batchnorm.layers._keras_weights import keras_parameter_shape, layer_keras_shape
from batchnorm.layers._layer_state import estimator_mismatch
from batchnorm.layers._lazy_weights import TensorOwner, unmaterialize
from batchnorm.layers._parametrized import write_weight

# What a build sets, restored by a first call that raises; the last two are torch's lazy-module
# hook handles, which a built layer no longer has (see BatchNormalization.__init__).
_BUILD_STATE = (
    "built",
    "axis",
    "fused",
    "_axes",
    "_input_rank",
    "_loaded_estimator",
    "_initialize_hook",
    "_load_hook",
)
# What the layer remembers of its calls (see BatchNormalization.forward).
_CALL_CACHES = ("_direct_calls", "_statistics", "_accepted_input", "_options")


class BuildingLayer(TensorOwner, Protocol):
    """What these functions read and set on a :class:`~batchnorm.BatchNormalization` layer."""

    name: str
    axis: list[int] | int
    fused: bool | None
    virtual_batch_size: int | None
    synchronized: bool
    built: bool
    moving_mean: torch.Tensor
    dtype_policy: DTypePolicy
    scale: bool
    center: bool
    renorm: bool
    moving_average: str
    moving_variance_estimator: str
    beta_initializer: Any
    gamma_initializer: Any
    moving_mean_initializer: Any
    moving_variance_initializer: Any
    _device: Any
    _axes: tuple[int, ...] | None
    _input_rank: int | None

    def _stored_estimator(self, fused: bool | None) -> str | None: ...

    def _create_weights(
        self, channel_shape: tuple[int, ...], keras_shape: tuple[int, ...] | None = None
    ) -> list[str]: ...


def buffer_dtypes(layer: BuildingLayer) -> dict[str, torch.dtype]:
    """The buffers the layer's options call for, with the dtype each is created in."""
    dtype = layer.dtype_policy.parameter_dtype
    names = ["moving_mean", "moving_variance"]
    if layer.renorm:
        names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    dtypes = dict.fromkeys(names, dtype)
    if layer.moving_average == "debiased":
        # float64: with momentum=1 it counts batches, exactly up to 2**53.
        dtypes["moving_average_weight"] = torch.float64
    return dtypes


def initial_weights(
    layer: BuildingLayer,
    channel_shape: tuple[int, ...],
    keras_shape: tuple[int, ...] | None,
    device: torch.device | None = None,
    affine: bool = True,
) -> dict[str, torch.Tensor]:
    """Every weight's initial value, in the per-channel shape, on ``device`` (the layer's
    construction device by default); initializers see ``keras_shape``. Without ``affine``, the
    moving statistics' only (gamma's and beta's initializers are not called: a random one
    would draw from the generator for nothing)."""
    init_shape = keras_shape or channel_shape
    dtype, device = layer.dtype_policy.parameter_dtype, device or layer._device

    def initial(initializer: Callable[..., torch.Tensor]) -> torch.Tensor:
        value = torch.as_tensor(initializer(init_shape, dtype=dtype, device=device))
        if value.numel() != math.prod(channel_shape):
            raise ValueError(
                f"An initializer must return a tensor of shape {tuple(init_shape)}. Received: "
                f"shape {tuple(value.shape)} from {initializer!r}"
            )
        return value.to(dtype=dtype, device=device).reshape(channel_shape).clone()

    values = {}
    if affine and layer.scale:
        values["gamma"] = initial(layer.gamma_initializer)
    if affine and layer.center:
        values["beta"] = initial(layer.beta_initializer)
    values["moving_mean"] = initial(layer.moving_mean_initializer)
    values["moving_variance"] = initial(layer.moving_variance_initializer)
    if layer.renorm:
        values["moving_stddev"] = values["moving_variance"].sqrt()
        values["renorm_mean"] = initial(layer.moving_mean_initializer)
        values["renorm_stddev"] = values["moving_variance"].sqrt()
    if layer.moving_average == "debiased":
        values["moving_average_weight"] = torch.zeros((), dtype=torch.float64, device=device)
    return values


def reset_weights(layer: BuildingLayer, affine: bool) -> None:
    """Write the initial values of the moving statistics, and of gamma and beta with ``affine``,
    into the layer's tensors, in place (their memory, dtype and device stay); a rerouted gamma or
    beta has the parameters behind it written (:func:`write_weight`); nothing before the build.
    Initializers see the Keras shape where the layer was built on an input (as at the build)."""
    if not layer.built:
        return
    channel_shape = tuple(layer.moving_mean.shape)
    keras_shape = layer_keras_shape(layer)
    device = layer.moving_mean.device
    values = initial_weights(layer, channel_shape, keras_shape, device, affine)
    for name, value in values.items():
        # Through a parametrization or pruning of gamma or beta too: their originals are reset.
        write_weight(layer, name, value)


def build_input_shape(input_shape: Any, axis: Any) -> tuple[int, ...]:
    """``build``'s ``input_shape`` as sizes: Keras passes None for the batch size (and any size
    it does not know yet); only the channel axes' sizes are read, and must be known. None
    elsewhere becomes 1. Any iterable of sizes (a list, tuple, torch.Size, a NumPy array or
    integer tensor), each an int, a NumPy or 0-d tensor integer, a whole float or a SymInt
    (torch.compile with dynamic shapes)."""
    sizes = _checked_sizes(input_shape)
    for a in normalize_axes(axis, len(sizes)):
        # A SymInt (a dynamic size under torch.compile / torch.export) is read only on a channel
        # axis: int() of the batch size specialised it to the example's ("You marked B as
        # dynamic but your code specialized it to be a constant").
        if isinstance(sizes[a], torch.SymInt):
            sizes[a] = _size(sizes[a])
        if sizes[a] is None:
            raise ValueError(
                f"`input_shape` needs a known size on the channel axis {a}. "
                f"Received: input_shape={input_shape!r} for axis={axis!r}"
            )
    return tuple(1 if s is None or isinstance(s, torch.SymInt) else s for s in sizes)


def output_shape(input_shape: Any, axis: Any) -> tuple[int | None, ...]:
    """Keras' ``compute_output_shape``: ``input_shape`` as given, None kept anywhere (channel
    sizes too, as in tf-keras and Keras 3); its sizes checked as :func:`build_input_shape`
    checks them, and ``axis`` against its rank."""
    sizes = _checked_sizes(input_shape)
    normalize_axes(axis, len(sizes))  # ValueError for an axis out of the rank's range
    return tuple(_size(s) if isinstance(s, torch.SymInt) else s for s in sizes)


def _checked_sizes(input_shape: Any) -> list[Any]:
    """``input_shape`` as a list of sizes, each None, a SymInt (left as it is) or an int
    (:func:`_size`); a TypeError naming ``input_shape`` otherwise."""
    try:
        if isinstance(input_shape, (str, bytes)):
            raise TypeError
        return [s if s is None or isinstance(s, torch.SymInt) else _size(s) for s in input_shape]
    except (TypeError, ValueError):
        raise TypeError(
            "`input_shape` must be a sequence of non-negative ints (None where unknown, as Keras' "
            f"batch size). Received: input_shape={input_shape!r}"
        ) from None


def _size(value: Any) -> int:
    """One size as an int: TypeError/ValueError for a bool, a fraction, a negative number."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    size = int(value) if isinstance(value, torch.SymInt) else operator.index(value)
    if size < 0:
        raise ValueError
    return size


def build_layer(layer: BuildingLayer, input_shape: tuple[int, ...]) -> list[str]:
    """Keras' ``build`` for inputs of ``input_shape`` (nothing when the rank is fixed already);
    every check runs before anything is set. Returns the names materialised in place."""
    rank = len(input_shape)
    if layer._input_rank is not None:
        return []
    if not layer.built:
        _refuse_substituted_placeholders(layer)
    axes = normalize_axes(layer.axis, rank)
    if layer.virtual_batch_size is not None and 0 in axes:
        # tf-keras' build checks the resolved axes (the constructor saw a negative one)
        raise ValueError(
            "When using `virtual_batch_size`, the batch dimension must be 0 and thus axis "
            f"cannot include 0. Received: axis={layer.axis!r} (axis 0 of an input of rank "
            f"{rank})"
        )
    # The `fused` argument, decided again for the settings now (synchronized, renorm, ghost
    # batches or an adjustment may have been set, or unset, since construction), as
    # from_config of this layer's config decides it.
    given = vars(layer).get("_fused_argument", layer.fused)
    fused = built_path(layer, given, layer.synchronized, axes, rank)
    channel_shape = tuple(input_shape[a] for a in axes)
    if 0 in channel_shape:  # as num_features=0 and load_state_dict refuse them
        raise ValueError(
            f"An input with no channels cannot build the layer: axis {list(axes)} has size 0. "
            f"Received: input_shape={input_shape}"
        )
    keras_shape = keras_parameter_shape(channel_shape, axes, rank, layer.virtual_batch_size)
    if layer.built:
        built_shape = tuple(layer.moving_mean.shape)
        if built_shape != channel_shape:
            raise ValueError(
                f"Input has {channel_shape} channels on axis {list(axes)}, but the layer was "
                f"built for {built_shape}. Received: input_shape={input_shape}"
            )
    # A checkpoint loaded before the build recorded the variance it holds (see _layer_state).
    loaded = vars(layer).get("_loaded_estimator")
    stored = layer._stored_estimator(fused)
    if loaded is not None and stored is not None and loaded != stored:
        setting = layer.moving_variance_estimator
        raise ValueError(estimator_mismatch(layer.name, setting, stored, loaded))
    materialized = [] if layer.built else layer._create_weights(channel_shape, keras_shape)
    # The resolved path, not an argument (the setter would record it as one for get_config).
    vars(layer)["fused"] = fused
    layer._axes, layer._input_rank = axes, rank
    # Keras keeps the order the user gave, with negative axes made positive.
    layer.axis = [a % rank for a in check_axis_type(layer.axis)]
    for name in ("_loaded_estimator", "_initialize_hook", "_load_hook"):
        vars(layer).pop(name, None)
    return materialized


def _refuse_substituted_placeholders(layer: BuildingLayer) -> None:
    """Raise where an unbuilt layer's placeholders hold real tensors: ``torch.func.
    functional_call`` (or a hand-made swap) put them there for one call, and building would
    replace them with the initializers' values (the tensors passed were ignored, the caller's
    dict entries overwritten, and the layer left built over placeholders once the call ended)."""
    slots = {**layer._parameters, **layer._buffers}
    real = sorted(n for n, t in slots.items() if t is not None and not nn.parameter.is_lazy(t))
    if real:
        raise ValueError(
            f"Layer {layer.name} is not built, but its {', '.join(real)} hold tensors put in "
            "place of its placeholders (by torch.func.functional_call, or `.to()` under "
            "torch.__future__.set_swap_module_params_on_conversion(True)): build it first "
            "(num_features, build(input_shape) or one call), then pass its tensors. "
            f"Received: tensors for {real}"
        )


def first_call(
    layer: BuildingLayer, input_shape: tuple[int, ...], step: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """Build for ``input_shape``, then run ``step``; if it raises, undo the build."""
    before = build_settings(layer)
    materialized = build_layer(layer, input_shape)
    try:
        return step()
    except BaseException:
        undo_build(layer, before, materialized)
        raise


def build_settings(layer: TensorOwner) -> dict[str, Any]:
    """What a build sets, as the layer holds it now (for :func:`undo_build`)."""
    memory = vars(layer)
    return {name: memory[name] for name in _BUILD_STATE if name in memory}


def undo_build(layer: TensorOwner, settings: dict[str, Any], materialized: list[str]) -> None:
    """Undo a build: the tensors it ``materialized`` back to placeholders, the build settings
    as :func:`build_settings` read them before it, and no call caches."""
    unmaterialize(layer, materialized)
    memory = vars(layer)
    for name in (*_CALL_CACHES, *_BUILD_STATE):
        memory.pop(name, None)
    memory.update(settings)
