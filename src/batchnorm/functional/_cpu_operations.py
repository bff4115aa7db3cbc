"""The CPU batch-norm operations on tensors: Numba kernels over a ``(rows, channels, inner)`` view.

Passes over the input: training forward two (moments, normalise), inference one, backward two
(gradient sums, input gradient). Per-channel arithmetic runs in NumPy on ``[groups, C]`` arrays.
Fresh outputs are allocated by NumPy (see :func:`_fresh_like`). float16/bfloat16 are converted to
float32 around the kernels (Numba has no half type). :mod:`batchnorm.functional._cpu_backend`
exposes these functions to PyTorch's autograd, ``torch.compile`` and ``torch.export``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from batchnorm import kernels
from batchnorm.functional._canonical_layout import (
    CanonicalLayout,
    canonical_layout,
    canonical_weights,
    inverse_permutation,
)
from batchnorm.functional._torch_ops import TORCH_OPS

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.float64)
_NO_WEIGHTS: dict[torch.dtype, np.ndarray] = {
    torch.float32: np.zeros((1, 1), np.float32),
    torch.float64: np.zeros((1, 1), np.float64),
}


class _Canonical(NamedTuple):
    source: torch.Tensor  # x itself or its one copy, in the kernel dtype
    layout: CanonicalLayout
    x3: np.ndarray
    weights: np.ndarray
    has_weights: bool
    blocks: int
    parallel: bool  # threaded build: more than one block and more than one thread


# Layouts of the input signatures seen, so that each call does not search them again.
_LAYOUTS: dict[tuple[object, ...], CanonicalLayout] = {}
_LAYOUTS_KEPT = 256


def _prepare(
    x: torch.Tensor, axes: list[int], weights: torch.Tensor | None, batch_outermost: bool
) -> _Canonical:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    detached = x.detach() if x.dtype == dtype else x.detach().to(dtype)
    key = (detached.shape, detached.stride(), tuple(axes), batch_outermost)
    layout = _LAYOUTS.get(key)
    if layout is None:
        source, layout = canonical_layout(detached, tuple(axes), batch_outermost)
        if not layout.copied:
            if len(_LAYOUTS) >= _LAYOUTS_KEPT:
                _LAYOUTS.clear()
            _LAYOUTS[key] = layout
    else:
        source = detached  # only layouts that view x without a copy are kept
    x3 = _canonical_array(source.numpy(), layout)
    blocks = kernels.blocks_for(x3.size, layout.rows)
    parallel = blocks > 1 and kernels.set_threads(torch.get_num_threads()) > 1
    if weights is None:
        return _Canonical(source, layout, x3, _NO_WEIGHTS[dtype], False, blocks, parallel)
    squeezed = weights.detach().squeeze(tuple(axes)) if weights.ndim == x.ndim else weights.detach()
    w2 = canonical_weights(squeezed, layout, tuple(axes), dtype).numpy()
    return _Canonical(source, layout, x3, w2, True, blocks, parallel)


def _canonical_array(array: np.ndarray, layout: CanonicalLayout) -> np.ndarray:
    """``layout.view`` in NumPy (a fraction of torch's per-call cost); a view, never a copy."""
    if layout.order != tuple(range(len(layout.order))):
        array = array.transpose(layout.order)
    canonical = array.reshape(layout.rows, layout.channels, layout.inner)
    assert canonical.base is not None or canonical is array or array.size == 0
    return canonical


# NumPy views of the long-lived per-channel tensors (parameters, buffers), by id: Tensor.numpy()
# costs about a microsecond, four times on every call. An entry is used only while the tensor
# still has the same memory and shape; the view keeps its tensor alive, so an id cannot be reused
# while its entry exists. Cleared when it grows past _ARRAYS_KEPT.
_ARRAYS: dict[int, tuple[int, torch.Size, np.ndarray]] = {}
_ARRAYS_KEPT = 1024


def shared_array(tensor: torch.Tensor) -> np.ndarray:
    """``tensor.detach().numpy()``, remembered for the next call with the same tensor."""
    entry = _ARRAYS.get(id(tensor))
    if entry is not None and entry[0] == tensor.data_ptr() and entry[1] == tensor.shape:
        return entry[2]
    array = tensor.detach().numpy()
    if len(_ARRAYS) >= _ARRAYS_KEPT:
        _ARRAYS.clear()
    _ARRAYS[id(tensor)] = (tensor.data_ptr(), tensor.shape, array)
    return array


def _to_canonical(
    tensor: torch.Tensor | None, layout: CanonicalLayout, fill: float, groups: int | None = None
) -> np.ndarray:
    """A per-channel tensor ``(..., *channel_shape)`` as an array ``(..., C)`` in memory order.

    float32/float64 tensors are shared, not copied; None becomes ``fill``. With ``groups`` the
    result is ``[groups, C]`` float64 (statistics).
    """
    if (
        tensor is not None
        and groups is None
        and tensor.ndim == 1
        and tensor.dtype in _KERNEL_DTYPES
        and layout.channel_permutation == (0,)
    ):
        return shared_array(tensor)  # the common case, on every call: a view
    if tensor is None:
        array = np.full(layout.channels, fill)
    else:
        detached = tensor.detach()
        array = detached.numpy() if detached.dtype in _KERNEL_DTYPES else _float64(detached)
        permutation = layout.channel_permutation
        lead = array.ndim - len(permutation)
        if permutation != tuple(range(len(permutation))):
            array = array.transpose((*range(lead), *(lead + p for p in permutation)))
        if len(permutation) > 1:
            array = array.reshape(*array.shape[:lead], layout.channels)
    if groups is None:
        return array
    if array.dtype == np.float64 and array.size == groups * layout.channels:
        # (C,) for one group or (groups, C): a view, no copy, on every training step.
        return np.ascontiguousarray(array.reshape(groups, layout.channels))
    return np.ascontiguousarray(np.broadcast_to(array, (groups, layout.channels)), np.float64)


def _statistic_row(tensor: torch.Tensor, layout: CanonicalLayout, fill: float) -> np.ndarray:
    """A per-channel statistic as ``[1, C]``: a view of a float32/float64 tensor (the moving
    statistics at inference, read on every call), else the float64 copy of :func:`_to_canonical`."""
    if tensor.ndim == 1 and tensor.dtype in _KERNEL_DTYPES and layout.channel_permutation == (0,):
        return shared_array(tensor).reshape(1, -1)
    return _to_canonical(tensor, layout, fill, 1)


def _float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).numpy()


