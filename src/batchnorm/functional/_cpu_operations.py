"""The CPU batch-norm operations on tensors: Numba kernels over a ``(rows, channels, inner)`` view.

Passes over the input: training forward two (moments, normalise), inference one, backward two
(gradient sums, input gradient); a layer's one-call training step (one pass for its forward, one
for its backward) is :mod:`batchnorm.functional._cpu_training_call`. Per-channel arithmetic runs
in NumPy on ``[groups, C]`` arrays. Layouts, row blocks, kernels and output memory come from the
plan of the input's signature (:mod:`batchnorm.functional._cpu_plan`). float16/bfloat16 are read
and written by the kernels as their bits and computed in float32 (Numba has no half type).
:mod:`batchnorm.functional._cpu_backend` exposes these functions to PyTorch's autograd,
``torch.compile`` and ``torch.export``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from batchnorm.functional._activation import Activation, activate
from batchnorm.functional._canonical_layout import CanonicalLayout
from batchnorm.functional._cpu_plan import (
    KERNEL_DTYPES,
    VIEWED_DTYPES,
    CpuPlan,
    Prepared,
    compiled_build,
    compute_dtype,
    constant_channels,
    dispatched_in_python,
    prepare,
    resizable_array,
    shared_array,
    storage_array,
    storageless,
)
from batchnorm.functional._renorm import compose_transforms
from batchnorm.functional._torch_ops import TORCH_OPS
from batchnorm.kernels._elementwise import ELU, LEAKY_RELU, RELU

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def to_canonical(
    tensor: torch.Tensor | None, layout: CanonicalLayout, fill: float, groups: int | None = None
) -> np.ndarray:
    """A per-channel tensor ``(..., *channel_shape)`` as an array ``(..., C)`` in memory order.

    float32/float64/float16/bfloat16 tensors are shared, not copied (half precision as its bits,
    which the kernels widen); None becomes ``fill``. With ``groups`` the
    result is ``[groups, C]`` float64 (statistics).
    """
    if (
        tensor is not None
        and groups is None
        and tensor.ndim == 1
        and tensor.dtype in VIEWED_DTYPES
        and layout.channel_permutation == (0,)
    ):
        return shared_array(tensor)  # the common case, on every call: a view
    if tensor is None:
        if groups is None:
            return constant_channels(layout.channels, fill, np.float64)
        array = np.full(layout.channels, fill)
    else:
        detached = tensor.detach()
        array = resizable_array(detached) if detached.dtype in KERNEL_DTYPES else _float64(detached)
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
    """A per-channel statistic as ``[1, C]``: a view of a tensor of a kernel dtype (the moving
    statistics at inference, read on every call), else the float64 copy of :func:`to_canonical`."""
    if tensor.ndim == 1 and tensor.dtype in VIEWED_DTYPES and layout.channel_permutation == (0,):
        return shared_array(tensor).reshape(1, -1)
    return to_canonical(tensor, layout, fill, 1)


def _float64(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).numpy()


def from_canonical(
    array: np.ndarray, layout: CanonicalLayout, channel_shape: tuple[int, ...]
) -> torch.Tensor:
    if layout.channel_permutation == (0,) and array.flags.c_contiguous:
        return torch.from_numpy(array)  # one channel axis: (..., C) is already the shape
    return layout.channels_from_canonical(torch.from_numpy(array), channel_shape).contiguous()


def normalize_prepared(
    prepared: Prepared,
    mean: np.ndarray,
    variance: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    epsilon: float,
    groups: int,
    out_dtype: torch.dtype,
    activation: Activation | None = None,
) -> torch.Tensor:
    """The affine kernel (and ``activation``, in the same pass) on an input already prepared,
    into a new tensor with x's memory layout; the statistics are ``[groups, C]`` arrays."""
    out, out3 = prepared.plan.fresh(prepared.source)
    normalize_into(prepared, mean, variance, scale, offset, epsilon, groups, activation, out3)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def normalize_plain(
    plan: CpuPlan,
    x: torch.Tensor,
    mean: np.ndarray,
    variance: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    epsilon: float,
    code: tuple[int | None, float],
    backward_follows: bool = False,
) -> torch.Tensor:
    """A layer's inference output, ``f((x - M) / sqrt(V + epsilon) * gamma + beta)``: the
    affine kernel on x (of the plan's signature and dtype) into a new tensor, in the plan's
    :meth:`CpuPlan.inference_blocks`; ``mean`` and ``variance`` ``[1, C]``, ``scale`` and
    ``offset`` ``[C]``, ``code`` the activation's :func:`activation_code`.

    :func:`normalize_prepared` without the :class:`Prepared` input and the calls between: inside
    a model the batch norm's share of ``Linear(784, 1000)-ReLU-BN-Linear(10)`` inference at
    batch 64 on the Intel VM went from 93-102 us to 80-84 us (this path with
    :meth:`CpuPlan.fresh`'s ``empty_like`` and :meth:`CpuPlan.kernel_view`; torch's 39-49 us),
    where the same calls cost a few microseconds in a loop.
    """
    out, out3 = plan.fresh(x)
    plan.normalize(
        plan.kernel_view(x),
        mean,
        variance,
        scale,
        offset,
        epsilon,
        1,
        plan.inference_blocks(backward_follows),
        out3,
        code,
    )
    return out


