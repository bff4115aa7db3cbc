"""The summary of a comparison in plain words: who reached the target first on each measure.

For each measure (training, validation on the moving averages, validation on population
statistics) it counts the epochs each run needed to reach the target accuracy, says which run got
there first, and lists the final accuracies. The moving-average note is added only where it
applies: a run whose validation reached the target later on its moving averages than on population
statistics. Each training step does ``moving = momentum * moving + (1 - momentum) * batch_statistic``,
so after ``t`` steps a fraction ``momentum**t`` of the averages' initial values (mean 0, variance 1)
remains, and the rest mixes the statistics of about the last ``1 / (1 - momentum)`` steps, computed
with older weights.

Example:
    >>> runs = {"a": {"train_accuracy": [0.9, 0.97], "val_accuracy": [0.96, 0.97]},
    ...         "b": {"train_accuracy": [0.96, 0.99], "val_accuracy": [0.5, 0.9]}}
    >>> print(plain_summary(runs, {"a": "run a", "b": "run b"}, 0.95))  # doctest: +NORMALIZE_WHITESPACE
    In words: on training accuracy, run b reached 95.0% first (epoch 1; run a at epoch 2).
    On validation accuracy with the moving averages (as Keras evaluates), run a reached 95.0%
    first (epoch 1; run b did not in 2 epochs).
"""

from __future__ import annotations

from collections.abc import Mapping

from batchnorm.demo._measures import (
    MEASURES,
    MOVING_AVERAGES,
    POPULATION_STATISTICS,
    TRAINING,
    Measure,
    accuracy_series,
    measures_of,
    runs_with,
)
from batchnorm.demo._training import History, epochs_to_reach

_PHRASES = {
    TRAINING: "training accuracy",
    MOVING_AVERAGES: "validation accuracy with the moving averages (as Keras evaluates)",
    POPULATION_STATISTICS: "validation accuracy with population statistics",
}


def _epochs(history: History) -> int:
    return len(history["val_accuracy"])


def reached(runs: Mapping[str, History], target: float) -> dict[Measure, dict[str, int | None]]:
    """``{measure: {run: first epoch at or above target, or None}}`` for each reported measure."""
    return {
        measure: {
            name: epochs_to_reach(accuracy_series(history, measure), target)
            for name, history in runs.items()
        }
        for measure in measures_of(runs)
    }


def _race(
    epochs: Mapping[str, int | None], labels: Mapping[str, str], goal: str, total: int
) -> str:
    """Who reached ``goal`` first on one measure, in words."""
    done = {name: epoch for name, epoch in epochs.items() if epoch is not None}
    if not done:
        return f"no run reached {goal} in {total} epochs"
    first = min(done.values())
    leaders = [labels[name] for name, epoch in done.items() if epoch == first]
    others = [
        f"{labels[name]} at epoch {epoch}"
        if epoch is not None
        else f"{labels[name]} did not in {total} epochs"
        for name, epoch in epochs.items()
        if epoch != first
    ]
    if len(leaders) > 1:
        text = f"{' and '.join(leaders)} reached {goal} at the same epoch ({first}"
    else:
        text = f"{leaders[0]} reached {goal} first (epoch {first}"
    return text + ("; " + ", ".join(others) if others else "") + ")"


def plain_summary(runs: Mapping[str, History], labels: Mapping[str, str], target: float) -> str:
    """One paragraph: on each measure, which run reached ``target`` accuracy first."""
    total = max(_epochs(history) for history in runs.values())
    text = " ".join(
        f"On {_PHRASES[measure]}, {_race(epochs, labels, f'{target:.1%}', total)}."
        for measure, epochs in reached(runs, target).items()
    )
    return "In words: " + text[0].lower() + text[1:]


