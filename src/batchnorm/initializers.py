"""Keras initializers for batch-norm weights, by name, Keras config dict or class (as ``keras.initializers``).

``get("glorot_uniform")`` resolves a name; each initializer is called as
``initializer(shape, dtype=..., device=...)`` with the tf-keras weight shape. The implementations
live in :mod:`batchnorm.layers`, beside the layer that uses them.
"""

from batchnorm.layers._initializers import *  # noqa: F403 (the same names, under their public module)
from batchnorm.layers._initializers import __all__ as __all__
