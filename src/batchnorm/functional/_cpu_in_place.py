"""In-place training (``memory="in_place"``) on the CPU kernels.

The forward is the kernels' normalising pass (with the activation) written over ``x`` itself; the
backward reads only that output and its gradient
(:mod:`batchnorm.kernels._in_place_backward`): two passes, against the torch-op version's dozen
element-wise operations in float64 (:class:`batchnorm.functional._in_place.InPlaceNormalizeActivate`,
which the other devices, ``torch.compile`` and the inputs the kernels cannot view take).
Same formulas and the same refusals (checked by the caller).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from batchnorm.functional._activation import Activation, elu_inverse_floor
from batchnorm.functional._backend import Moments
from batchnorm.functional._cpu_operations import (
    activation_code,
    canonical_gradient,
    from_canonical,
    normalize_into,
    to_canonical,
)
from batchnorm.functional._cpu_plan import (
    VIEWED_DTYPES,
    Prepared,
    compute_dtype,
    dispatched_in_python,
    kernels_can_read,
    prepare,
    storage_array,
    storageless,
)
from batchnorm.functional._in_place import (
    grouped_in_place,
    in_place_gradients,
    refuse_double_backward,
)
from batchnorm.kernels._elementwise import NO_ACTIVATION


class InPlacePass(NamedTuple):
    """What the in-place forward leaves for its backward (the output is the saved x)."""

    prepared: Prepared
    variance: np.ndarray  # [groups, C] float64
    total_weight: np.ndarray
    scale: np.ndarray  # [C], every value nonzero
    offset: np.ndarray
    activation: Activation | None
    epsilon: float
    ghost_batches: int
    # For a backward under a dispatch mode (torch ops, see _InPlaceKernels.backward).
    axes: tuple[int, ...]
    variance_tensor: torch.Tensor  # the batch variance as the caller gave it, detached
    weights_tensor: torch.Tensor | None
    # gamma and beta, whose views ``scale`` and ``offset`` do not keep them alive (see
    # batchnorm.functional._cpu_training_call.StepArrays.held)
    held: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)


def normalize_in_place_kernels(
    x: torch.Tensor,
    axes: tuple[int, ...],
    moments: Moments,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
    weights: torch.Tensor | None,
    ghost_batches: int,
    activation: Activation | None,
) -> torch.Tensor | None:
    """``f(batch norm of x)`` written over ``x``; None (nothing done) where the kernels cannot
    write into x's own memory (another dtype, a layout that needs a copy, tracing)."""
    if (
        x.dtype not in VIEWED_DTYPES
        or x.device.type != "cpu"
        or torch.compiler.is_compiling()
        or not kernels_can_read(x)
        or any(t is not None and t.dtype != compute_dtype(x.dtype) for t in (scale, offset))
        or any(t is not None and t.ndim != len(axes) for t in (scale, offset))
    ):
        return None
    prepared = prepare(x, list(axes), weights, ghost_batches > 1)
    if prepared.layout.copied:
        return None
    layout = prepared.layout
    in_place_pass = InPlacePass(
        prepared,
        to_canonical(moments.variance.detach(), layout, 1.0, ghost_batches),
        to_canonical(moments.total_weight.detach(), layout, 0.0, ghost_batches),
        to_canonical(scale, layout, 1.0),
        to_canonical(offset, layout, 0.0),
        activation,
        epsilon,
        ghost_batches,
        axes,
        moments.variance.detach(),
        None if weights is None else weights.detach(),
        (scale, offset),
    )
    mean = to_canonical(moments.mean.detach(), layout, 0.0, ghost_batches)
    y: torch.Tensor = _InPlaceKernels.apply(x, scale, offset, mean, in_place_pass)  # type: ignore[no-untyped-call]
    return y


class _InPlaceKernels(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        mean: np.ndarray,
        in_place_pass: InPlacePass,
    ) -> torch.Tensor:
        prepared = in_place_pass.prepared
        normalize_into(
            prepared,
            mean,
            in_place_pass.variance,
            in_place_pass.scale,
            in_place_pass.offset,
            in_place_pass.epsilon,
            in_place_pass.ghost_batches,
            in_place_pass.activation,
            None,  # over prepared.x3, x's own memory
        )
        ctx.mark_dirty(x)
        ctx.save_for_backward(x, scale, offset)
        ctx.in_place_pass = in_place_pass
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        y, scale, offset = ctx.saved_tensors  # checks that y was not modified since
        refuse_double_backward()
        if storageless(grad):
            raise RuntimeError(
                "memory='in_place' has no batched backward (torch.autograd.functional's "
                "vectorize=True, torch.autograd.grad's is_grads_batched=True): its backward "
                "works from the output alone. Use memory='default'."
            )
        in_place_pass: InPlacePass = ctx.in_place_pass
        if dispatched_in_python(grad):
            return _gradients_in_torch_ops(y, grad, scale, offset, in_place_pass)
        prepared = in_place_pass.prepared
        plan = prepared.plan
        y3 = plan.canonical(storage_array(y.detach()))
        dy3 = canonical_gradient(grad, prepared.plan, prepared.source)
        dx, dx3 = plan.fresh(prepared.source)
        code, parameter = activation_code(in_place_pass.activation)
        floor = elu_inverse_floor(plan.torch_dtype)  # where y rounds to -alpha
        backward = prepared.compiled(plan.in_place_backward)
        dscale, doffset = backward(
            dy3,
            y3,
            prepared.weights,
            prepared.masked,
            in_place_pass.variance,
            in_place_pass.total_weight,
            in_place_pass.scale,
            in_place_pass.offset,
            in_place_pass.epsilon,
            NO_ACTIVATION if code is None else code,
            1.0 if code is None else parameter,
            floor,
            in_place_pass.ghost_batches,
            plan.layout.period,
            plan.blocks,
            dx3,
        )
        return (
            dx,
            None if scale is None else _parameter_gradient(dscale, scale, prepared),
            None if offset is None else _parameter_gradient(doffset, offset, prepared),
            None,
            None,
        )


def _gradients_in_torch_ops(
    y: torch.Tensor,
    grad: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    in_place_pass: InPlacePass,
) -> tuple[Any, ...]:
    """The backward in torch ops (:func:`batchnorm.functional._in_place.in_place_gradients`),
    for a backward under a dispatch mode, which must see each operator (the kernels would run
    unseen by a ``FlopCounterMode`` around the backward alone)."""
    p = in_place_pass
    grouped, dims, scale_view, offset_view, variance, weights = grouped_in_place(
        y, p.axes, p.ghost_batches, scale, offset, (p.variance_tensor,), p.weights_tensor
    )
    dx, dscale, doffset = in_place_gradients(
        grouped,
        grad.reshape(grouped.shape),
        scale_view,
        offset_view,
        torch.rsqrt(variance + p.epsilon),
        weights,
        p.activation,
        dims,
    )
    return (
        dx.reshape(y.shape),
        None if dscale is None or scale is None else dscale.reshape(scale.shape),
        None if doffset is None or offset is None else doffset.reshape(offset.shape),
        None,
        None,
    )


def _parameter_gradient(
    gradient: np.ndarray, parameter: torch.Tensor, prepared: Prepared
) -> torch.Tensor:
    """A ``[C]`` float64 gradient in memory order as a tensor shaped like ``parameter``."""
    channel_shape = tuple(parameter.shape)
    return from_canonical(gradient, prepared.layout, channel_shape).to(parameter.dtype)
