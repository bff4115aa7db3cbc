"""The demos' data: scikit-learn's bundled digits by default, or MNIST from a path.

Images are kept as ``(N, H, W)`` float32 tensors; each experiment flattens them or adds a channel
axis. By default (``inputs="scaled"``) pixels are divided by their peak value, ``x / 16`` on the
digits and ``x / 255`` on MNIST, so they lie in [0, 1]; ``inputs="raw"`` keeps the unscaled pixel
values (0..16, 0..255), the setting in which the hidden values of a network are large and batch
norm matters most. The validation split is fixed (it does not depend on the demo's ``--seed``):
MNIST's test set when present, otherwise 20% of the samples chosen by a fixed permutation.

Example:
    >>> data = load_dataset(None)          # the 1797 digits of scikit-learn, 8x8
    >>> data.train_images.shape[1:], data.num_classes
    (torch.Size([8, 8]), 10)
    >>> float(load_dataset(None, inputs="raw").train_images.max())
    16.0
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from batchnorm.demo._mnist import DataError, ImageSplit, read_mnist

Inputs = Literal["scaled", "raw"]
INPUTS: tuple[Inputs, ...] = ("scaled", "raw")
VALIDATION_FRACTION = 0.2
_SPLIT_SEED = 20150211  # fixed so that every --seed sees the same validation samples


@dataclass(frozen=True)
class ImageDataset:
    """Train and validation images ``(N, H, W)`` float32 with int64 labels.

    ``pixels`` says what the values are: ``"scaled to [0, 1]"`` or ``"raw, 0..16"`` (``"raw, 0..255"``).
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    validation_images: torch.Tensor
    validation_labels: torch.Tensor
    num_classes: int = 10
    pixels: str = "scaled to [0, 1]"

    def describe(self) -> str:
        height, width = self.train_images.shape[1:]
        return (
            f"{self.name}: {len(self.train_labels)} training and "
            f"{len(self.validation_labels)} validation images of {height}x{width}, "
            f"pixels {self.pixels}"
        )

    def limited(self, train: int, validation: int) -> ImageDataset:
        """The first ``train`` / ``validation`` samples: for smoke runs and tests."""
        return ImageDataset(
            self.name,
            self.train_images[:train],
            self.train_labels[:train],
            self.validation_images[:validation],
            self.validation_labels[:validation],
            self.num_classes,
            self.pixels,
        )


def _check_inputs(inputs: str) -> None:
    if inputs not in INPUTS:
        raise ValueError(f"`inputs` must be one of {INPUTS}. Received: inputs={inputs!r}")


def _pixels(inputs: Inputs, peak: float) -> str:
    return "scaled to [0, 1]" if inputs == "scaled" else f"raw, 0..{peak:g}"


def _tensors(images: np.ndarray, labels: np.ndarray, divisor: float) -> tuple[torch.Tensor, ...]:
    """float32 images divided by ``divisor`` (1 keeps the raw values) and int64 labels."""
    scaled = torch.from_numpy(np.asarray(images, dtype=np.float32) / np.float32(divisor))
    return scaled, torch.from_numpy(np.asarray(labels, dtype=np.int64))


def _holdout(split: ImageSplit, peak: float, name: str, inputs: Inputs) -> ImageDataset:
    count = len(split.labels)
    order = np.random.default_rng(_SPLIT_SEED).permutation(count)
    held = max(1, round(count * VALIDATION_FRACTION))
    if count - held < 1:
        raise DataError(f"{name}: {count} samples are too few to hold out a validation split")
    validation, train = order[:held], order[held:]
    divisor = peak if inputs == "scaled" else 1.0
    train_x, train_y = _tensors(split.images[train], split.labels[train], divisor)
    val_x, val_y = _tensors(split.images[validation], split.labels[validation], divisor)
    return ImageDataset(name, train_x, train_y, val_x, val_y, pixels=_pixels(inputs, peak))


def load_digits_dataset(inputs: Inputs = "scaled") -> ImageDataset:
    """scikit-learn's 1797 handwritten digits (8x8, values 0..16), 20% held out for validation.

    Args:
        inputs: ``"scaled"`` (default) divides the pixels by 16; ``"raw"`` keeps 0..16.
    """
    _check_inputs(inputs)
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the default demo data needs scikit-learn: pip install 'batchnorm[demo]' "
            "(or pass --data with MNIST files)"
        ) from error
    digits = load_digits()
    split = ImageSplit(np.asarray(digits.images), np.asarray(digits.target, dtype=np.int64))
    return _holdout(split, 16.0, "scikit-learn digits", inputs)


def load_mnist_dataset(path: str | Path, inputs: Inputs = "scaled") -> ImageDataset:
    """MNIST from a folder of IDX files or a Keras ``mnist.npz``.

    With both splits, the test split is the validation set; with one split only, 20% of it is held out.
    ``inputs="scaled"`` (default) divides the pixels by 255; ``"raw"`` keeps 0..255.

    Raises:
        DataError: the path is missing or malformed (the message names the file).
    """
    _check_inputs(inputs)
    splits = read_mnist(path)
    name = f"MNIST ({path})"
    if "train" in splits and "test" in splits:
        divisor = 255.0 if inputs == "scaled" else 1.0
        train_x, train_y = _tensors(splits["train"].images, splits["train"].labels, divisor)
        val_x, val_y = _tensors(splits["test"].images, splits["test"].labels, divisor)
        if train_x.shape[1:] != val_x.shape[1:]:
            raise DataError(
                f"{path}: train images are {tuple(train_x.shape[1:])} but test images are "
                f"{tuple(val_x.shape[1:])}; they must match"
            )
        return ImageDataset(name, train_x, train_y, val_x, val_y, pixels=_pixels(inputs, 255.0))
    (only,) = splits.values()
    return _holdout(only, 255.0, name, inputs)


def load_dataset(path: str | Path | None, inputs: Inputs = "scaled") -> ImageDataset:
    """The digits when ``path`` is None, MNIST from ``path`` otherwise (``inputs`` as above)."""
    if path is None:
        return load_digits_dataset(inputs)
    return load_mnist_dataset(path, inputs)
