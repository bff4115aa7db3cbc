"""Compiling ahead (batchnorm.kernels._ahead): the kernel signatures a first training step asks a
helper process for are those its backward and the layer's inference then call, and a process
with an empty Numba cache loads them from the helper's cache entries and gets the bits of a
process that compiled them itself.

Oracles: the kernels' own dispatchers (the signatures they were called with, their cache hits)
and a process run with ``BATCHNORM_COMPILE_AHEAD=0``.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import batchnorm
from batchnorm.functional import _cpu_training_call
from batchnorm.kernels import _ahead
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

    def record(kernel, build, requests):  # type: ignore[no-untyped-def]
        asked.append(requests())
        return contextlib.nullcontext()

    monkeypatch.setattr(_cpu_training_call, "compiling_ahead", record)
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
    assert [kernel.function.__name__ for kernel, _, _ in requests][:1] == [backward]
    for kernel, build, signature in requests:
        assert signature in getattr(kernel, build).signatures, (kernel.__name__, build, signature)


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
