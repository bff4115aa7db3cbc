"""``batchnorm bench``: this package against torch's native batch norm and the copy floor.

Every case is timed in one process, implementations interleaved, and reported as the median
wall time divided by the median time of one out-of-place copy of the input, the least that any
batch norm must pay. The copy is torch's (threaded) ``copy_`` into fresh memory allocated by
NumPy, which asks for transparent huge pages as the CPU kernels' outputs do; ``x.clone()``, whose
fresh memory from torch's allocator costs many more page faults, is reported beside it. torch native is ``torch.nn.functional.batch_norm`` with the
layout a PyTorch user would use: the channel moved to dim 1 by a permuted view (channels-last
memory for images, a transposed view for sequences and dense inputs keep dim 1).
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from batchnorm.functional._canonical_layout import canonical_layout
from batchnorm.layers import BatchNormalization
from batchnorm.tools._progress import Progress


@dataclass(frozen=True)
class BenchCase:
    name: str
    shape: tuple[int, ...]
    axis: int
    large: bool
    options: dict[str, Any] = field(default_factory=dict)
    mask: bool = False


MAIN_CASES = [
    BenchCase("conv-early NCHW", (64, 64, 56, 56), 1, True),
    BenchCase("conv-early NHWC", (64, 56, 56, 64), -1, True),
    BenchCase("conv-late NCHW", (64, 512, 7, 7), 1, False),
    BenchCase("dense NC", (8192, 1024), -1, True),
    BenchCase("sequence NLC", (64, 256, 512), -1, True),
    BenchCase("small-batch NC", (32, 4096), -1, False),
]
EXTRA_CASES = [
    BenchCase("renorm NHWC", (64, 56, 56, 64), -1, False, {"renorm": True}),
    BenchCase("ghost NHWC", (64, 56, 56, 64), -1, False, {"virtual_batch_size": 8}),
    BenchCase("mask NLC", (64, 256, 512), -1, False, {"fused": False}, mask=True),
]
MODES = ("train forward", "inference", "train forward+backward")


def quick_cases() -> tuple[list[BenchCase], list[BenchCase]]:
    """The same layouts at small sizes, for a smoke run (``--quick``)."""

    def shrink(case: BenchCase) -> BenchCase:
        shape = tuple(max(2, s // 8) for s in case.shape)
        return BenchCase(case.name, shape, case.axis, case.large, case.options, case.mask)

    return [shrink(c) for c in MAIN_CASES], [shrink(c) for c in EXTRA_CASES]


def interleaved_medians(functions: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run round-robin so that drift hits all of them alike."""
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _torch_layout(x: torch.Tensor, axis: int) -> torch.Tensor:
    """The view a PyTorch user hands to F.batch_norm: channel at dim 1."""
    axis = axis % x.ndim
    return x if axis == 1 else x.movedim(axis, 1)


def _mode_functions(case: BenchCase, x: torch.Tensor) -> dict[str, dict[str, Callable[[], Any]]]:
    channels = x.shape[case.axis]
    layer = BatchNormalization(channels, axis=case.axis, **case.options)
    mask = None
    if case.mask:
        mask = torch.rand([s for i, s in enumerate(x.shape) if i != case.axis % x.ndim]) > 0.2
    torch_x = _torch_layout(x, case.axis)
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    running_mean, running_var = torch.zeros(channels), torch.ones(channels)
    x_grad = x.detach().clone().requires_grad_()
    torch_x_grad = _torch_layout(x_grad, case.axis)
    upstream = torch.randn_like(x)
    torch_upstream = _torch_layout(upstream, case.axis)

    def ours_train() -> Any:
        with torch.no_grad():
            return layer(x, training=True, mask=mask)

    def ours_inference() -> Any:
        with torch.no_grad():
            return layer(x, training=False)

    def ours_backward() -> Any:
        x_grad.grad = None
        layer(x_grad, training=True, mask=mask).backward(upstream)  # type: ignore[no-untyped-call]

    def native(training: bool, source: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            source,
            running_mean,
            running_var,
            weight,
            bias,
            training=training,
            momentum=0.01,
            eps=1e-3,
        )

    def torch_train() -> Any:
        with torch.no_grad():
            return native(True, torch_x)

    def torch_inference() -> Any:
        with torch.no_grad():
            return native(False, torch_x)

    def torch_backward() -> Any:
        x_grad.grad = None
        native(True, torch_x_grad).backward(torch_upstream)  # type: ignore[no-untyped-call]

    return {
        "train forward": {"batchnorm": ours_train, "torch": torch_train},
        "inference": {"batchnorm": ours_inference, "torch": torch_inference},
        "train forward+backward": {"batchnorm": ours_backward, "torch": torch_backward},
    }


def run_case(case: BenchCase, repeats: int, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=generator)
    functions = _mode_functions(case, x)
    ghost = bool(case.options.get("virtual_batch_size"))
    _, layout = canonical_layout(x, (case.axis % x.ndim,), ghost)
    result: dict[str, Any] = {**asdict(case), "input_copy": layout.copied, "modes": {}}
    floors, clones = [], []
    for mode in modes:
        copies = {"floor": lambda: fresh_copy(x), "clone": x.clone}
        timings = interleaved_medians({**copies, **functions[mode]}, repeats)
        floor = timings.pop("floor")
        floors.append(floor)
        clones.append(timings.pop("clone"))
        result["modes"][mode] = {
            "seconds": timings,
            "speedup_over_torch": timings["torch"] / timings["batchnorm"],
        }
    # First-touch page faults make single copies noisy: one floor per case, over every mode.
    floor = result["floor_seconds"] = statistics.median(floors)
    result["clone_seconds"] = statistics.median(clones)
    for numbers in result["modes"].values():
        numbers["floor_multiple"] = {name: t / floor for name, t in numbers["seconds"].items()}
    return result


