"""The CPU backend: Numba kernels, exposed to PyTorch as custom operators and autograd functions.

Passes over the input: training forward two (moments, normalise), inference one, backward two
(gradient sums, input gradient). Per-channel arithmetic runs in NumPy on ``[groups, C]`` arrays.

Each operation has one implementation on tensors (``*_impl`` in
:mod:`batchnorm.functional._cpu_operations`) and two doors into autograd:

- ``torch.library`` custom operators (``batchnorm::batch_moments``, ``batchnorm::normalize_batch``,
  ``batchnorm::normalize_batch_backward``, ``batchnorm::normalize``) with fake implementations and
  registered autograd, used while ``torch.compile`` / ``torch.export`` trace;
- ``torch.autograd.Function`` subclasses for eager calls, which skip the dispatcher's overhead
  (it dominates on small batches).

Under ``create_graph=True`` the backward is recomputed with torch ops so that second derivatives
exist. float16/bfloat16 data are read and written by the kernels as their bits and computed in
float32 (:mod:`batchnorm.kernels._half`): no conversion pass on either side.
"""

from __future__ import annotations

import numpy as np
import torch

from batchnorm.functional._activation import Activation, activate, gradient_through_output
from batchnorm.functional._backend import Moments
from batchnorm.functional._cpu_in_place import normalize_in_place_kernels
from batchnorm.functional._cpu_operations import (
    SUPPORTED_DTYPES,
    InferenceCall,
    batch_moments_impl,
    inference_gradients,
    normalize_backward_impl,
    normalize_batch_backward_impl,
    normalize_batch_gradients,
    normalize_batch_impl,
    normalize_gradients,
    normalize_impl,
    torch_ops_backward,
)
from batchnorm.functional._cpu_plan import Prepared, kernels_can_read, prepare
from batchnorm.functional._cpu_training_call import RenormStep, TrainingCall, step_arrays
from batchnorm.functional._torch_ops import affine_normalize


