"""The normalising step of synchronized batch norm, whose backward all-reduces two gradient sums.

With the global statistics (:func:`~batchnorm.functional._synchronized.synchronized_moments`),
``y = (x - mean) * rsqrt(variance + epsilon) * scale + offset``. The backward computes the local
per-channel sums ``sum(dy)`` and ``sum(dy * (x - mean))`` (per ghost batch), all-reduces them and
applies the batch-norm input gradient with the global sums and total weight,

.. math::
    \\frac{\\partial L}{\\partial x_i} = s\\, dy_i - \\frac{w_i\\, s}{W} \\left( \\sum dy +
    \\frac{x_i - \\mu}{\\sigma^2 + \\epsilon} \\sum dy\\,(x - \\mu) \\right), \\quad
    s = \\frac{\\text{scale}}{\\sqrt{\\sigma^2 + \\epsilon}},

which is the gradient of one process on the concatenated batch. The scale and offset gradients
stay local (data-parallel training reduces them with the other parameters). On CPU the Numba
kernels do both passes (the sums go through the all-reduce between them); elsewhere, and for an
adjustment that varies inside a channel, composed torch ops do. Not twice differentiable.

Each backward remembers the number of its forward call on the process group; the all-reduce pads
the sums to the group's size and checks that every rank differentiates that same call
(:func:`~batchnorm.functional._synchronized.reduce_gradient_sums`), so a rank that runs backward
through other calls, or skips one, raises on every rank instead of mixing or aborting.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from batchnorm.functional._backend import BatchNormBackend, Moments
from batchnorm.functional._cpu_backend import NumbaCpuBackend
from batchnorm.functional._cpu_operations import (
    normalize_batch_backward_impl,
    normalize_batch_impl,
)
from batchnorm.functional._synchronized import current_call, reduce_gradient_sums
from batchnorm.functional._torch_ops import TorchOpsBackend, divide_no_nan

_NOT_TWICE = (
    b"Synchronized batch norm is not twice differentiable: its gradient goes through an "
    b"all-reduce that is not differentiated. Differentiate the unsynchronized layer "
    b"(synchronized=False) instead, or leave create_graph=True out"
)


def _first_order(backward: Callable[..., Any]) -> Callable[..., Any]:
    """``once_differentiable``, also where only the saved inputs require grad.

    torch's ``once_differentiable`` makes the gradients raise when differentiated only if an
    incoming gradient requires grad. For a loss linear in the output (``(y * c).sum()``) none
    does, and under ``create_graph=True`` it returned gradients with no graph at all: a gradient
    penalty built from them was silently dropped (its second-order term lost)."""

    @functools.wraps(backward)
    def wrapped(ctx: Any, *grads: torch.Tensor) -> Any:
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():
            return outputs
        inputs = (*grads, *ctx.saved_tensors)
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            return outputs
        delayed = torch._C._functions.DelayedError(_NOT_TWICE, len(outputs))

        def attached(gradient: torch.Tensor | None) -> torch.Tensor | None:
            if gradient is None:
                return None
            return gradient.detach().requires_grad_()

        return delayed(*map(attached, outputs))  # type: ignore[arg-type]  # None: no gradient

    return wrapped


class _KernelSynchronizedNormalize(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[no-untyped-def, override]
        ctx, x, axes, moments, scale, offset, epsilon, weights, ghost_batches, group
    ):
        mean, variance, total_weight = moments
        ctx.save_for_backward(x, mean, variance, total_weight, scale, weights)
        ctx.axes, ctx.epsilon, ctx.ghost_batches, ctx.group = axes, epsilon, ghost_batches, group
        ctx.call = current_call(group)
        ctx.offset_dtype = None if offset is None else offset.dtype
        return normalize_batch_impl(
            x, list(axes), mean, variance, scale, offset, epsilon, ghost_batches
        )

    @staticmethod
    @_first_order
    def backward(ctx, dy):  # type: ignore[no-untyped-def, override]
        x, mean, variance, total_weight, scale, weights = ctx.saved_tensors
        dx, dscale, doffset = normalize_batch_backward_impl(
            dy,
            x,
            list(ctx.axes),
            mean,
            variance,
            total_weight,
            scale,
            ctx.epsilon,
            weights,
            ctx.ghost_batches,
            reduce_sums=lambda sums: reduce_gradient_sums(sums, ctx.group, ctx.call),
        )
        return (
            dx,
            None,
            None,
            None if scale is None else dscale.to(scale.dtype),
            None if ctx.offset_dtype is None else doffset.to(ctx.offset_dtype),
            None,
            None,
            None,
            None,
        )


class _TorchSynchronizedNormalize(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[no-untyped-def, override]
        ctx,
        x,
        mean,
        variance,
        total_weight,
        scale,
        offset,
        weights,
        epsilon,
        view,
        reduce_dims,
        group,
    ):
        inv = torch.rsqrt(variance.reshape(view) + epsilon).to(x.dtype)
        centred_mean = mean.reshape(view).to(x.dtype)
        xhat = (x - centred_mean) * inv
        y = xhat if scale is None else xhat * scale
        y = y if offset is None else y + offset
        ctx.save_for_backward(x, centred_mean, inv, total_weight.reshape(view), scale, weights)
        ctx.offset_shape = None if offset is None else offset.shape
        ctx.group, ctx.reduce_dims, ctx.call = group, reduce_dims, current_call(group)
        return y

    @staticmethod
    @_first_order
    def backward(ctx, dy):  # type: ignore[no-untyped-def, override]
        x, mean, inv, total_weight, scale, weights = ctx.saved_tensors
        xhat = (x - mean) * inv
        dx = dscale = doffset = None
        if ctx.needs_input_grad[0]:
            g = dy if scale is None else dy * scale
            sum_g, sum_gx = g, g * xhat
            if ctx.reduce_dims:
                sum_g = sum_g.sum(dim=ctx.reduce_dims, keepdim=True, dtype=torch.float64)
                sum_gx = sum_gx.sum(dim=ctx.reduce_dims, keepdim=True, dtype=torch.float64)
            local_sums = torch.stack([sum_g.to(torch.float64), sum_gx])
            sums = reduce_gradient_sums(local_sums, ctx.group, ctx.call)
            share = divide_no_nan(
                torch.ones_like(total_weight) if weights is None else weights.to(total_weight),
                total_weight,
            )
            correction = share * (sums[0] + xhat.to(torch.float64) * sums[1])
            dx = inv * (g - correction.to(g.dtype))
        if scale is not None and ctx.needs_input_grad[4]:
            dscale = (dy * xhat).sum_to_size(scale.shape)
        if ctx.offset_shape is not None and ctx.needs_input_grad[5]:
            doffset = dy.sum_to_size(ctx.offset_shape)
        return dx, None, None, None, dscale, doffset, None, None, None, None, None


def synchronized_normalize(
    x: torch.Tensor,
    axes: tuple[int, ...],
    moments: Moments,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
    weights: torch.Tensor | None,
    ghost_batches: int,
    backend: BatchNormBackend,
    group: Any,
) -> torch.Tensor:
    """``(x - mean) * rsqrt(variance + epsilon) * scale + offset`` with the global ``moments``.

    Its gradient treats the moments as functions of the global batch (see the module docstring).
    ``scale`` / ``offset`` are per channel, or broadcastable to ``x`` without ghost batches.

    Shape:
        ``moments``: each ``(ghost_batches, *channel_shape)``; the output has ``x``'s shape.
    """
    channel_shape = tuple(x.shape[a] for a in axes)
    per_channel = all(t is None or tuple(t.shape) == channel_shape for t in (scale, offset))
    if isinstance(backend, NumbaCpuBackend) and per_channel and not torch.compiler.is_compiling():
        y: torch.Tensor = _KernelSynchronizedNormalize.apply(  # type: ignore[no-untyped-call]
            x,
            axes,
            moments,
            scale,
            offset,
            epsilon,
            None if weights is None else weights.detach(),
            ghost_batches,
            group,
        )
        return y
    compute = x.to(torch.promote_types(x.dtype, torch.float32))
    grouped, reduce_dims, view = TorchOpsBackend._grouped(compute, axes, ghost_batches)
    parameter_view = view if ghost_batches == 1 else [1, 1, *view[2:]]
    grouped_weights = None
    if weights is not None:
        grouped_weights = weights.detach().to(compute.dtype)
        if ghost_batches > 1:
            grouped_weights = grouped_weights.reshape(-1, ghost_batches, *weights.shape[1:])
    y = _TorchSynchronizedNormalize.apply(  # type: ignore[no-untyped-call]
        grouped,
        moments.mean,
        moments.variance,
        moments.total_weight,
        TorchOpsBackend._parameter(scale, parameter_view),
        TorchOpsBackend._parameter(offset, parameter_view),
        grouped_weights,
        epsilon,
        view,
        reduce_dims,
        group,
    )
    return y.reshape(x.shape)
