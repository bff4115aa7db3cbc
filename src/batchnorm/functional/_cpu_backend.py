"""The CPU backend: Numba kernels registered as PyTorch custom operators.

Three operators, each with a fake (meta) implementation so ``torch.compile(fullgraph=True)`` and
``torch.export`` trace them:

- ``batchnorm::batch_moments``: one pass over x; float64 mean, biased variance and total weight
  per ghost batch and channel (no gradient: the layer uses them detached).
- ``batchnorm::normalize_batch``: one pass, ``y = (x - mean) * rsqrt(var + eps) * scale + offset``;
  its backward is the full batch-norm backward (the moments are x's own), in two passes
  (``batchnorm::normalize_batch_backward``). Under ``create_graph=True`` the backward is recomputed
  with torch ops so that second derivatives exist.
- ``batchnorm::normalize``: inference with given statistics, one pass; backward one elementwise
  pass and one reduction.

float16/bfloat16 are converted to float32 around the kernels (Numba has no half type).
"""

from __future__ import annotations

import torch

from batchnorm import kernels
from batchnorm.functional._backend import Moments
from batchnorm.functional._canonical_layout import (
    CanonicalLayout,
    canonical_layout,
    canonical_weights,
)
from batchnorm.functional._torch_ops import TORCH_OPS

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _blocks(rows: int) -> int:
    return max(1, min(kernels.set_threads(torch.get_num_threads()), rows))


def _prepare(
    x: torch.Tensor, axes: list[int], weights: torch.Tensor | None, batch_outermost: bool
) -> tuple[torch.Tensor, CanonicalLayout, torch.Tensor, torch.Tensor, bool]:
    """x in canonical layout (kernel dtype) and its weights as (rows, inner), or a 1x1 dummy."""
    dtype = _kernel_dtype(x)
    source, layout = canonical_layout(x.to(dtype), tuple(axes), batch_outermost)
    x3 = layout.view(source)
    if weights is None:
        return source, layout, x3, torch.zeros((1, 1), dtype=dtype), False
    squeezed = weights.squeeze(tuple(axes)) if weights.ndim == x.ndim else weights
    return source, layout, x3, canonical_weights(squeezed, layout, tuple(axes), dtype), True


