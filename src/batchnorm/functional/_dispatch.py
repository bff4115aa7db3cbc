"""Which backend runs a call: the one registered for the tensor's device type, if it supports the
tensor, else the torch-op backend (every device; the reference the kernels are tested against).
"""

from __future__ import annotations

import torch

from batchnorm.functional._backend import BatchNormBackend
from batchnorm.functional._torch_ops import TORCH_OPS

_BACKENDS: dict[str, BatchNormBackend] = {}


def register_backend(device_type: str, backend: BatchNormBackend | None) -> None:
    """Use ``backend`` for tensors on ``device_type`` ("cpu", "cuda", ...); None restores torch ops."""
    if backend is None:
        _BACKENDS.pop(device_type, None)
    else:
        _BACKENDS[device_type] = backend


def backend_for(x: torch.Tensor) -> BatchNormBackend:
    """The backend registered for ``x.device.type`` when it supports ``x``; torch ops otherwise."""
    backend = _BACKENDS.get(x.device.type)
    return backend if backend is not None and backend.supports(x) else TORCH_OPS


def registered_backend(device_type: str) -> BatchNormBackend | None:
    """The backend registered for ``device_type``, if any."""
    return _BACKENDS.get(device_type)
