"""Keras files: tf-keras ``.h5`` and Keras 3 ``.keras`` / ``.weights.h5`` read into records,
compared with and loaded into batch-norm modules (public as :mod:`batchnorm.keras`; needs h5py).
"""

from batchnorm.interop.keras._compare import Difference
from batchnorm.interop.keras._load import batch_norm_modules, load_weights
from batchnorm.interop.keras._read import read_batch_norm_layers
from batchnorm.interop.keras._records import KerasBatchNormLayer
from batchnorm.interop.keras._report import LayerLoad, LoadReport

__all__ = [
    "Difference",
    "KerasBatchNormLayer",
    "LayerLoad",
    "LoadReport",
    "batch_norm_modules",
    "load_weights",
    "read_batch_norm_layers",
]