def _from_canonical(
    array: np.ndarray, layout: CanonicalLayout, channel_shape: tuple[int, ...]
) -> torch.Tensor:
    if layout.channel_permutation == (0,) and array.flags.c_contiguous:
        return torch.from_numpy(array)  # one channel axis: (..., C) is already the shape
    return layout.channels_from_canonical(torch.from_numpy(array), channel_shape).contiguous()


def _fresh_like(prepared: _Canonical) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised tensor shaped and laid out like the kernel's source, allocated by NumPy,
    and its canonical ``(rows, channels, inner)`` array.

    NumPy advises the kernel to back large allocations with transparent huge pages, so writing a
    fresh output takes far fewer page faults than with torch's CPU allocator: on the 2-core
    development machine a new 51 MB output cost 37 ms to fill from torch.empty_like and 11 ms
    from NumPy (5 ms into memory already touched). The kernels' passes are that fast; the page
    faults were most of the time.
    """
    source, layout = prepared.source, prepared.layout
    order = layout.order
    dtype = np.float64 if source.dtype == torch.float64 else np.float32
    array = np.empty([source.shape[d] for d in order], dtype)
    canonical = array.reshape(layout.rows, layout.channels, layout.inner)
    fresh = torch.from_numpy(array)
    if order == tuple(range(len(order))):
        return fresh, canonical
    return fresh.permute(inverse_permutation(list(order))), canonical


def _normalized(
    prepared: _Canonical,
    mean: np.ndarray,
    variance: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    epsilon: float,
    groups: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The affine kernel into a new tensor with x's memory layout."""
    out, out3 = _fresh_like(prepared)
    kernels.run(
        kernels.affine_normalize,
        prepared.parallel,
        prepared.x3,
        mean,
        variance,
        scale,
        offset,
        epsilon,
        groups,
        prepared.layout.period,
        prepared.blocks,
        out3,
    )
    return out if out.dtype == out_dtype else out.to(out_dtype)


