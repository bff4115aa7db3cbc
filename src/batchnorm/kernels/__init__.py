"""Numba CPU kernels on NumPy arrays in canonical ``(rows, channels, inner)`` layout.

No torch here: :mod:`batchnorm.functional._cpu_backend` adapts tensors and registers the kernels as
PyTorch custom operators.

Optional inputs are None rather than a flag, where Numba can then compile less: ``masked`` is True
with a mask (``weights``, one per row and inner element) and None without one (``weights`` is then
a dummy), ``activation`` an activation code or None. The kernels test ``masked is None`` and
``activation is None``, which Numba resolves from the argument's type before compiling, so a plain
call compiles no mask or activation branches. Threaded loops live in
:class:`~batchnorm.kernels._jit.Runner` functions, one per pass; kernels and runners are written
once and compiled per layout (rows: channels last; narrow: channels last, fewer than 16 channels;
planes: ``inner > 1``; :func:`~batchnorm.kernels._jit.layout_for`), a runner's call to its
pass's :class:`~batchnorm.kernels._jit.ByLayout` block helpers bound to that layout's helper, and a
kernel's calls to runners bound to its layout and build (:func:`~batchnorm.kernels._jit.bound`).
Kernels do not call kernels (see :mod:`batchnorm.kernels._training`).
"""

from batchnorm.kernels._activated_backward import train_backward_activated
from batchnorm.kernels._elementwise import (
    affine_normalize,
    batch_norm_input_gradient,
    normalize_block,
)
from batchnorm.kernels._in_place_backward import in_place_backward
from batchnorm.kernels._inference_backward import inference_backward
from batchnorm.kernels._jit import Kernel, blocks_for, run, set_threads
from batchnorm.kernels._statistics import batch_moments, gradient_sums
from batchnorm.kernels._training import train_backward, train_forward

__all__ = [
    "Kernel",
    "affine_normalize",
    "batch_moments",
    "batch_norm_input_gradient",
    "blocks_for",
    "gradient_sums",
    "in_place_backward",
    "inference_backward",
    "normalize_block",
    "run",
    "set_threads",
    "train_backward",
    "train_backward_activated",
    "train_forward",
]
