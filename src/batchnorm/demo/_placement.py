"""``batchnorm demo placement``: BatchNormalization before or after the activation.

Both networks are ``Conv2D(64, 3x3)`` on NCHW images with ``BatchNormalization(64, axis=1)``, either
``Conv2D -> BN -> ReLU`` (the original paper's placement) or ``Conv2D -> ReLU -> BN`` (common in Keras
code), followed by 2x2 max pooling and ``Dense(10)``. Same initial weights, same batches.

Example:
    >>> from batchnorm.demo._datasets import load_dataset
    >>> result = run_placement_demo(load_dataset(None), epochs=1, seed=0, max_batches=2)
    >>> sorted(result.histories)
    ['bn_after_relu', 'bn_before_relu']
"""

from __future__ import annotations

from typing import TextIO

from batchnorm.demo._comparison import Comparison, compare
from batchnorm.demo._datasets import ImageDataset
from batchnorm.demo._models import placement_network

PLACEMENT_LABELS = {"bn_before_relu": "Conv-BN-ReLU", "bn_after_relu": "Conv-ReLU-BN"}
PLACEMENT_BATCH_SIZE = 64
# Conv2D 3x3 ("valid") leaves H - 2 rows and columns; 2x2 max pooling needs at least 2 of each.
PLACEMENT_MIN_IMAGE_SIZE = 4


def check_image_size(height: int, width: int) -> None:
    """Raise ValueError unless ``height x width`` images fit the placement network (at least 4x4);
    smaller ones failed inside torch's convolution or pooling, after the demo had started."""
    if min(height, width) < PLACEMENT_MIN_IMAGE_SIZE:
        size = PLACEMENT_MIN_IMAGE_SIZE
        raise ValueError(
            f"the placement demo needs images of at least {size}x{size} pixels (Conv2D 3x3, "
            f"then 2x2 max pooling). Received: images of {height}x{width}"
        )


def run_placement_demo(
    dataset: ImageDataset,
    *,
    epochs: int,
    seed: int,
    momentum: float = 0.99,
    max_batches: int | None = None,
    stream: TextIO | None = None,
) -> Comparison:
    """Train the conv network with BN before (``"bn_before_relu"``) and after the ReLU.

    Raises:
        ValueError: images smaller than 4x4 (see :func:`check_image_size`).
    """
    height, width = dataset.train_images.shape[1:]
    check_image_size(height, width)
    return compare(
        {
            "bn_before_relu": lambda: placement_network(
                height, width, batch_norm_before_relu=True, seed=seed, momentum=momentum
            ),
            "bn_after_relu": lambda: placement_network(
                height, width, batch_norm_before_relu=False, seed=seed, momentum=momentum
            ),
        },
        PLACEMENT_LABELS,
        dataset,
        flatten=False,
        epochs=epochs,
        batch_size=PLACEMENT_BATCH_SIZE,
        seed=seed,
        max_batches=max_batches,
        stream=stream,
    )