def epochs_table(runs: Mapping[str, History], labels: Mapping[str, str], target: float) -> str:
    """The epochs each run needed to reach ``target`` on each measure ("-": not reached)."""
    names = list(runs)
    width = max(12, *(len(labels[name]) + 2 for name in names))
    first = max(len(measure.title) for measure in MEASURES) + 4
    lines = [
        f"{'Epochs to reach ' + format(target, '.1%') + ' accuracy':<{first}}"
        + "".join(f"{labels[name]:>{width}}" for name in names)
    ]
    for measure, epochs in reached(runs, target).items():
        cells = "".join(
            f"{epochs[name] if epochs[name] is not None else '-':>{width}}" for name in names
        )
        lines.append(f"  {measure.title:<{first - 2}}{cells}")
    return "\n".join(lines)


def final_accuracies(runs: Mapping[str, History], labels: Mapping[str, str]) -> str:
    """Each run's last training and validation accuracies, on every measure it has."""
    with_population = runs_with(runs, POPULATION_STATISTICS)
    lines = ["Final accuracy: training / validation, moving averages / population statistics"]
    for name, history in runs.items():
        population = (
            f"{history[POPULATION_STATISTICS.accuracy_key][-1]:.4f}"
            if name in with_population
            else "-"
        )
        lines.append(
            f"  {labels[name]:<24} {history['train_accuracy'][-1]:.4f} / "
            f"{history['val_accuracy'][-1]:.4f} / {population}"
        )
    return "\n".join(lines)


_VISIBLE_SHARE = 0.005  # below this, "0%" says nothing: the initial values are gone


def _lag(momentum: float, steps_per_epoch: int, last_behind: int) -> str:
    """Why moving averages lag, with the real numbers: their span and their initial values' share."""
    # An exponential average with weight `momentum` spans about 1 / (1 - momentum) steps.
    span = (
        f"they mix the batch statistics of about the last {1 / (1 - momentum):.0f} steps, "
        "computed with older weights"
        if momentum < 1
        else "they average the batch statistics of every step, computed with older weights"
    )
    first = momentum**steps_per_epoch
    if first < _VISIBLE_SHARE:
        return f"{span}; their initial values (mean 0, variance 1) faded within epoch 1"
    held = f"still hold {first:.0%} of their initial values (mean 0, variance 1) after epoch 1"
    share = momentum ** (steps_per_epoch * last_behind)
    if last_behind > 1 and share >= _VISIBLE_SHARE:
        held += f" and {share:.0%} after epoch {last_behind}"
    return f"{span}, and {held}"


def moving_average_notes(
    runs: Mapping[str, History],
    labels: Mapping[str, str],
    target: float,
    steps_per_epoch: int,
    momenta: Mapping[str, float],
) -> list[str]:
    """A note for each run whose moving averages made it reach ``target`` later; else none.

    Args:
        runs, labels, target: as in :func:`plain_summary`.
        steps_per_epoch: training steps (moving-average updates) per epoch.
        momenta: run name -> its batch norms' momentum (Keras' convention).
    """
    notes = []
    for name in runs_with(runs, POPULATION_STATISTICS):
        history = runs[name]
        population = epochs_to_reach(history[POPULATION_STATISTICS.accuracy_key], target)
        moving = epochs_to_reach(history[MOVING_AVERAGES.accuracy_key], target)
        if population is None or (moving is not None and moving <= population):
            continue
        momentum = momenta[name]
        total = _epochs(history)
        late = f"only at epoch {moving}" if moving is not None else f"not in {total} epochs"
        last_behind = (moving - 1) if moving is not None else total
        notes.append(
            f"Note: {labels[name]} reached {target:.1%} validation accuracy at epoch {population} "
            f"on population statistics, but {late} on the moving averages. The moving averages "
            f"lag behind the weights: at momentum {momentum}, with {steps_per_epoch} steps per "
            f"epoch, {_lag(momentum, steps_per_epoch, last_behind)}. After training, "
            "batchnorm.recalibrate(model, training_batches) replaces them by population "
            "statistics; a lower momentum (--momentum 0.9) makes them settle sooner "
            "(see `batchnorm demo modes`)."
        )
    return notes
