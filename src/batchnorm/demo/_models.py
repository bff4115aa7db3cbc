"""The demos' networks, initialised like Keras: glorot_uniform kernels, zero biases.

Each builder takes a ``seed`` and draws its weights from its own ``torch.Generator``; the
BatchNormalization layer draws nothing (gamma ones, beta zeros), so the variants of one experiment
built with the same seed start from identical Dense/Conv2D weights.

Example:
    >>> with_bn = classic_network(64, with_batch_norm=True, seed=0)
    >>> without = classic_network(64, with_batch_norm=False, seed=0)
    >>> torch.equal(with_bn[1].weight, without[1].weight)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from batchnorm.layers import BatchNormalization


def keras_dense(inputs: int, units: int, generator: torch.Generator) -> nn.Linear:
    """``Dense(units)``: glorot_uniform kernel, zero bias."""
    layer = nn.Linear(inputs, units)
    with torch.no_grad():
        nn.init.xavier_uniform_(layer.weight, generator=generator)
        nn.init.zeros_(layer.bias)
    return layer


def keras_conv2d(
    in_channels: int, filters: int, kernel_size: int, generator: torch.Generator
) -> nn.Conv2d:
    """``Conv2D(filters, kernel_size)``, padding "valid", on NCHW input."""
    layer = nn.Conv2d(in_channels, filters, kernel_size)
    with torch.no_grad():
        # torch's fans for (out, in, k, k) are in*k*k and out*k*k, the same as Keras' for (k, k, in, out)
        nn.init.xavier_uniform_(layer.weight, generator=generator)
        nn.init.zeros_(layer.bias)  # type: ignore[arg-type]
    return layer


def classic_network(
    inputs: int, *, with_batch_norm: bool, seed: int, momentum: float = 0.99
) -> nn.Sequential:
    """Flatten -> Dense(1000, relu) -> [BatchNormalization] -> Dense(10) (logits).

    The classic Keras example; softmax is applied by the cross-entropy loss. ``momentum`` is the
    BatchNormalization layer's (Keras' default 0.99).
    """
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), keras_dense(inputs, 1000, generator), nn.ReLU()]
    if with_batch_norm:
        layers.append(BatchNormalization(1000, momentum=momentum))
    layers.append(keras_dense(1000, 10, generator))
    return nn.Sequential(*layers)


def placement_network(
    height: int, width: int, *, batch_norm_before_relu: bool, seed: int, momentum: float = 0.99
) -> nn.Sequential:
    """Conv2D(64, 3x3) with BatchNormalization before or after its ReLU, then a linear classifier.

    Input ``(N, H, W)`` gray images; the network adds the channel axis (NCHW) and uses
    ``BatchNormalization(64, axis=1, momentum=momentum)``. After the block: 2x2 max pooling,
    flatten, Dense(10).
    """
    generator = torch.Generator().manual_seed(seed)
    conv = keras_conv2d(1, 64, 3, generator)
    norm = BatchNormalization(64, axis=1, momentum=momentum)
    block = [conv, norm, nn.ReLU()] if batch_norm_before_relu else [conv, nn.ReLU(), norm]
    pooled = ((height - 2) // 2) * ((width - 2) // 2) * 64
    return nn.Sequential(
        nn.Unflatten(1, (1, height)),
        *block,
        nn.MaxPool2d(2),
        nn.Flatten(),
        keras_dense(pooled, 10, generator),
    )


def sigmoid_network(inputs: int, *, with_batch_norm: bool, seed: int) -> nn.Sequential:
    """Ioffe & Szegedy's Figure 1 network: three hidden layers of 100 sigmoids, then Dense(10).

    With batch norm, each hidden layer is Dense -> BatchNormalization -> sigmoid (normalising the
    sigmoid's input, as in the paper).
    """
    generator = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    width = inputs
    for _ in range(3):
        layers.append(keras_dense(width, 100, generator))
        if with_batch_norm:
            layers.append(BatchNormalization(100))
        layers.append(nn.Sigmoid())
        width = 100
    layers.append(keras_dense(width, 10, generator))
    return nn.Sequential(*layers)


def batch_norm_layers(model: nn.Module) -> list[BatchNormalization]:
    """The model's BatchNormalization layers, in order."""
    return [module for module in model.modules() if isinstance(module, BatchNormalization)]
