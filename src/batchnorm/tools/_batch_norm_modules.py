"""Batch-norm modules found in a model, ours and torch's, behind one set of accessors.

The model tools (freeze, fold, recalibrate, diagnose) treat :class:`BatchNormalization` and every
``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, the lazy ones once
initialised) alike through the functions here.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.functional._validation import normalize_axes
from batchnorm.layers import BatchNormalization
from batchnorm.layers._parametrized import affine_parameters_behind

TorchBatchNorm = _BatchNorm


def is_batch_norm(module: object) -> bool:
    """True for our layer and torch's batch norms (BatchNorm1d/2d/3d, SyncBatchNorm, lazy)."""
    return isinstance(module, (BatchNormalization, _BatchNorm))


def is_frozen_batch_norm(module: object) -> bool:
    """torchvision's ``FrozenBatchNorm2d`` (detection backbones), or detectron2's and DETR's of
    the same name: buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` and ``eps``,
    always normalising with them. Recognised by name and attributes (torchvision not needed)."""
    return (
        type(module).__name__ == "FrozenBatchNorm2d"
        and isinstance(module, nn.Module)
        and isinstance(getattr(module, "eps", None), (int, float))
        and all(
            isinstance(module._buffers.get(name), torch.Tensor)
            for name in ("weight", "bias", "running_mean", "running_var")
        )
    )


def batch_norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every batch norm in ``model`` (``""`` for the model itself)."""
    return [(name, module) for name, module in model.named_modules() if is_batch_norm(module)]


def display_name(name: str) -> str:
    return name or "<model>"


def kind(module: nn.Module) -> str:
    return type(module).__name__


def statistics_buffers(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The moving mean and variance buffers, or None for a torch BN without running statistics."""
    if isinstance(module, BatchNormalization):
        if not module.built:
            return None
        return module.moving_mean, module.moving_variance
    mean, variance = getattr(module, "running_mean", None), getattr(module, "running_var", None)
    if not isinstance(mean, torch.Tensor) or not isinstance(variance, torch.Tensor):
        return None
    if isinstance(mean, nn.parameter.UninitializedBuffer):
        return None
    return mean, variance


def epsilon(module: nn.Module) -> float:
    if isinstance(module, BatchNormalization):
        return float(module.epsilon)
    return float(module.eps)  # type: ignore[arg-type]


def affine(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(gamma, beta)``; None where the layer has no scale or no offset."""
    if isinstance(module, BatchNormalization):
        return getattr(module, "gamma", None), getattr(module, "beta", None)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        weight if isinstance(weight, torch.Tensor) else None,
        bias if isinstance(bias, torch.Tensor) else None,
    )


def named_affine_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters that gamma and beta come from, with their paths in ``module``: themselves,
    or the originals of their ``torch.nn.utils.parametrize`` parametrizations."""
    names = ("gamma", "beta") if isinstance(module, BatchNormalization) else ("weight", "bias")
    return affine_parameters_behind(module, names)


def affine_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in named_affine_parameters(module)]


def stores_unbiased_variance(module: nn.Module) -> bool:
    """Whether the moving variance holds ``Var * n / (n - 1)`` (torch always; ours per its options)."""
    if isinstance(module, BatchNormalization):
        return module._stores_unbiased_variance()
    return True


def keras_momentum(module: nn.Module) -> float | None:
    """Momentum in Keras' convention (weight of the old value); None for a cumulative average."""
    if isinstance(module, BatchNormalization):
        if module.moving_average == "debiased":
            return None
        return float(module.momentum)
    momentum = getattr(module, "momentum", None)
    return None if momentum is None else 1.0 - float(momentum)


def averaging_horizon(momentum: float | None) -> float:
    """``1 / (1 - momentum)`` (Keras convention): the steps an exponential average looks back."""
    if momentum is None:
        return 1.0
    return math.inf if momentum >= 1.0 else 1.0 / (1.0 - momentum)


def steps_taken(module: nn.Module) -> int | None:
    """Training steps recorded by the layer (torch's num_batches_tracked), else None."""
    tracked = getattr(module, "num_batches_tracked", None)
    if isinstance(tracked, torch.Tensor) and tracked.numel() == 1:
        return int(tracked.item())
    return None


def channel_axes(module: nn.Module, rank: int) -> tuple[int, ...]:
    """The channel axes for an input of ``rank`` (torch's batch norms: axis 1)."""
    if isinstance(module, BatchNormalization):
        if module._axes is not None and module._input_rank == rank:
            return module._axes
        return normalize_axes(module.axis, rank)
    return (1,) if rank > 1 else (0,)


def normalises_with_moving_statistics(module: nn.Module) -> bool:
    """Whether inference (eval mode) uses the stored statistics rather than the batch's."""
    if statistics_buffers(module) is None:
        return False
    if isinstance(module, BatchNormalization):
        return module.use_global_stats is not False
    return True


def uses_batch_statistics_in_training(module: nn.Module) -> bool:
    """False for layers frozen for training: ours with use_global_stats=True or trainable=False,
    torch's frozen by :func:`batchnorm.freeze`."""
    if isinstance(module, BatchNormalization):
        return module.use_global_stats is not True and module.trainable
    return not getattr(type(module), "frozen_statistics", False)
