"""Output memory for the CPU kernels, reused once nothing refers to it any more.

A large array from ``np.empty`` is fresh memory from the operating system: the kernel writing
the output takes a page fault per page first touched, which on the 2-core development machine
made a training forward into new memory cost 1.5x the same forward into memory used before
(inference: 1.9x a copy into preallocated memory against 1.0x). A training loop or an inference
server asks for the same shapes again and again, so the arrays handed out for outputs of at
least :data:`SMALLEST_KEPT` bytes are kept here, by ``(shape, dtype)``, and handed out again
once no tensor, view or array refers to them: each output tensor is made by
``torch.from_numpy``, whose storage holds a reference to the array (or to a view of it, which
refers to the array's buffer), so the reference counts of the array and its buffer say exactly
whether anything can still read or write it.

What is kept is bounded: at most ``BATCHNORM_OUTPUT_MEMORY_MB`` MiB (read on import; default
512, 0 keeps nothing), the least recently used shapes given back first.
:func:`release_output_memory` gives everything unused back now. Arrays below the threshold come
from the C allocator's heap, which reuses memory by itself.

Every output of at least :data:`ALIGNED_FROM` bytes starts on a 64-byte boundary (a cache line,
as torch's CPU allocator aligns; below :data:`SMALLEST_KEPT` such outputs come from torch's
allocator itself, see :func:`source`): ``np.empty`` gives 16 or 32 (glibc's heap, or 16 past a page
for an mmap-backed array), and on an Intel Xeon (Sapphire Rapids) a normalising pass writing
rows of 4096 float32 values that start 16, 32 or 48 bytes into a cache line took 32-38 us
against 22 us aligned (each 32-byte store straddles two lines every other time); the input
gradient 47-48 against 39-41 us.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections import OrderedDict

import numpy as np

SMALLEST_KEPT = 1 << 20  # bytes
ALIGNMENT = 64  # bytes
# Smaller outputs come from np.empty as they are: aligning costs 1.5-2 us an output, more than
# a misaligned pass loses below this size (at 2^15 bytes, (8, 16, 8, 8) float32, the tiny conv
# case's training forward went from 0.72x torch's time to 0.82x, its forward+backward from 1.33x
# to 1.44x; a normalising pass over 2^15 float32 values takes about 5 us aligned).
ALIGNED_FROM = 1 << 17  # bytes
_DEFAULT_LIMIT_MB = 512


def _limit_from_environment() -> int:
    value = os.environ.get("BATCHNORM_OUTPUT_MEMORY_MB", str(_DEFAULT_LIMIT_MB))
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(
            "BATCHNORM_OUTPUT_MEMORY_MB must be a number of MiB (0 keeps no output memory). "
            f"Received: {value!r}"
        ) from None
    return max(0, int(megabytes * (1 << 20)))


_lock = threading.Lock()
_kept: OrderedDict[tuple[tuple[int, ...], np.dtype], list[np.ndarray]] = OrderedDict()
_state = {"bytes": 0, "limit": _limit_from_environment()}


def aligned_empty(shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose data start on an :data:`ALIGNMENT`-byte boundary: a view
    into a byte array ``ALIGNMENT`` bytes longer."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + ALIGNMENT, np.uint8)
    return np.ndarray(shape, dtype, raw, -raw.ctypes.data % ALIGNMENT)


def _unused_indices(arrays: list[np.ndarray]) -> list[int]:
    """The indices of the kept arrays that nothing but this list refers to.

    A kept array is a view of its byte buffer (:func:`aligned_empty`), and NumPy makes a view of
    a view refer to the buffer, not to the view it was taken from: a half-precision output's
    tensor holds ``array.view(np.int16)``, which counts on the buffer alone. Both counts are
    read (checking the array's alone handed out the memory of a live bfloat16 output again).
    """
    return [
        i
        for i in range(len(arrays))
        if sys.getrefcount(arrays[i]) == _UNUSED
        and sys.getrefcount(arrays[i].base) == _BUFFER_UNUSED
    ]


# The reference counts of a kept array held by a list alone and of its buffer, as
# _unused_indices reads them: measured rather than assumed.
_kept_alone = [aligned_empty((1,), np.float32)]
_UNUSED = sys.getrefcount(_kept_alone[0])
_BUFFER_UNUSED = sys.getrefcount(_kept_alone[0].base)
del _kept_alone


def source(shape: tuple[int, ...], dtype: type | np.dtype) -> str:
    """Where the kernels' outputs of this shape and dtype come from: ``"numpy"``
    (``np.empty``) below :data:`ALIGNED_FROM` bytes, ``"torch"`` (``torch.empty``, whose
    memory starts on a 64-byte boundary) from there to :data:`SMALLEST_KEPT`, ``"kept"``
    (:func:`empty`: NumPy's huge pages, memory reused) from :data:`SMALLEST_KEPT`.

    In the middle band :func:`empty` aligned a NumPy array by hand, which took more Python
    (1.5-2 us a call alone; 9-13 us inside a model, whose layers had pushed the interpreter's
    data out of the caches): in a ``Linear(784, 1000)-ReLU-BN-Linear(10)`` inference at batch
    64 on the Intel VM, the batch norm's share of the model's time went from 102-116 us to
    91-92 us (torch's: 39-56 us), three alternating runs of 60 rounds.
    """
    size = math.prod(shape) * np.dtype(dtype).itemsize
    if size < ALIGNED_FROM:
        return "numpy"
    return "torch" if size < SMALLEST_KEPT else "kept"


def empty(shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
    """An uninitialised aligned array for an output that :func:`source` sends here (``"kept"``:
    at least :data:`SMALLEST_KEPT` bytes), in memory that a previous output no longer needs
    where there is one (see the module docstring)."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if _state["limit"] == 0:
        return aligned_empty(shape, dtype)
    key = (shape, dtype)
    with _lock:
        arrays = _kept.get(key)
        if arrays is not None:
            _kept.move_to_end(key)
            unused = _unused_indices(arrays)
            if unused:
                return arrays[unused[0]]
        array = aligned_empty(shape, dtype)
        if _make_room(size):
            _kept.setdefault(key, []).append(array)
            _state["bytes"] += size
        return array


def _make_room(size: int) -> bool:
    """Whether ``size`` more bytes fit under the limit, after giving back unused arrays of the
    least recently used shapes (the lock is held)."""
    limit = _state["limit"]
    if size > limit:
        return False
    for key in list(_kept):
        if _state["bytes"] + size <= limit:
            break
        _give_back_unused(key)
    return _state["bytes"] + size <= limit


def _give_back_unused(key: tuple[tuple[int, ...], np.dtype]) -> None:
    arrays = _kept[key]
    for i in reversed(_unused_indices(arrays)):
        _state["bytes"] -= arrays.pop(i).nbytes
    if not arrays:
        del _kept[key]


def release_output_memory() -> int:
    """Give back every kept output array that nothing refers to; returns the bytes still kept
    (arrays in use by live tensors, handed out again once those are gone)."""
    with _lock:
        for key in list(_kept):
            _give_back_unused(key)
        return int(_state["bytes"])


def kept_bytes() -> int:
    """Bytes of output memory kept now (in use or not)."""
    return int(_state["bytes"])
