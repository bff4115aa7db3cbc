"""The per-epoch table of a comparison, the three measures side by side, and its JSON file.

The table has one column group per measure (see :mod:`batchnorm.demo._measures`): training,
validation on the moving averages, validation on population statistics. Inside a group each run
shows its mean cross-entropy (``loss``) and its accuracy (``acc``). Runs without batch norm have
no population statistics, so they appear only in the first two groups.

Example:
    >>> runs = {"with_bn": {"train_loss": [0.5], "val_loss": [0.4],
    ...                     "train_accuracy": [0.8], "val_accuracy": [0.9]}}
    >>> print(history_table(runs, {"with_bn": "with BN"}))
          | training (batch statistics) | validation, moving averages
          |           with BN           |           with BN
    epoch |          loss     acc       |          loss     acc
    -----------------------------------------------------------------
        1 |        0.5000  0.8000       |        0.4000  0.9000
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from batchnorm.demo._measures import MEASURES, POPULATION_STATISTICS, runs_with
from batchnorm.demo._training import History

_LOSS_WIDTH = 8
_ACCURACY_WIDTH = 8
_CELL = _LOSS_WIDTH + _ACCURACY_WIDTH
_SEPARATOR = " | "


def _format_loss(value: float) -> str:
    # Four decimals as Keras prints them; significant digits once raw inputs make losses large.
    return f"{value:.4f}" if abs(value) < 100 else f"{value:.4g}"


def history_table(runs: Mapping[str, History], labels: Mapping[str, str]) -> str:
    """One row per epoch: every measure of every run that has it, grouped by measure."""
    groups = [(measure, runs_with(runs, measure)) for measure in MEASURES]
    groups = [(measure, names) for measure, names in groups if names]
    titles, run_names, columns, widths = [], [], [], []
    for measure, names in groups:
        natural = len(names) * _CELL + (len(names) - 1) * len(_SEPARATOR)
        # A group as wide as its title: the extra width goes to its cells, spread evenly.
        cell = _CELL + max(0, -(-(len(measure.title) - natural) // len(names)))
        width = len(names) * cell + (len(names) - 1) * len(_SEPARATOR)
        widths.append((measure, names, cell))
        titles.append(f"{measure.title:^{width}}")
        run_names.append(_SEPARATOR.join(f"{labels[name]:^{cell}}" for name in names))
        header = f"{'loss':>{_LOSS_WIDTH}}{'acc':>{_ACCURACY_WIDTH}}"
        columns.append(_SEPARATOR.join(f"{header:^{cell}}" for _ in names))
    lines = [
        (" " * 5 + _SEPARATOR + _SEPARATOR.join(titles)).rstrip(),
        (" " * 5 + _SEPARATOR + _SEPARATOR.join(run_names)).rstrip(),
        ("epoch" + _SEPARATOR + _SEPARATOR.join(columns)).rstrip(),
    ]
    lines.append("-" * max(len(line) for line in lines))
    epochs = max(len(history["val_loss"]) for history in runs.values())
    for epoch in range(epochs):
        cells = []
        for measure, names, cell in widths:
            for name in names:
                loss = _format_loss(runs[name][measure.loss_key][epoch])
                accuracy = runs[name][measure.accuracy_key][epoch]
                values = f"{loss:>{_LOSS_WIDTH}}{accuracy:>{_ACCURACY_WIDTH}.4f}"
                cells.append(f"{values:^{cell}}")
        lines.append((f"{epoch + 1:>5}" + _SEPARATOR + _SEPARATOR.join(cells)).rstrip())
    return "\n".join(lines)


def table_legend(runs: Mapping[str, History], labels: Mapping[str, str]) -> str:
    """What the column groups of :func:`history_table` measure, in words."""
    lines = [
        "training: averages over each epoch's batches, in training mode (batch statistics).",
        "validation, moving averages: after each epoch, in inference mode, as Keras evaluates.",
    ]
    measured = runs_with(runs, POPULATION_STATISTICS)
    if measured:
        lines.append(
            "validation, population statistics: the same, after batchnorm.recalibrate over the "
            "training set (on a copy: training is unchanged)."
        )
        plain = [labels[name] for name in runs if name not in measured]
        if plain:
            lines.append(
                f"{', '.join(plain)}: no batch norm, so no statistics to recalibrate; its "
                "validation is the same on both."
            )
    return "\n".join(lines)


def write_json(path: Path, document: Mapping[str, object]) -> Path:
    """Write ``document`` as indented JSON (creating the folder); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path
