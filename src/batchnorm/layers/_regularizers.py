"""Keras weight regularizers: penalties added to the loss, differentiable in the weight.

- ``L1(l1=0.01)``: ``l1 * sum(|w|)``
- ``L2(l2=0.01)``: ``l2 * sum(w^2)``
- ``L1L2(l1=0.0, l2=0.0)``: the sum of both (the name ``"l1_l2"`` gives l1 = l2 = 0.01, as tf-keras)
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch

from batchnorm.layers._keras_objects import KerasObject, resolve, serialize

__all__ = ["L1", "L1L2", "L2", "Regularizer", "get", "serialize_regularizer"]


class Regularizer(KerasObject):
    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _coefficient(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value) >= 0.0:
        raise ValueError(f"`{name}` must be a non-negative number. Received: {name}={value!r}")
    return float(value)


class L1(Regularizer):
    def __init__(self, l1: float = 0.01) -> None:
        self.l1 = _coefficient("l1", l1)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.l1 * weight.abs().sum()

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1}


class L2(Regularizer):
    def __init__(self, l2: float = 0.01) -> None:
        self.l2 = _coefficient("l2", l2)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.l2 * weight.square().sum()

    def get_config(self) -> dict[str, Any]:
        return {"l2": self.l2}


class L1L2(Regularizer):
    def __init__(self, l1: float = 0.0, l2: float = 0.0) -> None:
        self.l1 = _coefficient("l1", l1)
        self.l2 = _coefficient("l2", l2)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return self.l1 * weight.abs().sum() + self.l2 * weight.square().sum()

    def get_config(self) -> dict[str, Any]:
        return {"l1": self.l1, "l2": self.l2}


_REGISTRY: dict[str, type[KerasObject]] = {"L1": L1, "L2": L2, "L1L2": L1L2}


def get(identifier: Any, *, argument: str = "regularizer") -> Callable[..., torch.Tensor] | None:
    if identifier == "l1_l2":
        # tf-keras resolves this name to its l1_l2() function, whose defaults are 0.01 each;
        # the class's names ("L1L2", "l1l2" in Keras 3) to the class, whose defaults are 0.
        return L1L2(l1=0.01, l2=0.01)
    if isinstance(identifier, Mapping) and identifier.get("class_name") == "l1_l2":
        # The same function named in a dict: its config's values over the function's defaults.
        config = identifier.get("config") or {}
        identifier = {
            **identifier,
            "class_name": "L1L2",
            "config": {"l1": 0.01, "l2": 0.01, **config},
        }
    regularizer: Callable[..., torch.Tensor] | None = resolve(
        identifier, _REGISTRY, kind="regularizer", argument=argument
    )
    return regularizer


def serialize_regularizer(regularizer: Any) -> Any:
    return serialize(regularizer, module="keras.regularizers")
