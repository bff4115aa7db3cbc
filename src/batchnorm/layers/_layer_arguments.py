"""Checks of BatchNormalization's constructor arguments that go beyond one value's type and range
(those live in :mod:`batchnorm.functional._validation`): how arguments combine, and the defaults
that depend on them (the layer name, tf-keras' fused choice).
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch

from batchnorm.functional._validation import check_axis_type
from batchnorm.layers._fused import fused_unsupported_reason

MovingVarianceEstimator = Literal["auto", "biased", "unbiased"]
MovingAverage = Literal["ema", "debiased"]
_NAME_COUNTER = itertools.count()


def check_axis_argument(axis: Any) -> list[int] | int:
    """``axis`` as the layer keeps it before its build: an int, or a list without repeats.

    Axes that repeat only for some ranks (``[1, -1]`` on rank 2) are found at the build.
    """
    axes = check_axis_type(axis)
    if len(set(axes)) != len(axes):
        raise ValueError(f"`axis` contains duplicate axes. Received: axis={axis!r}")
    return axis if isinstance(axis, int) else axes


def channel_shape_argument(num_features: Any, axis: Any) -> tuple[int, ...]:
    """``num_features`` as a per-channel shape with one size per channel axis."""
    values = [num_features] if isinstance(num_features, numbers.Integral) else num_features
    valid = (
        not isinstance(num_features, bool)
        and isinstance(values, Sequence)
        and len(values) > 0
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)
    )
    if not valid or min(int(v) for v in values) <= 0:
        raise ValueError(
            "`num_features` must be a positive int or a tuple of positive ints. "
            f"Received: num_features={num_features!r}"
        )
    if len(values) != len(check_axis_type(axis)):
        raise ValueError(
            "`num_features` needs one size per channel axis. "
            f"Received: num_features={num_features!r} for axis={axis!r}"
        )
    return tuple(int(v) for v in values)


def check_fused(
    fused: Any,
    *,
    axis: Any,
    renorm: bool,
    virtual_batch_size: int | None,
    adjustment_given: bool,
    compute_dtype: torch.dtype,
) -> bool | None:
    """The path before the build: ``fused=True`` must be possible; ``fused=None`` becomes False
    when the options rule fusing out, and stays None (decided at the build) otherwise."""
    if fused is not None and not isinstance(fused, (bool, np.bool_)):  # 1 == True, 0.0 == False
        raise TypeError(f"`fused` must be None, True or False. Received: fused={fused!r}")
    fused = None if fused is None else bool(fused)
    reason = fused_unsupported_reason(
        axis=check_axis_type(axis),
        renorm=renorm,
        virtual_batch_size=virtual_batch_size,
        adjustment_given=adjustment_given,
        compute_dtype=compute_dtype,
    )
    if fused and reason is not None:
        raise ValueError(reason)
    return False if (fused is None and reason is not None) else fused  # type: ignore[no-any-return]


def check_name(name: Any) -> str:
    """``name``, or Keras' default: ``batch_normalization``, then ``batch_normalization_<n>``."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"`name` must be a string or None. Received: name={name!r}")
    if name is not None:
        return name
    index = next(_NAME_COUNTER)
    return "batch_normalization" if index == 0 else f"batch_normalization_{index}"


def check_choice(value: Any, argument: str, choices: Any) -> Any:
    allowed = get_args(choices)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"`{argument}` must be one of {', '.join(repr(c) for c in allowed)}. "
            f"Received: {argument}={value!r}"
        )
    return value
