"""``diagnose``: find the batch-norm layers whose statistics are wrong, and say why."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from batchnorm.layers import BatchNormalization
from batchnorm.tools import _batch_norm_modules as bn
from batchnorm.tools._diagnosis_report import DiagnosisReport, LayerDiagnosis, variance_findings
from batchnorm.tools._model_copy import model_copy
from batchnorm.tools._population_statistics import (
    Forward,
    PopulationStatistics,
    _default_forward,
    check_model_and_batches,
    collect_population_statistics,
    in_place_input_copied,
)


def diagnose(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    steps: int | Mapping[str, int] | None = None,
    progress: bool = False,
    forward: Forward | None = None,
) -> DiagnosisReport:
    """One row per batch norm: is its state sound, does it match the data, is it stable?

    For each layer (ours and torch's) the report gives
    (see :class:`~batchnorm.LayerDiagnosis` for the exact definitions):

    - channels whose stored variance is NaN, Inf, negative or zero (or whose mean is not finite);
    - the distance between the moving statistics and the population statistics recomputed
      exactly over ``batches`` (as :func:`batchnorm.recalibrate` would, nothing written):
      mean shift in population standard deviations, variance ratio;
    - the train-vs-inference gap on the first batch: the RMS of the difference between the
      output with batch statistics and with moving statistics, divided by ``|gamma|``;
    - frozen but still updating: gamma/beta have ``requires_grad=False`` but the moving
      statistics changed when the batches ran through a copy of the model in its current mode
      (``model.train()`` re-enabled them: use :func:`batchnorm.freeze`);
    - the smallest batch or ghost batch seen (fewer than 8 samples is flagged);
    - momentum whose horizon ``1 / (1 - momentum)`` (Keras convention) exceeds the steps taken
      (torch's ``num_batches_tracked``, or ``steps``), unless the moving statistics already
      match the population (after :func:`batchnorm.recalibrate`).

    Limits flagged: mean shift > 0.25 and variance ratio > 1.5 (each widened by three standard
    errors of the population estimate), gap > 0.5 (widened by two standard errors of batch
    statistics, ``sqrt(1.5 / n)``), batch < 8: see :attr:`LayerDiagnosis.limits`.
    Pass batches like the training batches (same size), as many as you can afford. The model is
    not changed: both passes run on deep copies (the current-mode pass on one, the population
    pass on another, which restores every buffer and mode; so diagnose holds the model three
    times over).

    Args:
        model: a model holding batch norms.
        batches: iterable of batches, as for :func:`batchnorm.recalibrate`.
        num_batches: use at most this many batches.
        steps: training steps taken, for layers that do not count them (ours): an int for all
            layers or ``{layer_name: steps}``.
        progress: draw a progress bar on stderr when it is a terminal.
        forward: optional ``forward(model, batch)`` running one batch.

    Returns:
        A :class:`~batchnorm.DiagnosisReport`: ``print(report)`` shows a table,
        ``report.problems`` lists the findings, ``report.to_dict()`` is JSON-ready.

    Example:
        >>> report = batchnorm.diagnose(model, [next(iter(loader))[0] for _ in range(4)])
        >>> print(report)  # doctest: +SKIP
    """
    layers = check_model_and_batches(model, batches, num_batches, "diagnose", progress, forward)
    _check_steps(steps, [name for name, _ in layers])
    current = model_copy(model)
    current_layers = dict(bn.batch_norm_modules(current))
    for module in current_layers.values():
        # An in-place layer training in the current mode would write over the caller's batch,
        # which the population pass then read.
        module.register_forward_pre_hook(in_place_input_copied, with_kwargs=True)
    before = {name: _statistics_copy(module) for name, module in current_layers.items()}
    run = _default_forward if forward is None else forward
    gaps: dict[str, tuple[float | None, int]] = {}

    def run_both(target: nn.Module, batch: Any) -> Any:
        run(current, batch)
        return run(target, batch)

    # The population pass runs on a copy too: a layer not built yet would be built by it (its
    # axis, fused path and weights decided). The rows read that copy, whose buffers the pass
    # restores: for a built layer the model's values, for one not built yet those it builds with.
    measured = model_copy(model)
    measured_layers = dict(bn.batch_norm_modules(measured))
    population = collect_population_statistics(
        measured,
        batches,
        num_batches=num_batches,
        progress=progress,
        label="diagnose",
        forward=run_both,
        observe=lambda name, module, args, kwargs: gaps.__setitem__(
            name, _train_inference_gap(module, args, kwargs)
        ),
    )
    if population.batches == 0:
        raise ValueError("`batches` is empty: diagnose needs at least one batch.")
    rows = []
    for name, original in layers:
        module = measured_layers[name]
        row = _static_row(name, module, _steps_for(name, original, steps))
        statistics = population.statistics.get(name)
        if statistics is not None:
            _add_distances(row, module, statistics)
        row.train_inference_gap, row.gap_samples = gaps.get(name, (None, None))
        row.smallest_batch = population.smallest_batch.get(name)
        saved = before[name]
        updated = saved is not None and _changed(saved, current_layers[name])
        row.frozen_but_updating = _looks_frozen(module) and updated
        rows.append(row)
    return DiagnosisReport(rows, population.batches)


def _check_steps(steps: Any, names: list[str]) -> None:
    unknown = [key for key in steps if key not in names] if isinstance(steps, Mapping) else []
    if unknown:
        raise ValueError(
            f"`steps` names layers the model does not hold: {unknown}; its batch norms are "
            f"{names}. Received: steps={steps!r}"
        )
    values = list(steps.values()) if isinstance(steps, Mapping) else [steps]
    for value in values:
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise ValueError(
                "`steps` must be a non-negative int, a {layer: int} mapping or None. "
                f"Received: steps={steps!r}"
            )


def _steps_for(name: str, module: nn.Module, steps: Any) -> int | None:
    given = steps.get(name) if isinstance(steps, Mapping) else steps
    return bn.steps_taken(module) if given is None else int(given)


def _static_row(name: str, module: nn.Module, steps: int | None) -> LayerDiagnosis:
    buffers = bn.statistics_buffers(module)
    channels = int(buffers[0].numel()) if buffers is not None else _channels(module)
    row = LayerDiagnosis(name=name, kind=bn.kind(module), channels=channels, steps=steps)
    if buffers is not None:
        for key, value in variance_findings(*buffers).items():
            setattr(row, key, value)
        row.momentum = bn.keras_momentum(module)
        if row.momentum is not None:
            row.horizon = bn.averaging_horizon(row.momentum)
    return row


def _channels(module: nn.Module) -> int:
    return int(getattr(module, "num_features", 0) or 0)


def _add_distances(
    row: LayerDiagnosis, module: nn.Module, statistics: PopulationStatistics
) -> None:
    buffers = bn.statistics_buffers(module)
    if buffers is None or not bool((statistics.count > 0).all()):
        return
    epsilon = bn.epsilon(module)
    mean = buffers[0].detach().to(torch.float64).reshape(-1).cpu()
    variance = buffers[1].detach().to(torch.float64).reshape(-1).cpu()
    population_mean = statistics.mean.reshape(-1).cpu()
    population_variance = statistics.variance(bn.stores_unbiased_variance(module)).reshape(-1).cpu()
    shift = (mean - population_mean).abs() / torch.sqrt(population_variance + epsilon)
    ratio = (variance + epsilon) / (population_variance + epsilon)
    row.mean_shift = float(shift.max())
    row.samples = round(float(statistics.count.min()))
    row.variance_ratio = float(torch.maximum(ratio, 1 / ratio).max())


@torch.no_grad()
def _train_inference_gap(module: nn.Module, args: tuple, kwargs: dict) -> tuple[float | None, int]:
    """RMS of (y_train - y_inference) / |gamma| for one call, on a copy of the layer, and the
    samples per channel it was measured on."""
    x = args[0] if args else kwargs.get("x", kwargs.get("input"))
    if not isinstance(x, torch.Tensor) or not bn.normalises_with_moving_statistics(module):
        return None, 0
    axes = bn.channel_axes(module, x.ndim)
    channels = math.prod(x.shape[a] for a in axes)
    samples = x.numel() // channels if channels else 0
    clone = model_copy(module)
    if isinstance(clone, BatchNormalization):
        mask = args[2] if len(args) > 2 else kwargs.get("mask")
        if clone.memory == "in_place":  # its training call writes over the layer's real input
            x = x.clone()
        y_inference = clone.forward(x, training=False, mask=mask)
        y_train = clone.forward(x, training=True, mask=mask)
    else:
        # The flag only: eval()/train() recurse into the batch norm's children (timm's
        # BatchNormAct2d holds a dropout as `drop`), and train() switched that dropout on.
        clone.training = False
        y_inference = clone.forward(x)
        clone.training = True
        y_train = clone.forward(x)
    difference = (y_train.to(torch.float64) - y_inference.to(torch.float64)).cpu()
    gamma, _ = bn.affine(module)
    if gamma is not None:
        view = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
        scale = gamma.detach().to(torch.float64).abs().reshape(view).cpu()
        difference = torch.where(scale > 0, difference / scale.clamp(min=1e-300), 0.0)
    if difference.numel() == 0:
        return None, 0
    return float(torch.sqrt((difference**2).mean())), samples


def _statistics_copy(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    buffers = bn.statistics_buffers(module)
    return None if buffers is None else (buffers[0].detach().clone(), buffers[1].detach().clone())


def _changed(before: tuple[torch.Tensor, torch.Tensor], module: nn.Module) -> bool:
    after = bn.statistics_buffers(module)
    if after is None:
        return False
    for old, new in zip(before, after, strict=True):
        same = (old == new) | (torch.isnan(old) & torch.isnan(new))
        if not bool(same.all()):
            return True
    return False


def _looks_frozen(module: nn.Module) -> bool:
    parameters = bn.affine_parameters(module)
    return bool(parameters) and not any(p.requires_grad for p in parameters)
