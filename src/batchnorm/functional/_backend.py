"""The operations a kernel backend can replace, and the registry that picks one per device.

The functional core calls exactly two primitives on the hot path:

- ``moments(x, reduce_dims, weights)``: per-channel ``mean = sum(w x) / sum(w)`` and biased
  ``variance = sum(w (x - mean)^2) / sum(w)`` (``w = 1`` without weights), kept with size-1 reduced
  dimensions, plus the per-channel ``total_weight = sum(w)`` (the element count without weights);
- ``normalize(x, mean, variance, scale, offset, epsilon)``: tf.nn.batch_normalization,
  ``inv = rsqrt(variance + epsilon) * scale; y = (x - mean) * inv + offset``.

The torch-op backend serves every device. A faster backend registers itself for a device type
with :func:`register_backend`; it must be differentiable (autograd) for both primitives.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class Moments(NamedTuple):
    mean: torch.Tensor
    variance: torch.Tensor
    total_weight: torch.Tensor


class BatchNormBackend(Protocol):
    name: str

    def moments(
        self, x: torch.Tensor, reduce_dims: tuple[int, ...], weights: torch.Tensor | None
    ) -> Moments: ...

    def normalize(
        self,
        x: torch.Tensor,
        mean: torch.Tensor,
        variance: torch.Tensor,
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        epsilon: float,
    ) -> torch.Tensor: ...


def divide_no_nan(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` with 0 where the denominator is 0, as tf.math.divide_no_nan."""
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / safe)


def _accumulator(x: torch.Tensor) -> torch.dtype:
    # MPS has no float64; it keeps float32 accumulation.
    return x.dtype if x.device.type == "mps" else torch.float64


class TorchOpsBackend:
    """Composed torch operations: runs on every device and is the reference for other backends."""

    name = "torch"

    def moments(
        self, x: torch.Tensor, reduce_dims: tuple[int, ...], weights: torch.Tensor | None
    ) -> Moments:
        if not reduce_dims:
            # torch reads dim=() as "every dim"; reducing over nothing leaves each value its own mean.
            ones = (
                torch.ones_like(x) if weights is None else weights.to(x.dtype) + torch.zeros_like(x)
            )
            return Moments(x * (ones > 0), torch.zeros_like(x), ones)
        if weights is None:
            # A float64 accumulator makes the float32 mean correctly rounded; with |mean| >> std
            # (1000 + 0.01 * randn) its rounding is the error that dominates everything after.
            mean = x.mean(dim=reduce_dims, keepdim=True, dtype=_accumulator(x)).to(x.dtype)
            # tf.nn.moments: the centred square uses stop_gradient(mean); the gradient is the same.
            variance = (x - mean.detach()).square().mean(dim=reduce_dims, keepdim=True)
            count = torch.full_like(mean, x.numel() / max(mean.numel(), 1)).detach()
            return Moments(mean, variance, count)
        weights = weights.to(x.dtype)
        count = (weights + torch.zeros_like(x)).sum(dim=reduce_dims, keepdim=True)
        weighted_sum = (weights * x).sum(dim=reduce_dims, keepdim=True, dtype=_accumulator(x))
        mean = divide_no_nan(weighted_sum.to(x.dtype), count)
        squared = (weights * (x - mean).square()).sum(dim=reduce_dims, keepdim=True)
        return Moments(mean, divide_no_nan(squared, count), count.detach())

    def normalize(
        self,
        x: torch.Tensor,
        mean: torch.Tensor,
        variance: torch.Tensor,
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        epsilon: float,
    ) -> torch.Tensor:
        inv = torch.rsqrt(variance + epsilon)
        if scale is not None:
            inv = inv * scale
        # (x - mean) * inv rather than tf's x * inv + (offset - mean * inv): the same value, but
        # without cancelling two large terms when |mean| >> std (e.g. 1000 + 0.01 * randn).
        centred = (x - mean) * inv
        return centred if offset is None else centred + offset


TORCH_OPS = TorchOpsBackend()
_BACKENDS: dict[str, BatchNormBackend] = {}


def register_backend(device_type: str, backend: BatchNormBackend | None) -> None:
    """Use ``backend`` for tensors on ``device_type`` ("cpu", "cuda", ...); ``None`` restores torch ops."""
    if backend is None:
        _BACKENDS.pop(device_type, None)
    else:
        _BACKENDS[device_type] = backend


def backend_for(x: torch.Tensor) -> BatchNormBackend:
    return _BACKENDS.get(x.device.type, TORCH_OPS)
