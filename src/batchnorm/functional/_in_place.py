"""In-place training: the output of batch norm and its activation written over the input, and
a backward that needs only that output.

Batch norm followed by an activation keeps two tensors of the input's size alive for the
backward: batch norm's input ``x`` and the activation's output ``y``. Written in place, only
``y`` exists (in ``x``'s memory), and the backward recovers what it needs from it (InPlace-ABN,
Rota Bulo et al., 2018):

.. math::
    z = f^{-1}(y), \\quad \\hat x = (z - \\beta) / \\gamma, \\quad
    \\delta = \\frac{\\partial L}{\\partial y} f'(z)

    \\frac{\\partial L}{\\partial \\beta} = \\sum \\delta, \\quad
    \\frac{\\partial L}{\\partial \\gamma} = \\sum \\delta \\hat x, \\quad
    \\frac{\\partial L}{\\partial x} = \\frac{\\gamma}{\\sigma}
        \\Big(\\delta - \\frac{w}{W}\\sum \\delta - \\hat x \\frac{w}{W} \\sum \\delta \\hat x\\Big)

with ``sigma = sqrt(var + epsilon)`` and, per ghost batch and channel, ``w`` the mask weight of
each position (1 without a mask) and ``W`` their sum. The activation must be invertible (identity,
leaky_relu with a positive slope, elu) and every ``gamma`` nonzero. Overwriting ``x`` is safe only
where nothing else needs it: autograd's version counters make a backward that did need it raise,
and a leaf that requires grad is refused up front.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake

from batchnorm.functional._activation import (
    Activation,
    activate_,
    derivative_from_output,
    invert,
)
from batchnorm.functional._torch_ops import TorchOpsBackend


def check_in_place_settings(activation: Activation | None, synchronized: bool) -> None:
    """Why settings cannot train in place, as an error (checked when a layer is made)."""
    if activation is not None and not activation.invertible:
        raise ValueError(
            "memory='in_place' recovers the normalised input by inverting the activation; "
            f"{activation.name!r} (with activation_param={activation.parameter}) is not "
            "invertible: use 'identity', 'leaky_relu' with a slope > 0 or 'elu', or "
            f"memory='default'. Received: activation={activation.name!r}"
        )
    if synchronized:
        raise ValueError(
            "memory='in_place' does not combine with `synchronized=True` (its backward "
            "reduces across processes). Received: synchronized=True"
        )


def check_in_place(x: torch.Tensor, scale: torch.Tensor | None) -> None:
    """Why this call's ``x`` and ``scale`` cannot be trained in place, as an error; nothing when
    they can (the settings are :func:`check_in_place_settings`')."""
    if x.is_leaf and x.requires_grad:
        raise ValueError(
            "memory='in_place' overwrites its input, which must not be a leaf that requires "
            "grad (autograd needs a leaf's value). Received: x with requires_grad=True and no "
            "history"
        )
    if not torch.compiler.is_compiling() and shares_memory_within(x):
        raise ValueError(
            "memory='in_place' overwrites its input, each element of which must have memory of "
            "its own: in x several elements share memory (a view made by expand, unfold or "
            "as_strided), and writing the output over them would give values that depend on "
            "the order of the writes. clone() x first, or use memory='default'. Received: x of "
            f"shape {tuple(x.shape)} with strides {x.stride()}"
        )
    concrete = _holds_memory(x)
    saved_as = _saved_by_producer(x) if concrete else None
    if saved_as is not None:
        raise ValueError(
            "memory='in_place' overwrites its input, which the operation that produced it keeps "
            "for its own backward (an activation that saves its output, for instance): put the "
            "in-place batch norm right after an operation that does not (a convolution or a "
            f"linear layer), or use memory='default'. Received: x saved as {saved_as}"
        )
    if (
        scale is not None
        and not torch.compiler.is_compiling()
        and concrete  # under FakeTensorMode gamma may be real, the comparison not
        and _holds_memory(scale)
        and bool((scale == 0).any())
    ):
        raise ValueError(
            "memory='in_place' recovers the normalised input as (z - beta) / gamma: every "
            "gamma must be nonzero. Received: a gamma with zeros"
        )


def _holds_memory(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` has values and memory to check: a meta or fake one (a dry run, shape
    inference under FakeTensorMode) has neither (its storage address is 0 for every tensor, so
    each input read as saved by its producer, and reading gamma's values raised)."""
    if tensor.is_meta:
        return False
    # A plain tensor or parameter is not fake (is_fake costs ~1 us a call, on the hot path).
    return type(tensor) in (torch.Tensor, torch.nn.Parameter) or not is_fake(tensor)


def shares_memory_within(x: torch.Tensor) -> bool:
    """Whether two elements of ``x`` are the same memory (``torch.nn.ReLU(inplace=True)`` checks
    only for an expanded dimension and writes over the other overlapping views).

    The dimensions, by increasing stride, each step past every element the smaller ones reach:
    then none overlaps, exactly. Where one does not, more elements than offsets between the
    first and the last share memory for sure (an expanded dimension, overlapping ``unfold``
    windows), without counting them; otherwise x may still interleave without sharing (strides
    (2, 3) for shape (3, 2)), and its element offsets are counted (at most as many as the
    offsets it spans)."""
    if x.numel() == 0:
        return False
    reach = 0  # the largest offset the dimensions so far reach
    for stride, size in sorted((s, n) for s, n in zip(x.stride(), x.shape, strict=True) if n > 1):
        if stride <= reach:
            break
        reach += stride * (size - 1)
    else:
        return False
    last = sum(s * (n - 1) for s, n in zip(x.stride(), x.shape, strict=True))
    if x.numel() > last + 1:
        return True
    offsets = torch.arange(last + 1).as_strided(x.shape, x.stride())
    return bool(torch.bincount(offsets.reshape(-1)).max() > 1)


def _saved_by_producer(x: torch.Tensor) -> str | None:
    """``"<node>.<name>"`` where the autograd node that produced ``x`` saved x's memory for its
    backward (which overwriting x would break), else None. Later users of x that saved it are
    not reachable from x: their backward raises autograd's version-counter error instead."""
    node = x.grad_fn
    if node is None or torch.compiler.is_compiling():
        return None
    storage = x.untyped_storage().data_ptr()
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            value = getattr(node, name)
        except RuntimeError:  # already freed by a backward
            continue
        if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == storage:
            return f"{type(node).__name__}.{name[len('_saved_') :]}"
    return None


# Elements per slice of the float32 copy a half-precision input is normalised in (4 MiB).
_HALF_SLICE = 1 << 20


def _normalize_half_into(
    x: torch.Tensor,
    high: torch.Tensor,
    factor: torch.Tensor,
    shift: torch.Tensor,
    activation: Activation | None,
) -> None:
    """``x <- f((x - high) * factor + shift)`` for a float16/bfloat16 ``x``, computed in
    ``factor``'s dtype and rounded once into ``x``, in slices along dim 0 (the wider copy stays
    at most 4 MiB). Three in-place steps in half precision each rounded, and near 0 (z about
    1e-3 against beta) gave 0 or the other sign: the backward reads the activation's slope from
    the output's sign, and leaky_relu's gradients were 30-60% off."""
    compute = factor.dtype
    rows = max(1, _HALF_SLICE // max(1, x[0].numel()))
    for start in range(0, x.shape[0], rows):
        piece = slice(start, start + rows)
        # the per-channel tensors broadcast along dim 0 unless they vary along it
        high_part, factor_part, shift_part = (
            t if t.ndim < x.ndim or t.shape[0] == 1 else t[piece] for t in (high, factor, shift)
        )
        z = (x[piece].to(compute) - high_part.to(compute)) * factor_part + shift_part
        activate_(z, activation)
        x[piece].copy_(z)


class InPlaceNormalizeActivate(torch.autograd.Function):
    """``f(gamma * (x - mean) / sqrt(var + epsilon) + beta)`` written over ``x`` (the batch
    statistics given, detached; broadcast against ``x`` in its grouped view)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        mean: torch.Tensor,
        variance: torch.Tensor,
        weights: torch.Tensor | None,
        epsilon: float,
        activation: Activation | None,
        reduce_dims: tuple[int, ...],
    ) -> torch.Tensor:
        inverse_std = torch.rsqrt(variance + epsilon)
        factor = inverse_std if scale is None else inverse_std * scale
        high = mean.to(x.dtype)
        # The mean as high + low (low folded into the shift): |mean| >> std costs nothing.
        shift = -(mean - high.to(mean.dtype)) * factor
        if offset is not None:
            shift = shift + offset
        with torch.no_grad():
            if x.dtype in (torch.float16, torch.bfloat16) and x.numel():
                _normalize_half_into(x, high, factor, shift, activation)
            else:
                x.sub_(high).mul_(factor.to(x.dtype)).add_(shift.to(x.dtype))
                activate_(x, activation)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, scale, offset, inverse_std, weights)
        ctx.activation, ctx.reduce_dims = activation, reduce_dims
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        y, scale, offset, inverse_std, weights = ctx.saved_tensors
        # Its torch ops would record a graph, but one that differentiates the inverse of the
        # activation with a detached variance: second derivatives 0.6-1.1 off, silently.
        refuse_double_backward()
        dx, dscale, doffset = in_place_gradients(
            y, grad, scale, offset, inverse_std, weights, ctx.activation, ctx.reduce_dims
        )
        return dx, dscale, doffset, None, None, None, None, None, None


def refuse_double_backward() -> None:
    """Raise inside an in-place backward run with ``create_graph=True``."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "memory='in_place' has no double backward (create_graph=True): its backward "
            "works from the output alone. Use memory='default'."
        )


def in_place_gradients(
    y: torch.Tensor,
    grad: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    inverse_std: torch.Tensor,
    weights: torch.Tensor | None,
    activation: Activation | None,
    dims: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dgamma, dbeta)`` from the in-place output ``y`` alone (the module docstring's
    formulas), in torch ops, with everything in the grouped view of :func:`grouped_in_place`;
    computed in ``inverse_std``'s dtype, ``dx`` returned in ``y``'s."""
    compute = inverse_std.dtype
    z = invert(y.to(compute), activation)
    derivative = derivative_from_output(y.to(compute), activation)
    delta = grad.to(compute) if derivative is None else grad.to(compute) * derivative
    centred = z if offset is None else z - offset
    x_hat = centred if scale is None else centred / scale
    sum_delta = delta.sum(dim=dims, keepdim=True)
    sum_delta_x_hat = (delta * x_hat).sum(dim=dims, keepdim=True)
    if weights is None:
        count = y.numel() // max(sum_delta.numel(), 1)
        share: torch.Tensor | float = 1.0 / count
    else:
        weights = weights.to(compute)
        total = (weights + torch.zeros_like(y, dtype=compute)).sum(dim=dims, keepdim=True)
        share = weights / total.clamp(min=torch.finfo(compute).tiny)
    factor = inverse_std if scale is None else inverse_std * scale
    dx = factor * (delta - share * sum_delta - x_hat * (share * sum_delta_x_hat))
    dscale = None if scale is None else _reduce_to(sum_delta_x_hat, scale)
    doffset = None if offset is None else _reduce_to(sum_delta, offset)
    return dx.to(y.dtype), dscale, doffset


def grouped_in_place(
    x: torch.Tensor,
    axes: tuple[int, ...],
    ghost_batches: int,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    statistics: tuple[torch.Tensor, ...],
    weights: torch.Tensor | None,
) -> tuple[Any, ...]:
    """``x`` grouped by ghost batch (sample ``j`` in batch ``j % G``, as the composed ops group
    them), the dims to reduce, and ``scale``, ``offset``, each of ``statistics`` (per ghost batch
    and channel) and the mask's ``weights`` viewed to broadcast against it."""
    grouped, reduce_dims, statistic_view = TorchOpsBackend._grouped(x, axes, ghost_batches)
    parameter_view = statistic_view if ghost_batches == 1 else [1, 1, *statistic_view[2:]]
    if weights is not None and ghost_batches > 1:
        weights = weights.reshape(-1, ghost_batches, *weights.shape[1:])
    return (
        grouped,
        reduce_dims,
        None if scale is None else scale.reshape(parameter_view),
        None if offset is None else offset.reshape(parameter_view),
        *(t.reshape(statistic_view) for t in statistics),
        None if weights is None else weights.detach(),
    )


def _reduce_to(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """A gradient summed over what ``parameter`` broadcast across (ghost batches)."""
    while value.ndim > parameter.ndim:
        value = value.sum(dim=0)
    dims = [
        i
        for i, (v, p) in enumerate(zip(value.shape, parameter.shape, strict=True))
        if p == 1 and v != 1
    ]
    return (value.sum(dim=dims, keepdim=True) if dims else value).to(parameter.dtype)