# ---------------------------------------------------------------------------- custom operators
def _as_declared(result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``result`` with the strides the operators' fake implementations declare,
    ``torch.empty_like(x)``'s. The kernels write channel axes that are not adjacent in x (axes
    [1, 3] of NCHW) in their own order: a traced graph planned views for the declared strides,
    which failed on the real ones ("view size is not compatible", inductor's stride asserts)."""
    # the strides on the meta device: nothing allocated where they match
    if result.stride() == torch.empty_like(x, dtype=result.dtype, device="meta").stride():
        return result
    return torch.empty_like(x, dtype=result.dtype).copy_(result)


def _laid_out_like(result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An eager output with :func:`_as_declared`'s strides, as torch's ops lay out a result of x
    (a contiguous x gives a contiguous output, which ``.view(n, -1)`` takes): one stride
    comparison where they are x's own (every layout the kernels read in place), a copy only
    where the channel axes are not adjacent in x (axes [1, 3] of NCHW), which the kernels read
    through a copy already. Differentiable (``copy_``)."""
    return result if result.stride() == x.stride() else _as_declared(result, x)


@torch.library.custom_op("batchnorm::batch_moments", mutates_args=())
def batch_moments_op(
    x: torch.Tensor, axes: list[int], weights: torch.Tensor | None, ghost_batches: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return batch_moments_impl(x, axes, weights, ghost_batches)


@batch_moments_op.register_fake
def _(x, axes, weights, ghost_batches):  # type: ignore[no-untyped-def]
    shape = (ghost_batches, *(x.shape[a] for a in axes))
    return tuple(x.new_empty(shape, dtype=torch.float64) for _ in range(3))


@torch.library.custom_op("batchnorm::normalize_batch", mutates_args=())
def normalize_batch_op(
    x: torch.Tensor,
    axes: list[int],
    mean: torch.Tensor,
    variance: torch.Tensor,
    total_weight: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
    weights: torch.Tensor | None,
    ghost_batches: int,
) -> torch.Tensor:
    y = normalize_batch_impl(x, axes, mean, variance, scale, offset, epsilon, ghost_batches)
    return _as_declared(y, x)


@normalize_batch_op.register_fake
def _(x, axes, mean, variance, total_weight, scale, offset, epsilon, weights, ghost_batches):  # type: ignore[no-untyped-def]
    return torch.empty_like(x)


@torch.library.custom_op("batchnorm::normalize_batch_backward", mutates_args=())
def normalize_batch_backward_op(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dscale, doffset = normalize_batch_backward_impl(
        grad, x, axes, mean, variance, total_weight, scale, epsilon, weights, ghost_batches
    )
    return _as_declared(dx, x), dscale, doffset


@normalize_batch_backward_op.register_fake
def _(grad, x, axes, mean, variance, total_weight, scale, epsilon, weights, ghost_batches):  # type: ignore[no-untyped-def]
    channel_shape = tuple(x.shape[a] for a in axes)
    return (
        torch.empty_like(x),
        x.new_empty(channel_shape, dtype=torch.float64),
        x.new_empty(channel_shape, dtype=torch.float64),
    )


def _normalize_batch_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x, axes, mean, variance, total_weight, scale, offset, epsilon, weights, ghost_batches = inputs
    ctx.save_for_backward(x, mean, variance, total_weight, scale, offset, weights)
    ctx.axes, ctx.epsilon, ctx.ghost_batches = axes, epsilon, ghost_batches


def _normalize_batch_op_backward(ctx, grad):  # type: ignore[no-untyped-def]
    dx, dscale, doffset = normalize_batch_gradients(
        grad,
        ctx.saved_tensors,
        ctx.axes,
        ctx.epsilon,
        ctx.ghost_batches,
        normalize_batch_backward_op,
        through_dispatcher=True,
    )
    return dx, None, None, None, None, dscale, doffset, None, None, None


normalize_batch_op.register_autograd(
    _normalize_batch_op_backward, setup_context=_normalize_batch_setup
)


@torch.library.custom_op("batchnorm::normalize", mutates_args=())
def normalize_op(
    x: torch.Tensor,
    axes: list[int],
    mean: torch.Tensor,
    variance: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
) -> torch.Tensor:
    return _as_declared(normalize_impl(x, axes, mean, variance, scale, offset, epsilon), x)


@normalize_op.register_fake
def _(x, axes, mean, variance, scale, offset, epsilon):  # type: ignore[no-untyped-def]
    return torch.empty_like(x)


def _normalize_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x, axes, mean, variance, scale, _, epsilon = inputs
    ctx.save_for_backward(x, mean, variance, scale)
    ctx.axes, ctx.epsilon = axes, epsilon


def _normalize_op_backward(ctx, grad):  # type: ignore[no-untyped-def]
    needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:6])
    dx, dmean, dvariance, dscale, doffset = normalize_gradients(
        grad, ctx.saved_tensors, ctx.axes, ctx.epsilon, needs
    )
    return dx, None, dmean, dvariance, dscale, doffset, None


normalize_op.register_autograd(_normalize_op_backward, setup_context=_normalize_setup)


# ---------------------------------------------------------------------------- eager autograd
class _NormalizeBatch(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[no-untyped-def, override]
        ctx, x, axes, mean, variance, total_weight, scale, offset, epsilon, weights, ghost_batches
    ):
        ctx.save_for_backward(x, mean, variance, total_weight, scale, offset, weights)
        ctx.axes, ctx.epsilon, ctx.ghost_batches = axes, epsilon, ghost_batches
        return normalize_batch_impl(x, axes, mean, variance, scale, offset, epsilon, ghost_batches)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        dx, dscale, doffset = normalize_batch_gradients(
            grad,
            ctx.saved_tensors,
            ctx.axes,
            ctx.epsilon,
            ctx.ghost_batches,
            normalize_batch_backward_impl,
        )
        return dx, None, None, None, None, dscale, doffset, None, None, None


class TrainInPlace(torch.autograd.Function):
    """The training forward in one kernel call (moving statistics stepped in place), and its
    backward in one more (or, under ``create_graph=True``, :func:`normalize_batch_gradients`):
    a :class:`TrainingCall` on ``source``, x or its one copy, with the mask's ``weights``
    (detached) or none. The call's activation is applied in the forward's pass and folded into
    the backward's."""

    @staticmethod
    def forward(ctx, x, scale, offset, call, source, weights):  # type: ignore[no-untyped-def, override]
        y, training_pass = call.forward(source, weights, backward_follows=True)
        # elu's backward reads y: saved, so autograd refuses a backward after y was modified.
        # x's copy, where the forward read one, is saved too: every tensor the backward reads
        # goes through save_for_backward (and its hooks: torch.utils.checkpoint frees them).
        # Where there is no copy, source is x (or x detached): not saved, so that every path
        # saves the same tensors (non-reentrant checkpointing compares their number between
        # the forward and its recomputation).
        saved = (x, scale, offset, weights, y if call.reads_output else None)
        ctx.save_for_backward(*saved, source if call.plan.layout.copied else None)
        ctx.training_pass = training_pass
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        # checks that x (and y) were not modified
        x, scale, offset, weights, y, copy = ctx.saved_tensors
        training_pass = ctx.training_pass
        call = training_pass.call
        if torch_ops_backward(grad):  # create_graph=True, or a batched gradient
            mean, variance, total = training_pass.moments()
            dx, dscale, doffset = normalize_batch_gradients(
                grad,
                (x, mean, variance, total, scale, offset, weights),
                call.axes,
                call.epsilon,
                call.ghost_batches,
                normalize_batch_backward_impl,
                call.activation,
                training_pass.correction,
            )
        else:
            source = x if copy is None else copy
            dx, dscale, doffset = call.backward(grad, training_pass, source, weights, y)
            dscale = None if scale is None else dscale
            doffset = None if offset is None else doffset
        return dx, dscale, doffset, None, None, None


class _Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, axes, mean, variance, scale, offset, epsilon):  # type: ignore[no-untyped-def, override]
        prepared = prepare(x, axes, None, False)
        # x's copy, where the kernels read one, is saved too, and only the plan is kept on ctx:
        # every tensor the backward reads goes through save_for_backward (and its hooks).
        copy = prepared.source if prepared.plan.layout.copied else None
        ctx.save_for_backward(x, mean, variance, scale, copy)
        ctx.axes, ctx.epsilon = axes, epsilon
        ctx.kernels = (prepared.plan, prepared.weights, prepared.masked, prepared.parallel)
        return normalize_impl(x, axes, mean, variance, scale, offset, epsilon, prepared=prepared)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:6])
        x, mean, variance, scale, copy = ctx.saved_tensors  # checks that x was not modified
        if torch_ops_backward(grad):  # create_graph=True, or a batched gradient
            dx, dmean, dvariance, dscale, doffset = normalize_gradients(
                grad, (x, mean, variance, scale), ctx.axes, ctx.epsilon, needs
            )
        else:
            plan, weights, masked, parallel = ctx.kernels
            source = x if copy is None else copy
            prepared = Prepared(plan, source, plan.kernel_view(source), weights, masked, parallel)
            dx, dmean, dvariance, dscale, doffset = normalize_backward_impl(
                grad, prepared, mean, variance, scale, ctx.epsilon, needs, x.dtype
            )
        return dx, None, dmean, dvariance, dscale, doffset, None


