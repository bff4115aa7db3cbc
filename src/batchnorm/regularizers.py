"""Keras weight regularizers, by name, Keras config dict or class (as ``keras.regularizers``).

``L1(l1)``: ``l1 * sum(|w|)``; ``L2(l2)``: ``l2 * sum(w^2)``; ``L1L2``: both. The layer reports
the penalties in ``layer.losses``. The implementations live in :mod:`batchnorm.layers`.
"""

from batchnorm.layers._regularizers import *  # noqa: F403 (the same names, under their public module)
from batchnorm.layers._regularizers import __all__ as __all__