# ---------------------------------------------------------------------------- implementations
def batch_moments_impl(
    x: torch.Tensor, axes: list[int], weights: torch.Tensor | None, ghost_batches: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    prepared = _prepare(x, axes, weights, ghost_batches > 1)
    mean, variance, total = kernels.run(
        kernels.batch_moments,
        prepared.parallel,
        prepared.x3,
        prepared.weights,
        prepared.has_weights,
        ghost_batches,
        prepared.layout.period,
        prepared.blocks,
    )
    channel_shape = tuple(x.shape[a] for a in axes)
    return tuple(
        _from_canonical(a, prepared.layout, channel_shape) for a in (mean, variance, total)
    )  # type: ignore[return-value]


def normalize_batch_impl(
    x: torch.Tensor,
    axes: list[int],
    mean: torch.Tensor,
    variance: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
    ghost_batches: int,
) -> torch.Tensor:
    prepared = _prepare(x, axes, None, ghost_batches > 1)
    layout = prepared.layout
    return _normalized(
        prepared,
        _to_canonical(mean, layout, 0.0, ghost_batches),
        _to_canonical(variance, layout, 1.0, ghost_batches),
        _to_canonical(scale, layout, 1.0),
        _to_canonical(offset, layout, 0.0),
        epsilon,
        ghost_batches,
        x.dtype,
    )


class TrainingPass(NamedTuple):
    """What the one-call training forward leaves for its backward: the canonical input and the
    batch statistics as the kernels read them, so the backward prepares nothing again."""

    prepared: _Canonical
    mean: np.ndarray  # [groups, C] float64
    variance: np.ndarray
    total_weight: np.ndarray
    scale: np.ndarray  # [C]


def train_in_place_impl(
    x: torch.Tensor,
    axes: list[int],
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
    weights: torch.Tensor | None,
    ghost_batches: int,
    moving: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    momentum: float,
    unbiased: bool,
) -> tuple[torch.Tensor, TrainingPass]:
    """:func:`batch_moments_impl` then :func:`normalize_batch_impl` in one kernel call, which also
    steps the moving statistics in place; returns ``y`` and what :func:`train_backward_impl` needs.

    ``moving`` is ``(moving_mean, moving_variance, moving_average_weight or None)``: contiguous
    tensors of x's dtype over ONE channel axis, written through NumPy views. Their version
    counters are bumped, so autograd still sees that they changed.
    """
    prepared = _prepare(x, axes, weights, ghost_batches > 1)
    layout = prepared.layout
    out, out3 = _fresh_like(prepared)
    scale_c = _to_canonical(scale, layout, 1.0)
    moving_mean, moving_variance, average_weight = moving
    mean, variance, total = kernels.run(
        kernels.train_forward,
        prepared.parallel,
        prepared.x3,
        prepared.weights,
        prepared.has_weights,
        ghost_batches,
        layout.period,
        prepared.blocks,
        scale_c,
        _to_canonical(offset, layout, 0.0),
        epsilon,
        out3,
        shared_array(moving_mean),
        shared_array(moving_variance),
        _NO_WEIGHTS[x.dtype][0] if average_weight is None else average_weight.reshape(1).numpy(),
        average_weight is not None,
        momentum,
        unbiased,
    )
    torch.autograd.graph.increment_version([t for t in moving if t is not None])
    return out, TrainingPass(prepared, mean, variance, total, scale_c)


def train_backward_impl(
    grad: torch.Tensor, training_pass: TrainingPass, epsilon: float, ghost_batches: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dscale, doffset)`` of :func:`train_in_place_impl`'s output in one kernel call (as
    :func:`normalize_batch_backward_impl`, without re-preparing the input)."""
    prepared = training_pass.prepared
    dy3 = _canonical_gradient(grad, prepared)
    dx, dx3 = _fresh_like(prepared)
    layout = prepared.layout
    dscale, doffset = kernels.run(
        kernels.train_backward,
        prepared.parallel,
        dy3,
        prepared.x3,
        prepared.weights,
        prepared.has_weights,
        training_pass.mean,
        training_pass.variance,
        training_pass.total_weight,
        training_pass.scale,
        epsilon,
        ghost_batches,
        layout.period,
        prepared.blocks,
        dx3,
    )
    parameter_dtype = np.float64 if training_pass.scale.dtype == np.float64 else np.float32
    return (
        dx,
        torch.from_numpy(dscale.astype(parameter_dtype, copy=False)),
        torch.from_numpy(doffset.astype(parameter_dtype, copy=False)),
    )


def _canonical_gradient(grad: torch.Tensor, prepared: _Canonical) -> np.ndarray:
    """The upstream gradient as a dense canonical array, a view where it is laid out like x."""
    grad = grad.detach()
    source = prepared.source
    if grad.dtype == source.dtype and grad.stride() == source.stride():
        return _canonical_array(grad.numpy(), prepared.layout)
    # A gradient of expanded ones (from .sum()) has zero strides: the kernels need it dense.
    return np.ascontiguousarray(prepared.layout.view(grad.to(source.dtype)).numpy())


def moments_of(
    training_pass: TrainingPass, channel_shape: tuple[int, ...]
) -> tuple[torch.Tensor, ...]:
    """The batch ``(mean, variance, total_weight)`` of a training pass as tensors
    ``(groups, *channel_shape)`` float64."""
    layout = training_pass.prepared.layout
    return tuple(
        _from_canonical(a, layout, channel_shape)
        for a in (training_pass.mean, training_pass.variance, training_pass.total_weight)
    )


def normalize_batch_backward_impl(
    grad: torch.Tensor,
    x: torch.Tensor,
    axes: list[int],
    mean: torch.Tensor,
    variance: torch.Tensor,
    total_weight: torch.Tensor,
    scale: torch.Tensor | None,
    epsilon: float,
    weights: torch.Tensor | None,
    ghost_batches: int,
    reduce_sums: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dscale, doffset of ``y = (x - mean(x)) * rsqrt(var(x) + eps) * scale + offset``.

    ``dscale = sum(dy * (x - mean)) * inv`` and ``doffset = sum(dy)`` per channel (summed over
    ghost batches); dx is :func:`batchnorm.kernels.batch_norm_input_gradient`. ``reduce_sums``
    (synchronized batch norm) maps the local sums ``(2, ghost_batches, *channel_shape)`` to the
    global ones that dx uses; dscale and doffset stay local.
    """
    prepared = _prepare(x, axes, weights, ghost_batches > 1)
    layout = prepared.layout
    # A gradient of expanded ones (from .sum()) has zero strides: the kernels need it dense.
    dy3 = _canonical_gradient(grad, prepared)
    mean_c = _to_canonical(mean, layout, 0.0, ghost_batches)
    variance_c = _to_canonical(variance, layout, 1.0, ghost_batches)
    sums = kernels.run(
        kernels.gradient_sums,
        prepared.parallel,
        dy3,
        prepared.x3,
        mean_c,
        ghost_batches,
        layout.period,
        prepared.blocks,
    )
    channel_shape = tuple(x.shape[a] for a in axes)
    global_sums = sums
    if reduce_sums is not None:
        reduced = reduce_sums(_from_canonical(sums, layout, channel_shape))
        global_sums = np.ascontiguousarray(_to_canonical(reduced, layout, 0.0), np.float64)
    dx, dx3 = _fresh_like(prepared)
    kernels.run(
        kernels.batch_norm_input_gradient,
        prepared.parallel,
        dy3,
        prepared.x3,
        prepared.weights,
        prepared.has_weights,
        mean_c,
        variance_c,
        _to_canonical(total_weight, layout, 1.0, ghost_batches),
        _to_canonical(scale, layout, 1.0),
        global_sums,
        epsilon,
        ghost_batches,
        layout.period,
        prepared.blocks,
        dx3,
    )
    inv = 1.0 / np.sqrt(variance_c + epsilon)
    dscale = _from_canonical((sums[1] * inv).sum(0), layout, channel_shape)
    doffset = _from_canonical(sums[0].sum(0), layout, channel_shape)
    return dx.to(x.dtype), dscale, doffset


