"""Argument and shape checks shared by the functional core and the layer.

Every error names the argument, says what was expected and shows the value received, in the
Keras form ``... Received: name=value``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.nn.parameter import is_lazy
from torch.utils._python_dispatch import _get_current_dispatch_mode


def check_axis_type(axis: Any, argument: str = "axis", allow_empty: bool = False) -> list[int]:
    """``axis`` as a list of ints; a TypeError naming ``argument`` for anything but an int or a
    sequence of ints (an empty one only with ``allow_empty``)."""
    if isinstance(axis, bool):
        raise TypeError(
            f"`{argument}` must be an int or a list/tuple of ints. Received: {argument}={axis!r}"
        )
    if isinstance(axis, numbers.Integral):
        return [int(axis)]
    if isinstance(axis, Sequence) and not isinstance(axis, str):
        items = list(axis)
        if (not items and not allow_empty) or not all(
            isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in items
        ):
            what = "a" if allow_empty else "a non-empty"
            raise TypeError(
                f"`{argument}` must be an int or {what} list/tuple of ints. "
                f"Received: {argument}={axis!r}"
            )
        return [int(a) for a in items]
    raise TypeError(
        f"`{argument}` must be an int or a list/tuple of ints. Received: {argument}={axis!r}"
    )


def normalize_axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """Sorted non-negative channel axes for an input of rank ``ndim``; negative axes count from the end."""
    axes = check_axis_type(axis)
    if ndim == 0:
        raise ValueError(
            "`x` must have at least one axis (its channel axis): a 0-d tensor has none. "
            f"Received: an input of rank 0 for axis={axis!r}"
        )
    return _resolved_axes(axis, axes, ndim, "axis")


def reduction_axes(axes: Any, ndim: int) -> tuple[int, ...]:
    """Sorted non-negative axes to reduce over (``moments``' ``axes``), for an input of rank
    ``ndim``: an int or a sequence of ints, empty for none (as tf.nn.moments takes it)."""
    return _resolved_axes(axes, check_axis_type(axes, "axes", allow_empty=True), ndim, "axes")


def _resolved_axes(given: Any, axes: list[int], ndim: int, argument: str) -> tuple[int, ...]:
    """``axes`` in range for rank ``ndim``, made non-negative, sorted, without duplicates."""
    resolved = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`{argument}` is out of range for an input of rank {ndim}: every axis must be "
                f"in [{-ndim}, {ndim - 1}]. Received: {argument}={given!r}"
            )
        resolved.append(a % ndim)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"`{argument}` contains duplicate axes. Received: {argument}={given!r}")
    return tuple(sorted(resolved))


INPUT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def check_tensor(value: Any, argument: str, optional: bool = False) -> None:
    """A torch.Tensor (or, ``optional``, None)."""
    if not isinstance(value, torch.Tensor) and not (optional and value is None):
        raise TypeError(
            f"`{argument}` must be a torch.Tensor{' or None' if optional else ''}. "
            f"Received: {argument} of type {type(value).__name__}"
        )


def check_floating_input(x: Any, argument: str = "x") -> None:
    """A tensor of one of :data:`INPUT_DTYPES` (float8 types are floating too, but nothing
    computes batch norm in them: torch's promotion refused them deep inside)."""
    check_tensor(x, argument)
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(
            f"`{argument}` must be a floating-point tensor (float16, bfloat16, float32 or float64). "
            f"Received: {argument}.dtype={x.dtype}"
        )


def check_fraction(value: Any, argument: str) -> float:
    """A number in [0, 1], as momentum and renorm_momentum are."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= float(value) <= 1.0
    ):
        raise ValueError(f"`{argument}` must be a number in [0, 1]. Received: {argument}={value!r}")
    return float(value)


def check_positive(value: Any, argument: str) -> float:
    """A finite number > 0, as epsilon is (an infinite epsilon turns every output into beta)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 < float(value) < math.inf
    ):
        raise ValueError(
            f"`{argument}` must be a finite number > 0. Received: {argument}={value!r}"
        )
    return float(value)


def check_bool(value: Any, argument: str) -> bool:
    """A Python or NumPy bool: a string such as "False" would otherwise read as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{argument}` must be True or False. Received: {argument}={value!r}")
    return bool(value)


def check_module(value: Any, argument: str = "model") -> torch.nn.Module:
    """An ``nn.Module`` (a model, or a batch norm itself), or a TypeError naming ``argument``."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(
            f"`{argument}` must be an nn.Module. Received: {argument} of type "
            f"{type(value).__name__}"
        )
    return value