def fresh_copy(x: torch.Tensor) -> torch.Tensor:
    """One out-of-place copy of ``x`` into new NumPy-allocated (huge-page advised) memory."""
    fresh = torch.from_numpy(
        np.empty(tuple(x.shape), np.float32 if x.dtype == torch.float32 else np.float64)
    )
    return fresh.copy_(x)


_FIRST_CALL = (
    "import time, torch; t = time.perf_counter(); import batchnorm; "
    "layer = batchnorm.BatchNormalization(3, axis=1); x = torch.randn(4, 3, 5, requires_grad=True); "
    "layer(x, training=True).sum().backward(); layer(x, training=False); "
    "print(time.perf_counter() - t)"
)


def first_call_seconds(*, cold_cache: bool) -> float:
    """Import plus a first training and inference call in a fresh process.

    With ``cold_cache`` Numba's cache points at an empty folder, so JIT compilation is included;
    otherwise the process finds the compiled kernels on disk.
    """
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache} if cold_cache else dict(os.environ)
        output = subprocess.run(
            [sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True, check=True
        )
    return float(output.stdout.strip().splitlines()[-1])


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarise(main: list[dict[str, Any]], extra: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets, each with the measured value and whether it is met."""
    large = [r for r in main if r["large"]]
    targets: list[tuple[str, float, str, float]] = []
    for mode, bound in zip(MODES, (2.0, 1.3, 4.0), strict=True):
        worst = max(r["modes"][mode]["floor_multiple"]["batchnorm"] for r in large)
        targets.append((f"large cases: {mode} (worst, x floor)", worst, "<=", bound))
    speedups = [r["modes"]["train forward+backward"]["speedup_over_torch"] for r in main]
    targets.append(
        ("forward+backward speedup over torch (geo-mean)", geometric_mean(speedups), ">=", 5.0)
    )
    for r in main:
        if r["name"].startswith("small-batch"):
            ratio = max(
                r["modes"][m]["seconds"]["batchnorm"] / r["modes"][m]["seconds"]["torch"]
                for m in MODES
            )
            targets.append(("small batch: time / torch's (worst mode)", ratio, "<=", 1.5))
    for r in extra:
        plain = next((m for m in main if m["shape"] == r["shape"]), None)
        if plain is not None:
            ratio = (
                r["modes"]["train forward"]["seconds"]["batchnorm"]
                / plain["modes"]["train forward"]["seconds"]["batchnorm"]
            )
            targets.append((f"{r['name']}: train forward / plain", ratio, "<=", 1.3))
    return {
        "targets": [
            {
                "target": f"{name} {relation} {bound}",
                "measured": value,
                "met": value <= bound if relation == "<=" else value >= bound,
            }
            for name, value, relation, bound in targets
        ]
    }


def format_table(
    main: list[dict[str, Any]], extra: list[dict[str, Any]], summary: dict[str, Any]
) -> str:
    lines = [
        "| case | shape | mode | batchnorm (x floor) | torch (x floor) | speedup | floor ms "
        "| clone ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in [*main, *extra]:
        for mode, numbers in result["modes"].items():
            lines.append(
                f"| {result['name']} | {'x'.join(map(str, result['shape']))} | {mode} | "
                f"{numbers['floor_multiple']['batchnorm']:.2f} | {numbers['floor_multiple']['torch']:.2f} | "
                f"{numbers['speedup_over_torch']:.2f}x | {result['floor_seconds'] * 1e3:.2f} | "
                f"{result['clone_seconds'] * 1e3:.2f} |"
            )
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target in summary["targets"]:
        lines.append(
            f"| {target['target']} | {target['measured']:.2f} | {'yes' if target['met'] else 'NO'} |"
        )
    return "\n".join(lines)


def run_benchmark(
    *, quick: bool, repeats: int, compile_time: bool, progress: bool = True
) -> dict[str, Any]:
    """Time every case (and, with ``compile_time``, the first call in fresh processes).

    ``progress`` draws a bar over the cases on stderr when it is a terminal, and writes one
    closing line when it is not.
    """
    main_cases, extra_cases = quick_cases() if quick else (MAIN_CASES, EXTRA_CASES)
    report: dict[str, Any] = {
        "machine": {
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "platform": sys.platform,
        },
        "quick": quick,
        "repeats": repeats,
    }
    steps = len(main_cases) + len(extra_cases) + (2 if compile_time else 0)
    bar = Progress("bench", steps, unit="step", enabled=progress, summary=True)
    try:
        if compile_time:
            cold = first_call_seconds(cold_cache=True)
            bar.update()
            warm = first_call_seconds(cold_cache=False)
            bar.update()
            report["first_call_seconds"] = {"cold_cache": cold, "warm_cache": warm}
        main_results, extra_results = [], []
        for case in main_cases:
            main_results.append(run_case(case, repeats))
            bar.update()
        for case in extra_cases:
            extra_results.append(run_case(case, repeats, modes=("train forward",)))
            bar.update()
    finally:
        bar.close()
    report["cases"] = main_results
    report["extra_cases"] = extra_results
    report["summary"] = summarise(main_results, extra_results)
    return report
