"""The operations a kernel backend provides, and the registry that picks one per device.

The layer step (:func:`batchnorm.functional.batch_norm`) calls three primitives, each on the input
``x`` with its channel ``axes`` (sorted) and per-channel parameters (shape ``channel_shape``):

- ``batch_moments(x, axes, weights, ghost_batches)``: per ghost batch and channel, the mean
  ``sum(w x) / sum(w)``, the biased variance ``sum(w (x - mean)^2) / sum(w)`` and ``sum(w)``
  (``w = 1`` without weights; 0 / 0 gives 0), each of shape ``(ghost_batches, *channel_shape)``.
  Ghost batch ``j`` holds samples ``{j, j + G, j + 2G, ...}`` (tf-keras' interleaving).
- ``normalize_batch(x, axes, moments, scale, offset, epsilon, weights, ghost_batches)``:
  ``y = (x - mean) * rsqrt(variance + epsilon) * scale + offset`` with the moments just computed;
  its gradient treats them as functions of ``x`` (the full batch-norm backward).
- ``normalize(x, axes, mean, variance, scale, offset, epsilon)``: the same with given statistics
  (inference), differentiable in ``x``, ``scale`` and ``offset``.

``normalize_batch`` and ``normalize`` may take an ``activation`` keyword
(:class:`batchnorm.functional._activation.Activation`): the output is then ``f(y)``, computed in
the same pass where the backend can. The step passes it only when an activation is set.

A backend may also provide ``train_in_place(x, axis, moving, scale, offset, weights,
ghost_batches, momentum, epsilon, unbiased)``: the training output over one channel axis with the
moving statistics stepped in place, in one native call (the layer's eager path; see
:mod:`batchnorm.functional._direct_step`). With Batch Renormalization the call also gets the
keyword ``renorm`` (:class:`batchnorm.functional._cpu_operations.RenormStep`: the renorm buffers,
stepped in the same call, and the settings); without renorm it is not passed.

The torch-op backend (:mod:`batchnorm.functional._torch_ops`) serves every device and is the
reference; faster backends register for a device type (:mod:`batchnorm.functional._dispatch`).
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
    # False: float16/bfloat16 inputs are converted to float32 once, before the first operation.
    reads_half_precision: bool

    def supports(self, x: torch.Tensor) -> bool: ...

    def batch_moments(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        weights: torch.Tensor | None,
        ghost_batches: int,
    ) -> Moments: ...

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
    ) -> torch.Tensor: ...

    def normalize(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        mean: torch.Tensor,
        variance: torch.Tensor,
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        epsilon: float,
    ) -> torch.Tensor: ...