def _split_mean(mean: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    high = mean.to(dtype)
    return high, (mean - high.to(mean.dtype)).to(dtype)


def _channel_vector(
    tensor: torch.Tensor | None, layout: CanonicalLayout, fill: float, dtype: torch.dtype
) -> torch.Tensor:
    if tensor is None:
        return torch.full((layout.channels,), fill, dtype=dtype)
    return layout.channels_to_canonical(tensor.detach().to(dtype))


# ---------------------------------------------------------------------------- batch_moments
@torch.library.custom_op("batchnorm::batch_moments", mutates_args=())
def batch_moments_op(
    x: torch.Tensor, axes: list[int], weights: torch.Tensor | None, ghost_batches: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, layout, x3, w2, has_weights = _prepare(x, axes, weights, ghost_batches > 1)
    shift, sums = kernels.shifted_channel_sums(
        x3.numpy(), w2.numpy(), has_weights, ghost_batches, layout.period, _blocks(layout.rows)
    )
    s0, s1, s2 = (torch.from_numpy(sums[i]) for i in range(3))
    empty = s0 == 0
    safe = torch.where(empty, torch.ones_like(s0), s0)
    centred_mean = s1 / safe
    mean = torch.where(empty, torch.zeros_like(s0), torch.from_numpy(shift) + centred_mean)
    variance = torch.where(empty, torch.zeros_like(s0), (s2 / safe - centred_mean**2).clamp(min=0))
    channel_shape = tuple(x.shape[a] for a in axes)
    return tuple(  # type: ignore[return-value]
        layout.channels_from_canonical(t, channel_shape).contiguous() for t in (mean, variance, s0)
    )


@batch_moments_op.register_fake
def _(
    x: torch.Tensor, axes: list[int], weights: torch.Tensor | None, ghost_batches: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shape = (ghost_batches, *(x.shape[a] for a in axes))
    return tuple(x.new_empty(shape, dtype=torch.float64) for _ in range(3))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- normalize_batch
def _normalize_into(
    source: torch.Tensor,
    layout: CanonicalLayout,
    x3: torch.Tensor,
    mean: torch.Tensor,
    factor: torch.Tensor,
    offset: torch.Tensor,
    groups: int,
    out_dtype: torch.dtype,
    shape: torch.Size,
) -> torch.Tensor:
    """Run the affine kernel with per-(group, canonical channel) coefficients; y in x's layout."""
    dtype = x3.dtype
    high, low = _split_mean(mean, dtype)
    out = (
        torch.empty_like(source) if source.dtype == dtype else torch.empty_like(source, dtype=dtype)
    )
    out3 = layout.view(out)
    kernels.affine_normalize(
        x3.numpy(),
        high.numpy(),
        low.numpy(),
        factor.to(dtype).contiguous().numpy(),
        offset.to(dtype).contiguous().numpy(),
        groups,
        layout.period,
        _blocks(layout.rows),
        out3.numpy(),
    )
    return out.to(out_dtype) if out_dtype != dtype else out


def _inverse_std(variance: torch.Tensor, epsilon: float) -> torch.Tensor:
    return torch.rsqrt(variance + epsilon)


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
    source, layout, x3, _, _ = _prepare(x, axes, None, ghost_batches > 1)
    mean_c = layout.channels_to_canonical(mean)
    inv = _inverse_std(layout.channels_to_canonical(variance), epsilon)
    factor = inv * _channel_vector(scale, layout, 1.0, torch.float64)
    shift = _channel_vector(offset, layout, 0.0, torch.float64).expand_as(factor)
    return _normalize_into(
        source, layout, x3, mean_c, factor, shift, ghost_batches, x.dtype, x.shape
    )


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
    scale: torch.Tensor | None,
    epsilon: float,
    weights: torch.Tensor | None,
    total_weight: torch.Tensor,
    ghost_batches: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    source, layout, x3, w2, has_weights = _prepare(x, axes, weights, ghost_batches > 1)
    dtype = x3.dtype
    dy3 = layout.view(grad.to(dtype))
    mean_c = layout.channels_to_canonical(mean)
    inv = _inverse_std(layout.channels_to_canonical(variance), epsilon)
    sums = torch.from_numpy(
        kernels.gradient_sums(
            dy3.numpy(),
            x3.numpy(),
            mean_c.numpy(),
            ghost_batches,
            layout.period,
            _blocks(layout.rows),
        )
    )
    sum_dy, sum_dy_centred = sums[0], sums[1]
    gamma = _channel_vector(scale, layout, 1.0, torch.float64)
    count = layout.channels_to_canonical(total_weight)
    per_weight = torch.where(count > 0, 1.0 / torch.where(count > 0, count, 1.0), 0.0)
    k_dy = gamma * inv
    k_centred = -k_dy * inv * inv * sum_dy_centred * per_weight
    k_constant = -k_dy * sum_dy * per_weight
    high, low = _split_mean(mean_c, dtype)
    dx = (
        torch.empty_like(source) if source.dtype == dtype else torch.empty_like(source, dtype=dtype)
    )
    kernels.batch_norm_input_gradient(
        dy3.numpy(),
        x3.numpy(),
        w2.numpy(),
        has_weights,
        high.numpy(),
        low.numpy(),
        k_dy.to(dtype).numpy(),
        k_centred.to(dtype).numpy(),
        k_constant.to(dtype).numpy(),
        ghost_batches,
        layout.period,
        _blocks(layout.rows),
        layout.view(dx).numpy(),
    )
    channel_shape = tuple(x.shape[a] for a in axes)
    dscale = layout.channels_from_canonical((sum_dy_centred * inv).sum(0), channel_shape)
    doffset = layout.channels_from_canonical(sum_dy.sum(0), channel_shape)
    return dx.to(x.dtype), dscale.contiguous(), doffset.contiguous()


@normalize_batch_backward_op.register_fake
def _(grad, x, axes, mean, variance, scale, epsilon, weights, total_weight, ghost_batches):  # type: ignore[no-untyped-def]
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


def _normalize_batch_backward(ctx, grad):  # type: ignore[no-untyped-def]
    x, mean, variance, total_weight, scale, offset, weights = ctx.saved_tensors
    axes, epsilon, ghost_batches = ctx.axes, ctx.epsilon, ctx.ghost_batches
    if torch.is_grad_enabled():
        # create_graph=True: recompute with torch ops so that the gradient is differentiable too.
        return _double_backward_path(ctx, grad, x, scale, offset, weights)  # type: ignore[no-untyped-call]
    dx, dscale, doffset = normalize_batch_backward_op(
        grad, x, axes, mean, variance, scale, epsilon, weights, total_weight, ghost_batches
    )
    return (
        dx,
        None,
        None,
        None,
        None,
        None if scale is None else dscale.to(scale.dtype),
        None if offset is None else doffset.to(offset.dtype),
        None,
        None,
        None,
    )


def _double_backward_path(ctx, grad, x, scale, offset, weights):  # type: ignore[no-untyped-def]
    # The saved tensors carry their autograd history here, so the gradient computed from them
    # is itself differentiable with respect to the original inputs.
    inputs = [x, scale, offset]
    moments = TORCH_OPS.batch_moments(x, tuple(ctx.axes), weights, ctx.ghost_batches)
    y = TORCH_OPS.normalize_batch(
        x, tuple(ctx.axes), moments, scale, offset, ctx.epsilon, weights, ctx.ghost_batches
    )
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(y, wanted, grad, create_graph=True, allow_unused=True))
    dx, dscale, doffset = (
        next(grads) if t is not None and t.requires_grad else None for t in inputs
    )
    return dx, None, None, None, None, dscale, doffset, None, None, None


normalize_batch_op.register_autograd(
    _normalize_batch_backward, setup_context=_normalize_batch_setup
)


# ---------------------------------------------------------------------------- normalize
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
    source, layout, x3, _, _ = _prepare(x, axes, None, False)
    mean_c = layout.channels_to_canonical(mean.to(torch.float64))[None]
    inv = _inverse_std(layout.channels_to_canonical(variance.to(torch.float64)), epsilon)[None]
    factor = inv * _channel_vector(scale, layout, 1.0, torch.float64)
    shift = _channel_vector(offset, layout, 0.0, torch.float64)[None]
    return _normalize_into(source, layout, x3, mean_c, factor, shift, 1, x.dtype, x.shape)


@normalize_op.register_fake
def _(x, axes, mean, variance, scale, offset, epsilon):  # type: ignore[no-untyped-def]
    return torch.empty_like(x)


def _normalize_setup(ctx, inputs, output):  # type: ignore[no-untyped-def]
    x, axes, mean, variance, scale, _, epsilon = inputs
    ctx.save_for_backward(x, mean, variance, scale)
    ctx.axes, ctx.epsilon = axes, epsilon


def _normalize_backward(ctx, grad):  # type: ignore[no-untyped-def]
    x, mean, variance, scale = ctx.saved_tensors
    axes, epsilon = ctx.axes, ctx.epsilon
    view = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    inv = torch.rsqrt(variance.to(torch.float64) + epsilon)
    gamma = torch.ones_like(inv) if scale is None else scale.to(torch.float64)
    # y is affine in x: dx = dy * gamma * inv, element-wise (differentiable, double backward too).
    dx = (grad * (gamma * inv).to(grad.dtype).reshape(view)).to(x.dtype)
    needs = ctx.needs_input_grad
    dmean = dvariance = dscale = doffset = None
    if needs[2] or needs[3] or needs[4] or needs[5]:
        reduce = tuple(i for i in range(x.ndim) if i not in axes)
        centred = x.to(torch.float64) - mean.to(torch.float64).reshape(view)
        sum_dy = grad.to(torch.float64).sum(reduce)
        sum_dy_centred = (grad.to(torch.float64) * centred).sum(reduce).reshape(inv.shape)
        sum_dy = sum_dy.reshape(inv.shape)
        dmean = (-sum_dy * gamma * inv).to(mean.dtype) if needs[2] else None
        dvariance = (
            (-0.5 * gamma * inv**3 * sum_dy_centred).to(variance.dtype) if needs[3] else None
        )
        dscale = (sum_dy_centred * inv).to(scale.dtype) if needs[4] and scale is not None else None
        doffset = sum_dy.to(grad.dtype) if needs[5] else None
    return dx, None, dmean, dvariance, dscale, doffset, None


normalize_op.register_autograd(_normalize_backward, setup_context=_normalize_setup)


class NumbaCpuBackend:
    """Batch norm on CPU tensors through the Numba custom operators above."""

    name = "numba"

    def supports(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in _SUPPORTED and x.ndim >= 1

    def batch_moments(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        weights: torch.Tensor | None,
        ghost_batches: int,
    ) -> Moments:
        mean, variance, total = batch_moments_op(
            x.detach(), list(axes), None if weights is None else weights.detach(), ghost_batches
        )
        return Moments(mean, variance, total)

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
    ) -> torch.Tensor:
        y: torch.Tensor = normalize_batch_op(
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
        return y

    def normalize(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        mean: torch.Tensor,
        variance: torch.Tensor,
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        epsilon: float,
    ) -> torch.Tensor:
        y: torch.Tensor = normalize_op(x, list(axes), mean, variance, scale, offset, epsilon)
        return y


NUMBA_CPU = NumbaCpuBackend()