def check_virtual_batch_size(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            "`virtual_batch_size` must be a positive integer that divides the batch size. "
            f"Received: virtual_batch_size={value!r}"
        )
    return int(value)


def check_renorm_clipping(clipping: Any, argument: str = "renorm_clipping") -> dict[str, float]:
    """Keys rmin, rmax, dmax only; rmax >= rmin (and >= 1 would be usual, but Keras does not ask).
    None, and None values, mean no bound (tf-keras). Errors name ``argument``."""
    if clipping is None:
        return {}
    if not isinstance(clipping, Mapping):
        raise TypeError(
            f"`{argument}` must be a dict with keys among 'rmin', 'rmax', 'dmax'. "
            f"Received: {argument}={clipping!r}"
        )
    unknown = set(clipping) - {"rmin", "rmax", "dmax"}
    if unknown:
        raise ValueError(
            f"`{argument}` accepts only the keys 'rmin', 'rmax' and 'dmax'. "
            f"Received: {argument}={dict(clipping)!r}"
        )
    values = {key: value for key, value in clipping.items() if value is not None}
    for key, value in values.items():
        # ``value != value`` for NaN: torch.compile(dynamic=True) passes symbolic floats, which
        # math.isnan broke the graph on (fullgraph=True raised); a comparison it traces.
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
            raise ValueError(
                f"`{argument}['{key}']` must be a number. Received: {argument}={dict(clipping)!r}"
            )
    if "rmin" in values and "rmax" in values and float(values["rmax"]) < float(values["rmin"]):
        raise ValueError(
            f"`{argument}` needs rmax >= rmin. Received: {argument}={dict(clipping)!r}"
        )
    if "dmax" in values and float(values["dmax"]) < 0:
        raise ValueError(f"`{argument}` needs dmax >= 0. Received: {argument}={dict(clipping)!r}")
    return {key: float(value) for key, value in values.items()}


def check_same_device(
    x: torch.Tensor, names: Iterable[str], tensors: Iterable[torch.Tensor | None]
) -> None:
    """Each of ``tensors`` (named as the caller's arguments by ``names``) on ``x``'s device. A
    layer made on the meta device and never materialised met a CPU input inside NumPy ("data is
    NULL"). One pass comparing devices: 1 us for a step's seven tensors."""
    device = x.device
    for name, tensor in zip(names, tensors, strict=True):
        if (
            tensor is not None
            and tensor.device != device
            # a CPU scalar goes with any device (a placeholder has no shape yet)
            and not (tensor.is_cpu and not is_lazy(tensor) and tensor.ndim == 0)
        ):
            hint = ""
            if is_lazy(tensor) and tensor.device.type == "meta":
                # A placeholder on the meta device has no data to copy: `.to()` and `to_empty`
                # both fail on it.
                hint = (
                    " (an unbuilt layer made on the meta device: build it there first, with "
                    "`build(input_shape)` or a call on a meta batch, then `to_empty(device=...)` "
                    "and `reset_parameters()`)"
                )
            elif is_lazy(tensor):
                hint = " (move the unbuilt layer there first: `.to(x.device)`)"
            elif tensor.device.type == "meta":
                hint = (
                    " (a model made on the meta device needs `to_empty(device=...)` and "
                    "`reset_parameters()` first)"
                )
            raise RuntimeError(
                f"`{name}` must be on the input's device, {x.device}{hint}. "
                f"Received: {name}.device={tensor.device}, x.device={x.device}"
            )


def check_adjustment(adjustment: Any, virtual_batch_size: int | None, axis: Any) -> None:
    """tf-keras' rules: ``adjustment`` is a callable, not combined with ghost batches, whose
    batch axis 0 cannot be a channel axis."""
    if adjustment is not None and not callable(adjustment):
        raise TypeError(
            "`adjustment` must be a callable (input_shape) -> (scale, offset) or None. "
            f"Received: adjustment={adjustment!r}"
        )
    if adjustment is not None and virtual_batch_size is not None:
        raise ValueError(
            "When using `virtual_batch_size`, `adjustment` cannot be specified. "
            f"Received: virtual_batch_size={virtual_batch_size}, adjustment={adjustment!r}"
        )
    if virtual_batch_size is not None and 0 in check_axis_type(axis):
        raise ValueError(
            "When using `virtual_batch_size`, the batch dimension must be 0 and thus axis "
            f"cannot include 0. Received: axis={axis!r}"
        )


