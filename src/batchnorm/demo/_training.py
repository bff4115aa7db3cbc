"""Keras-style ``fit`` for the demos: shuffled mini-batches, Adam, per-epoch history.

Like Keras, the training loss and accuracy of an epoch are the averages over its batches (in
training mode, as the weights move), and the validation numbers are computed after the epoch in
inference mode. Further measurements taken after each epoch (``after_epoch``) join the history
under their own keys. The shuffling order comes from a ``torch.Generator`` seeded with ``seed``, so runs
that share a seed see the same batches in the same order.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    >>> data = Split(torch.rand(100, 8, 8), torch.randint(0, 10, (100,)),
    ...              torch.rand(20, 8, 8), torch.randint(0, 10, (20,)))
    >>> history = fit(model, data, epochs=2, batch_size=32, seed=0, label="demo")
    >>> sorted(history)
    ['train_accuracy', 'train_loss', 'val_accuracy', 'val_loss']
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple, TextIO

import torch
import torch.nn.functional as F
from torch import nn

from batchnorm.tools._progress import Progress

History = dict[str, list[float]]
HISTORY_KEYS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy")
EpochMeasurement = Callable[[nn.Module], Mapping[str, float]]
_EVALUATION_BATCH = 2048


class Split(NamedTuple):
    """Model-ready training and validation inputs with int64 class labels."""

    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    validation_inputs: torch.Tensor
    validation_labels: torch.Tensor


def keras_adam(model: nn.Module) -> torch.optim.Adam:
    """Adam with Keras' defaults: learning rate 1e-3, betas (0.9, 0.999), epsilon 1e-7."""
    return torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)


def shuffled_batches(
    count: int, batch_size: int, generator: torch.Generator, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Index tensors of one shuffled epoch (the last batch may be smaller), at most ``max_batches``."""
    order = torch.randperm(count, generator=generator)
    batches = torch.split(order, batch_size)
    return iter(batches if max_batches is None else batches[:max_batches])


def batch_count(count: int, batch_size: int, max_batches: int | None = None) -> int:
    batches = -(-count // batch_size)
    return batches if max_batches is None else min(batches, max_batches)


@torch.no_grad()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in inference mode (``model.eval()``)."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(labels), _EVALUATION_BATCH):
        logits = model(inputs[start : start + _EVALUATION_BATCH])
        target = labels[start : start + _EVALUATION_BATCH]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return loss_sum / len(labels), correct / len(labels)


def fit(
    model: nn.Module,
    data: Split,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    label: str,
    max_batches: int | None = None,
    stream: TextIO | None = None,
    after_epoch: EpochMeasurement | None = None,
) -> History:
    """Train ``model`` (logits out) with Adam and cross-entropy; returns the per-epoch history.

    Args:
        model: maps a batch of ``data.train_inputs`` to class logits (softmax + categorical
            cross-entropy as in Keras, fused here into ``F.cross_entropy``).
        data: the inputs and labels.
        epochs: passes over the training data.
        batch_size: samples per step (Keras' default 32; the classic example uses 64).
        seed: seeds the shuffling generator.
        label: the progress bar's title.
        max_batches: stop each epoch after this many batches (smoke runs and tests).
        stream: where the progress bar goes (default stderr).
        after_epoch: called with the model after each epoch's validation; each key of the mapping
            it returns gets one value per epoch in the history. It must leave the model as it
            found it (measure a copy), so that training is the same with or without it.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = keras_adam(model)
    history: History = {key: [] for key in HISTORY_KEYS}
    total = batch_count(len(data.train_labels), batch_size, max_batches)
    for epoch in range(1, epochs + 1):
        bar = Progress(f"{label}  epoch {epoch}/{epochs}", total, summary=True, stream=stream)
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for index in shuffled_batches(len(data.train_labels), batch_size, generator, max_batches):
            logits = model(data.train_inputs[index])
            target = data.train_labels[index]
            loss = F.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            loss_sum += float(loss.detach()) * len(index)
            correct += int((logits.detach().argmax(dim=1) == target).sum())
            seen += len(index)
            bar.update(loss=loss_sum / seen, accuracy=correct / seen)
        val_loss, val_accuracy = evaluate(model, data.validation_inputs, data.validation_labels)
        history["train_loss"].append(loss_sum / seen)
        history["train_accuracy"].append(correct / seen)
        history["val_loss"].append(val_loss)
        history["val_accuracy"].append(val_accuracy)
        measured = dict(after_epoch(model)) if after_epoch is not None else {}
        for key, value in measured.items():
            history.setdefault(key, []).append(value)
        bar.close(val_loss=val_loss, val_accuracy=val_accuracy, **measured)
    return history


def epochs_to_reach(validation_accuracy: list[float], target: float) -> int | None:
    """The first epoch (1-based) whose validation accuracy is at least ``target``; None if never."""
    return next((i for i, value in enumerate(validation_accuracy, 1) if value >= target), None)
