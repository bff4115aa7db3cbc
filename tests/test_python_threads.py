"""Layers called from several Python threads at once (a threaded inference server, a data
pipeline): every call gives what the same call gives alone, whatever Numba's threading layer.

Oracle: the same calls made one after another in the same process, before the threads start;
results are bit-identical for any thread count and between the serial and threaded builds
(tests/test_cpu_numerics.py), so equality is exact.
"""

from __future__ import annotations

import threading

import numba
import pytest

from tests.snippets import run_program

_CONCURRENT_CALLS = """
import threading
import torch
from batchnorm import BatchNormalization
torch.manual_seed(0)
x = torch.randn(32, 16, 32, 32)  # 2^19 values: the threaded kernels
upstream = torch.randn_like(x)
trained = BatchNormalization(16, axis=1)
with torch.no_grad():
    trained(x, training=True)


def step():
    layer = BatchNormalization(16, axis=1)
    source = x.clone().requires_grad_()
    layer(source, training=True).backward(upstream)
    with torch.no_grad():
        inference = trained(x, training=False)
    return inference, source.grad, layer.gamma.grad, layer.moving_variance.clone()


expected = step()
failures = []


def work():
    try:
        for _ in range(20):
            if not all(torch.equal(a, b) for a, b in zip(step(), expected)):
                failures.append("differs")
    except Exception as error:  # reported below
        failures.append(repr(error))


threads = [threading.Thread(target=work) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
import numba
print(numba.threading_layer(), failures)
"""


@pytest.mark.parametrize("layer", ["workqueue", "omp"])
def test_layers_called_from_four_threads_at_once(layer):
    # Numba's workqueue layer (its fallback without TBB or an OpenMP runtime: macOS, slim Linux
    # images) aborted the process when two threads launched a threaded kernel at once.
    result = run_program(_CONCURRENT_CALLS, NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS="2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [layer, "[]"]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba has one thread")
def test_a_new_thread_gets_the_thread_count_even_with_an_ended_threads_id():
    """Numba's thread count is per thread; what was set was remembered by thread id, and Python
    gives a new thread an ended one's id: the new thread skipped the setting and ran on Numba's
    default count."""
    from batchnorm.kernels._jit import set_threads

    counts = []

    def work():
        set_threads(1)
        counts.append(numba.get_num_threads())

    for _ in range(8):  # one after another: the ids are reused
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    assert counts == [1] * 8
