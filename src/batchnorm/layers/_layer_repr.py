"""The layer's ``repr``: its constructor arguments, the ones that differ from the defaults.

``num_features``, ``axis`` (as given), ``momentum`` and ``epsilon`` are always shown, as
torch.nn.BatchNorm always shows ``eps`` and ``momentum``; every other argument appears when it is
not the default, in the constructor's order, so the repr reads as the call that makes the layer.
"""

from __future__ import annotations

from typing import Any, Protocol

from batchnorm.layers import _initializers as initializers
from batchnorm.layers._dtype_policy import DTypePolicy

_DEFAULT_INITIALIZERS = {
    "beta_initializer": "zeros",
    "gamma_initializer": "ones",
    "moving_mean_initializer": "zeros",
    "moving_variance_initializer": "ones",
}
_DEFAULT_RENORM_MOMENTUM = 0.99


class ShownLayer(Protocol):
    """What :func:`layer_repr` reads from a :class:`~batchnorm.BatchNormalization` layer."""

    _axis_argument: int | list[int]
    momentum: float
    epsilon: float
    center: bool
    scale: bool
    renorm: bool
    renorm_clipping: dict[str, float]
    renorm_momentum: float
    virtual_batch_size: int | None
    adjustment: Any
    trainable: bool
    dtype_policy: DTypePolicy
    synchronized: bool

    _fused_argument: bool | None

    @property
    def num_features(self) -> int | tuple[int, ...] | None: ...

    def _convention_options(self) -> dict[str, Any]: ...

    def _activation_options(self) -> dict[str, Any]: ...


def layer_repr(layer: ShownLayer) -> str:
    shown: dict[str, Any] = {
        "num_features": layer.num_features,
        "axis": layer._axis_argument,
        "momentum": layer.momentum,
        "epsilon": layer.epsilon,
    }
    if not layer.center:
        shown["center"] = False
    if not layer.scale:
        shown["scale"] = False
    for argument, default in _DEFAULT_INITIALIZERS.items():
        value = getattr(layer, argument)
        if value != initializers.get(default):
            shown[argument] = value
    for argument in (
        "beta_regularizer",
        "gamma_regularizer",
        "beta_constraint",
        "gamma_constraint",
    ):
        if getattr(layer, argument) is not None:
            shown[argument] = getattr(layer, argument)
    if layer.renorm:
        shown["renorm"] = True
        if layer.renorm_clipping:
            shown["renorm_clipping"] = layer.renorm_clipping
        if layer.renorm_momentum != _DEFAULT_RENORM_MOMENTUM:
            shown["renorm_momentum"] = layer.renorm_momentum
    if layer._fused_argument is not None and not layer.synchronized:  # synchronized: unfused
        shown["fused"] = layer._fused_argument
    if not layer.trainable:
        shown["trainable"] = False
    if layer.virtual_batch_size is not None:
        shown["virtual_batch_size"] = layer.virtual_batch_size
    if layer.adjustment is not None:
        shown["adjustment"] = _FunctionName(layer.adjustment)
    shown.update(layer._convention_options())
    if layer.dtype_policy.name != "float32":
        shown["dtype"] = layer.dtype_policy.name
    if layer.synchronized:
        shown["synchronized"] = True
    shown.update(layer._activation_options())
    return ", ".join(f"{key}={value!r}" for key, value in shown.items())


class _FunctionName:
    """A function shown by its name, as a traceback shows it: ``adjustment=<lambda>``."""

    def __init__(self, function: Any) -> None:
        self.name = getattr(function, "__qualname__", type(function).__name__)

    def __repr__(self) -> str:
        return str(self.name)
