"""Keras weight regularizers, by name, Keras config dict or class (as ``keras.regularizers``).

``L1(l1)``: ``l1 * sum(|w|)``; ``L2(l2)``: ``l2 * sum(w^2)``; ``L1L2``: both. The layer reports
the penalties in ``layer.losses``. The implementations live in :mod:`batchnorm.layers`.
"""

from batchnorm.layers._regularizers import L1, L1L2, L2, Regularizer, get, serialize_regularizer

__all__ = ["L1", "L1L2", "L2", "Regularizer", "get", "serialize_regularizer"]
