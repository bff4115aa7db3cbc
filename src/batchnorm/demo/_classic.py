"""``batchnorm demo``: the classic Keras experiment, a Dense network with and without batch norm.

``Dense(1000, relu) -> BatchNormalization -> Dense(10, softmax)``, Adam, categorical cross-entropy,
batch size 64, trained twice from the same initial Dense weights on the same batches: once with the
BatchNormalization layer and once without it.

Example:
    >>> from batchnorm.demo._datasets import load_dataset
    >>> result = run_classic_demo(load_dataset(None), epochs=1, seed=0, max_batches=2)
    >>> sorted(result.histories)
    ['with_bn', 'without_bn']
"""

from __future__ import annotations

from typing import TextIO

from batchnorm.demo._comparison import Comparison, compare
from batchnorm.demo._datasets import ImageDataset
from batchnorm.demo._models import classic_network

CLASSIC_LABELS = {"with_bn": "with BN", "without_bn": "without BN"}
CLASSIC_BATCH_SIZE = 64


def run_classic_demo(
    dataset: ImageDataset,
    *,
    epochs: int,
    seed: int,
    momentum: float = 0.99,
    max_batches: int | None = None,
    stream: TextIO | None = None,
) -> Comparison:
    """Train the classic network with (``"with_bn"``) and without (``"without_bn"``) batch norm."""
    inputs = dataset.train_images[0].numel()
    return compare(
        {
            "with_bn": lambda: classic_network(
                inputs, with_batch_norm=True, seed=seed, momentum=momentum
            ),
            "without_bn": lambda: classic_network(inputs, with_batch_norm=False, seed=seed),
        },
        CLASSIC_LABELS,
        dataset,
        flatten=True,
        epochs=epochs,
        batch_size=CLASSIC_BATCH_SIZE,
        seed=seed,
        max_batches=max_batches,
        stream=stream,
    )
