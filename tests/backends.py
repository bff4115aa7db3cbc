"""Running one test body on the composed torch-op backend and on the Numba kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from batchnorm.functional import register_backend
from batchnorm.functional._cpu_backend import NUMBA_CPU
from batchnorm.functional._torch_ops import TorchOpsBackend


def torch_ops_and_kernels(run: Callable[[], list[Any]]) -> tuple[list[Any], list[Any]]:
    """``run()`` with the composed torch ops registered for the CPU (the reference), then with
    the Numba kernels (the default, restored whatever happens)."""
    results = []
    for backend in (TorchOpsBackend(), NUMBA_CPU):
        register_backend("cpu", backend)
        try:
            results.append(run())
        finally:
            register_backend("cpu", NUMBA_CPU)
    return results[0], results[1]


def assert_equal_to_reference(ours: list[Any], reference: list[Any], tolerance: float) -> None:
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=tolerance, atol=tolerance)
