"""The functional core of batchnorm: stateless functions on tensors.

- :func:`moments`: tf.nn.moments / weighted_moments.
- :func:`batch_normalization`: tf.nn.batch_normalization.
- :func:`batch_norm`: one full layer step (training or inference) returning the output and the new
  statistics instead of mutating buffers, so it composes with ``torch.func.vmap`` and
  ``functional_call``.
"""

import warnings

from batchnorm.functional._backend import BatchNormBackend, Moments
from batchnorm.functional._batch_norm import BatchNormStatistics, batch_norm
from batchnorm.functional._composed import compile_composed
from batchnorm.functional._cpu_backend import NUMBA_CPU, NumbaCpuBackend
from batchnorm.functional._dispatch import (
    apply_environment,
    backend_for,
    force_backend,
    register_backend,
)
from batchnorm.functional._moments import moments
from batchnorm.functional._moving_average import moving_average_update
from batchnorm.functional._native import NATIVE, NativeBackend
from batchnorm.functional._normalization import batch_normalization
from batchnorm.functional._output_memory import release_output_memory
from batchnorm.functional._renorm import RenormCorrection, renorm_correction
from batchnorm.functional._torch_ops import TORCH_OPS, TorchOpsBackend
from batchnorm.kernels._jit import jit_enabled

if jit_enabled():
    register_backend("cpu", NUMBA_CPU)
else:  # the kernels cannot run uncompiled: the CPU takes the composed torch ops
    warnings.warn(
        "batchnorm: NUMBA_DISABLE_JIT is set, so batch norm runs on the CPU with composed torch "
        "ops instead of the Numba kernels (the same results within float rounding, slower).",
        RuntimeWarning,
        stacklevel=2,
    )
apply_environment()

__all__ = [
    "NATIVE",
    "NUMBA_CPU",
    "TORCH_OPS",
    "BatchNormBackend",
    "BatchNormStatistics",
    "Moments",
    "NativeBackend",
    "NumbaCpuBackend",
    "RenormCorrection",
    "TorchOpsBackend",
    "backend_for",
    "batch_norm",
    "batch_normalization",
    "compile_composed",
    "force_backend",
    "moments",
    "moving_average_update",
    "register_backend",
    "release_output_memory",
    "renorm_correction",
]
