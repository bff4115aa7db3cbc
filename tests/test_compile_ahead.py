"""Compiling ahead (batchnorm.kernels._ahead): the kernel signatures a first training step asks a
helper process for are those its backward and the layer's inference then call, and a process
with an empty Numba cache loads them from the helper's cache entries and gets the bits of a
process that compiled them itself.

Oracles: the kernels' own dispatchers (the signatures they were called with, their cache hits)
and a process run with ``BATCHNORM_COMPILE_AHEAD=0``.
"""

from __future__ import annotations

import math

import numba
import pytest
import torch

import batchnorm
from batchnorm import kernels
from batchnorm.functional import _cpu_training_call
from batchnorm.kernels import _ahead
from batchnorm.kernels._jit import BlockBuild, bound, compiled, layout_for
from tests.snippets import run_program


@pytest.mark.parametrize(
    ("shape", "axis", "dtype", "activation"),
    [
        ((5, 3, 7), 1, torch.float32, None),  # channel planes, serial
        ((96, 1000), -1, torch.float32, None),  # rows, threaded reducing passes, serial inference
        ((4, 64, 33, 33), 1, torch.float32, None),  # planes, threaded throughout
        ((50, 6), -1, torch.float32, None),  # narrow rows
        ((6, 4, 5, 16), -1, torch.bfloat16, None),  # half-precision bits
        ((7, 3, 9), 1, torch.float64, None),
        ((5, 3, 7), 1, torch.float32, "relu"),  # the activation's backward, reading x
        ((40, 12), -1, torch.float32, "elu"),  # reading the output
    ],
)
def test_the_predicted_signatures_are_those_the_calls_take(
    monkeypatch, shape, axis, dtype, activation
):
    asked: list[list[_ahead.Request]] = []
    original = _cpu_training_call.first_call

    def record(kernel, parallel, arguments, requests):  # type: ignore[no-untyped-def]
        asked.append(requests(("serial", "parallel") if parallel else ("serial",)))
        return original(kernel, parallel, arguments, requests)

    monkeypatch.setattr(_cpu_training_call, "first_call", record)
    layer = batchnorm.BatchNormalization(axis=axis, activation=activation).to(dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    layer(x.detach(), training=True)  # builds the layer
    _reset_plans()
    asked.clear()
    layer(x, training=True).backward(torch.randn(shape, dtype=dtype))
    with torch.no_grad():
        layer(x, training=False)
    layer(x, training=False).backward(torch.randn(shape, dtype=dtype))
    assert asked, "the first training step asked for nothing"
    requests = asked[0]
    backward = "train_backward" if activation is None else "train_backward_activated"
    names = [kernel.function.__name__ for kernel, _, _ in requests]
    # The forward's normalising block helper comes first, which the forward then loads: on
    # channel planes through the inference kernel, on rows alone; narrow rows start with the
    # backward.
    layout = layout_for(shape[axis], math.prod(shape[axis:][1:]))
    first = {
        "planes": ["affine_normalize", backward],
        "rows": ["normalize_block", backward],
        "narrow": [backward],
    }[layout]
    assert names[: len(first)] == first
    # The serial and threaded builds take the same arguments: a call here may have taken either.
    for kernel, build, signature in requests:
        if isinstance(kernel, BlockBuild):
            _type_forward_again(kernel.layout)
        taken = {*kernel.serial.signatures, *kernel.parallel.signatures}
        assert signature in taken, (kernel.__name__, build, signature)


def _type_forward_again(layout: str) -> None:
    """A forward kernel loaded from Numba's cache leaves the block helpers it calls unknown to
    their dispatchers: its serial build compiled again, uncached, for the signatures it was
    called with, makes them compile (or load) what it calls."""
    forward = kernels.train_forward.for_layout(layout)
    fresh = compiled(bound(forward.function, layout, "serial"), reassociate=False, cache=False)
    for signature in {*forward.serial.signatures, *forward.parallel.signatures}:
        fresh.compile(signature)


def _reset_plans() -> None:
    """Every kept plan asks again on its next first step."""
    from batchnorm.functional import _cpu_plan

    for plan in _cpu_plan._PLANS.values():
        plan.ahead_asked = False


_FIRST_STEP = """
import sys, torch, batchnorm
from batchnorm import kernels
torch.manual_seed(0)
shape, axis = tuple(int(s) for s in sys.argv[1].split(",")), int(sys.argv[2])
layer = batchnorm.BatchNormalization(axis=axis)
x = torch.randn(shape, requires_grad=True)
y = layer(x, training=True)
y.backward(torch.randn(shape))
with torch.no_grad():
    z = layer(x, training=False)
hits = sum(
    sum(getattr(kernel.for_layout(layout), build).stats.cache_hits.values())
    for kernel in (kernels.train_backward, kernels.affine_normalize)
    for layout in ("rows", "planes", "narrow")
    for build in ("serial", "parallel")
    if build in vars(kernel.for_layout(layout))
)
values = torch.cat([y.flatten(), x.grad.flatten(), layer.gamma.grad, z.flatten()])
print(hits, values.double().sum().item(), values.abs().double().sum().item())
"""


@pytest.mark.skipif(not _ahead.enabled(), reason="compiling ahead is off on this machine")
@pytest.mark.parametrize(("shape", "axis"), [((4, 3, 5), 1), ((64, 1000), -1)])
def test_a_cold_first_step_loads_what_the_helper_compiled(tmp_path, shape, axis):
    arguments = (",".join(map(str, shape)), str(axis))
    ahead = run_program(_FIRST_STEP, *arguments, NUMBA_CACHE_DIR=str(tmp_path / "ahead"))
    alone = run_program(
        _FIRST_STEP,
        *arguments,
        NUMBA_CACHE_DIR=str(tmp_path / "alone"),
        BATCHNORM_COMPILE_AHEAD="0",
    )
    assert ahead.returncode == 0, ahead.stderr[-3000:]
    assert alone.returncode == 0, alone.stderr[-3000:]
    hits, *sums = ahead.stdout.split()
    hits_alone, *sums_alone = alone.stdout.split()
    assert int(hits) == 2  # the backward and the inference, both from the helper's entries
    assert int(hits_alone) == 0
    assert sums == sums_alone  # the same bits


_UNTIL_THREADED = """
import torch, batchnorm
from batchnorm import kernels
from batchnorm.kernels import _ahead
torch.manual_seed(0)
torch.set_num_threads(2)
# Moving statistics that stay as they are (Keras' momentum): every step gives the same bits.
layer = batchnorm.BatchNormalization(axis=-1, momentum=1.0)
x = torch.randn(96, 1000, requires_grad=True)
dy = torch.randn(96, 1000)

def step():
    x.grad = None
    y = layer(x, training=True)
    y.backward(dy)
    return torch.cat([y.detach().flatten(), x.grad.flatten(), layer.moving_mean.clone()])

forward = kernels.train_forward.for_layout("rows")
backward = kernels.train_backward.for_layout("rows")
first = step()
serial_first = bool(forward.serial.signatures) and not forward.parallel.signatures
meanwhile = step()  # serial or threaded, whichever the helper has written by now
_ahead.finish_helpers()  # what batchnorm bench does before timing
ended = all(helper.ended for helper in _ahead._helpers)
later = step()  # threaded now, from the helper's cache entries
hits = sum(forward.parallel.stats.cache_hits.values()) + sum(
    backward.parallel.stats.cache_hits.values()
)
print(serial_first, ended, hits, torch.equal(first, meanwhile) and torch.equal(first, later))
"""


@pytest.mark.skipif(not _ahead.enabled(), reason="compiling ahead is off on this machine")
def test_a_cold_threaded_step_runs_serial_until_the_helper_wrote_the_threaded_builds(tmp_path):
    # (96, 1000): two row blocks in the reducing passes, run threaded on two threads.
    result = run_program(_UNTIL_THREADED, NUMBA_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    serial_first, ended, hits, same = result.stdout.split()
    assert serial_first == "True"  # the first step compiled the serial build only
    assert ended == "True"  # finish_helpers returned once the helper had ended
    assert int(hits) == 2  # the next step's threaded builds came from the helper's entries
    assert same == "True"  # with the serial builds' bits


def _plus_one(value):  # type: ignore[no-untyped-def]
    return value + 1


def test_never_cached_tells_a_function_without_a_cache_entry(tmp_path, monkeypatch):
    # A first call starts its helper at once where Numba's cache has no index file for the
    # kernel: true before the first compilation writes one, false after it, and false for a
    # function Numba does not cache (nothing to tell).
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    cached = numba.njit(cache=True)(_plus_one)
    assert _ahead.never_cached(cached)
    assert cached(1) == 2
    assert not _ahead.never_cached(cached)
    assert numba.njit(cache=True)(_plus_one)._cache._cache_path.startswith(str(tmp_path))
    assert not _ahead.never_cached(numba.njit(cache=False)(_plus_one))
