"""Compiling ahead: while this process compiles the kernel a first call needs now, a helper
process compiles the kernels its next calls will need (a training step's backward, the layer's
inference) into Numba's on-disk cache, from which this process then loads them.

A cold first call is JIT compilation, one Python thread's work: on the 2-core Intel VM a 4x3x5
training step and inference call took 4.3 s, of which 2.1 s compiling the forward kernel and
1.5 s the backward and inference kernels. A helper imports only :mod:`batchnorm.kernels` (a
stand-in ``batchnorm`` package module, so not torch: 0.2-0.3 s) and compiled those in 2.1 s
beside the forward's compilation: 2.85-2.88 s in all (64x1000, with the threaded builds: 8.9-9.0
s -> 5.8-5.9 s).

- A helper starts only when the first call really compiles (Numba's ``numba:compile`` event for
  that kernel's dispatcher: a cache hit fires none), where more than one CPU is available, Numba
  compiles and has a writable cache folder, ``sys.executable`` is a Python interpreter, and
  ``BATCHNORM_COMPILE_AHEAD`` is not ``0``.
- The helper prints each request's index once it is done. A call that needs a kernel asked of a
  helper first waits for that line (at most :data:`WAIT_SECONDS`), then calls the kernel: Numba
  finds it in the cache. A kernel the helper did not write (another signature than predicted, a
  helper that failed) is compiled here as before, and the results are the same bits either way
  (tests/test_compile_ahead.py, tests/test_numba_environment.py).
- Helpers still running when this process exits are stopped; a forked child forgets its
  parent's.
"""

from __future__ import annotations

import atexit
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

from batchnorm.kernels._jit import Kernel, cache_folder_writable, jit_enabled

# A kernel's build ("serial" or "parallel") and the Numba signature it will be called with.
Request = tuple[Kernel, str, tuple[Any, ...]]

WAIT_SECONDS = 120.0
_PACKAGE_FOLDER = str(Path(__file__).resolve().parents[1])

# The helper: `batchnorm` stands in as a bare package module, so that importing the kernels runs
# neither the package's __init__ nor torch's import; the kernels' names, files and so Numba's
# cache entries are the asking process's.
_HELPER_SOURCE = """
import pickle, sys, types
package = types.ModuleType("batchnorm")
package.__path__ = [sys.argv[1]]
sys.modules["batchnorm"] = package
from batchnorm import kernels
for index, (name, layout, build, signature) in enumerate(pickle.load(sys.stdin.buffer)):
    try:
        getattr(getattr(kernels, name).for_layout(layout), build).compile(signature)
    except Exception:  # the asking process compiles what is missing itself
        pass
    print(index, flush=True)
"""


class _Helper:
    """A helper process, which prints the index of each request once it is compiled (or failed)."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.done: set[int] = set()
        self.lock = threading.Lock()

    def wait(self, index: int) -> None:
        """Until request ``index`` is done or the helper has ended (at most WAIT_SECONDS)."""
        with self.lock:
            stdout = self.process.stdout
            assert stdout is not None
            timer = threading.Timer(WAIT_SECONDS, self.process.kill)
            timer.start()
            try:
                while index not in self.done:
                    line = stdout.readline()
                    if not line:  # ended: what it did not report, this process compiles
                        self.done.update(range(index + 1))
                        return
                    if line.strip().isdigit():  # the helper's own lines, not a library's
                        self.done.add(int(line))
            finally:
                timer.cancel()

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
    """Drops the helpers that have ended and that no pending request names (the lock is held),
    closing their pipes."""
    named = {id(helper) for helper, _ in pending.values()}
    for helper in list(_helpers):
        if id(helper) not in named and helper.process.poll() is not None:
            _helpers.remove(helper)
            if helper.process.stdout is not None:
                helper.process.stdout.close()


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


@atexit.register
def _stop_helpers() -> None:
    with _lock:
        pending.clear()
        helpers = list(_helpers)
        _helpers.clear()
    for helper in helpers:
        helper.stop()
