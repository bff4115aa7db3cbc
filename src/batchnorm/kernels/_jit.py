"""The one place where Numba's compilation flags live.

- ``parallel``: kernels split rows into blocks whose number depends only on the input's shape
  (:func:`blocks_for`), and add the blocks' partial sums in block order: results are
  bit-identical for any thread count, and between the serial and the threaded build. The blocks
  run in :class:`Runner` loops (``prange``), the only functions compiled with ``parallel=True``.
- ``cache``: compiled code is written next to the sources (or Numba's user cache directory), so a
  second process starts without compiling. Numba keys an entry by its function's name and the
  stamp of that function's own file, so an edit to a helper in another file left the functions
  calling it running the old code from the cache; every compiled function's name therefore
  carries a digest of all the kernel sources (:data:`SOURCES_DIGEST`), and entries of other
  sources are never read (they stay on disk until deleted). The threaded runners are not cached
  (see :class:`Runner`).
- ``fastmath``: reassociation and contraction only, so reductions vectorise; no ``nnan``/``ninf``,
  so NaN and Inf inputs propagate as in PyTorch. Only the block helpers that sum along their
  loop keep reassociation: element-wise block helpers go without it (:func:`elementwise_helper`),
  and so do kernels and runners (the set-up helpers inlined into them, which add the blocks'
  partial sums and turn them into coefficients, are per-channel loops that vectorise without
  it). With it, LLVM was free to add the partial sums in another order in the serial and the
  threaded build of a kernel, and did once the per-ghost-batch shifts changed the code around
  them: 1- and 2-thread moments differed in the last bit.
- ``error_model="numpy"``: divisions are not tested for zero (:func:`compiled`).

Kernels compare rather than call ``min``/``max``, and zero with loops rather than call
``np.zeros`` (except the 4-d partial sums, see :class:`Runner`): each builtin overload is one more
function Numba compiles on a cold cache (0.02-0.3 s each), and each inlined helper one more pass of
Numba's front end, so these one-liners get no helper either.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Any

import numba
from numba.np.ufunc import parallel as numba_parallel

FASTMATH = {"reassoc", "contract", "nsz"}


def sources_digest(folder: Path) -> str:
    """A digest of the ``*.py`` files in ``folder``: names and contents, in name order."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# The kernel sources' digest, appended to every compiled function's name (see the module
# docstring): a cache entry is used only by the sources it was compiled from.
SOURCES_DIGEST = sources_digest(Path(__file__).parent)