class InferenceWithGradients(torch.autograd.Function):
    """A layer's inference output with gradients for x, gamma and beta (the moving statistics
    are constants): the forward and the backward are one kernel call each on the arrays of an
    :class:`InferenceCall`, which the layer's shortcut keeps (:func:`_Normalize` derives
    them on every call). A batch norm kept in inference while the model around it trains runs
    this on every step; on small inputs the per-call work is what counts (a (32, 64)
    forward+backward took 93 us through :class:`_Normalize`, torch 53 us).

    The backward reads the moving statistics as they were in the forward: a training step in
    between (which updates them in place) is an error, as autograd's for a saved tensor.
    """

    @staticmethod
    def forward(ctx, x, scale, offset, call):  # type: ignore[no-untyped-def, override]
        y = call.output(x, backward_follows=True)
        # beta and y only with an activation (its derivative reads them): without one, beta
        # may change in place before the backward, as before.
        if call.activation is None:
            ctx.save_for_backward(x, scale, None, None)
        else:
            ctx.save_for_backward(x, scale, offset, y)
        ctx.call = call
        ctx.offset_dtype = None if offset is None else offset.dtype
        ctx.versions = (call.moving_mean._version, call.moving_variance._version)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        x, scale, offset, y = ctx.saved_tensors  # checks that none was modified
        call = ctx.call
        activation = call.activation
        if ctx.versions != (call.moving_mean._version, call.moving_variance._version):
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an "
                "inplace operation: the moving statistics of a batch norm called in inference "
                "were updated (a training call) before the backward of that call"
            )
        needs_x, needs_scale, needs_offset = ctx.needs_input_grad[:3]
        if torch_ops_backward(grad):  # create_graph=True, or a batched gradient
            if activation is not None:
                grad = grad * _activation_derivative(x, scale, offset, call, activation)
            needs = (needs_x, False, False, needs_scale, needs_offset)
            saved = (x, call.moving_mean, call.moving_variance, scale)
            dx, _, _, dscale, doffset = normalize_gradients(
                grad, saved, call.axes, call.epsilon, needs
            )
            return dx, dscale, doffset, None
        if activation is not None and _derivative_from_output(activation, y.dtype):
            grad = gradient_through_output(grad, y, activation)  # y's sign is z's
        elif activation is not None:  # f'(z) from z
            grad = grad * _activation_derivative(x, scale, offset, call, activation)
        dx, gradients = inference_gradients(
            grad,
            call.plan,
            x,
            call.mean,
            call.variance,
            call.scale,
            call.epsilon,
            needs_x,
            needs_scale or needs_offset,
        )
        dscale = doffset = None
        if needs_scale:
            dscale = _parameter_gradient(gradients[2], scale.dtype)
        if needs_offset:
            doffset = _parameter_gradient(gradients[3], ctx.offset_dtype)
        return dx, dscale, doffset, None


