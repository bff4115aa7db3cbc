"""Layers called in a process forked after its parent ran the threaded kernels (Hogwild-style
torch.multiprocessing training, a forked pool of evaluation workers): the child gives what the
parent gave, whatever Numba's threading layer.

Numba's "omp" layer on Linux is GNU OpenMP, which cannot run in a forked child: Numba
terminated the child on its first threaded kernel ("fork() called from a process already using
GNU OpenMP"). Such a child now runs the serial builds.

Oracle: the same calls in the parent before the fork; results are bit-identical between the
serial and threaded builds (tests/test_cpu_numerics.py), so equality is exact. The child calls
no threaded torch operator: torch's own, on GNU OpenMP too, hang in such a child unless it sets
``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import sys

import pytest

from tests.snippets import run_program

_FORKED_CALLS = """
import os
import numba
import numpy as np
import torch
from batchnorm import BatchNormalization

values = np.random.default_rng(0).normal(size=(32, 16, 32, 32)).astype(np.float32)  # threaded
upstream = torch.from_numpy(np.random.default_rng(1).normal(size=values.shape).astype(np.float32))


def step():
    layer = BatchNormalization(16, axis=1)
    x = torch.from_numpy(values.copy()).requires_grad_()
    y = layer(x, training=True)
    y.backward(upstream)
    with torch.no_grad():
        inference = layer(x, training=False)
    results = (y, inference, x.grad, layer.gamma.grad, layer.beta.grad, layer.moving_variance)
    return [t.detach().numpy().copy() for t in results]


expected = step()
read, write = os.pipe()
child = os.fork()
if child == 0:
    try:
        same = all(np.array_equal(a, b) for a, b in zip(step(), expected))
        os.write(write, str(same).encode())
    finally:
        os._exit(0)
os.close(write)
_, status = os.waitpid(child, 0)
answer = os.read(read, 100).decode() or "nothing"
print(numba.threading_layer(), answer, os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP: Linux")
@pytest.mark.parametrize("layer", ["omp", "workqueue"])
def test_a_forked_child_gives_the_parents_results(layer):
    threads = {"NUMBA_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}  # the threaded kernels
    result = run_program(_FORKED_CALLS, NUMBA_THREADING_LAYER=layer, **threads)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [layer, "True", "0"], result.stderr[-3000:]
