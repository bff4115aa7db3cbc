"""The bench's timing loop (batchnorm.bench._benchmark.interleaved_timings)."""

from __future__ import annotations

import torch

from batchnorm.bench._benchmark import interleaved_timings


def test_timed_functions_run_with_the_process_thread_count():
    # torch.utils.benchmark.Timer runs its statement on one thread unless told otherwise: the
    # bench would then time one-thread kernels while reporting the process's thread count.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    try:
        timings = interleaved_timings(
            {"probe": lambda: seen.append(torch.get_num_threads())}, rounds=2, min_run_time=0.001
        )
    finally:
        torch.set_num_threads(previous)
    assert set(seen) == {2}
    assert timings["probe"].seconds > 0
