"""``batchnorm demo shift``: internal covariate shift, after Ioffe & Szegedy (2015), Figure 1.

A network of three hidden layers of 100 sigmoids is trained with plain SGD (batches of 60, as in
the paper) with and without BatchNormalization before each sigmoid. Every few steps we record the
validation accuracy and the 15th, 50th and 85th percentiles, over the validation set, of the input
to one fixed sigmoid of the last hidden layer. Without batch norm that distribution drifts as the
layers below it learn; with batch norm it stays put.

Example:
    >>> from batchnorm.demo._datasets import load_dataset
    >>> result = run_shift_demo(load_dataset(None), steps=20, seed=0, record_every=10)
    >>> result.steps
    [0, 10, 20]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from batchnorm.demo._datasets import ImageDataset
from batchnorm.demo._models import sigmoid_network
from batchnorm.demo._plots import plot_shift
from batchnorm.demo._report import write_json
from batchnorm.demo._training import evaluate, shuffled_batches
from batchnorm.tools._progress import Progress

SHIFT_LABELS = {"with_bn": "with BN", "without_bn": "without BN"}
PERCENTILES = (15, 50, 85)
SHIFT_BATCH_SIZE = 60
SHIFT_LEARNING_RATE = 0.1
WATCHED_UNIT = 0


@dataclass
class ShiftResult:
    """Validation accuracy and sigmoid-input percentiles at each recorded step, per run."""

    steps: list[int]
    val_accuracy: dict[str, list[float]]
    percentiles: dict[str, dict[int, list[float]]]
    models: dict[str, nn.Module]
    seconds: dict[str, float]

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "steps": self.steps,
            "batch_size": SHIFT_BATCH_SIZE,
            "learning_rate": SHIFT_LEARNING_RATE,
            "watched_unit": WATCHED_UNIT,
        }
        for name in SHIFT_LABELS:
            document[name] = {
                "val_accuracy": self.val_accuracy[name],
                "sigmoid_input_percentiles": {
                    str(q): values for q, values in self.percentiles[name].items()
                },
            }
        return document

    def report(self, rows: int = 12) -> str:
        """A table of the recorded steps (about ``rows`` of them)."""
        stride = max(1, -(-len(self.steps) // rows))
        chosen = list(range(0, len(self.steps), stride))
        if chosen[-1] != len(self.steps) - 1:
            chosen.append(len(self.steps) - 1)
        quantiles = "/".join(f"p{q}" for q in PERCENTILES)
        lines = [
            f"{'step':>6} | {'val_acc with BN':>15} {'without BN':>10} | "
            f"sigmoid input {quantiles} with BN  | without BN",
        ]
        for i in chosen:
            spread = {
                name: " ".join(f"{self.percentiles[name][q][i]:6.2f}" for q in PERCENTILES)
                for name in SHIFT_LABELS
            }
            lines.append(
                f"{self.steps[i]:>6} | {self.val_accuracy['with_bn'][i]:>15.4f} "
                f"{self.val_accuracy['without_bn'][i]:>10.4f} | {spread['with_bn']:>34} | "
                f"{spread['without_bn']}"
            )
        for name, label in SHIFT_LABELS.items():
            drift = [self.percentiles[name][50][i] for i in (0, len(self.steps) - 1)]
            lines.append(
                f"{label}: median sigmoid input moved {drift[0]:+.2f} -> {drift[1]:+.2f}; "
                f"final validation accuracy {self.val_accuracy[name][-1]:.4f} "
                f"({self.seconds[name]:.1f} s)"
            )
        return "\n".join(lines)

    def write(self, out: Path) -> list[Path]:
        json_path = write_json(out / "shift.json", self.as_json())
        png_path = plot_shift(
            self.steps, self.val_accuracy, self.percentiles, SHIFT_LABELS, out / "shift.png"
        )
        return [png_path, json_path]


def _watched_input(model: nn.Sequential, images: torch.Tensor) -> torch.Tensor:
    """The input of the watched sigmoid of the last hidden layer, over ``images``, in inference."""
    captured: list[torch.Tensor] = []
    last_sigmoid = [module for module in model if isinstance(module, nn.Sigmoid)][-1]
    handle = last_sigmoid.register_forward_hook(
        lambda module, inputs, output: captured.append(inputs[0][:, WATCHED_UNIT])
    )
    try:
        evaluate(model, images, torch.zeros(len(images), dtype=torch.int64))
    finally:
        handle.remove()
    return torch.cat(captured)


def _train(
    model: nn.Sequential,
    dataset: ImageDataset,
    steps: int,
    record_every: int,
    seed: int,
    label: str,
    stream: TextIO | None,
) -> tuple[list[int], list[float], dict[int, list[float]]]:
    train_x, val_x = dataset.train_images.flatten(1), dataset.validation_images.flatten(1)
    optimizer = torch.optim.SGD(model.parameters(), lr=SHIFT_LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    recorded: list[int] = []
    accuracy: list[float] = []
    percentiles: dict[int, list[float]] = {q: [] for q in PERCENTILES}
    quantile_levels = torch.tensor([q / 100 for q in PERCENTILES])
    bar = Progress(f"{label:<11}", steps, unit="step", summary=True, stream=stream)

    def record(step: int) -> None:
        recorded.append(step)
        accuracy.append(evaluate(model, val_x, dataset.validation_labels)[1])
        values = torch.quantile(_watched_input(model, val_x), quantile_levels)
        for q, value in zip(PERCENTILES, values.tolist(), strict=True):
            percentiles[q].append(value)

    record(0)
    step = 0
    model.train()
    while step < steps:
        for index in shuffled_batches(len(dataset.train_labels), SHIFT_BATCH_SIZE, generator):
            loss = F.cross_entropy(model(train_x[index]), dataset.train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            step += 1
            bar.update(loss=float(loss.detach()))
            if step % record_every == 0 or step == steps:
                record(step)
            if step == steps:
                break
    bar.close(val_accuracy=accuracy[-1])
    return recorded, accuracy, percentiles


def run_shift_demo(
    dataset: ImageDataset,
    *,
    steps: int,
    seed: int,
    record_every: int | None = None,
    stream: TextIO | None = None,
) -> ShiftResult:
    """Train the sigmoid network with and without batch norm for ``steps`` SGD steps.

    Args:
        dataset: the images (flattened here).
        steps: training steps (batches of 60) per run.
        seed: initial weights and batch order (the same for both runs).
        record_every: steps between records (default: ``steps // 50``, at least 1).
        stream: where the progress bars go (default stderr).
    """
    every = record_every if record_every is not None else max(1, steps // 50)
    inputs = dataset.train_images[0].numel()
    accuracy: dict[str, list[float]] = {}
    percentiles: dict[str, dict[int, list[float]]] = {}
    models: dict[str, nn.Module] = {}
    seconds: dict[str, float] = {}
    recorded: list[int] = []
    for name, label in SHIFT_LABELS.items():
        start = time.perf_counter()
        model = sigmoid_network(inputs, with_batch_norm=name == "with_bn", seed=seed)
        recorded, accuracy[name], percentiles[name] = _train(
            model, dataset, steps, every, seed, label, stream
        )
        models[name], seconds[name] = model, time.perf_counter() - start
    return ShiftResult(recorded, accuracy, percentiles, models, seconds)
