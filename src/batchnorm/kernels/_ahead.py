"""Compiling ahead: while this process compiles the kernel a first call needs now, a helper
process compiles the kernels its next calls will need (a training step's backward, the layer's
inference) into Numba's on-disk cache, from which this process then loads them.

A cold first call is JIT compilation, one Python thread's work: on the 2-core Intel VM a 4x3x5
training step and inference call took 4.3 s, of which 2.1 s compiling the forward kernel and
1.5 s the backward and inference kernels. A helper imports only :mod:`batchnorm.kernels` (a
stand-in ``batchnorm`` package module, so not torch: 0.2-0.3 s) and compiled those in 2.1 s
beside the forward's compilation: 2.6-2.9 s in all.

- A helper starts only when the first call really compiles, where more than one CPU is
  available, Numba compiles and has a writable cache folder, ``sys.executable`` is a Python
  interpreter, and ``BATCHNORM_COMPILE_AHEAD`` is not ``0``. Where Numba's cache has no index
  file for the kernel (:func:`never_cached`) the helper starts before the call, while this
  process still imports Numba's compiler libraries (0.2-0.3 s it used to wait for); elsewhere
  when Numba starts compiling it (its ``numba:compile`` event for that kernel's dispatcher: a
  cache hit fires none).
- The helper blocks SciPy's import: Numba's first compilation probes for BLAS by importing it
  (0.1 s where it is installed) and the kernels call no BLAS.
- A request may name a block helper of one layout (:class:`~batchnorm.kernels._jit.BlockBuild`)
  rather than a kernel's build: the forward compiling here loads it from the helper's cache
  entry where the helper wrote it first, and compiles it itself otherwise (nothing waits for
  it).
- Threaded builds cost twice the JIT of serial ones (Numba compiles each parallel loop as a
  gufunc of its own): a 64x1000 training forward 4.2 s against 2.1. Where a first call would
  compile the threaded build, it runs the serial one, and the helper compiles the serial
  builds of the next calls, then the threaded ones; calls take the serial builds (the same
  results) until the helper has written the threaded ones (:func:`first_call`,
  :func:`build_for`). Cold first calls on the Intel VM: 32x64x56x56 3.8-3.9 s -> 2.8 s,
  64x1000 5.8-5.9 s -> 3.3 s.
- The helper prints each request's index once it is done; a thread here reads those lines. A
  call that needs a kernel asked of a helper first waits for that line (at most
  :data:`WAIT_SECONDS`), then calls the kernel: Numba finds it in the cache. A kernel the
  helper did not write (another signature than predicted, a helper that failed) is compiled
  here as before, and the results are the same bits either way (tests/test_compile_ahead.py,
  tests/test_numba_environment.py).
- Helpers still running when this process exits finish their list on their own (at most the
  threaded builds' JIT, some seconds; stopping where the cache folder has gone), so that the
  next process finds every kernel in the cache; a forked child forgets its parent's.
"""

from __future__ import annotations

import atexit
import functools
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numba
from numba.core import event

from batchnorm.kernels._jit import BlockBuild, Kernel, cache_folder_writable, jit_enabled

# A kernel's build ("serial" or "parallel") and the Numba signature it will be called with.
Request = tuple[Kernel | BlockBuild, str, tuple[Any, ...]]

WAIT_SECONDS = 120.0
_PACKAGE_FOLDER = str(Path(__file__).resolve().parents[1])

# The helper: `batchnorm` stands in as a bare package module, so that importing the kernels runs
# neither the package's __init__ nor torch's import; the kernels' names, files and so Numba's
# cache entries are the asking process's.
_HELPER_SOURCE = """
import os, pickle, sys, types
# Numba's first compilation probes for BLAS by importing SciPy (0.1 s where it is installed);
# the kernels call no BLAS.
sys.modules.setdefault("scipy", None)
package = types.ModuleType("batchnorm")
package.__path__ = [sys.argv[1]]
sys.modules["batchnorm"] = package
from batchnorm import kernels
cache = os.environ.get("NUMBA_CACHE_DIR")
for index, (name, layout, build, signature) in enumerate(pickle.load(sys.stdin.buffer)):
    if cache and not os.path.isdir(cache):
        break  # a temporary cache folder, removed since
    try:
        getattr(getattr(kernels, name).for_layout(layout), build).compile(signature)
    except Exception:  # the asking process compiles what is missing itself
        pass
    try:
        print(index, flush=True)
    except OSError:  # the asking process has ended: the rest is for the next one
        pass
"""


