"""Keras initializers for batch-norm weights, as torch tensors.

Each initializer is called as ``initializer(shape, dtype=..., device=...)`` with the tf-keras weight
shape, so the fans of the variance-scaling family are the ones tf-keras computes
(``fan_in = fan_out = shape[0]`` for a vector). Random initializers draw from torch's generator,
seeded with ``seed`` when given: the distribution matches Keras, the draws cannot.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from batchnorm.layers._keras_objects import KerasObject, resolve, serialize

__all__ = [
    "Constant",
    "GlorotNormal",
    "GlorotUniform",
    "HeNormal",
    "HeUniform",
    "Initializer",
    "LecunNormal",
    "LecunUniform",
    "Ones",
    "RandomNormal",
    "RandomUniform",
    "TruncatedNormal",
    "VarianceScaling",
    "Zeros",
    "compute_fans",
    "get",
    "serialize_initializer",
]

Shape = tuple[int, ...]


def _generator(seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator().manual_seed(seed)


class Initializer(KerasObject):
    def __call__(
        self, shape: Shape, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        raise NotImplementedError


class Zeros(Initializer):
    def __call__(
        self, shape: Shape, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)


class Ones(Initializer):
    def __call__(
        self, shape: Shape, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        return torch.ones(shape, dtype=dtype, device=device)


class Constant(Initializer):
    def __init__(self, value: float = 0.0) -> None:
        zero_dimensional = isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0
        if isinstance(value, bool) or not (isinstance(value, numbers.Real) or zero_dimensional):
            raise TypeError(f"Constant's `value` must be a number. Received: value={value!r}")
        # a 0-d array or tensor as the number it holds (JSON-ready in get_config)
        self.value: float = float(value) if zero_dimensional else value

    def __call__(
        self, shape: Shape, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        return torch.full(shape, float(self.value), dtype=dtype, device=device)

    def get_config(self) -> dict[str, Any]:
        return {"value": self.value}


class RandomNormal(Initializer):
    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None) -> None:
        self.mean, self.stddev, self.seed = mean, stddev, seed

    def __call__(
        self, shape: Shape, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        sample = torch.randn(shape, generator=_generator(self.seed), dtype=torch.float64)
        return (sample * self.stddev + self.mean).to(dtype=dtype, device=device)

    def get_config(self) -> dict[str, Any]:
        return {"mean": self.mean, "stddev": self.stddev, "seed": self.seed}


class RandomUniform(Initializer):
    def __init__(
        self, minval: float = -0.05, maxval: float = 0.05, seed: int | None = None
    ) -> None:
        self.minval, self.maxval, self.seed = minval, maxval, seed

    def __call__(
        self, shape: Shape, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        sample = torch.rand(shape, generator=_generator(self.seed), dtype=torch.float64)
        return (sample * (self.maxval - self.minval) + self.minval).to(dtype=dtype, device=device)

    def get_config(self) -> dict[str, Any]:
        return {"minval": self.minval, "maxval": self.maxval, "seed": self.seed}


def _truncated_normal(shape: Shape, stddev: float, seed: int | None) -> torch.Tensor:
    """Normal draws re-drawn outside two standard deviations, as tf.random.truncated_normal."""
    sample = torch.empty(shape, dtype=torch.float64)
    torch.nn.init.trunc_normal_(sample, std=1.0, a=-2.0, b=2.0, generator=_generator(seed))
    return sample * stddev


class TruncatedNormal(Initializer):
    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed: int | None = None) -> None:
        self.mean, self.stddev, self.seed = mean, stddev, seed

    def __call__(
        self, shape: Shape, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        sample = _truncated_normal(shape, self.stddev, self.seed) + self.mean
        return sample.to(dtype=dtype, device=device)

    def get_config(self) -> dict[str, Any]:
        return {"mean": self.mean, "stddev": self.stddev, "seed": self.seed}


def compute_fans(
    shape: Shape,
    input_axes: Sequence[int] | None = None,
    output_axes: Sequence[int] | None = None,
) -> tuple[int, int]:
    """tf-keras' ``_compute_fans``: vectors use their length, kernels multiply the receptive field;
    with Keras 3.15's ``input_axes`` and ``output_axes`` both given, the products of those axes."""
    if input_axes is not None and output_axes is not None:
        return (
            math.prod(shape[a] for a in input_axes),
            math.prod(shape[a] for a in output_axes),
        )
    if len(shape) < 1:
        return 1, 1
    if len(shape) == 1:
        return shape[0], shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    receptive_field = math.prod(shape[:-2])
    return shape[-2] * receptive_field, shape[-1] * receptive_field


