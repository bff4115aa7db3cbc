"""Train several networks on the same data with the same seed and compare them epoch by epoch.

The shared machinery of ``batchnorm demo`` (with vs without BatchNormalization) and
``batchnorm demo placement`` (BatchNormalization before vs after the ReLU).

Example:
    >>> from batchnorm.demo._datasets import load_dataset
    >>> from batchnorm.demo._models import classic_network
    >>> data = load_dataset(None).limited(200, 50)
    >>> result = compare(
    ...     {"with_bn": lambda: classic_network(64, with_batch_norm=True, seed=0)},
    ...     {"with_bn": "with BN"}, data, flatten=True, epochs=1, batch_size=64, seed=0)
    >>> len(result.histories["with_bn"]["val_accuracy"])
    1
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from torch import nn

from batchnorm.demo._datasets import ImageDataset
from batchnorm.demo._plots import plot_histories
from batchnorm.demo._report import history_table, target_summary, write_json
from batchnorm.demo._training import History, Split, batch_count, fit


@dataclass
class Comparison:
    """The histories, trained models and training seconds of each run, keyed by run name."""

    dataset: ImageDataset
    labels: dict[str, str]
    histories: dict[str, History]
    models: dict[str, nn.Module]
    seconds: dict[str, float]
    steps_per_epoch: int

    def report(self, target: float) -> str:
        """The per-epoch table and the epochs-to-target summary."""
        timing = ", ".join(
            f"{self.labels[name]} {seconds:.1f} s" for name, seconds in self.seconds.items()
        )
        return "\n".join(
            [
                history_table(self.histories, self.labels),
                "",
                target_summary(self.histories, self.labels, target),
                f"Training time: {timing}",
            ]
        )

    def write(self, out: Path, json_name: str, png_name: str, title: str) -> list[Path]:
        """Write the histories as JSON and the curves as a PNG into ``out``; returns the paths."""
        json_path = write_json(out / json_name, self.histories)
        png_path = plot_histories(self.histories, self.labels, out / png_name, title)
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
    for name, build in builders.items():
        start = time.perf_counter()
        models[name] = build()
        histories[name] = fit(
            models[name],
            split,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            label=f"{labels[name]:<14}",
            max_batches=max_batches,
            stream=stream,
        )
        seconds[name] = time.perf_counter() - start
    steps = batch_count(len(dataset.train_labels), batch_size, max_batches)
    return Comparison(dataset, dict(labels), histories, models, seconds, steps)
