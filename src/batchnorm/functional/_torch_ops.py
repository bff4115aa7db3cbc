"""The torch-op backend: composed torch operations, on every device; the reference for kernels."""

from __future__ import annotations

import math

import torch

from batchnorm.functional._activation import Activation, activate
from batchnorm.functional._backend import Moments


def divide_no_nan(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` with 0 where the denominator is 0, as tf.math.divide_no_nan."""
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / safe)


def _accumulator(x: torch.Tensor) -> torch.dtype:
    # MPS has no float64; it keeps float32 accumulation.
    return x.dtype if x.device.type == "mps" else torch.float64


def reduced_moments(
    x: torch.Tensor, reduce_dims: tuple[int, ...], weights: torch.Tensor | None
) -> Moments:
    """Mean, biased variance and total weight over ``reduce_dims``, kept with size-1 dimensions.

    With ``W = sum(w)``, the mean ``m = sum(w x) / W`` and the variance
    ``sum(w (x - m)^2) / W`` are accumulated in float64 (x.dtype on MPS, which has none), the
    deviations ``x - m`` taken in float64 too: exact to float64 precision, and no float32
    square overflows where the variance fits (deviations near 1e19 square past float32's
    3.4e38). The gradient is as exact, value by value: centring on ``m`` rounded to float32
    (as this did before) cost the variance ``(m - k)^2``, which a correction restored, but left
    the gradient the rounding, and summed the variance's gradient with respect to that mean
    over float32 terms of the channel's size; where masked values lie far from a channel's
    data those terms are large, and dx near the mean was off by up to 2e-2 of its own size.
    """
    if not reduce_dims:
        # torch reads dim=() as "every dim"; reducing over nothing leaves each value its own mean.
        ones = torch.ones_like(x) if weights is None else weights.to(x.dtype) + torch.zeros_like(x)
        return Moments(x * (ones > 0), torch.zeros_like(x), ones)
    accumulator = _accumulator(x)
    # tf.nn.moments centres with stop_gradient(mean): the same first derivative, but a wrong
    # second one, so the mean stays attached here (double backward must be exact).
    if weights is None:
        elements = math.prod([x.shape[i] for i in reduce_dims])
        mean = x.sum(dim=reduce_dims, keepdim=True, dtype=accumulator) / max(elements, 1)
        # x - mean promotes to the mean's dtype: the deviations are taken in float64.
        squared = (x - mean).square().sum(dim=reduce_dims, keepdim=True)
        count = torch.full_like(mean, elements)
    else:
        weights = weights.to(x.dtype)
        # A value of weight 0 adds exactly 0, whatever it is (inf or NaN padding: 0 * inf is
        # NaN), as in the kernels; no gradient reaches it through the statistics.
        x = torch.where(weights != 0, x, 0.0)
        count = weights.broadcast_to(x.shape).sum(dim=reduce_dims, keepdim=True, dtype=accumulator)
        # Each product in the accumulator's dtype: weights * x in x's dtype rounded every term
        # (0/1 weights are exact; 0.37 * x at |mean| / std = 1e6 put y 7e-3 off).
        wide_weights = weights.to(accumulator)
        weighted_sum = (wide_weights * x).sum(dim=reduce_dims, keepdim=True)
        mean = divide_no_nan(weighted_sum, count)
        squared = (wide_weights * (x - mean).square()).sum(dim=reduce_dims, keepdim=True)
    variance = divide_no_nan(squared, count)
    # Mean and variance stay in the accumulator's dtype (float64 except on MPS), as the CPU
    # kernels return them: normalising with a float32-rounded mean costs |mean| / std * 6e-8 of
    # the output's unit, 0.06 at |mean| / std = 1e6.
    return Moments(mean, variance, count.to(x.dtype).detach())


def inverse_std(shifted: torch.Tensor) -> torch.Tensor:
    """``rsqrt(shifted)``, differentiated as ``1 / sqrt(shifted)``.

    torch's rsqrt backward is ``-0.5 * grad * rsqrt(v) ** 3``: the cube underflows to 0 for
    ``v`` above about 1e206 in float64 (std above 1e103), and the variance's share of dx was lost
    (dx 10-24% off until session 53; the float32 path keeps a float64 variance, well below).
    ``reciprocal(sqrt(v))`` differentiates through ``1 / s**2`` and ``1 / (2 s)``, which stay
    normal; added to rsqrt's detached value as ``safe - safe.detach()``, exactly 0, it leaves the
    value unchanged and gives the only gradient."""
    inverse = torch.rsqrt(shifted)
    if not shifted.requires_grad:
        return inverse
    safe = torch.sqrt(shifted).reciprocal()
    return inverse.detach() + (safe - safe.detach())


def affine_normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
) -> torch.Tensor:
    """``(x - mean) * rsqrt(variance + epsilon) * scale + offset``, all broadcast against ``x``.

    tf writes ``x * inv + (offset - mean * inv)``: the same value, but it cancels two large terms
    when ``|mean| >> std`` (1000 + 0.01 * randn), so the centred form is used.
    """
    inv = inverse_std(variance + epsilon)
    if scale is not None:
        inv = inv * scale
    centred = (x - mean) * inv
    return centred if offset is None else centred + offset


def split_mean_normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    variance: torch.Tensor,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
) -> torch.Tensor:
    """:func:`affine_normalize` with statistics wider than ``x`` (float64 for float32), in x's dtype.

    The mean is split as ``high + low`` with ``high`` rounded to x's dtype:
    ``y = (x - high) * f + (offset - low * f)`` with ``f = scale / sqrt(variance + epsilon)``,
    so the digits that rounding the mean loses are kept, and no float64 copy of x is made.
    ``d(low)/d(mean) = 0`` (the rounding passes the gradient through), so derivatives are exact.
    """
    if mean.dtype == x.dtype:
        return affine_normalize(x, mean, variance, scale, offset, epsilon)
    factor = torch.rsqrt(variance + epsilon)
    if scale is not None:
        factor = factor * scale
    high = mean.to(x.dtype)
    shift = -(mean - high.to(mean.dtype)) * factor
    if offset is not None:
        shift = shift + offset
    return (x - high) * factor.to(x.dtype) + shift.to(x.dtype)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # float16/bfloat16 inputs are computed in float32, as tf-keras does.
    return x.to(torch.promote_types(x.dtype, torch.float32))


class TorchOpsBackend:
    """Composed torch operations; moments stay attached to autograd, so gradients flow through them."""

    name = "torch"
    reads_half_precision = True  # upcasts inside its ops

    def supports(self, x: torch.Tensor) -> bool:
        return True

    @staticmethod
    def _parameter(tensor: torch.Tensor | None, view: list[int]) -> torch.Tensor | None:
        """Per-channel parameters take the view; full-rank tensors are broadcast against x as
        they are (a per-sample ``(N, 1)`` factor with N equal to the channel count included,
        which was viewed as per-channel)."""
        if tensor is None or tensor.ndim == len(view):
            return tensor
        return tensor.reshape(view)

    @staticmethod
    def _grouped(
        x: torch.Tensor, axes: tuple[int, ...], ghost_batches: int
    ) -> tuple[torch.Tensor, tuple[int, ...], list[int]]:
        """x as [v, G, ...] for ghost batches, the dims to reduce, and the statistics' view shape."""
        view = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
        reduce_dims = tuple([i for i in range(x.ndim) if i not in axes])
        if ghost_batches == 1:
            return x, reduce_dims, view
        # Ghost batch j holds samples {j, j + G, ...}: tf-keras reshapes to [B/G, G, ...].
        grouped = x.reshape(-1, ghost_batches, *x.shape[1:])
        return grouped, (0, *[i + 1 for i in reduce_dims if i != 0]), [1, ghost_batches, *view[1:]]

    def batch_moments(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        weights: torch.Tensor | None,
        ghost_batches: int,
    ) -> Moments:
        grouped, reduce_dims, _ = self._grouped(_upcast(x), axes, ghost_batches)
        if weights is not None and ghost_batches > 1:
            weights = weights.reshape(-1, ghost_batches, *weights.shape[1:])
        channel_shape = (ghost_batches, *[x.shape[a] for a in axes])
        moments = reduced_moments(grouped, reduce_dims, weights)
        return Moments(*[t.reshape(channel_shape) for t in moments])

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
        grouped, _, view = self._grouped(_upcast(x), axes, ghost_batches)
        parameter_view = view if ghost_batches == 1 else [1, 1, *view[2:]]
        y = split_mean_normalize(
            grouped,
            moments.mean.reshape(view),
            moments.variance.reshape(view),
            self._parameter(scale, parameter_view),
            self._parameter(offset, parameter_view),
            epsilon,
        )
        return activate(y, activation).reshape(x.shape).to(x.dtype)

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
        view = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
        y = affine_normalize(
            _upcast(x),
            mean.reshape(view),
            variance.reshape(view),
            None if scale is None else scale.reshape(view),
            None if offset is None else offset.reshape(view),
            epsilon,
        )
        return activate(y, activation).to(x.dtype)


TORCH_OPS = TorchOpsBackend()
