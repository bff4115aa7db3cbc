"""The three measures a comparison reports for each run, epoch by epoch, and their history keys.

1. **Training** (``train_loss``, ``train_accuracy``): the averages over an epoch's batches, in
   training mode, where batch norm normalises each batch with that batch's own mean and variance.
   How fast the network learns.
2. **Validation on the moving averages** (``val_loss``, ``val_accuracy``): after the epoch, in
   inference mode, where batch norm uses its moving averages, updated once per training step as
   ``moving = momentum * moving + (1 - momentum) * batch_statistic`` (Keras' convention; torch's
   ``momentum`` is ``1 - momentum`` here). This is what Keras' ``fit`` reports.
3. **Validation on population statistics** (``population_val_loss``, ``population_val_accuracy``):
   the same validation after :func:`batchnorm.recalibrate` has replaced the moving averages by the
   mean and variance of each channel over the whole training set (on a copy of the network), the
   inference of Ioffe & Szegedy (2015), Algorithm 2. Only networks with batch norm have it; a
   network without batch norm has no statistics, and its validation is the same on both.

Example:
    >>> history = {"val_loss": [0.3], "val_accuracy": [0.9]}
    >>> accuracy_series(history, POPULATION_STATISTICS)  # no batch norm: the plain validation
    [0.9]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from batchnorm.demo._training import History


class Measure(NamedTuple):
    """One way of measuring a run: a short name, a title for tables and plots, its history keys."""

    name: str
    title: str
    loss_key: str
    accuracy_key: str


TRAINING = Measure("training", "training (batch statistics)", "train_loss", "train_accuracy")
MOVING_AVERAGES = Measure(
    "moving averages", "validation, moving averages", "val_loss", "val_accuracy"
)
POPULATION_STATISTICS = Measure(
    "population statistics",
    "validation, population statistics",
    "population_val_loss",
    "population_val_accuracy",
)
MEASURES = (TRAINING, MOVING_AVERAGES, POPULATION_STATISTICS)
POPULATION_KEYS = (POPULATION_STATISTICS.loss_key, POPULATION_STATISTICS.accuracy_key)


def has_measure(history: History, measure: Measure) -> bool:
    """Whether the run recorded ``measure`` itself (population statistics: only with batch norm)."""
    return measure.accuracy_key in history


def _series(history: History, measure: Measure, key: str) -> list[float]:
    if key in history:
        return history[key]
    if measure is POPULATION_STATISTICS:
        # Without batch norm there are no statistics to recalibrate: inference is unchanged.
        fallback = MOVING_AVERAGES.loss_key if key == measure.loss_key else "val_accuracy"
        return history[fallback]
    raise KeyError(f"the history has no {key!r}. Received: keys {sorted(history)}")


def accuracy_series(history: History, measure: Measure) -> list[float]:
    """The run's accuracy per epoch on ``measure`` (see the module docstring for the fallback)."""
    return _series(history, measure, measure.accuracy_key)


def loss_series(history: History, measure: Measure) -> list[float]:
    """The run's mean cross-entropy per epoch on ``measure``."""
    return _series(history, measure, measure.loss_key)


def runs_with(runs: Mapping[str, History], measure: Measure) -> list[str]:
    """The names of the runs that recorded ``measure`` themselves, in order."""
    return [name for name, history in runs.items() if has_measure(history, measure)]


def measures_of(runs: Mapping[str, History]) -> tuple[Measure, ...]:
    """The measures to report: population statistics only when some run has batch norm."""
    if runs_with(runs, POPULATION_STATISTICS):
        return MEASURES
    return (TRAINING, MOVING_AVERAGES)