def check_broadcasts(tensor: torch.Tensor, x: torch.Tensor, argument: str, what: str) -> None:
    """``tensor`` broadcasts against ``x`` (``what`` says how, for the error)."""
    try:
        torch.broadcast_shapes(tuple(tensor.shape), tuple(x.shape))  # type: ignore[no-untyped-call]
    except RuntimeError as error:
        raise ValueError(
            f"`{argument}` must {what} `x` of shape {tuple(x.shape)}. "
            f"Received: {argument}.shape={tuple(tensor.shape)}"
        ) from error


def check_tensor_shape(
    tensor: torch.Tensor | None, expected: tuple[int, ...], argument: str
) -> None:
    """A floating-point tensor of the ``expected`` per-channel shape, or None. An integer one
    was taken: the moving statistics came back truncated to integers (torch refuses them)."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        dtype = f" of dtype {tensor.dtype}" if isinstance(tensor, torch.Tensor) else ""
        raise TypeError(
            f"`{argument}` must be a floating-point torch.Tensor. "
            f"Received: {argument}, a {type(tensor).__name__}{dtype}"
        )
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"`{argument}` must have the per-channel shape {expected}. "
            f"Received: {argument}.shape={tuple(tensor.shape)}"
        )


def check_mask_values(mask: Any, x: torch.Tensor) -> torch.Tensor:
    """``mask`` checked as frequency weights for ``x``: a real (bool, integer or floating)
    tensor on ``x``'s device whose values are finite and >= 0.

    The value check reads the mask once (it is the size of ``x`` without its channel axes); it is
    skipped while ``torch.compile`` traces, where it would break the graph. Under ``torch.func``
    transforms it reads the values the wrappers hold: all of a vmapped mask's at once (reading a
    vmapped tensor as a bool failed, "data-dependent control flow").
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            "`mask` must be a torch.Tensor (`torch.as_tensor(mask)` converts an array). "
            f"Received: mask of type {type(mask).__name__}"
        )
    if mask.device != x.device:
        raise ValueError(
            "`mask` must be on the device of `x` (`mask.to(x.device)` moves it). "
            f"Received: mask.device={mask.device} for x.device={x.device}"
        )
    if mask.is_complex():
        raise TypeError(
            f"`mask` must hold real weights (bool, integer or floating). Received: mask.dtype={mask.dtype}"
        )
    if mask.dtype == torch.bool or torch.compiler.is_compiling():
        return mask
    values = mask
    while torch._C._functorch.is_functorch_wrapped_tensor(values):
        values = torch._C._functorch.get_unwrapped(values)
    if values.is_meta or isinstance(values, FakeTensor) or torch._C._len_torch_dispatch_stack():
        return mask  # no values to read (meta, FakeTensorMode: shape propagation), as compiling
    if not bool(((values >= 0) & (values < math.inf)).all()):
        problems = [
            label
            for label, bad in (
                ("NaN", values.isnan()),
                ("negative", values < 0),
                ("infinite", values.isinf()),
            )
            if bool(bad.any())
        ]
        raise ValueError(
            "`mask` must hold finite weights >= 0 (0 leaves a position out of the statistics). "
            f"Received: a mask with {' and '.join(problems)} values"
        )
    return mask


def training_flag(training: bool | torch.Tensor) -> bool | torch.Tensor:
    """``training`` as the step takes it: a Python bool, or a 0-d bool tensor.

    An eager call reads a tensor on the CPU as a bool (free: no device to wait for), as
    TensorFlow's ``smart_cond`` does in eager mode, and so runs one branch. Traced calls
    (``torch.compile``, ``torch.jit.trace``, fake or proxy tensors, functorch transforms) and
    tensors on another device keep the tensor: both branches are computed and one is selected,
    which traces without a graph break and never waits for the device.
    """
    if not isinstance(training, torch.Tensor):
        return training
    if training.ndim != 0 or training.dtype != torch.bool:
        raise ValueError(
            "`training` must be a Python bool or a 0-d bool tensor. "
            f"Received: training with shape {tuple(training.shape)} and dtype {training.dtype}"
        )
    if (
        type(training) is torch.Tensor  # not a fake, proxy or other subclass
        and training.device.type == "cpu"
        and not torch.compiler.is_compiling()
        and torch._C._get_tracing_state() is None  # not inside torch.jit.trace
        and not torch._C._functorch.is_functorch_wrapped_tensor(training)
        and _get_current_dispatch_mode() is None
    ):
        return bool(training)
    return training