class _Helper:
    """A helper process, which prints the index of each request once it is compiled (or failed);
    a thread of this process reads those lines as they come."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.done: set[int] = set()
        self.ended = False
        self.changed = threading.Condition()
        threading.Thread(target=self._read, name="batchnorm-compile-ahead", daemon=True).start()

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        for line in stdout:
            if line.strip().isdigit():  # the helper's own lines, not a library's
                with self.changed:
                    self.done.add(int(line))
                    self.changed.notify_all()
        stdout.close()
        self.process.wait()  # ended (or closed its output): reaped here
        with self.changed:  # what it did not report, the asking process compiles
            self.ended = True
            self.changed.notify_all()

    def finished(self, index: int | None = None) -> bool:
        """Whether request ``index`` (every request: None) is done or the helper has ended
        (without waiting)."""
        return (index is not None and index in self.done) or self.ended

    def wait(self, index: int | None = None) -> None:
        """Until request ``index`` (every request: None) is done or the helper has ended (at
        most WAIT_SECONDS, after which the helper is stopped)."""
        with self.changed:
            if not self.changed.wait_for(lambda: self.finished(index), WAIT_SECONDS):
                self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


_lock = threading.Lock()
# The helper compiling each (kernel name with its layout, build) asked of one, and the request's
# index there: callers test this before calling wait_for (one dictionary test a call while empty).
pending: dict[tuple[str, str], tuple[_Helper, int]] = {}
_helpers: list[_Helper] = []


def _forget_helpers() -> None:
    """In a forked child: the parent's helpers and their pipes are the parent's to read."""
    pending.clear()
    _helpers.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_helpers)


def enabled() -> bool:
    """Whether first calls compile ahead (see the module docstring)."""
    if os.environ.get("BATCHNORM_COMPILE_AHEAD", "1") == "0":
        return False
    if not (jit_enabled() and cache_folder_writable()):
        return False
    if not sys.executable or "python" not in Path(sys.executable).name.lower():
        return False  # an embedding program (uWSGI, ...) is not an interpreter to start
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return cpus > 1


@contextmanager
def compiling_ahead(
    kernel: Kernel, build: str, requests: Callable[[], list[Request]]
) -> Iterator[None]:
    """Runs the body, which calls ``kernel``'s ``build``; if that call compiles it (the build has
    no signature in this process and Numba's cache had none), first starts a helper compiling
    ``requests()``."""
    dispatcher = getattr(kernel, build)
    if dispatcher.signatures or not enabled():
        yield
        return
    listener = _FirstCompile(dispatcher, requests)
    with event.install_listener("numba:compile", listener):
        yield


class _FirstCompile(event.Listener):  # type: ignore[misc]
    """Starts the helper when ``dispatcher`` starts compiling (events come for every dispatcher
    that compiles, in any thread, while installed)."""

    def __init__(self, dispatcher: Any, requests: Callable[[], list[Request]]) -> None:
        self.dispatcher, self.requests, self.started = dispatcher, requests, False

    def on_start(self, occurrence: event.Event) -> None:
        if occurrence.data.get("dispatcher") is self.dispatcher and not self.started:
            self.started = True
            start(self.requests())

    def on_end(self, occurrence: event.Event) -> None:
        pass


def start(requests: list[Request]) -> None:
    """A helper process compiling ``requests`` (those not compiled here nor asked of another
    helper); nothing where none is left or the process cannot start."""
    with _lock:
        _close_finished()
        wanted = [
            (kernel, build, signature)
            for kernel, build, signature in requests
            if signature not in getattr(kernel, build).signatures
            and (kernel.__name__, build) not in pending
        ]
        if not wanted:
            return
        payload = pickle.dumps(
            [(kernel.function.__name__, kernel.layout, build, sig) for kernel, build, sig in wanted]
        )
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _HELPER_SOURCE, _PACKAGE_FOLDER],
                env=_helper_environment(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert process.stdin is not None
            process.stdin.write(payload)
            process.stdin.close()
        except OSError:
            return
        helper = _Helper(process)
        _helpers.append(helper)
        for index, (kernel, build, _) in enumerate(wanted):
            pending[(kernel.__name__, build)] = (helper, index)


def _close_finished() -> None:
    """Drops the helpers that have ended and that no pending request names (the lock is held)."""
    named = {id(helper) for helper, _ in pending.values()}
    for helper in list(_helpers):
        if id(helper) not in named and helper.ended:
            _helpers.remove(helper)


def _helper_environment() -> dict[str, str]:
    """This process's environment, with the cache folder Numba uses here where it was set in
    ``numba.config`` rather than in ``NUMBA_CACHE_DIR``: the helper must write where this
    process reads."""
    environment = dict(os.environ)
    folder = getattr(numba.config, "CACHE_DIR", "")
    if folder:
        environment["NUMBA_CACHE_DIR"] = str(folder)
    return environment


def wait_for(kernel: Kernel, build: str) -> None:
    """Before calling ``kernel``'s ``build``: wait until the helper compiling it is done with it,
    if one is."""
    with _lock:
        entry = pending.pop((kernel.__name__, build), None)
    if entry is not None:
        helper, index = entry
        helper.wait(index)


def finish_helpers() -> None:
    """Until every helper this process started has ended (at most :data:`WAIT_SECONDS` each):
    the calls after it take the builds they will keep (threaded ones included, from the
    cache), and no helper shares the CPUs. For timing (``batchnorm bench``): with a cold cache,
    the timed calls took the serial builds while a helper compiled the threaded ones, a
    bfloat16 training forward 2.2x its time, and torch's calls beside them slowed by the
    helper's compilation (an inference from 0.19 to 8 ms)."""
    with _lock:
        helpers = list(_helpers)
    for helper in helpers:
        helper.wait()


