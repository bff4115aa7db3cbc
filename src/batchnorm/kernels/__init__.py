"""Numba CPU kernels on NumPy arrays in canonical ``(rows, channels, inner)`` layout.

No torch here: :mod:`batchnorm.functional._cpu_backend` adapts tensors and registers the kernels as
PyTorch custom operators.
"""

from batchnorm.kernels._elementwise import affine_normalize, batch_norm_input_gradient
from batchnorm.kernels._jit import set_threads
from batchnorm.kernels._statistics import gradient_sums, shifted_channel_sums

__all__ = [
    "affine_normalize",
    "batch_norm_input_gradient",
    "gradient_sums",
    "set_threads",
    "shifted_channel_sums",
]
