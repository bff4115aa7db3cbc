"""Weights that exist before their shape is known, as torch's lazy modules keep them.

A layer built on its first input registers gamma/beta as :class:`LazyParameter` and its moving
statistics as :class:`LazyBuffer` from ``__init__`` on (torch's ``UninitializedParameter`` /
``UninitializedBuffer``, as ``nn.LazyBatchNorm2d`` has). Building materialises those very objects
in place, so an optimizer created before the first call holds the parameters it will train;
``.to()`` before the build changes the dtype and device they materialise with. Torch's
placeholders lose their dtype and device when pickled and its buffer cannot be deep-copied: these
subclasses keep both through ``pickle`` and ``copy.deepcopy``, and accept ``requires_grad_``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

__all__ = [
    "LazyBuffer",
    "LazyParameter",
    "TensorOwner",
    "is_lazy",
    "materialize",
    "register_placeholders",
    "unmaterialize",
]


class TensorOwner(Protocol):
    """The part of ``torch.nn.Module`` these functions use."""

    _parameters: dict[str, Any]
    _buffers: dict[str, Any]

    def register_parameter(self, name: str, param: Any) -> None: ...

    def register_buffer(self, name: str, tensor: Any, persistent: bool = True) -> None: ...


# ``requires_grad_`` too, so that ``trainable = False`` or ``model.requires_grad_(False)`` before
# the build holds after it (materialising keeps the flag).
_ALLOWED_METHODS = [*UninitializedParameter._allowed_methods, torch.Tensor.requires_grad_]  # type: ignore[attr-defined]


class LazyParameter(UninitializedParameter):
    """An ``UninitializedParameter`` that keeps its dtype and device through pickling."""

    _allowed_methods = _ALLOWED_METHODS

    def __reduce_ex__(self, proto: Any) -> Any:
        return (_placeholder, (type(self), self.requires_grad, self.data.device, self.data.dtype))


class LazyBuffer(UninitializedBuffer):
    """An ``UninitializedBuffer`` that keeps its dtype and device through pickling and deepcopy."""

    _allowed_methods = _ALLOWED_METHODS

    def __reduce_ex__(self, proto: Any) -> Any:
        return (_placeholder, (type(self), self.requires_grad, self.data.device, self.data.dtype))

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if id(self) not in memo:
            memo[id(self)] = _placeholder(
                type(self), self.requires_grad, self.data.device, self.data.dtype
            )
        return memo[id(self)]


def _placeholder(kind: type, requires_grad: bool, device: Any, dtype: torch.dtype) -> Any:
    # torch's stubs give these classes Parameter's signature; at run time they take these three.
    return kind(requires_grad, device, dtype)


def register_placeholders(
    module: TensorOwner,
    parameters: Iterable[str],
    buffers: Mapping[str, torch.dtype],
    *,
    dtype: torch.dtype,
    device: Any,
    requires_grad: bool,
) -> None:
    """Register unshaped ``parameters`` (of ``dtype``) and ``buffers`` (of their own dtypes)."""
    for name in parameters:
        module.register_parameter(name, _placeholder(LazyParameter, requires_grad, device, dtype))
    for name, buffer_dtype in buffers.items():
        module.register_buffer(name, _placeholder(LazyBuffer, False, device, buffer_dtype))


def materialize(
    module: TensorOwner,
    values: Mapping[str, torch.Tensor],
    parameters: Iterable[str],
    requires_grad: bool,
) -> list[str]:
    """Give ``module`` the tensors ``values`` and return the names materialised in place.

    A placeholder becomes a tensor of its value's shape, in the placeholder's own dtype and device
    (those ``.to()`` set), holding the value: the same Python object, so references to it stay
    valid. A name without a placeholder is registered anew (a parameter if in ``parameters``,
    with ``requires_grad``); placeholders that ``values`` does not name (an option changed
    before the build) are removed.
    """
    parameter_names = set(parameters)
    materialized = []
    with torch.no_grad():
        for name, value in values.items():
            current = module._parameters.get(name, module._buffers.get(name))
            if current is not None and is_lazy(current):
                current.materialize(value.shape, device=current.device, dtype=current.dtype)
                current.copy_(value)
                materialized.append(name)
            elif name in parameter_names:
                wanted = requires_grad if current is None else current.requires_grad
                module.register_parameter(name, nn.Parameter(value, requires_grad=wanted))
            else:
                module.register_buffer(name, value)
    for store in (module._parameters, module._buffers):
        lazy = [n for n, t in store.items() if t is not None and is_lazy(t) and n not in values]
        for name in lazy:
            del store[name]
    return materialized


def unmaterialize(module: TensorOwner, names: Iterable[str]) -> None:
    """Turn tensors that :func:`materialize` filled back into placeholders (a failed build)."""
    for name in names:
        tensor = module._parameters.get(name, module._buffers.get(name))
        if tensor is None or is_lazy(tensor):
            continue
        placeholder_type = LazyParameter if name in module._parameters else LazyBuffer
        tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        tensor.__class__ = placeholder_type