def build_for(kernel: Kernel, parallel: bool) -> Callable[..., Any]:
    """The build of ``kernel`` a call takes while helpers compile builds ahead: the threaded
    one where the call runs threaded (``parallel``), except while the helper compiling it has
    not written it yet, when the serial one serves where it is asked of a helper too, compiled
    here or in Numba's cache (the two builds give the same results; :func:`first_call`); after
    the helper compiling the build taken, if one is."""
    name = kernel.__name__
    if parallel:
        entry = pending.get((name, "parallel"))
        if entry is not None and not entry[0].finished(entry[1]):
            if (name, "serial") in pending:
                wait_for(kernel, "serial")
                serial: Callable[..., Any] = kernel.serial
                return serial
            return functools.partial(_serial_unless_compiling, kernel)
    wait_for(kernel, "parallel" if parallel else "serial")
    build: Callable[..., Any] = kernel.threaded if parallel else kernel.serial
    return build


def _serial_unless_compiling(kernel: Kernel, *arguments: Any) -> Any:
    """The serial build where it is compiled here or in the cache, else the threaded one once
    its helper has written it."""
    try:
        return _without_compiling(kernel.serial, kernel.serial, arguments)
    except _WouldCompileError:
        wait_for(kernel, "parallel")
        return kernel.threaded(*arguments)


def first_call(
    kernel: Kernel,
    parallel: bool,
    arguments: tuple[Any, ...],
    requests: Callable[[tuple[str, ...]], list[Request]],
) -> Any:
    """A plan's first call of ``kernel`` on ``arguments`` (its threaded build where
    ``parallel``); where that compiles here, a helper first starts compiling ``requests(builds)``,
    the kernels the next calls take in each of ``builds``.

    Where the threaded build would compile, the call takes the serial build (half the JIT: 2.1
    against 4.2 s for a 64x1000 training forward on the Intel VM, whose parallel loops Numba
    compiles as gufuncs of their own) and the helper compiles the serial builds of the next
    calls, then the threaded ones (this kernel's too): the calls take the serial builds until
    the helper has written the threaded ones (:func:`build_for`). Where the serial build is in
    the cache and the threaded one is not (a process that ended before its helper was done),
    the helper compiles the threaded builds alone.
    """
    if not enabled():
        return build_for(kernel, parallel)(*arguments)
    if never_cached(kernel.serial):
        # It compiles here for sure: the helper starts before Numba's own set-up in this
        # process (importing its libraries, 0.2-0.3 s) rather than after it.
        start(requests(("serial", "parallel") if parallel else ("serial",)))
    if parallel:
        try:
            return _without_compiling(kernel.threaded, kernel.parallel, arguments)
        except _WouldCompileError:
            pass
        try:  # the serial builds may be in the cache without the threaded ones
            result = _without_compiling(kernel.serial, kernel.serial, arguments)
        except _WouldCompileError:
            builds: tuple[str, ...] = ("serial", "parallel")
        else:
            start(requests(("parallel",)))
            return result
    else:
        builds = ("serial",)
    with compiling_ahead(kernel, "serial", lambda: requests(builds)):
        return kernel.serial(*arguments)


def never_cached(dispatcher: Any) -> bool:
    """Whether Numba's on-disk cache holds no entry for ``dispatcher``'s function at all (no
    index file), so that its first call compiles; False where that cannot be told (no cache)."""
    try:
        index = dispatcher._cache._cache_file._index_path
    except AttributeError:
        return False
    return not os.path.exists(index)


def _without_compiling(
    call: Callable[..., Any], dispatcher: Any, arguments: tuple[Any, ...]
) -> Any:
    """``call(*arguments)``, or :class:`_WouldCompileError` where ``dispatcher`` would compile
    (raised at the start of its compilation, before Numba does any work, which leaves the
    dispatcher as it was)."""
    with event.install_listener("numba:compile", _Refuse(dispatcher)):
        return call(*arguments)


class _WouldCompileError(Exception):
    """A build that is neither compiled in this process nor in Numba's cache."""


class _Refuse(event.Listener):  # type: ignore[misc]
    """Stops a call of ``dispatcher`` before it compiles (:func:`_without_compiling`)."""

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher

    def on_start(self, occurrence: event.Event) -> None:
        if occurrence.data.get("dispatcher") is self.dispatcher:
            raise _WouldCompileError

    def on_end(self, occurrence: event.Event) -> None:
        pass


@atexit.register
def _leave_helpers() -> None:
    """Helpers still running at exit finish their list on their own (the next process finds
    their kernels in the cache); this process no longer waits for them, and its ``Popen``
    objects must not warn at shutdown that they are still running."""
    with _lock:
        pending.clear()
        for helper in _helpers:
            if helper.process.poll() is None:
                helper.process.returncode = 0  # not ours to wait for any more
        _helpers.clear()
