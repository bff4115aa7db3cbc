"""Read Keras files (tf-keras ``.h5``, Keras 3 ``.keras``) and load their batch-norm layers.

Needs h5py, an optional dependency: ``pip install 'batchnorm[keras]'``.

Example:
    >>> import torch, batchnorm
    >>> from batchnorm.keras import load_weights, read_batch_norm_layers
    >>> model = torch.nn.Sequential(batchnorm.BatchNormalization(3))  # doctest: +SKIP
    >>> print(load_weights(model, "model.keras", configure=True))     # doctest: +SKIP
"""

from batchnorm.keras._compare import Difference
from batchnorm.keras._load import batch_norm_modules, load_weights
from batchnorm.keras._read import read_batch_norm_layers
from batchnorm.keras._records import KerasBatchNormLayer
from batchnorm.keras._report import LayerLoad, LoadReport

__all__ = [
    "Difference",
    "KerasBatchNormLayer",
    "LayerLoad",
    "LoadReport",
    "batch_norm_modules",
    "load_weights",
    "read_batch_norm_layers",
]
