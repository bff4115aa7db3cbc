"""Which backend runs a call, decided here and nowhere else.

Per call, by device: the backend registered for the tensor's device type when it supports the
tensor (the Numba kernels for "cpu", registered on import); otherwise the native backend
(torch's own batch-norm kernels, :mod:`batchnorm.functional._native`) on every other device, and
the composed torch ops on the CPU (eager, or compiled after ``compile_composed()``). By configuration: the step runs a backend's one-call native
training (``train_batch``) only where the backend ``expresses`` it (one channel axis, no mask, no
ghost batches, no renorm, per-channel scale and offset), and weights or an adjustment that vary
inside a channel always take the composed torch ops (:func:`composed_backend`).

``BATCHNORM_BACKEND=numba|native|torch`` in the environment (read on import; for debugging and
comparisons) forces one backend for every device it supports, as :func:`force_backend` does.
"""

from __future__ import annotations

import os

import torch

from batchnorm.functional._backend import BatchNormBackend
from batchnorm.functional._composed import composed_ops
from batchnorm.functional._native import NATIVE
from batchnorm.functional._torch_ops import TORCH_OPS

_BACKENDS: dict[str, BatchNormBackend] = {}
_FORCED: list[BatchNormBackend] = []
_NAMED: dict[str, BatchNormBackend] = {"native": NATIVE, "torch": TORCH_OPS}


# What :func:`register_backend` checks a backend has (see :class:`BatchNormBackend`).
_BACKEND_METHODS = ("supports", "batch_moments", "normalize_batch", "normalize")


def register_backend(device_type: str | torch.device, backend: BatchNormBackend | None) -> None:
    """Use ``backend`` for tensors on ``device_type`` ("cpu", "cuda", ... or a ``torch.device``,
    of which the type counts: "cuda:1" registers for every CUDA device); None restores the
    default (native kernels on accelerators, composed torch ops on the CPU). Both arguments are
    checked before anything changes."""
    device_type = _device_type(device_type)
    if backend is None:
        _BACKENDS.pop(device_type, None)
        return
    lacking = [m for m in _BACKEND_METHODS if not callable(getattr(backend, m, None))]
    if not isinstance(getattr(backend, "name", None), str):
        lacking.append("name (a str)")
    if not hasattr(backend, "reads_half_precision"):
        lacking.append("reads_half_precision")
    if lacking:
        raise TypeError(
            "`backend` must be None or a batch-norm backend with `name`, `reads_half_precision` "
            f"and the methods {', '.join(_BACKEND_METHODS)} (a BatchNormBackend, such as "
            f"batchnorm.functional.NUMBA_CPU); it lacks {', '.join(lacking)}. "
            f"Received: backend={backend!r}"
        )
    _BACKENDS[device_type] = backend
    _NAMED.setdefault(backend.name, backend)


def _device_type(device: object) -> str:
    """The device type ``register_backend`` keys its registry by ("cpu", "cuda", ...)."""
    if isinstance(device, torch.device):
        return device.type
    if isinstance(device, str):
        try:
            return torch.device(device).type
        except RuntimeError as error:
            raise ValueError(
                '`device_type` must name a device type ("cpu", "cuda", ...). '
                f"Received: device_type={device!r}"
            ) from error
    raise TypeError(
        '`device_type` must be a device type string ("cpu", "cuda", ...) or a '
        f"torch.device. Received: device_type of type {type(device).__name__}"
    )


def force_backend(name: str | None) -> None:
    """Run every call on the backend ``name`` ("numba", "native", "torch") wherever it supports
    the tensor, whatever is registered; None ends it. ``BATCHNORM_BACKEND`` sets it on import."""
    _force(name, "name")


def _force(name: str | None, argument: str) -> None:
    """:func:`force_backend`, its error naming ``argument`` (the parameter, or the variable)."""
    if name is None or name == "":
        _FORCED.clear()
        return
    if name not in _NAMED:
        raise ValueError(
            f"`{argument}` must be one of {sorted(_NAMED)}. Received: {argument}={name!r}"
        )
    _FORCED[:] = [_NAMED[name]]


def backend_for(x: torch.Tensor) -> BatchNormBackend:
    """The backend that runs a call on ``x`` (see the module docstring)."""
    if _FORCED and _FORCED[0].supports(x):
        return _FORCED[0]
    backend = _BACKENDS.get(x.device.type)
    if backend is not None and backend.supports(x):
        return backend
    return composed_ops() if x.device.type == "cpu" else NATIVE


def composed_backend() -> BatchNormBackend:
    """The backend for weights or adjustments that vary inside a channel: the composed torch ops
    (compiled after :func:`~batchnorm.functional._composed.compile_composed`)."""
    return composed_ops()


def registered_backend(device_type: str) -> BatchNormBackend | None:
    """The backend a call on ``device_type`` takes first: the forced one, else the registered one."""
    return _FORCED[0] if _FORCED else _BACKENDS.get(device_type)


def apply_environment() -> None:
    """Read ``BATCHNORM_BACKEND`` (called once, after the backends are registered)."""
    _force(os.environ.get("BATCHNORM_BACKEND"), "BATCHNORM_BACKEND")
