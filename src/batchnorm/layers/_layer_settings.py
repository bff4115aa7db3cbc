"""Settings assigned to a constructed layer (``layer.momentum = 0.5``): checked as the constructor
checks them, before anything is set.

Keras and torch let a layer's settings be changed between calls (a momentum schedule, relaxing
renorm's clipping, freezing with ``use_global_stats``), so the layer takes them; what it does not
take is a value its constructor refuses: ``momentum = 2.0`` made the moving mean diverge, a
string ``use_global_stats = "no"`` read as True (the layer froze), ``epsilon = "1e-3"`` reached
the kernels as a Numba typing error. Settings that decide the layer's weights (``center``,
``scale``, ``renorm``: which parameters and buffers exist; ``axis``: their shape) cannot change
once the layer is built: a new layer is the way. Combinations are checked as the constructor
checks them: ghost batches, an adjustment or renorm with ``fused=True``, ghost batches with an
adjustment, ``synchronized`` with ``fused=True``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from batchnorm.functional._batch_norm import check_use_global_stats
from batchnorm.functional._in_place import check_in_place_settings
from batchnorm.functional._synchronized import check_synchronized
from batchnorm.functional._validation import (
    check_adjustment,
    check_axis_type,
    check_bool,
    check_fraction,
    check_positive,
    check_renorm_clipping,
    check_virtual_batch_size,
)
from batchnorm.layers import _constraints as constraints
from batchnorm.layers import _initializers as initializers
from batchnorm.layers import _regularizers as regularizers
from batchnorm.layers._fused import built_path, fused_unsupported_reason
from batchnorm.layers._layer_arguments import (
    MovingAverage,
    MovingVarianceEstimator,
    check_axis_argument,
    check_choice,
    check_fused,
    check_name,
)


class SettingsLayer(Protocol):
    """What the checks read of the layer (its current settings)."""

    built: bool
    axis: list[int] | int
    fused: bool | None
    renorm: bool
    virtual_batch_size: int | None
    adjustment: Any
    synchronized: bool
    process_group: Any
    _input_rank: int | None
    _axes: tuple[int, ...] | None
    _fused_argument: bool | None
    _activation: Any
    memory: str
    dtype_policy: Any


def _unchanged_once_built(name: str, what: str) -> Callable[[SettingsLayer, Any], Any]:
    def check(layer: SettingsLayer, value: Any) -> Any:
        value = check_bool(value, name)
        if layer.built and value != getattr(layer, name):
            raise ValueError(
                f"`{name}` cannot change once the layer is built ({what}); make a new layer. "
                f"Received: {name}={value!r} for layer {getattr(layer, 'name', '')!r} built "
                f"with {name}={getattr(layer, name)!r}"
            )
        return value

    return check


def _fused_allows(layer: SettingsLayer, **change: Any) -> None:
    """Raise where the layer's ``fused=True`` cannot run with the settings after ``change``."""
    if layer.fused is not True:
        return
    reason = fused_unsupported_reason(
        axis=check_axis_type(layer.axis),
        renorm=change.get("renorm", layer.renorm),
        virtual_batch_size=change.get("virtual_batch_size", layer.virtual_batch_size),
        adjustment_given=change.get("adjustment_given", layer.adjustment is not None),
        compute_dtype=layer.dtype_policy.compute_dtype,
    )
    if reason is not None:
        raise ValueError(f"{reason} (set `fused = False` first)")


def _renorm(layer: SettingsLayer, value: Any) -> bool:
    value = _unchanged_once_built("renorm", "its buffers are made by the build")(layer, value)
    _fused_allows(layer, renorm=value)
    return bool(value)


def _virtual_batch_size(layer: SettingsLayer, value: Any) -> int | None:
    size = check_virtual_batch_size(value)
    check_adjustment(layer.adjustment, size, layer.axis)
    _fused_allows(layer, virtual_batch_size=size)
    return size


def _adjustment(layer: SettingsLayer, value: Any) -> Any:
    check_adjustment(value, layer.virtual_batch_size, layer.axis)
    _fused_allows(layer, adjustment_given=value is not None)
    return value


def _fused(layer: SettingsLayer, value: Any) -> bool | None:
    """The path for ``fused = value``: checked as the constructor checks it and, on a layer
    built for inputs of one rank, resolved as the build resolves it (None: tf-keras' automatic
    choice for that rank and axis, not the non-fused path; True on an input rank other than 4
    or 5: refused, as tf-keras' build refuses it)."""
    if value is True and layer.synchronized:
        check_synchronized(True, layer.process_group, True)
    fused = check_fused(
        value,
        axis=layer.axis,
        renorm=layer.renorm,
        virtual_batch_size=layer.virtual_batch_size,
        adjustment_given=layer.adjustment is not None,
        compute_dtype=layer.dtype_policy.compute_dtype,
    )
    rank, axes = layer._input_rank, layer._axes
    if rank is None or axes is None:
        return fused
    return built_path(layer, fused, layer.synchronized, axes, rank)


