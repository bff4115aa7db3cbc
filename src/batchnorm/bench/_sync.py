"""``batchnorm bench --sync``: the per-step cost of synchronized batch norm, 2 gloo processes on CPU.

Two processes (one thread each) on 127.0.0.1 time a training step (forward + backward) of the
same layer on the same local batch, synchronized and not, round-robin; the difference is the
overhead of synchronization. The collectives alone (the same tensors, no batch norm) are timed too,
and the bytes each rank sends per step are computed from the tensor sizes.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import start_processes

from batchnorm.bench._machine import cpu_facts
from batchnorm.functional._synchronized import communicated_bytes
from batchnorm.kernels import _ahead as ahead
from batchnorm.layers import BatchNormalization

WORLD_SIZE = 2
# name, local batch shape, channel axis
CASES = [
    ("conv NCHW", (32, 64, 28, 28), 1),
    ("conv-late NCHW", (32, 512, 7, 7), 1),
    ("dense NC", (256, 1024), -1),
    ("small NC", (16, 64), -1),
]
QUICK_CASES = [("conv NCHW", (4, 8, 6, 6), 1), ("small NC", (8, 16), -1)]


def interleaved_medians(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin so that drift hits all of them alike.

    A fixed number of calls, not ``blocked_autorange``: the ranks' collectives must pair up, so
    every rank has to make the same calls.
    """
    for function in functions.values():
        function()
    ahead.finish_helpers()  # see interleaved_timings: every rank makes the same calls
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _step(layer: BatchNormalization, x: torch.Tensor, iterations: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(iterations):
            layer(x, training=True).sum().backward()

    return run


def _collectives(channels: int, iterations: int) -> Callable[[], None]:
    """The two collectives of one synchronized step, on tensors of the same sizes."""
    sizes = communicated_bytes(channels, 1, WORLD_SIZE)
    statistics = torch.zeros(sizes["forward_sent"] // 8, dtype=torch.float64)
    gradients = torch.zeros(sizes["backward_all_reduce"] // 8, dtype=torch.float64)

    def run() -> None:
        for _ in range(iterations):
            dist.all_gather([torch.empty_like(statistics) for _ in range(WORLD_SIZE)], statistics)
            dist.all_reduce(gradients)

    return run


def _time_case(shape: tuple[int, ...], axis: int, repeats: int, rank: int) -> dict[str, Any]:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(rank)).requires_grad_(True)
    channels = shape[axis]
    plain = BatchNormalization(channels, axis=axis, fused=False)
    synchronized = BatchNormalization(channels, axis=axis, synchronized=True)
    iterations = max(1, min(50, int(2e6 // max(x.numel(), 1))))
    seconds = interleaved_medians(
        {
            "unsynchronized": _step(plain, x, iterations),
            "synchronized": _step(synchronized, x, iterations),
            "collectives only": _collectives(channels, iterations),
        },
        repeats,
    )
    per_step = {name: value / iterations for name, value in seconds.items()}
    overhead = per_step["synchronized"] - per_step["unsynchronized"]
    return {
        "local_shape": list(shape),
        "channels": channels,
        "ms_per_step": {name: 1e3 * value for name, value in per_step.items()},
        "overhead_ms": 1e3 * overhead,
        "ratio": per_step["synchronized"] / per_step["unsynchronized"],
        "bytes_per_step": communicated_bytes(channels, 1, WORLD_SIZE),
    }


def _worker(rank: int, port: int, directory: str, quick: bool, repeats: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        cases = {
            name: _time_case(shape, axis, repeats, rank)
            for name, shape, axis in (QUICK_CASES if quick else CASES)
        }
        Path(directory, f"rank{rank}.json").write_text(json.dumps(cases))
    finally:
        dist.destroy_process_group()


def run_sync_benchmark(*, quick: bool = False, repeats: int = 9) -> dict[str, Any]:
    """Spawn the 2 gloo processes and return rank 0's timings (rank 1's are in ``ranks``)."""
    with tempfile.TemporaryDirectory() as directory:
        start_processes(  # type: ignore[no-untyped-call]
            _worker,
            args=(_free_port(), directory, quick, repeats),
            nprocs=WORLD_SIZE,
            join=True,
            start_method="spawn",
        )
        ranks = [json.loads(Path(directory, f"rank{r}.json").read_text()) for r in range(2)]
    return {
        "machine": {
            **cpu_facts(),
            "threads_per_process": 1,
            "torch": torch.__version__,
        },
        "world_size": WORLD_SIZE,
        "backend": "gloo",
        "repeats": repeats,
        "cases": ranks[0],
        "ranks": ranks,
    }


def format_sync_table(cases: dict[str, Any]) -> str:
    header = (
        f"{'case':<16}{'local batch':>18}{'plain ms':>10}{'sync ms':>10}{'overhead ms':>13}"
        f"{'ratio':>7}{'comm ms':>9}{'bytes/step sent':>17}"
    )
    lines = [header, "-" * len(header)]
    for name, case in cases.items():
        ms = case["ms_per_step"]
        sent = case["bytes_per_step"]
        total = sent["forward_sent"] + sent["backward_all_reduce"]
        shape = "x".join(str(s) for s in case["local_shape"])
        lines.append(
            f"{name:<16}{shape:>18}{ms['unsynchronized']:>10.3f}{ms['synchronized']:>10.3f}"
            f"{case['overhead_ms']:>13.3f}{case['ratio']:>7.2f}{ms['collectives only']:>9.3f}"
            f"{total:>17,}"
        )
    return "\n".join(lines)