class VarianceScaling(Initializer):
    """``stddev = sqrt(scale / n)`` with n the fan in, fan out or their average."""

    def __init__(
        self,
        scale: float = 1.0,
        mode: str = "fan_in",
        distribution: str = "truncated_normal",
        seed: int | None = None,
        input_axes: Sequence[int] | None = None,
        output_axes: Sequence[int] | None = None,
    ) -> None:
        for name, axes in (("input_axes", input_axes), ("output_axes", output_axes)):
            if axes is not None and not (
                isinstance(axes, (list, tuple)) and all(isinstance(a, int) for a in axes)
            ):
                raise ValueError(
                    f"`{name}` must be None or a list of ints. Received: {name}={axes!r}"
                )
        if scale <= 0.0:
            raise ValueError(f"`scale` must be positive. Received: scale={scale}")
        if mode not in ("fan_in", "fan_out", "fan_avg"):
            raise ValueError(
                f"`mode` must be one of 'fan_in', 'fan_out', 'fan_avg'. Received: mode={mode!r}"
            )
        if distribution not in ("truncated_normal", "untruncated_normal", "uniform", "normal"):
            raise ValueError(
                "`distribution` must be one of 'truncated_normal', 'untruncated_normal', "
                f"'uniform'. Received: distribution={distribution!r}"
            )
        self.scale, self.mode, self.distribution, self.seed = scale, mode, distribution, seed
        self.input_axes = None if input_axes is None else list(input_axes)
        self.output_axes = None if output_axes is None else list(output_axes)

    def __call__(
        self, shape: Shape, dtype: torch.dtype = torch.float32, device: Any = None
    ) -> torch.Tensor:
        fan_in, fan_out = compute_fans(tuple(shape), self.input_axes, self.output_axes)
        fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[self.mode]
        variance = self.scale / max(1.0, fan)
        generator = _generator(self.seed)
        if self.distribution in ("truncated_normal", "normal"):
            # 0.879... is the stddev of a unit normal truncated to [-2, 2], as tf-keras corrects.
            sample = _truncated_normal(shape, math.sqrt(variance) / 0.87962566103423978, self.seed)
        elif self.distribution == "untruncated_normal":
            sample = torch.randn(shape, generator=generator, dtype=torch.float64) * math.sqrt(
                variance
            )
        else:
            limit = math.sqrt(3.0 * variance)
            sample = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 * limit - limit
        return sample.to(dtype=dtype, device=device)

    def get_config(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "mode": self.mode,
            "distribution": self.distribution,
            "seed": self.seed,
            **self._axes_config(),
        }

    def _axes_config(self) -> dict[str, Any]:
        """Keras 3.15's fan axes, written only when set (tf-keras' configs have neither)."""
        axes = {"input_axes": self.input_axes, "output_axes": self.output_axes}
        return {key: value for key, value in axes.items() if value is not None}


def _variance_scaling_preset(
    class_name: str, scale: float, mode: str, distribution: str
) -> type[VarianceScaling]:
    def initialise(
        self: VarianceScaling,
        seed: int | None = None,
        input_axes: Sequence[int] | None = None,
        output_axes: Sequence[int] | None = None,
    ) -> None:
        VarianceScaling.__init__(self, scale, mode, distribution, seed, input_axes, output_axes)

    def get_config(self: VarianceScaling) -> dict[str, Any]:
        return {"seed": self.seed, **self._axes_config()}

    preset = type(
        class_name, (VarianceScaling,), {"__init__": initialise, "get_config": get_config}
    )
    preset.__module__ = __name__
    preset.__doc__ = (
        f"VarianceScaling(scale={scale}, mode={mode!r}, distribution={distribution!r})."
    )
    return preset


GlorotUniform = _variance_scaling_preset("GlorotUniform", 1.0, "fan_avg", "uniform")
GlorotNormal = _variance_scaling_preset("GlorotNormal", 1.0, "fan_avg", "truncated_normal")
HeUniform = _variance_scaling_preset("HeUniform", 2.0, "fan_in", "uniform")
HeNormal = _variance_scaling_preset("HeNormal", 2.0, "fan_in", "truncated_normal")
LecunUniform = _variance_scaling_preset("LecunUniform", 1.0, "fan_in", "uniform")
LecunNormal = _variance_scaling_preset("LecunNormal", 1.0, "fan_in", "truncated_normal")

_REGISTRY: dict[str, type[KerasObject]] = {
    cls.__name__: cls
    for cls in (
        Zeros,
        Ones,
        Constant,
        RandomNormal,
        RandomUniform,
        TruncatedNormal,
        VarianceScaling,
        GlorotUniform,
        GlorotNormal,
        HeUniform,
        HeNormal,
        LecunUniform,
        LecunNormal,
    )
}


# Keras' short names (tf-keras and Keras 3 both take them).
_ALIASES: dict[str, type[KerasObject]] = {
    "zero": Zeros,
    "one": Ones,
    "normal": RandomNormal,
    "uniform": RandomUniform,
}


def get(identifier: Any, *, argument: str = "initializer") -> Callable[..., torch.Tensor]:
    """Resolve an initializer name, Keras dict or callable; ``None`` is an error here."""
    if identifier is None:
        raise ValueError(
            f"`{argument}` must be an initializer name, a Keras config dict or a callable. "
            f"Received: {argument}=None"
        )
    initializer: Callable[..., torch.Tensor] = resolve(
        identifier, {**_REGISTRY, **_ALIASES}, kind="initializer", argument=argument
    )
    return initializer


def serialize_initializer(initializer: Any) -> Any:
    return serialize(initializer, module="keras.initializers")