def compiled(
    function: Any,
    *,
    parallel: bool = False,
    inline: bool = False,
    from_python: bool = True,
    cache: bool = True,
    reassociate: bool = True,
) -> Any:
    """``function`` compiled with the package's options (every compiled function goes here).

    ``error_model="numpy"``: a float division by zero gives inf or NaN, as in NumPy and torch;
    Python's model tests every divisor and raises, and that test kept each per-channel loop
    with a division scalar (``1 / sqrt(v + eps)`` over 4096 channels took 16 us, vectorised
    3.8 us; a (2, 4096) training forward 79 us, now 21). The layer and the functional API
    require ``epsilon > 0``, and a channel without weight is tested before its total divides,
    so no divisor is zero on their calls; integer divisors are >= 1.

    ``from_python=False`` (block helpers, threaded runners: only kernels call them) compiles no
    CPython wrapper, and no function gets a C-callable wrapper (nothing takes one): less for
    Numba to lower and LLVM to compile on a cold cache (helpers 0.12-0.20 s instead of
    0.17-0.34 s each, 0.2 s less LLVM over a first training step).

    ``cache=False`` (the threaded runners, see :class:`Runner`) keeps it off Numba's on-disk
    cache; ``reassociate=False`` (kernels, runners, :func:`elementwise_helper`) drops
    ``reassoc`` from the fast-math flags.
    """
    # Numba's type stubs do not list the wrapper options: passed through a plain dict.
    options: dict[str, Any] = {
        "parallel": parallel,
        "inline": "always" if inline else "never",
        "fastmath": FASTMATH if reassociate else FASTMATH - {"reassoc"},
        "nogil": True,
        "error_model": "numpy",
        "no_cpython_wrapper": not from_python,
        "no_cfunc_wrapper": True,
    }
    renamed = _renamed(function, f"_{SOURCES_DIGEST}")
    if cache and _cache_folder["writable"]:
        try:
            return numba.njit(renamed, cache=True, **options)
        except RuntimeError as error:  # Numba found no folder it can write its cache to
            if "cannot cache function" not in str(error):
                raise
            _cache_folder["writable"] = False
            warnings.warn(
                "batchnorm: Numba has no writable cache folder (the package's folder and the "
                "user cache folder are read-only), so the CPU kernels compile again in every "
                "process; set NUMBA_CACHE_DIR to a writable folder to keep them. "
                f"Numba said: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
    return numba.njit(renamed, cache=False, **options)


# False once Numba found no writable cache folder (read-only installs: AWS Lambda, read-only
# containers), where `cache=True` raised at `import batchnorm`: compiled() then stops caching
# (and has warned once).
_cache_folder = {"writable": True}


def cache_folder_writable() -> bool:
    """Whether compiled kernels are written to Numba's on-disk cache (see :func:`compiled`)."""
    return _cache_folder["writable"]


def jit_enabled() -> bool:
    """Whether Numba compiles: ``NUMBA_DISABLE_JIT=1`` (set to debug other Numba code) makes every
    compiled function plain Python, in which the kernels' intrinsics (half precision's bit
    conversions) cannot run."""
    return not numba.config.DISABLE_JIT  # type: ignore[attr-defined]


# Below this many elements the normalising pass alone runs as one block on the calling thread:
# waking the pool costs more. Above it, blocks of at least BLOCK_ELEMENTS, at most MAX_BLOCKS of
# them (so, both being 2^16, two blocks from 2^17 elements). On the 2-core Intel Xeon (Sapphire
# Rapids) VM, against torch in one process, 2 blocks from 2^17 elements instead of serial up to
# 2^18: (32, 4096), (64, 2048) and (128, 1024) training forward+backward 1.8-1.96x torch's ->
# 1.3-1.65x, inference forward+backward 2.1-2.4x -> 1.5-1.7x, the forwards level or better. A
# serial kernel streams the whole input and output through the calling core's L2 (2 MiB), out
# of which they push the interpreter's own data: Python around a (32, 64) forward+backward took
# 175 us after 4 MB of traffic instead of 57 (torch's 135 instead of 47); two blocks split that
# traffic between both cores' caches.
PARALLEL_THRESHOLD = 1 << 16
BLOCK_ELEMENTS = 1 << 16
# The kernels that sum (moments, gradient sums, a training step's forward and backward, the
# inference backward) take two blocks from here. They do several float64 operations a value
# where the normalising pass does one float32 multiply-add, so splitting pays off sooner: on
# the Intel VM (session 38, old and new code alternating), training forward+backward of
# (64, 1000) (the MLP step's batch norm) 1.53-1.58x torch's time -> 1.30-1.36x,
# (12, 64, 8, 8) 1.32-1.34x -> 1.21-1.24x; the training forward alone 0.81-0.85x -> 0.90-0.91x
# on (64, 1000). From 2^15 elements two blocks lost ((32, 1024) forward+backward 1.35x ->
# 1.49x), and on the normalising pass alone ((64, 1024) inference 1.11x -> 1.23x). The cost: an
# input of 49,152-131,071 elements compiles the threaded builds on its first call (a model with
# a larger batch norm input compiles them anyway): a cold (64, 1000) first call 5.5-5.9 -> 9.0 s.
SUMS_PARALLEL_THRESHOLD = 3 << 14
MAX_BLOCKS = 16


class Runner:
    """A loop over row blocks (``prange``) that calls a pass's block helper by one name, compiled
    per layout and build (:func:`bound`): threaded, and serial (inlined into the serial kernels).

    Only these small functions are compiled with ``parallel=True``: Numba's parallel lowering
    compiles each ``prange`` loop of a function as a function of its own, with everything else
    in that function around it, which made every threaded kernel cost twice its serial build
    to compile (a first (32, 64, 56, 56) training step took 12 s with a cold cache). A runner
    is compiled once per layout and build and shared by every kernel that runs its pass.

    The threaded builds are not cached on disk (the kernels calling them are, with the runner's
    code in them): a kernel compiled in a process that had loaded its runner from the cache was
    written to the cache in a form that crashed (a segmentation fault) every later process that
    loaded it, Numba's issue 8578 (a cached function calling a ``parallel=True`` one). After a
    training step in one process, ``gradient_sums`` (which synchronized batch norm's backward
    runs) on a large input crashed the second process that ran it. Compiled in every process
    that compiles a kernel calling it, a runner costs a few tenths of a second where a new
    kernel meets a runner compiled before.

    The serial and threaded builds give the same bits only while LLVM compiles the block helper
    alike in both places: allocating the kernels' `partial` sums as a reshaped 1-D array (like
    their other temporaries) let it optimise the inlined helper differently, and 1- and 2-thread
    results differed in the last bit (tests/test_cpu_numerics.py); they keep np.zeros of the 4-d
    shape.
    """

    def __init__(self, function: Any) -> None:
        self.function = function
        self.__doc__ = function.__doc__
        self.__name__ = function.__name__
        self._builds: dict[tuple[str, str], Any] = {}

    def build(self, layout: str, build: str) -> Any:
        """The compiled ``build`` ("parallel" or "serial") for ``layout``, made on first use."""
        key = (layout, build)
        if key not in self._builds:
            copy = bound(self.function, layout, build)
            if build == "parallel":
                self._builds[key] = compiled(
                    copy, parallel=True, from_python=False, cache=False, reassociate=False
                )
            else:
                self._builds[key] = compiled(copy, inline=True, reassociate=False)
        return self._builds[key]

    def __call__(self, *args: Any) -> Any:
        """Only kernels call a runner (its builds have no CPython wrapper)."""
        raise TypeError(f"runner {self.__name__} is called from kernels only")


def runner(function: Any) -> Runner:
    return Runner(function)


# Channels-last rows of fewer channels than this take the "narrow" build, which reads them as
# wide virtual rows (batchnorm.kernels._narrow_rows).
NARROW_CHANNELS = 16


def layout_for(channels: int, inner: int, ghost_batches: bool = False, half: bool = False) -> str:
    """The build a call on a canonical ``x[o, c, i]`` takes: ``"planes"`` for ``inner > 1``
    (``"half_planes"`` for float16/bfloat16 data, ``half``: their sums in float32 chunks,
    :mod:`batchnorm.kernels._half_sums`); for channels last (``inner == 1``), ``"narrow"`` for
    fewer than :data:`NARROW_CHANNELS` channels without ghost batches (virtual rows), ``"rows"``
    otherwise.

    Each build compiles only its own block helpers: with the narrow rows' loops in the rows
    helpers, a first (64, 1000) training step and inference call with a cold cache took 8.3 s
    of JIT, 5.5 s without them. The narrow build's helpers take any ghost-batch grouping (run
    by run), but ghost batches keep the rows build: a run of ``period`` rows would tile its
    coefficients again and again.
    """
    if inner != 1:
        return "half_planes" if half else "planes"
    if channels < NARROW_CHANNELS and not ghost_batches:
        return "narrow"
    return "rows"


class ByLayout:
    """A pass's block helpers for the layouts (:func:`layout_for`), which a runner calls by one
    name: its rows build calls ``rows``, its planes build ``planes``, its narrow build
    ``narrow`` (``rows`` where the pass has no narrow helper), its half-planes build
    ``half_planes`` (``planes`` where the pass has none) (:func:`bound`). All take the
    canonical ``x[o, c, i]``; a rows or narrow helper views it as ``x2[o, c]``
    (:func:`rows_view`)."""

    def __init__(self, rows: Any, planes: Any, narrow: Any = None, half_planes: Any = None) -> None:
        self.rows, self.planes = rows, planes
        self.narrow = rows if narrow is None else narrow
        self.half_planes = planes if half_planes is None else half_planes
        # The pass's name, as batchnorm.kernels exports it where it does (BlockBuild); the
        # Python function itself where Numba does not compile (NUMBA_DISABLE_JIT=1).
        name = getattr(rows, "py_func", rows).__name__
        self.__name__ = name.split("_rows_block")[0] + "_block"

    def __call__(self, *args: Any) -> Any:
        """Only runners call block helpers (they have no CPython wrapper)."""
        raise TypeError("block helpers are called from runners only")

    def for_layout(self, layout: str) -> BlockBuild:
        """The layout's helper as a target of a compile-ahead request, as a kernel's build is
        (:mod:`batchnorm.kernels._ahead`)."""
        return BlockBuild(self, layout)


def by_layout(rows: Any, planes: Any, narrow: Any = None, half_planes: Any = None) -> ByLayout:
    return ByLayout(rows, planes, narrow, half_planes)


class BlockBuild:
    """A pass's block helper for one layout, named like a :class:`Kernel`'s build for a helper
    process to compile ahead: ``function`` is the :class:`ByLayout`, which
    :mod:`batchnorm.kernels` exports under its ``__name__``; ``serial`` and ``parallel`` are the one
    compiled helper, which the serial and threaded runners both call. A kernel compiled later
    loads it from Numba's cache (nothing waits for it)."""

    def __init__(self, helpers: ByLayout, layout: str) -> None:
        self.function = helpers
        self.layout = layout
        self.serial = self.parallel = getattr(helpers, layout)
        self.__name__ = f"{helpers.__name__}_{layout}"


def bound(function: Any, layout: str, build: str) -> Any:
    """A copy of ``function`` named ``<name>_<layout>_<build>`` whose calls are bound to
    ``layout`` and ``build``: a :class:`ByLayout` name to that layout's helper, a
    :class:`Runner` to its build.

    Numba's on-disk cache keys a function by its name and signature, not by its options or
    globals: two builds of one name shared a cache entry, and whichever was compiled second
    loaded the first's code (the serial call of a (32, 64) training step then ran the threaded
    code, 12 us instead of 4 us); hence one name per build. Bound on first use, once the
    function's module has defined every name it calls.
    """
    namespace = dict(function.__globals__)
    for name in function.__code__.co_names:
        value = namespace.get(name)
        if isinstance(value, ByLayout):
            namespace[name] = getattr(value, layout)
        elif isinstance(value, Runner):
            namespace[name] = value.build(layout, build)
    return _renamed(function, f"_{layout}_{build}", namespace)


# Held while a threaded kernel runs (see Kernel.threaded).
_LAUNCH = threading.Lock()


class Kernel:
    """A kernel for one layout, compiled as one native call per build: its "parallel" build
    calls the threaded builds of the :class:`Runner` loops it names, its serial build their
    serial builds (:func:`bound`)."""

    def __init__(self, function: Any, layout: str) -> None:
        self.function = function
        self.layout = layout
        self.__doc__ = function.__doc__
        self.__name__ = f"{function.__name__}_{layout}"

    @functools.cached_property
    def parallel(self) -> Any:
        return compiled(bound(self.function, self.layout, "parallel"), reassociate=False)

    @functools.cached_property
    def threaded(self) -> Any:
        """The threaded build, launched by one Python thread at a time: a call made while
        another thread's threaded kernel runs takes the serial build (the same results).

        Numba's "workqueue" threading layer, the one it falls back to where it finds neither
        TBB nor an OpenMP runtime (macOS, slim Linux images without libgomp), aborts the
        process when two threads launch parallel work at once (four threads running a layer
        on a (32, 64, 32, 32) input did); the OpenMP and TBB layers would only oversubscribe
        the cores.
        """
        parallel, serial = self.parallel, self.serial

        def launch(*args: Any) -> Any:
            if not _LAUNCH.acquire(blocking=False):
                return serial(*args)
            try:
                return parallel(*args)
            finally:
                _LAUNCH.release()

        return launch

    @functools.cached_property
    def serial(self) -> Any:
        return compiled(bound(self.function, self.layout, "serial"), reassociate=False)


def _renamed(function: Any, suffix: str, namespace: dict[str, Any] | None = None) -> Any:
    """A copy of ``function`` (same code and defaults; its globals, or ``namespace``) named
    ``<name><suffix>``."""
    copy = types.FunctionType(
        function.__code__,
        function.__globals__ if namespace is None else namespace,
        function.__name__ + suffix,
        function.__defaults__,
        function.__closure__,
    )
    copy.__qualname__ = function.__qualname__ + suffix
    copy.__module__ = function.__module__
    copy.__doc__ = function.__doc__
    return copy


class LayoutKernel:
    """One kernel function compiled per layout (:func:`layout_for`), each build on first use.

    ``rows``: ``inner == 1`` (channels last: rows of C contiguous values); ``narrow``: rows of
    a few channels; ``planes``: channel planes of ``inner`` contiguous values; ``half_planes``:
    the same of float16/bfloat16 data (their bits, ``int16``/``uint16``). Each build's
    runners call its layout's block helpers (:class:`ByLayout`): Numba optimises each loop nest
    better in a function of its own (the planes loop reached memcpy speed alone and ran ~1.25x
    slower compiled beside the rows loop), and a call compiles only its layout's loops.
    """

    def __init__(self, function: Any) -> None:
        self.rows = Kernel(function, "rows")
        self.narrow = Kernel(function, "narrow")
        self.planes = Kernel(function, "planes")
        self.half_planes = Kernel(function, "half_planes")
        self.__doc__ = function.__doc__
        self.__name__ = function.__name__

    def for_layout(self, layout: str) -> Kernel:
        """The build for ``layout``, as :func:`layout_for` names it."""
        build: Kernel = getattr(self, layout)
        return build

    def for_array(self, x: Any) -> Kernel:
        """The build for a canonical ``x[o, c, i]`` without ghost batches (:func:`layout_for`)."""
        half = x.dtype.kind in "iu"  # half data as their bits
        return self.for_layout(layout_for(x.shape[1], x.shape[2], half=half))

    def parallel(self, *args: Any) -> Any:
        """The threaded build, chosen by the first array argument's layout."""
        return self.for_array(args[0]).parallel(*args)

    def serial(self, *args: Any) -> Any:
        """The serial build, chosen by the first array argument's layout."""
        return self.for_array(args[0]).serial(*args)

    def threaded(self, *args: Any) -> Any:
        """:attr:`Kernel.threaded`, chosen by the first array argument's layout."""
        return self.for_array(args[0]).threaded(*args)


def helper(function: Any) -> Any:
    """A serial compiled function that kernels call for a loop over a block of rows."""
    return compiled(function, from_python=False)


def elementwise_helper(function: Any) -> Any:
    """A :func:`helper` whose loop computes each output value on its own (no sum across
    values), compiled without reassociation, which such a loop does not need to vectorise.

    With it, LLVM rewrote the input gradient's ``a * ((dy - d) - b * ((x - h) - lo))`` one way
    in the process that compiled the kernel and another in the code it wrote to the cache: a
    first (32, 16, 32, 32) training backward in a fresh cache gave dx one ulp away from every
    later process's in 25% of the values (tests/test_numba_environment.py).
    """
    return compiled(function, from_python=False, reassociate=False)


def setup_helper(function: Any) -> Any:
    """A short per-channel step, inlined into each kernel that calls it.

    Each function Numba compiles on its own costs about half a second of JIT on the 2-core
    machine, however small; inlined, these cost the kernel a fraction of that. (The row-block
    loops stay separate: inlined into the kernels, the small-input backward ran 2.7x slower.)
    """
    return compiled(function, inline=True)


@setup_helper
def rows_view(x):  # type: ignore[no-untyped-def]
    """``x[o, c, 0]`` (channels last, ``inner == 1``) as ``x2[o, c]``: the rows runners' view."""
    return x.reshape((x.shape[0], x.shape[1]))


@setup_helper
def block_rows(rows, blocks, block):  # type: ignore[no-untyped-def]
    """The rows ``(start, stop)`` of block ``block`` of ``blocks`` near-equal row blocks;
    ``start <= stop`` always (the last blocks may be empty: 130 rows in 16 blocks of 9 gave
    block 15 the rows (135, 130), and the helpers that split a block in halves or quarters
    then ran their remainder loop back over rows 129 and 130: counted twice in masked
    statistics and gradient sums, normalised twice in place)."""
    rows_per_block = (rows + blocks - 1) // blocks
    stop = (block + 1) * rows_per_block
    stop = rows if rows < stop else stop  # min(rows, stop)
    start = block * rows_per_block
    return (stop if stop < start else start), stop


@setup_helper
def group_run(o, stop, groups, period):  # type: ignore[no-untyped-def]
    """Row ``o``'s ghost batch ``(o // period) % groups`` and where its run of rows of that
    batch ends, at ``stop`` at the latest."""
    period_stop = (o // period + 1) * period
    return (o // period) % groups, stop if groups == 1 or stop < period_stop else period_stop


def kernel(function: Any) -> LayoutKernel:
    return LayoutKernel(function)


# Each block of a reducing pass writes and then adds its own partial sums, 3 float64 values a
# channel: a block of fewer than this many rows of `inner` values per channel spends more on
# them than on its data. Wide rows in few samples took a 16-block split of one row each:
# (16, 65536) training forward 4.4x torch's time, forward+backward 4.0x; with blocks of at least
# 8 rows (2 blocks), 1.6x and 1.2-1.5x, inference level (1.05x), inference forward+backward
# 2.5x -> 0.8-1.0x. (8, 32768) runs serially then: training 2.4x -> 1.5x, forward+backward
# 2.4x -> 1.7x, inference 1.07x -> 1.4x (2 blocks of 4 rows: 1.9x, 2.0x and 1.15x).
MIN_BLOCK_ROW_VALUES = 8


def blocks_for(elements: int, rows: int, inner: int, sums: bool = True) -> int:
    """Row blocks for a pass over ``elements`` values in ``rows`` rows of ``inner`` values per
    channel, from the shape alone; ``sums=False`` for an element-wise pass (normalising alone),
    whose blocks keep no partial sums and so need no minimum of rows: (8, 32768) inference ran
    serially, 1.4-1.5x torch's time, and takes 4 blocks of 2 rows.

    A power of two (1, 2, 4, 8 or 16), so that 1, 2, 4, 8 or 16 threads get equal shares; the
    reduction order, and so every result, does not depend on the thread count.
    """
    if elements < (SUMS_PARALLEL_THRESHOLD if sums else PARALLEL_THRESHOLD):
        return 1
    blocks = elements // BLOCK_ELEMENTS
    if sums:  # at least 2 from SUMS_PARALLEL_THRESHOLD, with MIN_BLOCK_ROW_VALUES a block
        blocks = min(max(2, blocks), rows * inner // MIN_BLOCK_ROW_VALUES)
    blocks = min(MAX_BLOCKS, rows, blocks)
    return 1 << (max(1, blocks).bit_length() - 1)


def run(kernel: Kernel | LayoutKernel, parallel: bool, *args: Any) -> Any:
    """Call the threaded build when ``parallel`` (:attr:`Kernel.threaded`), the serial one
    otherwise (same results)."""
    build = kernel.threaded if parallel else kernel.serial
    return build(*args)


# The count this thread last gave Numba (its setting is per thread). Thread-local rather than
# keyed by thread id: Python reuses an ended thread's id, and a new thread with it skipped the
# setting (running on Numba's default count instead of torch's); a dict also grew per thread.
_threads_set = threading.local()

# Whether this process was forked from one whose Numba pool runs on GNU OpenMP (Numba's "omp"
# layer on Linux), which cannot run in a forked child: Numba terminates the child on its first
# threaded call ("Terminating: fork() called from a process already using GNU OpenMP, this is
# unsafe."), which killed every worker of a Hogwild-style torch.multiprocessing training after
# the parent had trained. Such a child runs the serial builds (the same results).
_forked_from_openmp = False


def _after_fork_in_child() -> None:
    global _forked_from_openmp
    if (
        numba_parallel._is_initialized
        and sys.platform.startswith("linux")
        and numba_parallel.threading_layer() == "omp"  # type: ignore[no-untyped-call]
    ):
        _forked_from_openmp = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def set_threads(count: int) -> int:
    """Use ``count`` threads (clamped to Numba's pool); returns the count in effect: 1 in a
    process forked from one that started Numba's GNU OpenMP pool, which cannot run there.

    Numba's setting is per calling thread; asking Numba each call costs microseconds that show
    on small batches, so what was set is remembered per thread. Results do not depend on it:
    the kernels' row blocks come from the shape (:func:`blocks_for`).
    """
    if _forked_from_openmp:
        return 1
    limit: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    count = max(1, min(int(count), limit))
    if getattr(_threads_set, "count", None) != count:
        numba.set_num_threads(count)
        _threads_set.count = count
    return count
