"""Train several networks on the same data with the same seed and compare them epoch by epoch.

The shared machinery of ``batchnorm demo`` (with vs without BatchNormalization) and
``batchnorm demo placement`` (BatchNormalization before vs after the ReLU). Each run is measured
three ways per epoch (:mod:`batchnorm.demo._measures`): training, validation on the moving
averages, and, for networks with batch norm, validation on population statistics (a recalibrated
copy; training is unchanged).

Example:
    >>> from batchnorm.demo._datasets import load_dataset
    >>> from batchnorm.demo._models import classic_network
    >>> data = load_dataset(None).limited(200, 50)
    >>> result = compare(
    ...     {"with_bn": lambda: classic_network(64, with_batch_norm=True, seed=0)},
    ...     {"with_bn": "with BN"}, data, flatten=True, epochs=1, batch_size=64, seed=0)
    >>> len(result.histories["with_bn"]["population_val_accuracy"])
    1
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from torch import nn

from batchnorm.demo._comparison_plot import plot_histories
from batchnorm.demo._datasets import ImageDataset
from batchnorm.demo._models import batch_norm_layers
from batchnorm.demo._population import population_statistics_measurement
from batchnorm.demo._report import history_table, table_legend, write_json
from batchnorm.demo._summary import (
    epochs_table,
    final_accuracies,
    moving_average_notes,
    plain_summary,
)
from batchnorm.demo._training import History, Split, batch_count, fit


@dataclass
class Comparison:
    """The histories, trained models and training seconds of each run, keyed by run name.

    ``momenta`` holds the batch norms' momentum of each run that has batch norm. ``seconds`` is
    the time of each run, its per-epoch recalibration and evaluation included.
    """

    dataset: ImageDataset
    labels: dict[str, str]
    histories: dict[str, History]
    models: dict[str, nn.Module]
    seconds: dict[str, float]
    steps_per_epoch: int
    momenta: dict[str, float]

    def report(self, target: float) -> str:
        """The per-epoch table, the epochs to ``target`` on each measure in numbers and words,
        the final accuracies, the time, and the moving-average note where it applies."""
        timing = ", ".join(
            f"{self.labels[name]} {seconds:.1f} s" for name, seconds in self.seconds.items()
        )
        runs, labels = self.histories, self.labels
        notes = moving_average_notes(runs, labels, target, self.steps_per_epoch, self.momenta)
        return "\n".join(
            [
                history_table(runs, labels),
                table_legend(runs, labels),
                "",
                epochs_table(runs, labels, target),
                plain_summary(runs, labels, target),
                "",
                final_accuracies(runs, labels),
                f"Time (training, evaluation and recalibration): {timing}",
                *notes,
            ]
        )

    def write(
        self, out: Path, json_name: str, png_name: str, title: str, target: float | None = None
    ) -> list[Path]:
        """Write the histories as JSON and the curves as a PNG into ``out``; returns the paths.

        The figure's title adds the data set and its pixel values to ``title``; ``target`` draws
        the target accuracy.
        """
        json_path = write_json(out / json_name, self.histories)
        full_title = f"{title}\n{self.dataset.name}, pixels {self.dataset.pixels}"
        png_path = plot_histories(self.histories, self.labels, out / png_name, full_title, target)
        return [png_path, json_path]


def compare(
    builders: Mapping[str, Callable[[], nn.Module]],
    labels: Mapping[str, str],
    dataset: ImageDataset,
    *,
    flatten: bool,
    epochs: int,
    batch_size: int,
    seed: int,
    max_batches: int | None = None,
    stream: TextIO | None = None,
) -> Comparison:
    """Build and train each network on ``dataset`` with the same seed (same batches, same order).

    Networks with batch norm are also validated on population statistics after each epoch: the
    history gains ``population_val_loss`` and ``population_val_accuracy``.

    Args:
        builders: run name -> a function building a fresh network (logits out).
        labels: run name -> the name shown in tables and plots.
        dataset: the images; ``flatten=True`` feeds ``(N, H*W)`` vectors, otherwise ``(N, H, W)``.
        epochs, batch_size, seed, max_batches, stream: as in :func:`fit`.
    """
    train, validation = dataset.train_images, dataset.validation_images
    if flatten:
        train, validation = train.flatten(1), validation.flatten(1)
    split = Split(train, dataset.train_labels, validation, dataset.validation_labels)
    histories: dict[str, History] = {}
    models: dict[str, nn.Module] = {}
    seconds: dict[str, float] = {}
    momenta: dict[str, float] = {}
    for name, build in builders.items():
        start = time.perf_counter()
        models[name] = build()
        layers = batch_norm_layers(models[name])
        measurement = None
        if layers:
            momenta[name] = layers[0].momentum
            measurement = population_statistics_measurement(split)
        histories[name] = fit(
            models[name],
            split,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            label=f"{labels[name]:<14}",
            max_batches=max_batches,
            stream=stream,
            after_epoch=measurement,
        )
        seconds[name] = time.perf_counter() - start
    steps = batch_count(len(dataset.train_labels), batch_size, max_batches)
    return Comparison(dataset, dict(labels), histories, models, seconds, steps, momenta)