def _derivative_from_output(activation: Activation, dtype: torch.dtype) -> bool:
    """Whether ``f'(z)`` is read from the output: where ``y``'s sign is ``z``'s (relu, the
    invertible activations), except elu on half precision, whose ``y + alpha`` (the derivative
    below 0) cancels to the rounding of ``y`` (gamma's gradient 200% off in bfloat16 at ``z`` =
    -6 until session 53)."""
    if activation.name == "elu":
        return dtype not in (torch.float16, torch.bfloat16)
    return activation.invertible or activation.name == "relu"


def _activation_derivative(
    x: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    call: InferenceCall,
    activation: Activation,
) -> torch.Tensor:
    """``f'(z)`` of the inference output's ``z = (x - M) / sqrt(V + epsilon) * gamma + beta``,
    differentiable in x, gamma and beta (double backward: elu's ``f'' = f'`` below 0)."""
    view = [x.shape[i] if i in call.axes else 1 for i in range(x.ndim)]

    def wide(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(torch.float64).reshape(view)

    z = affine_normalize(
        x.to(torch.float64),
        call.moving_mean.to(torch.float64).reshape(view),
        call.moving_variance.to(torch.float64).reshape(view),
        wide(scale),
        wide(offset),
        call.epsilon,
    )
    positive = z > 0
    if activation.name == "relu":
        return positive.to(x.dtype)
    a = activation.parameter
    assert a is not None
    if activation.name == "leaky_relu":  # the slope in float64 (two Python scalars: float32)
        return torch.where(positive, z.new_ones(()), z.new_full((), a)).to(x.dtype)
    return torch.where(positive, 1.0, a * torch.exp(z)).to(x.dtype)


def _parameter_gradient(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A float64 ``[C]`` gradient as a tensor of the parameter's dtype (rounded by NumPy where it
    can: a torch conversion costs more per call)."""
    if dtype == torch.float32:
        return torch.from_numpy(values.astype(np.float32))
    return torch.from_numpy(values).to(dtype)


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class NumbaCpuBackend:
    """Batch norm on CPU tensors through the Numba kernels."""

    name = "numba"
    reads_half_precision = True  # as bits (batchnorm.kernels._half)

    def supports(self, x: torch.Tensor) -> bool:
        """CPU tensors of the kernels' dtypes, read by the kernels or traced as their custom
        ops; not while ``torch.onnx.export`` traces (torch.export, then a translation of every
        operator into ONNX, which has none for the custom ops: the composed torch ops translate)
        nor inside ``torch.jit.trace`` (:func:`kernels_can_read`). Nor under ``torch.func``
        transforms, eager or traced by ``torch.compile``: the custom operators' autograd
        functions cannot run there, the composed torch ops can."""
        if x.device.type != "cpu" or x.dtype not in SUPPORTED_DTYPES or x.ndim == 0:
            return False
        if torch.compiler.is_compiling():
            return not (
                torch.onnx.is_in_onnx_export() or torch._C._are_functorch_transforms_active()
            )
        return kernels_can_read(x)

    def batch_moments(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        weights: torch.Tensor | None,
        ghost_batches: int,
    ) -> Moments:
        if torch.compiler.is_compiling():
            return Moments(*batch_moments_op(x.detach(), list(axes), weights, ghost_batches))
        return Moments(*batch_moments_impl(x, list(axes), weights, ghost_batches))

    def normalize_batch(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        moments: Moments,
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        epsilon: float,
        weights: torch.Tensor | None,
        ghost_batches: int,
        activation: Activation | None = None,
    ) -> torch.Tensor:
        """The training output; ``activation`` runs in the same kernel pass when no autograd
        graph is recorded, as a torch op after it otherwise."""
        arguments = (
            x,
            list(axes),
            moments.mean,
            moments.variance,
            moments.total_weight,
            scale,
            offset,
            epsilon,
            None if weights is None else weights.detach(),
            ghost_batches,
        )
        if torch.compiler.is_compiling():
            y: torch.Tensor = normalize_batch_op(*arguments)
        elif _needs_autograd(x, scale, offset):
            y = _laid_out_like(_NormalizeBatch.apply(*arguments), x)  # type: ignore[no-untyped-call]
        else:
            return _laid_out_like(
                normalize_batch_impl(
                    x,
                    list(axes),
                    moments.mean,
                    moments.variance,
                    scale,
                    offset,
                    epsilon,
                    ghost_batches,
                    activation,
                ),
                x,
            )
        return activate(y, activation)

    def train_in_place(
        self,
        x: torch.Tensor,
        axis: int,
        moving: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        weights: torch.Tensor | None,
        ghost_batches: int,
        momentum: float,
        epsilon: float,
        unbiased: bool,
        activation: Activation | None = None,
        renorm: RenormStep | None = None,
    ) -> torch.Tensor:
        """Training output over one channel axis; the moving statistics step in place.
        ``activation`` runs in the forward's normalising pass and, under autograd, is folded
        into the backward's two passes; ``renorm``'s statistics step in the same call.

        Eager only (``torch.compile`` traces :meth:`batch_moments` and :meth:`normalize_batch`).
        """
        prepared = prepare(x, [axis], None, ghost_batches > 1)
        plan = prepared.plan
        call = TrainingCall(
            plan,
            step_arrays(scale, offset, moving, plan.layout, renorm),
            axis,
            moving,
            epsilon=epsilon,
            momentum=momentum,
            unbiased=unbiased,
            ghost_batches=ghost_batches,
            activation=activation,
            renorm=renorm,
        )
        weights = None if weights is None else weights.detach()
        if _needs_autograd(x, scale, offset):
            y: torch.Tensor = TrainInPlace.apply(x, scale, offset, call, prepared.source, weights)  # type: ignore[no-untyped-call]
        else:
            y = call.forward(prepared.source, weights)[0]
        return _laid_out_like(y, x)

    # ``memory="in_place"`` training on the kernels (batchnorm.functional._cpu_in_place); None
    # where they cannot write into x.
    normalize_in_place = staticmethod(normalize_in_place_kernels)

    def normalize(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        mean: torch.Tensor,
        variance: torch.Tensor,
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        epsilon: float,
        activation: Activation | None = None,
    ) -> torch.Tensor:
        arguments = (x, list(axes), mean, variance, scale, offset, epsilon)
        if torch.compiler.is_compiling():
            y: torch.Tensor = normalize_op(*arguments)
        elif _needs_autograd(x, mean, variance, scale, offset):
            y = _laid_out_like(_Normalize.apply(*arguments), x)  # type: ignore[no-untyped-call]
        else:
            return _laid_out_like(normalize_impl(*arguments, activation), x)
        return activate(y, activation)


NUMBA_CPU = NumbaCpuBackend()
