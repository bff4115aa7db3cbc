"""Keras weight constraints, by name, Keras config dict or class (as ``keras.constraints``).

``NonNeg``, ``MaxNorm``, ``UnitNorm``, ``MinMaxNorm``: applied to gamma/beta after each optimizer
step (:func:`batchnorm.apply_constraints_after_step`), on the weight in its tf-keras shape. The
implementations live in :mod:`batchnorm.layers`.
"""

from batchnorm.layers._constraints import *  # noqa: F403 (the same names, under their public module)
from batchnorm.layers._constraints import __all__ as __all__
