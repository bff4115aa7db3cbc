"""Keras weight constraints, applied to gamma/beta after each optimizer step.

With ``norm = sqrt(sum(w^2, axis))`` and ``eps = 1e-7`` (Keras' backend epsilon):

- ``NonNeg()``: ``w * (w >= 0)``
- ``MaxNorm(max_value=2, axis=0)``: ``w * clip(norm, 0, max_value) / (eps + norm)``
- ``UnitNorm(axis=0)``: ``w / (eps + norm)``
- ``MinMaxNorm(min_value=0, max_value=1, rate=1, axis=0)``:
  ``w * (rate * clip(norm, min_value, max_value) + (1 - rate) * norm) / (eps + norm)``

Constraints see the weight in its tf-keras shape, so ``axis`` means what it means in Keras.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from batchnorm.layers._keras_objects import KerasObject, resolve, serialize

__all__ = [
    "KERAS_EPSILON",
    "Constraint",
    "MaxNorm",
    "MinMaxNorm",
    "NonNeg",
    "UnitNorm",
    "get",
    "serialize_constraint",
]

KERAS_EPSILON = 1e-7


class Constraint(KerasObject):
    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _norms(weight: torch.Tensor, axis: int | list[int]) -> torch.Tensor:
    dims = [axis] if isinstance(axis, int) else list(axis)
    return weight.square().sum(dim=dims, keepdim=True).sqrt()


class NonNeg(Constraint):
    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * (weight >= 0).to(weight.dtype)


class MaxNorm(Constraint):
    def __init__(self, max_value: float = 2, axis: int | list[int] = 0) -> None:
        self.max_value, self.axis = max_value, axis

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        norms = _norms(weight, self.axis)
        desired = norms.clamp(0, self.max_value)
        return weight * (desired / (KERAS_EPSILON + norms))

    def get_config(self) -> dict[str, Any]:
        return {"max_value": self.max_value, "axis": self.axis}


class UnitNorm(Constraint):
    def __init__(self, axis: int | list[int] = 0) -> None:
        self.axis = axis

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight / (KERAS_EPSILON + _norms(weight, self.axis))

    def get_config(self) -> dict[str, Any]:
        return {"axis": self.axis}


class MinMaxNorm(Constraint):
    def __init__(
        self,
        min_value: float = 0.0,
        max_value: float = 1.0,
        rate: float = 1.0,
        axis: int | list[int] = 0,
    ) -> None:
        self.min_value, self.max_value, self.rate, self.axis = min_value, max_value, rate, axis

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        norms = _norms(weight, self.axis)
        desired = self.rate * norms.clamp(self.min_value, self.max_value) + (1 - self.rate) * norms
        return weight * (desired / (KERAS_EPSILON + norms))

    def get_config(self) -> dict[str, Any]:
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "rate": self.rate,
            "axis": self.axis,
        }


_REGISTRY: dict[str, type[KerasObject]] = {
    "NonNeg": NonNeg,
    "MaxNorm": MaxNorm,
    "UnitNorm": UnitNorm,
    "MinMaxNorm": MinMaxNorm,
}


def get(identifier: Any, *, argument: str = "constraint") -> Callable[..., torch.Tensor] | None:
    constraint: Callable[..., torch.Tensor] | None = resolve(
        identifier, _REGISTRY, kind="constraint", argument=argument
    )
    return constraint


def serialize_constraint(constraint: Any) -> Any:
    return serialize(constraint, module="keras.constraints")