def normalize_into(
    prepared: Prepared,
    mean: np.ndarray,
    variance: np.ndarray,
    scale: np.ndarray,
    offset: np.ndarray,
    epsilon: float,
    groups: int,
    activation: Activation | None,
    out3: np.ndarray | None,
) -> None:
    """The affine kernel of :func:`normalize_prepared` writing into ``out3``, an array in the
    canonical layout, or over ``prepared.x3`` itself when None (in-place training: each value
    is read before it is written; :data:`batchnorm.kernels.affine_normalize` says why not
    ``out3=prepared.x3``), in the plan's normalising row blocks."""
    plan = prepared.plan
    plan.normalize(
        prepared.x3,
        mean,
        variance,
        scale,
        offset,
        epsilon,
        groups,
        plan.normalize_blocks,
        out3,
        activation_code(activation),
    )


def activation_code(activation: Activation | None) -> tuple[int | None, float]:
    """The kernels' ``(code, parameter)`` of an activation (:mod:`batchnorm.kernels._elementwise`);
    code None for none (a type of its own to Numba: calls without an activation run kernels
    compiled without its loops)."""
    if activation is None or activation.name == "identity":
        return None, 0.0
    code = _ACTIVATION_CODES[activation.name]
    return code, 0.0 if activation.parameter is None else activation.parameter


_ACTIVATION_CODES = {"relu": RELU, "leaky_relu": LEAKY_RELU, "elu": ELU}


def reads_output(activation: Activation | None) -> bool:
    """Whether the fused backward reads the forward's output (elu's derivative, ``y + alpha``)."""
    return activation is not None and activation.name == "elu"


