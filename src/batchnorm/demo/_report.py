"""Text and JSON reports for experiments that compare training runs epoch by epoch.

Example:
    >>> runs = {"with_bn": {"train_loss": [0.5], "val_loss": [0.4],
    ...                     "train_accuracy": [0.8], "val_accuracy": [0.9]}}
    >>> print(history_table(runs, {"with_bn": "with BN"}))
          |                 with BN
    epoch |       loss  val_loss  accuracy   val_acc
    ------------------------------------------------
        1 |     0.5000    0.4000    0.8000    0.9000
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from batchnorm.demo._training import HISTORY_KEYS, History, epochs_to_reach

_COLUMN = 10
_COLUMNS = ("loss", "val_loss", "accuracy", "val_acc")


def history_table(runs: Mapping[str, History], labels: Mapping[str, str]) -> str:
    """One row per epoch: training/validation loss and accuracy of every run side by side."""
    block = 4 * _COLUMN
    names = list(runs)
    title = " " * 5 + "".join(f" | {labels[name]:^{block}}" for name in names)
    columns = "".join(f"{column:>{_COLUMN}}" for column in _COLUMNS)
    header = "epoch" + " | " + " | ".join(columns for _ in names)
    lines = [title.rstrip(), header, "-" * len(header)]
    epochs = max(len(history["val_loss"]) for history in runs.values())
    for epoch in range(epochs):
        cells = []
        for name in names:
            values = [runs[name][key][epoch] for key in HISTORY_KEYS]
            cells.append("".join(f"{value:>{_COLUMN}.4f}" for value in values))
        lines.append(f"{epoch + 1:>5} | " + " | ".join(cells))
    return "\n".join(lines)


def target_summary(runs: Mapping[str, History], labels: Mapping[str, str], target: float) -> str:
    """Epochs each run needed to reach ``target`` validation accuracy, and the final accuracies."""
    lines = [f"Epochs to reach {target:.1%} validation accuracy:"]
    for name, history in runs.items():
        reached = epochs_to_reach(history["val_accuracy"], target)
        text = f"epoch {reached}" if reached is not None else "not reached"
        lines.append(f"  {labels[name]:<24} {text}")
    lines.append("Final accuracy (train / validation):")
    for name, history in runs.items():
        lines.append(
            f"  {labels[name]:<24} {history['train_accuracy'][-1]:.4f} / "
            f"{history['val_accuracy'][-1]:.4f}"
        )
    return "\n".join(lines)


def write_json(path: Path, document: Mapping[str, object]) -> Path:
    """Write ``document`` as indented JSON (creating the folder); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")
    return path


def moving_average_note(steps_per_epoch: int, momentum: float = 0.99) -> str:
    """Why validation numbers with batch norm can lag in the first epochs on a small dataset."""
    remaining = momentum**steps_per_epoch
    return (
        f"Note: validation runs in inference mode, on the moving averages (momentum {momentum}). "
        f"With {steps_per_epoch} steps per epoch they still hold {remaining:.0%} of their initial "
        f"values (mean 0, variance 1) after the first epoch and {remaining**3:.0%} after the "
        "third, so the validation numbers of networks with batch norm can trail their training "
        "numbers early on "
        "(see `batchnorm demo modes`)."
    )
