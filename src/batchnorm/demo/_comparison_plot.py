"""The per-epoch figure of a comparison: the three measures side by side, accuracy over loss.

One column per measure (training; validation on the moving averages; validation on population
statistics, when a run has batch norm), accuracy in the top row and mean cross-entropy (log scale)
in the bottom row, one colour per run in every panel, so that each column shows one race. Rows
share their y range; epochs are whole numbers on every x axis. A dotted line marks the target
accuracy, and the one legend sits below the panels.

Example:
    >>> runs = {"a": {"train_loss": [1.0, 0.5], "val_loss": [1.1, 0.6],
    ...               "train_accuracy": [0.5, 0.8], "val_accuracy": [0.4, 0.7]}}
    >>> figure = comparison_figure(runs, {"a": "run a"}, "demo", target=0.95)
    >>> [axes.get_title() for axes in figure.axes[:2]]
    ['training (batch statistics)', 'validation, moving averages']
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchnorm.demo._measures import (
    POPULATION_STATISTICS,
    Measure,
    accuracy_series,
    loss_series,
    measures_of,
    runs_with,
)
from batchnorm.demo._plots import lay_out, pyplot, save
from batchnorm.demo._training import History


def _column_title(runs: Mapping[str, History], labels: Mapping[str, str], measure: Measure) -> str:
    plain = [labels[name] for name in runs if name not in runs_with(runs, measure)]
    if measure is not POPULATION_STATISTICS or not plain:
        return measure.title
    return f"{measure.title}\n({', '.join(plain)}: no batch norm, same as its validation)"


def comparison_figure(
    runs: Mapping[str, History],
    labels: Mapping[str, str],
    title: str,
    target: float | None = None,
) -> Any:
    """The figure (not saved): accuracy and loss per epoch of each run, one column per measure."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    measures = measures_of(runs)
    figure, axes = plt.subplots(
        2, len(measures), figsize=(5 * len(measures), 7.4), sharey="row", squeeze=False
    )
    epochs = max(len(history["val_accuracy"]) for history in runs.values())
    handles = []
    for column, measure in enumerate(measures):
        accuracy_axes, loss_axes = axes[0, column], axes[1, column]
        for index, (name, history) in enumerate(runs.items()):
            x = range(1, len(history["val_accuracy"]) + 1)
            style = {"color": f"C{index}", "marker": "o", "markersize": 3, "label": labels[name]}
            line = accuracy_axes.plot(x, accuracy_series(history, measure), **style)[0]
            loss_axes.plot(x, loss_series(history, measure), **style)
            if column == 0:
                handles.append(line)
        if target is not None:
            mark = accuracy_axes.axhline(
                target, color="grey", linestyle=":", linewidth=1, label=f"target {target:.1%}"
            )
            if column == 0:
                handles.append(mark)
        accuracy_axes.set(title=_column_title(runs, labels, measure), ylabel="accuracy")
        loss_axes.set(
            title=f"{measure.name}: loss", ylabel="cross-entropy (log scale)", yscale="log"
        )
        for panel in (accuracy_axes, loss_axes):
            panel.set(xlabel="epoch", xlim=(0.5, epochs + 0.5))
            panel.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
            panel.tick_params(which="both", labelleft=True)  # sharey hides them; keep every scale
            panel.grid(alpha=0.3)
    lay_out(figure, handles, title)
    return figure


def plot_histories(
    runs: Mapping[str, History],
    labels: Mapping[str, str],
    path: Path,
    title: str,
    target: float | None = None,
) -> Path:
    """Draw :func:`comparison_figure` and write it as a PNG at ``path``; returns the path."""
    return save(comparison_figure(runs, labels, title, target), path)