# ---------------------------------------------------------------------------- implementations
def batch_moments_impl(
    x: torch.Tensor, axes: list[int], weights: torch.Tensor | None, ghost_batches: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    prepared = prepare(x, axes, weights, ghost_batches > 1)
    plan = prepared.plan
    moments = prepared.compiled(plan.batch_moments)
    mean, variance, total = moments(
        prepared.x3,
        prepared.weights,
        prepared.masked,
        ghost_batches,
        plan.layout.period,
        plan.blocks,
    )
    channel_shape = tuple(x.shape[a] for a in axes)
    return tuple(from_canonical(a, prepared.layout, channel_shape) for a in (mean, variance, total))  # type: ignore[return-value]


def normalize_batch_impl(
    x: torch.Tensor,
    axes: list[int],
    mean: torch.Tensor,
    variance: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
    ghost_batches: int,
    activation: Activation | None = None,
) -> torch.Tensor:
    prepared = prepare(x, axes, None, ghost_batches > 1)
    layout = prepared.layout
    return normalize_prepared(
        prepared,
        to_canonical(mean, layout, 0.0, ghost_batches),
        to_canonical(variance, layout, 1.0, ghost_batches),
        to_canonical(scale, layout, 1.0),
        to_canonical(offset, layout, 0.0),
        epsilon,
        ghost_batches,
        x.dtype,
        activation,
    )


class InferenceCall(NamedTuple):
    """A layer's inference calls on inputs of one signature as the kernels read them, without
    gradients and with them (:class:`~batchnorm.functional._cpu_backend.InferenceWithGradients`):
    the plan, the moving statistics ``[1, C]`` and gamma/beta ``[C]`` as arrays (views), the
    activation."""

    plan: CpuPlan
    mean: np.ndarray
    variance: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    epsilon: float
    axes: list[int]
    moving_mean: torch.Tensor  # what ``mean`` and ``variance`` view
    moving_variance: torch.Tensor
    activation: Activation | None  # None for none or the identity
    code: tuple[int | None, float]  # the activation's activation_code

    def output(self, x: torch.Tensor, backward_follows: bool = False) -> torch.Tensor:
        """``f((x - M) / sqrt(V + epsilon) * gamma + beta)`` for x of the plan's signature (one
        kernel call), its rows split for a backward that follows where one does
        (:meth:`CpuPlan.inference_blocks`)."""
        return normalize_plain(
            self.plan,
            x,
            self.mean,
            self.variance,
            self.scale,
            self.offset,
            self.epsilon,
            self.code,
            backward_follows,
        )


def canonical_gradient(grad: torch.Tensor, plan: CpuPlan, source: torch.Tensor) -> np.ndarray:
    """The upstream gradient of an output for ``source`` (x of the plan's signature, or its
    one copy) as a dense canonical array, a view where it is laid out like x (detached only
    where it requires grad, under ``create_graph``: see :meth:`CpuPlan.kernel_view`)."""
    grad = grad.detach() if grad.requires_grad else grad
    if grad.dtype == source.dtype and grad.stride() == source.stride():
        return plan.canonical(storage_array(grad))
    # A gradient of expanded ones (from .sum()) has zero strides: the kernels need it dense.
    # Viewed and copied by NumPy: the same by torch ops took 5 us, and 15 us inside autograd's
    # backward (a (32, 64) inference forward+backward is ~90 us in all).
    array = storage_array(grad if grad.dtype == source.dtype else grad.to(source.dtype))
    return np.ascontiguousarray(plan.canonical(array))


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
    prepared = prepare(x, axes, weights, ghost_batches > 1)
    plan = prepared.plan
    layout = plan.layout
    dy3 = canonical_gradient(grad, prepared.plan, prepared.source)
    mean_c = to_canonical(mean, layout, 0.0, ghost_batches)
    variance_c = to_canonical(variance, layout, 1.0, ghost_batches)
    gradient_sums = prepared.compiled(plan.gradient_sums)
    sums = gradient_sums(dy3, prepared.x3, mean_c, ghost_batches, layout.period, plan.blocks)
    channel_shape = tuple(x.shape[a] for a in axes)
    global_sums = sums
    if reduce_sums is not None:
        reduced = reduce_sums(from_canonical(sums, layout, channel_shape))
        global_sums = np.ascontiguousarray(to_canonical(reduced, layout, 0.0), np.float64)
    dx, dx3 = plan.fresh(prepared.source)
    input_gradient = prepared.compiled(plan.input_gradient)
    input_gradient(
        dy3,
        prepared.x3,
        prepared.weights,
        prepared.masked,
        mean_c,
        variance_c,
        to_canonical(total_weight, layout, 1.0, ghost_batches),
        to_canonical(scale, layout, 1.0),
        global_sums,
        epsilon,
        ghost_batches,
        layout.period,
        plan.blocks,
        dx3,
    )
    inv = 1.0 / np.sqrt(variance_c + epsilon)
    dscale = from_canonical((sums[1] * inv).sum(0), layout, channel_shape)
    doffset = from_canonical(sums[0].sum(0), layout, channel_shape)
    return dx.to(x.dtype), dscale, doffset


def normalize_impl(
    x: torch.Tensor,
    axes: list[int],
    mean: torch.Tensor,
    variance: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
    activation: Activation | None = None,
    prepared: Prepared | None = None,
) -> torch.Tensor:
    """Inference ``f((x - mean) / sqrt(variance + epsilon) * scale + offset)``; ``prepared``: x
    as :func:`prepare` gives it, when the caller has it already."""
    if prepared is None:
        prepared = prepare(x, axes, None, False)
    layout = prepared.layout
    return normalize_prepared(
        prepared,
        _statistic_row(mean, layout, 0.0),
        _statistic_row(variance, layout, 1.0),
        to_canonical(scale, layout, 1.0),
        to_canonical(offset, layout, 0.0),
        epsilon,
        1,
        x.dtype,
        activation,
    )


def normalize_backward_impl(
    grad: torch.Tensor,
    prepared: Prepared,
    mean: torch.Tensor,
    variance: torch.Tensor,
    scale: torch.Tensor | None,
    epsilon: float,
    needs: tuple[bool, ...],
    dtype: torch.dtype,
) -> tuple[torch.Tensor | None, ...]:
    """``(dx, dmean, dvariance, dscale, doffset)`` of :func:`normalize_impl` on the input
    ``prepared`` (x of ``dtype``) (the formulas of :func:`normalize_gradients`) in one kernel call
    (:data:`batchnorm.kernels.inference_backward`), each result only where ``needs`` says so (x,
    mean, variance, scale, offset). A batch norm kept in inference while the rest of a model
    trains (fine-tuning) runs this on every step: with float64 torch ops it took 8x torch's time.
    """
    layout = prepared.layout
    dx, gradients = inference_gradients(
        grad,
        prepared.plan,
        prepared.source,
        _statistic_row(mean, layout, 0.0),
        _statistic_row(variance, layout, 1.0),
        to_canonical(scale, layout, 1.0),
        epsilon,
        needs[0],
        any(needs[1:]),
    )
    if dx is not None and dx.dtype != dtype:
        dx = dx.to(dtype)
    channel_shape = tuple(mean.shape)

    def gradient(row: int, dtype: torch.dtype) -> torch.Tensor:
        values = gradients[row]
        if dtype == torch.float32:  # rounded by NumPy: a torch conversion costs more per call
            values = values.astype(np.float32)
        tensor = from_canonical(values, layout, channel_shape)
        return tensor if tensor.dtype == dtype else tensor.to(dtype)

    return (
        dx,
        gradient(0, mean.dtype) if needs[1] else None,
        gradient(1, variance.dtype) if needs[2] else None,
        gradient(2, scale.dtype) if needs[3] and scale is not None else None,
        gradient(3, compute_dtype(grad.dtype)) if needs[4] else None,
    )


def inference_gradients(
    grad: torch.Tensor,
    plan: CpuPlan,
    source: torch.Tensor,
    mean: np.ndarray,
    variance: np.ndarray,
    scale: np.ndarray,
    epsilon: float,
    input_wanted: bool,
    sums_wanted: bool,
) -> tuple[torch.Tensor | None, np.ndarray]:
    """The inference backward's kernel call on arrays (``mean``, ``variance`` ``[1, C]``,
    ``scale`` ``[C]``) for the input ``source`` (x of the plan's signature, or its one copy): dx
    in the input's layout when ``input_wanted`` (else None), and the float64
    ``[dM, dV, dgamma, dbeta]`` rows ``[4, C]`` when ``sums_wanted``."""
    dy3 = canonical_gradient(grad, plan, source)
    dx, dx3 = plan.fresh(source) if input_wanted else (None, None)
    backward = compiled_build(plan.inference_backward, plan.parallel())
    gradients = backward(
        dy3,
        plan.kernel_view(source),
        mean,
        variance,
        scale,
        epsilon,
        True if sums_wanted else None,
        plan.layout.period,
        plan.blocks,
        dx3,
    )
    return dx, gradients


# ---------------------------------------------------------------------------- gradients
def torch_ops_backward(grad: torch.Tensor, through_dispatcher: bool = False) -> bool:
    """Whether a backward takes the torch ops rather than the kernels: under create_graph=True
    (the gradient must be differentiable again), for a batched upstream gradient without
    storage for the kernels to read (:func:`storageless`: "Batching rule not implemented for
    aten::detach" before) and, for a backward that calls the kernels directly rather than
    ``through_dispatcher`` (a custom operator, which the dispatcher hands to its fake
    implementation or to a mode), under a dispatch mode or for a gradient that dispatches in
    Python (:func:`dispatched_in_python`). Only the tests of :func:`kernels_can_read` that can
    change between a forward and its backward: 0.1 us on every backward against its 0.3."""
    return (
        torch.is_grad_enabled()
        or storageless(grad)
        or (not through_dispatcher and dispatched_in_python(grad))
    )


def normalize_batch_gradients(
    grad: torch.Tensor,
    saved: tuple[Any, ...],
    axes: list[int],
    epsilon: float,
    ghost_batches: int,
    backward_op: Any,
    activation: Activation | None = None,
    correction: np.ndarray | None = None,
    through_dispatcher: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(dx, dscale, doffset)`` of the training output, or of ``f(output)`` with an
    ``activation`` (on the torch ops only: :meth:`TrainingCall.backward` folds it into the
    kernels otherwise); with renorm's ``correction`` (r, d) of a one-call step (torch ops
    only), of the output normalised with ``r * scale`` and ``d * scale + offset``.

    The torch ops (:func:`torch_ops_backward`) recompute the output from the saved tensors and
    differentiate it: under create_graph=True the saved tensors carry their history, so the
    gradient is itself differentiable. ``through_dispatcher``: ``backward_op`` is a custom
    operator (:func:`torch_ops_backward`); under ``torch.compile`` the torch ops would
    differentiate saved tensors that the traced backward holds without their history."""
    x, mean, variance, total_weight, scale, offset, weights = saved
    if torch_ops_backward(grad, through_dispatcher):
        differentiable = torch.is_grad_enabled()
        inputs = [x, scale, offset]
        used_scale, used_offset = scale, offset
        if correction is not None:  # r and d are constants (tf.stop_gradient)
            r, d = torch.from_numpy(correction).to(x.dtype)
            used_scale, used_offset = compose_transforms(r, d, scale, offset)
        with torch.enable_grad():  # a batched gradient's backward runs without grad mode
            moments = TORCH_OPS.batch_moments(x, tuple(axes), weights, ghost_batches)
            y = TORCH_OPS.normalize_batch(
                x, tuple(axes), moments, used_scale, used_offset, epsilon, weights, ghost_batches
            )
            y = activate(y, activation)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        found = iter(
            torch.autograd.grad(y, wanted, grad, create_graph=differentiable, allow_unused=True)
        )
        dx, dscale, doffset = (
            next(found) if t is not None and t.requires_grad else None for t in inputs
        )
        return dx, dscale, doffset
    assert activation is None, "the kernels' backward with an activation is TrainingCall.backward"
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
    compute = compute_dtype(grad.dtype)  # float32 for half precision, as the kernels
    dx = (grad.to(compute) * (gamma * inv).to(compute).reshape(view)).to(x.dtype)
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
        doffset = sum_dy.to(compute_dtype(grad.dtype)) if needs[4] else None
    return dx, dmean, dvariance, dscale, doffset