def _synchronized(layer: SettingsLayer, value: Any) -> bool:
    """``synchronized = value`` checked as the constructor checks it (a layer training in place
    cannot be synchronized); on a built layer whose ``fused`` was left automatic (None given),
    the path is decided again for the new value, as the build decides it (switched back off, a
    layer built while synchronized stayed on the non-fused path its config did not say)."""
    synchronized, _ = check_synchronized(value, None, layer.fused)
    if not synchronized and layer.process_group is not None:
        raise ValueError(
            "Set `process_group = None` before `synchronized = False` (a group is only used "
            f"with synchronized=True). Received: synchronized=False with process_group="
            f"{layer.process_group!r}"
        )
    if synchronized and layer.memory == "in_place":
        check_in_place_settings(layer._activation, True)
    rank, axes = layer._input_rank, layer._axes
    if layer._fused_argument is None and rank is not None and axes is not None:
        fused = built_path(layer, None, synchronized, axes, rank)
        vars(layer)["fused"] = fused  # checked above; the assignment of ``value`` cannot fail
    return synchronized


def _process_group(layer: SettingsLayer, value: Any) -> Any:
    return check_synchronized(layer.synchronized, value, None)[1]


def _axis(layer: SettingsLayer, value: Any) -> Any:
    value = check_axis_argument(value)
    rank = layer._input_rank
    if rank is not None:  # built for inputs of one rank: the same axes, written another way
        given, current = check_axis_type(value), check_axis_type(layer.axis)
        if not all(-rank <= a < rank for a in given) or sorted(a % rank for a in given) != sorted(
            a % rank for a in current
        ):
            raise ValueError(
                "`axis` cannot change once the layer is built (the weights have its channel "
                f"shape); make a new layer. Received: axis={value!r} for a layer built with "
                f"axis={layer.axis!r} on inputs of rank {rank}"
            )
        return [a % rank for a in given]  # as the build keeps it
    return value


def _initializer(name: str) -> Callable[[SettingsLayer, Any], Any]:
    return lambda layer, value: initializers.get(value, argument=name)


def _regularizer(name: str) -> Callable[[SettingsLayer, Any], Any]:
    return lambda layer, value: regularizers.get(value, argument=name)


def _constraint(name: str) -> Callable[[SettingsLayer, Any], Any]:
    return lambda layer, value: constraints.get(value, argument=name)


_CHECKS: dict[str, Callable[[SettingsLayer, Any], Any]] = {
    "momentum": lambda layer, value: check_fraction(value, "momentum"),
    "renorm_momentum": lambda layer, value: check_fraction(value, "renorm_momentum"),
    "epsilon": lambda layer, value: check_positive(value, "epsilon"),
    "center": _unchanged_once_built("center", "beta exists only with center=True"),
    "scale": _unchanged_once_built("scale", "gamma exists only with scale=True"),
    "renorm": _renorm,
    "renorm_clipping": lambda layer, value: check_renorm_clipping(value),
    "virtual_batch_size": _virtual_batch_size,
    "adjustment": _adjustment,
    "fused": _fused,
    "synchronized": _synchronized,
    "process_group": _process_group,
    "axis": _axis,
    "name": lambda layer, value: check_name(value),
    "use_global_stats": lambda layer, value: check_use_global_stats(value),
    "moving_variance_estimator": lambda layer, value: check_choice(
        value, "moving_variance_estimator", MovingVarianceEstimator
    ),
    "moving_average": lambda layer, value: check_choice(value, "moving_average", MovingAverage),
    **{
        name: _initializer(name)
        for name in (
            "beta_initializer",
            "gamma_initializer",
            "moving_mean_initializer",
            "moving_variance_initializer",
        )
    },
    **{name: _regularizer(name) for name in ("beta_regularizer", "gamma_regularizer")},
    **{name: _constraint(name) for name in ("beta_constraint", "gamma_constraint")},
}


def checked_setting(layer: SettingsLayer, name: str, value: Any) -> Any:
    """``value`` for the layer's setting ``name`` as the constructor would keep it (a checked,
    normalised value), or the error the constructor gives; other names pass unchanged."""
    check = _CHECKS.get(name)
    return value if check is None else check(layer, value)
