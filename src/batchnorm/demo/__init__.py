"""The ``batchnorm demo`` experiments: batch normalization on real data, with plots.

- ``batchnorm demo``: the classic Keras Dense network with and without BatchNormalization, measured
  three ways each epoch: training, validation on the moving averages (as Keras evaluates), and
  validation on population statistics (``batchnorm.recalibrate`` on a copy).
- ``batchnorm demo placement``: BatchNormalization before vs after the ReLU of a Conv2D.
- ``batchnorm demo shift``: internal covariate shift, Ioffe & Szegedy (2015) Figure 1.
- ``batchnorm demo modes``: training vs inference, momentum, trainable=False vs training=False.

Data: scikit-learn's bundled digits by default, or MNIST (IDX files or a Keras ``mnist.npz``),
with pixels scaled to [0, 1] or raw (``--inputs raw``).
The command-line front is :mod:`batchnorm.cli`.
"""

from batchnorm.demo._datasets import ImageDataset, load_dataset
from batchnorm.demo._mnist import DataError, read_idx, read_mnist

__all__ = [
    "DataError",
    "ImageDataset",
    "load_dataset",
    "read_idx",
    "read_mnist",
]
