"""get_config / from_config for BatchNormalization, compatible with tf-keras and Keras 3 configs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from batchnorm.layers._constraints import serialize_constraint
from batchnorm.layers._dtype_policy import DTypePolicy
from batchnorm.layers._initializers import serialize_initializer
from batchnorm.layers._regularizers import serialize_regularizer

_INIT_KEYS = {
    "num_features",
    "axis",
    "momentum",
    "epsilon",
    "center",
    "scale",
    "beta_initializer",
    "gamma_initializer",
    "moving_mean_initializer",
    "moving_variance_initializer",
    "beta_regularizer",
    "gamma_regularizer",
    "beta_constraint",
    "gamma_constraint",
    "renorm",
    "renorm_clipping",
    "renorm_momentum",
    "fused",
    "trainable",
    "virtual_batch_size",
    "moving_variance_estimator",
    "moving_average",
    "use_global_stats",
    "dtype",
    "name",
    "synchronized",
    # Not tf-keras keys: written only when set, so configs stay tf-keras' otherwise.
    "mask_weights",
    "activation",
    "activation_param",
    "memory",
}
# Keys Keras writes that carry nothing this layer needs.
_IGNORED_KERAS_KEYS = {
    "batch_input_shape",
    "input_shape",
    "build_config",
    "module",
    "registered_name",
}


class ConfiguredLayer(Protocol):
    """What :func:`layer_config` reads from a :class:`~batchnorm.BatchNormalization` layer."""

    name: str
    trainable: bool
    dtype_policy: DTypePolicy
    axis: list[int] | int
    momentum: float
    epsilon: float
    center: bool
    scale: bool
    beta_initializer: Any
    gamma_initializer: Any
    moving_mean_initializer: Any
    moving_variance_initializer: Any
    beta_regularizer: Any
    gamma_regularizer: Any
    beta_constraint: Any
    gamma_constraint: Any
    renorm: bool
    renorm_clipping: dict[str, float]
    renorm_momentum: float
    virtual_batch_size: int | None
    synchronized: bool

    built: bool
    moving_mean: torch.Tensor
    # The `fused` argument as given (None: tf-keras' automatic choice), not the resolved path.
    _fused_argument: bool | None

    def _convention_options(self) -> dict[str, Any]: ...

    def _activation_options(self) -> dict[str, Any]: ...


def layer_config(layer: ConfiguredLayer) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": layer.name,
        "trainable": layer.trainable,
        "dtype": layer.dtype_policy.name,
        "axis": list(layer.axis) if isinstance(layer.axis, list) else layer.axis,
        "momentum": layer.momentum,
        "epsilon": layer.epsilon,
        "center": layer.center,
        "scale": layer.scale,
        "beta_initializer": serialize_initializer(layer.beta_initializer),
        "gamma_initializer": serialize_initializer(layer.gamma_initializer),
        "moving_mean_initializer": serialize_initializer(layer.moving_mean_initializer),
        "moving_variance_initializer": serialize_initializer(layer.moving_variance_initializer),
        "beta_regularizer": serialize_regularizer(layer.beta_regularizer),
        "gamma_regularizer": serialize_regularizer(layer.gamma_regularizer),
        "beta_constraint": serialize_constraint(layer.beta_constraint),
        "gamma_constraint": serialize_constraint(layer.gamma_constraint),
    }
    if layer.renorm:
        config["renorm"] = True
        config["renorm_clipping"] = dict(layer.renorm_clipping)
        config["renorm_momentum"] = layer.renorm_momentum
    if layer.virtual_batch_size is not None:
        config["virtual_batch_size"] = layer.virtual_batch_size
    if layer.synchronized:
        config["synchronized"] = True
    if layer._fused_argument is not None:
        config["fused"] = layer._fused_argument
    config.update(layer._convention_options())
    config.update(layer._activation_options())
    if layer.built:
        shape = tuple(layer.moving_mean.shape)
        config["num_features"] = shape[0] if len(shape) == 1 else list(shape)
    elif _read_as_shifted(config):
        # Unbuilt, its axes as given: the key says so (see layer_kwargs_from_config).
        config["num_features"] = None
    return config


def _read_as_shifted(kwargs: Mapping[str, Any]) -> bool:
    """Whether a config's axes are tf-keras' of a built ghost-batch layer, each shifted by the
    ghost dimension: a list of positive axes, all >= 2 (axis 0 cannot be a channel axis there,
    so a shifted one is never 1), without ``num_features`` (which this layer's own configs
    hold when built, unshifted, and as None when not built). An unbuilt tf-keras layer keeps its
    axes as given: one given as [2, 3] is read as [1, 2]."""
    axis = kwargs.get("axis")
    return (
        kwargs.get("virtual_batch_size") is not None
        and "num_features" not in kwargs
        and isinstance(axis, list)
        and all(isinstance(a, int) and a >= 2 for a in axis)
    )


def layer_kwargs_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(config, Mapping):
        raise TypeError(
            f"`config` must be a dict. Received: config of type {type(config).__name__}"
        )
    # A full Keras layer entry {"class_name": "BatchNormalization", "config": {...}} is unwrapped.
    if "config" in config and "class_name" in config:
        config = config["config"]
    kwargs = {key: value for key, value in config.items() if key not in _IGNORED_KERAS_KEYS}
    unknown = sorted(set(kwargs) - _INIT_KEYS)
    if unknown:
        raise ValueError(
            f"Unknown BatchNormalization config keys {unknown}; expected keys among "
            f"{sorted(_INIT_KEYS)}. Received: config={dict(config)!r}"
        )
    if _read_as_shifted(kwargs):
        # tf-keras writes the axes of a built ghost-batch layer shifted by its extra ghost
        # dimension; this layer's own configs carry num_features and are not shifted.
        kwargs["axis"] = [a - 1 for a in kwargs["axis"]]
    if kwargs.get("renorm_clipping") is not None:
        kwargs["renorm_clipping"] = dict(kwargs["renorm_clipping"])
    return kwargs
