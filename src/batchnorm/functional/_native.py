"""The native backend: torch's own batch-norm kernels where they express the call, composed torch
ops for the rest.

``torch.batch_norm`` dispatches to cuDNN or the native CUDA kernels, MPS, XPU or the CPU kernel,
with its backward; it normalises one channel axis at dim 1 (a channels-last tensor is read in
place). It expresses a training or inference step with one channel axis, no mask, no ghost batches,
no renorm and per-channel scale and offset, on a batch with at least two elements per channel.
Everything else runs the composed ops (:func:`~batchnorm.functional._composed.composed_ops`: eager,
or compiled after ``compile_composed()``).

The batch statistics come from the same kernel call: running buffers that start at 0 and step
with torch's momentum 1 hold, after the call, the batch mean and torch's unbiased variance
``Var[x] * n / (n - 1)``; the biased variance is that times ``(n - 1) / n``. The layer's own
moving-average rules (Keras EMA, biased or unbiased, debiased) are applied to them afterwards,
exactly as for the other backends.

Numerics: the kernels accumulate in float32 for float16/bfloat16/float32 inputs on GPUs
(Welford's update, stable for ``|mean| >> std``) and in float32 sums on the CPU for float32 input,
which loses the variance of ``1000 + 0.01 * randn`` data to 1e-4 relative error and overflows the
sum of squares past 1e19. So the native backend is the default on GPUs and other accelerators, and
on the CPU only when chosen (``BATCHNORM_BACKEND=native`` or ``register_backend``), where the Numba
kernels are exact and faster.
"""

from __future__ import annotations

import torch

from batchnorm.functional._activation import Activation, activate
from batchnorm.functional._backend import Moments
from batchnorm.functional._composed import composed_ops

_NATIVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _channels_at_dim_1(x: torch.Tensor, axis: int) -> torch.Tensor:
    # A view: NHWC / NLC data with axis=-1 becomes a channels-last (strided) NCHW / NCL tensor.
    return x if axis == 1 else x.movedim(axis, 1)


class NativeBackend:
    """``torch.batch_norm`` where it expresses the call; the composed torch ops otherwise."""

    name = "native"
    reads_half_precision = True

    def supports(self, x: torch.Tensor) -> bool:
        return True

    def batch_moments(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        weights: torch.Tensor | None,
        ghost_batches: int,
    ) -> Moments:
        return composed_ops().batch_moments(x, axes, weights, ghost_batches)

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
        return composed_ops().normalize_batch(
            x, axes, moments, scale, offset, epsilon, weights, ghost_batches, activation
        )

    def expresses(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        parameters: tuple[torch.Tensor | None, ...],
        training: bool,
    ) -> bool:
        """One channel axis, a floating dtype, per-channel ``parameters`` (scale, offset and, in
        inference, the statistics) in ``x``'s compute dtype; in training, at least two elements
        in every channel and a scale and offset that are plain vectors.

        A channel of one element has variance 0 and output ``offset`` exactly (and input gradient
        exactly 0); the kernels leave rounding noise there, so those batches take the composed ops.
        """
        if len(axes) != 1 or x.ndim < 2 or x.dtype not in _NATIVE_DTYPES:
            return False
        channels = x.shape[axes[0]]
        statistic_dtype = torch.promote_types(x.dtype, torch.float32)
        if any(
            t is not None and (t.dtype != statistic_dtype or t.shape != (channels,))
            for t in parameters
        ):
            return False
        return not training or (channels > 0 and x.numel() // channels > 1)

    def train_batch(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        epsilon: float,
        activation: Activation | None = None,
    ) -> tuple[torch.Tensor, Moments]:
        """The training output ``(x - mean) / sqrt(var + epsilon) * scale + offset`` with the
        batch moments, from one native call; differentiable (the native backward) in x, scale and
        offset. Only for calls that :meth:`expresses` in training."""
        axis = axes[0]
        channels = x.shape[axis]
        elements = x.numel() // channels
        statistic_dtype = torch.promote_types(x.dtype, torch.float32)
        mean = torch.zeros(channels, dtype=statistic_dtype, device=x.device)
        unbiased_variance = torch.zeros_like(mean)
        y = torch.batch_norm(
            _channels_at_dim_1(x, axis),
            scale,
            offset,
            mean,
            unbiased_variance,
            True,
            1.0,  # torch's momentum: the running buffers become the batch statistics
            epsilon,
            torch.backends.cudnn.enabled,
        )
        variance = unbiased_variance * ((elements - 1) / elements)
        total_weight = torch.full_like(mean, float(elements))
        moments = Moments(mean.unsqueeze(0), variance.unsqueeze(0), total_weight.unsqueeze(0))
        return activate(y, activation).movedim(1, axis), moments

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
        """Inference: ``(x - mean) / sqrt(variance + epsilon) * scale + offset``, natively where
        the statistics are plain per-channel tensors (the native backward does not differentiate
        them); composed otherwise."""
        if (
            not self.expresses(x, axes, (mean, variance, scale, offset), training=False)
            or mean.requires_grad
            or variance.requires_grad
        ):
            return composed_ops().normalize(
                x, axes, mean, variance, scale, offset, epsilon, activation
            )
        axis = axes[0]
        y = torch.batch_norm(
            _channels_at_dim_1(x, axis),
            scale,
            offset,
            mean,
            variance,
            False,
            0.0,
            epsilon,
            torch.backends.cudnn.enabled,
        )
        return activate(y, activation).movedim(1, axis)


NATIVE = NativeBackend()
