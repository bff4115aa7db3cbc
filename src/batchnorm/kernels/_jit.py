"""The one place where Numba's compilation flags live.

- ``parallel``: kernels split rows into one block per thread (``prange``); the block layout depends
  only on the thread count, so repeated runs with the same count are bit-identical.
- ``cache``: compiled code is written next to the sources (or Numba's user cache directory), so a
  second process starts without compiling.
- ``fastmath``: reassociation and contraction only, so reductions vectorise; no ``nnan``/``ninf``,
  so NaN and Inf inputs propagate as in PyTorch.
"""

from __future__ import annotations

from typing import Any

import numba

FASTMATH = {"reassoc", "contract", "nsz"}


def kernel(function: Any) -> Any:
    return numba.njit(parallel=True, cache=True, fastmath=FASTMATH, nogil=True)(function)


def set_threads(count: int) -> int:
    """Use ``count`` threads (clamped to Numba's pool); returns the count in effect."""
    limit: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    count = max(1, min(int(count), limit))
    if numba.get_num_threads() != count:
        numba.set_num_threads(count)
    return count
