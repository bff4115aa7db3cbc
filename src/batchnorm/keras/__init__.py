"""Read Keras files (tf-keras ``.h5``, Keras 3 ``.keras``) and load their batch-norm layers.

The public name of :mod:`batchnorm.interop.keras`; needs h5py: ``pip install 'batchnorm[keras]'``.

Example:
    >>> import torch, batchnorm
    >>> from batchnorm.keras import load_weights, read_batch_norm_layers
    >>> model = torch.nn.Sequential(batchnorm.BatchNormalization(3))  # doctest: +SKIP
    >>> print(load_weights(model, "model.keras", configure=True))     # doctest: +SKIP
"""

from batchnorm.interop.keras import *  # noqa: F403 (the same names, under their public module)
from batchnorm.interop.keras import __all__ as __all__
