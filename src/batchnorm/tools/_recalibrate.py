"""``recalibrate``: replace moving statistics by the exact population statistics (precise BN)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from batchnorm.layers import BatchNormalization
from batchnorm.tools import _batch_norm_modules as bn
from batchnorm.tools._population_statistics import (
    Forward,
    PopulationStatistics,
    check_model_and_batches,
    collect_population_statistics,
)


@dataclasses.dataclass
class RecalibrationResult:
    """What :func:`recalibrate` did.

    Attributes:
        batches: batches run (summed over processes under torch.distributed).
        samples: ``{batch_norm: samples per channel}`` for each layer rewritten (sum of mask
            weights where masks are given).
        skipped: ``{batch_norm: reason}`` for each layer left unchanged.
    """

    batches: int
    samples: dict[str, int]
    skipped: dict[str, str]

    def __str__(self) -> str:
        lines = [f"recalibrated {len(self.samples)} batch norm(s) over {self.batches} batches"]
        lines += [
            f"  {bn.display_name(n)}: {s} samples per channel" for n, s in self.samples.items()
        ]
        lines += [f"  skipped {bn.display_name(n)}: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    progress: bool = True,
    forward: Forward | None = None,
) -> RecalibrationResult:
    """Re-estimate every batch norm's moving statistics as the population statistics of its input.

    The inference statistics of the original batch-norm paper: the mean and variance of each
    channel over every sample of ``batches`` (computed in float64 and pooled exactly across
    batches of any size, not an average of per-batch variances),

    .. math::
        \\mu = \\frac{1}{N} \\sum_i x_i, \\qquad
        \\sigma^2 = \\frac{1}{N - 1} \\sum_i (x_i - \\mu)^2 \\;\\text{(unbiased)} \\;\\text{or}\\;
        \\frac{1}{N} \\sum_i (x_i - \\mu)^2 \\;\\text{(biased)}

    stored with the estimator the layer stores (torch: unbiased; ours:
    ``layer._stores_unbiased_variance()``, tf-keras' rule by default). The model runs under
    ``torch.no_grad`` with its batch norms in training mode (normalising with batch statistics
    and ghost batches, as in training) and every other module in eval mode (no dropout); the
    batch norms' buffers are not updated during the pass and every module's mode is restored.
    Masks passed to our layer weight the samples. With ghost batches the statistics are still
    over all samples: the population the ghost batches are drawn from. With Batch
    Renormalization ``moving_stddev = sqrt(variance + epsilon)``, and ``renorm_mean`` /
    ``renorm_stddev`` become the population mean and ``sqrt(biased variance + epsilon)``.
    Caffe's ``moving_average_weight`` and torch's ``num_batches_tracked`` are kept.

    Frozen layers (ours with ``use_global_stats=True`` or ``trainable=False``, torch's frozen by
    :func:`batchnorm.freeze`) and torch batch norms without running statistics are left
    unchanged and listed in ``skipped``. Under ``torch.distributed`` (when initialised) the
    statistics are merged across all processes, so every rank ends with identical statistics;
    every rank must call it (a rank may have no batches).

    ``torch.optim.swa_utils.update_bn`` looks only for ``torch.nn.modules.batchnorm._BatchNorm``,
    so it skips ``batchnorm.BatchNormalization`` silently (no error, no warning, statistics
    unchanged); use ``batchnorm.recalibrate``, which takes the loaders ``update_bn`` takes (an
    iterable of tensors, or of tuples/lists with the input first, as a
    ``DataLoader(TensorDataset(x))`` or ``DataLoader(TensorDataset(x, y))`` yields) and
    recalibrates torch's batch norms as well. Where ``update_bn`` keeps a cumulative average of
    per-batch statistics (the population mean for equal batch sizes, but the mean of the per-batch
    variances) with every module in training mode, this stores the population variance and keeps
    dropout off.

    Args:
        model: a model holding batch norms (or one batch norm).
        batches: an iterable of batches (a ``DataLoader``, a list, a generator): each a tensor,
            a tuple/list whose first element is the model input (``(input, target)``, or the
            1-element list a ``DataLoader(TensorDataset(x))`` yields), or a dict with the input
            under ``"input"``; tensors are moved to the model's device.
            ``forward(model, batch)`` overrides this.
        num_batches: stop after this many batches (default: all).
        progress: draw a progress bar on stderr when it is a terminal (default True).
        forward: optional ``forward(model, batch)`` running one batch.

    Returns:
        A :class:`RecalibrationResult`.

    Example:
        >>> batchnorm.recalibrate(model, train_loader, num_batches=200)  # doctest: +SKIP
    """
    layers = check_model_and_batches(model, batches, num_batches, "recalibrate", progress, forward)
    population = collect_population_statistics(
        model,
        batches,
        num_batches=num_batches,
        progress=progress,
        label="recalibrate",
        forward=forward,
    )
    if population.batches == 0:
        raise ValueError("`batches` is empty: recalibrate needs at least one batch.")
    samples, skipped = {}, {}
    for name, module in layers:
        statistics = population.statistics.get(name)
        reason = _why_skipped(module, statistics)
        if reason is not None:
            skipped[name] = reason
            continue
        assert statistics is not None
        _write(module, statistics)
        samples[name] = round(float(statistics.count.max()))
    return RecalibrationResult(population.batches, samples, skipped)


def _why_skipped(module: nn.Module, statistics: PopulationStatistics | None) -> str | None:
    if bn.statistics_buffers(module) is None:
        return "no moving statistics (track_running_stats=False or not built)"
    if not bn.uses_batch_statistics_in_training(module):
        return "frozen (statistics fixed until unfrozen)"
    if statistics is None or not bool((statistics.count > 0).any()):
        return "saw no input (not called, or every sample masked)"
    if not bool(torch.isfinite(statistics.mean).all() and torch.isfinite(statistics.m2).all()):
        # Written, NaN moving statistics would make every later output NaN.
        return "its input held NaN or Inf (statistics not finite; nothing written)"
    return None


@torch.no_grad()
def _write(module: nn.Module, statistics: PopulationStatistics) -> None:
    buffers = bn.statistics_buffers(module)
    assert buffers is not None
    moving_mean, moving_variance = buffers
    variance = statistics.variance(bn.stores_unbiased_variance(module))

    def put(target: torch.Tensor, value: torch.Tensor) -> None:
        target.copy_(value.reshape(target.shape).to(dtype=target.dtype, device=target.device))

    put(moving_mean, statistics.mean)
    put(moving_variance, variance)
    if isinstance(module, BatchNormalization) and module.renorm:
        epsilon = bn.epsilon(module)
        put(module.moving_stddev, torch.sqrt(variance + epsilon))
        put(module.renorm_mean, statistics.mean)
        put(module.renorm_stddev, torch.sqrt(statistics.variance(unbiased=False) + epsilon))