def normalize_impl(
    x: torch.Tensor,
    axes: list[int],
    mean: torch.Tensor,
    variance: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
) -> torch.Tensor:
    prepared = _prepare(x, axes, None, False)
    layout = prepared.layout
    return _normalized(
        prepared,
        _statistic_row(mean, layout, 0.0),
        _statistic_row(variance, layout, 1.0),
        _to_canonical(scale, layout, 1.0),
        _to_canonical(offset, layout, 0.0),
        epsilon,
        1,
        x.dtype,
    )


# ---------------------------------------------------------------------------- gradients
def normalize_batch_gradients(
    grad: torch.Tensor,
    saved: tuple[Any, ...],
    axes: list[int],
    epsilon: float,
    ghost_batches: int,
    backward_op: Any,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    x, mean, variance, total_weight, scale, offset, weights = saved
    if torch.is_grad_enabled():
        # create_graph=True: the saved tensors carry their history, so a torch-op recomputation
        # gives a gradient that is itself differentiable.
        inputs = [x, scale, offset]
        moments = TORCH_OPS.batch_moments(x, tuple(axes), weights, ghost_batches)
        y = TORCH_OPS.normalize_batch(
            x, tuple(axes), moments, scale, offset, epsilon, weights, ghost_batches
        )
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        found = iter(torch.autograd.grad(y, wanted, grad, create_graph=True, allow_unused=True))
        dx, dscale, doffset = (
            next(found) if t is not None and t.requires_grad else None for t in inputs
        )
        return dx, dscale, doffset
    dx, dscale, doffset = backward_op(
        grad, x, axes, mean, variance, total_weight, scale, epsilon, weights, ghost_batches
    )
    return (
        dx,
        None if scale is None else dscale.to(scale.dtype),
        None if offset is None else doffset.to(offset.dtype),
    )


def normalize_gradients(
    grad: torch.Tensor,
    saved: tuple[Any, ...],
    axes: list[int],
    epsilon: float,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of inference ``y = (x - mean) * rsqrt(variance + eps) * scale + offset``."""
    x, mean, variance, scale = saved
    view = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    inv = torch.rsqrt(variance.to(torch.float64) + epsilon)
    gamma = torch.ones_like(inv) if scale is None else scale.to(torch.float64)
    # y is affine in x: an element-wise product, differentiable again for double backward.
    dx = (grad * (gamma * inv).to(grad.dtype).reshape(view)).to(x.dtype)
    dmean = dvariance = dscale = doffset = None
    if any(needs[1:]):
        reduce = tuple(i for i in range(x.ndim) if i not in axes)
        centred = x.to(torch.float64) - mean.to(torch.float64).reshape(view)
        sum_dy = grad.to(torch.float64).sum(reduce).reshape(inv.shape)
        sum_dy_centred = (grad.to(torch.float64) * centred).sum(reduce).reshape(inv.shape)
        dmean = (-sum_dy * gamma * inv).to(mean.dtype) if needs[1] else None
        dvariance = (
            (-0.5 * gamma * inv**3 * sum_dy_centred).to(variance.dtype) if needs[2] else None
        )
        dscale = (sum_dy_centred * inv).to(scale.dtype) if needs[3] and scale is not None else None
        doffset = sum_dy.to(grad.dtype) if needs[4] else None
    return dx, dmean, dvariance, dscale, doffset
