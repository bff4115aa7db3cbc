"""``batchnorm bench [--quick] [--sync] [--png PATH]``: time batchnorm against torch native batch norm."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from batchnorm.cli._paths import output_file

DEFAULT_JSON = Path("bench.json")
DEFAULT_SYNC_JSON = Path("bench-sync.json")


def add_bench_parser(commands: Any) -> None:
    """Register the ``bench`` sub-command on an ``add_subparsers()`` object."""
    bench = commands.add_parser(
        "bench",
        help="time batchnorm against torch native batch norm and the copy floor",
        description="Time batchnorm's CPU batch norm against torch's native one in training "
        "forward, training forward+backward and inference, on dense, sequence and image shapes "
        "and two small models; each time is also given as a multiple of the floor, one copy of "
        "the input. Also times the layer with a fused ReLU against the layer then nn.ReLU, and "
        "measures the peak memory of a conv-BN-leaky_relu stack's training step with the "
        "activation separate, fused and in place (one fresh process each). "
        "Prints a table and writes the numbers as JSON (and a bar chart with --png). "
        "With --sync: synchronized batch norm over 2 gloo processes instead.",
    )
    bench.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    bench.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="interleaved rounds of blocked_autorange per case and mode (default 5)",
    )
    bench.add_argument(
        "--allocators",
        choices=("both", "default"),
        default="both",
        help="'both' also times every case in a second process with THP_MEM_ALLOC_ENABLE=1 "
        "(huge pages for torch's allocator too); default: both",
    )
    bench.add_argument(
        "--json",
        type=output_file,
        default=None,
        help=f"where to write the numbers (default {DEFAULT_JSON}, {DEFAULT_SYNC_JSON} with --sync)",
    )
    bench.add_argument(
        "--png",
        type=output_file,
        default=None,
        help="also draw a bar chart here (needs matplotlib: pip install 'batchnorm[plot]')",
    )
    bench.add_argument(
        "--device",
        default="cpu",
        help="where every tensor and module lives: cpu (default), cuda, cuda:1, mps, xpu; off "
        "the CPU the timing waits for the device, and the first-call and allocator runs "
        "(which concern the CPU kernels) are skipped",
    )
    bench.add_argument(
        "--no-compile-time",
        action="store_true",
        help="skip timing the first call in fresh processes",
    )
    bench.add_argument(
        "--sync",
        action="store_true",
        help="time synchronized batch norm over 2 gloo processes instead (no chart)",
    )


def run_bench(arguments: argparse.Namespace) -> int:
    """Print the table and write the JSON (and chart); exit status 2 on a bad argument."""
    problem = _check(arguments)
    if problem is not None:
        print(f"batchnorm bench: {problem}", file=sys.stderr)
        return 2
    if arguments.sync:
        return _run_sync_bench(arguments)
    from batchnorm.bench import format_table, run_benchmark

    report = run_benchmark(
        quick=arguments.quick,
        repeats=arguments.repeats,
        compile_time=not arguments.no_compile_time,
        allocator_runs=arguments.allocators == "both",
        device=arguments.device,
    )
    machine = report["machine"]
    where = "" if report["device"] == "cpu" else f"{report['device_name']} ({report['device']}), "
    print(
        f"{where}CPU {machine['cpu_model']} ({machine['cpu_count']} cores), {machine['threads']} thread{'' if machine['threads'] == 1 else 's'}, "
        f"torch {machine['torch']}; "
        f"medians over {report['repeats']} interleaved rounds of blocked_autorange; spread = "
        "interquartile range / median; floor = one copy of the input into preallocated memory"
    )
    bandwidth = report["copy_bandwidth"]
    print(
        f"memory during the run: the copy floor of {bandwidth['case']} "
        f"({bandwidth['megabytes']:.1f} MB) took {bandwidth['seconds'] * 1e3:.3f} ms, "
        f"{bandwidth['gigabytes_per_second']:.0f} GB/s read and written (on a shared machine this "
        "moves between runs, and every floor multiple with it)"
    )
    for label, first in report.get("first_call_seconds", {}).items():
        shape = "x".join(map(str, first["shape"]))
        print(
            f"first training step and inference call, {label} input {shape}, "
            f"axis {first['axis']}: "
            f"{first['cold_cache']:.1f} s with JIT compilation "
            f"(training step alone {first['cold_step']:.1f} s), "
            f"{first['warm_cache']:.1f} s from the on-disk cache "
            f"({first['warm_step']:.1f} s)"
        )
    print(format_table(report))
    arguments.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"numbers written to {arguments.json}")
    if arguments.png is not None:
        from batchnorm.bench._chart import plot_benchmark

        plot_benchmark(report, arguments.png)
        print(f"chart written to {arguments.png}")
    return 0


def _check(arguments: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, found before any timing starts; None when nothing."""
    if arguments.repeats < 1:
        return f"--repeats must be >= 1. Received: {arguments.repeats}"
    if arguments.sync and arguments.png is not None:
        return f"--png does not apply with --sync. Received: --png {arguments.png}"
    if arguments.png is not None and importlib.util.find_spec("matplotlib") is None:
        return (
            "--png needs matplotlib: pip install 'batchnorm[plot]'. "
            f"Received: --png {arguments.png} without it"
        )
    problem = _device_problem(arguments.device)
    if problem is not None:
        return problem
    if arguments.json is None:
        default = DEFAULT_SYNC_JSON if arguments.sync else DEFAULT_JSON
        try:
            arguments.json = output_file(str(default))
        except argparse.ArgumentTypeError as error:
            return f"error: argument --json: {error}"
    return None


def _device_problem(device: str) -> str | None:
    """Why ``--device`` cannot be used here, or None."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        return (
            f"--device must name a torch device (cpu, cuda, cuda:1, mps, xpu). Received: {device!r}"
        )
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "xpu": hasattr(torch, "xpu") and torch.xpu.is_available(),
    }.get(kind, False)
    if not available:
        return (
            f"--device {device}: no such device is available on this machine. Received: {device!r}"
        )
    return None


def _run_sync_bench(arguments: argparse.Namespace) -> int:
    from batchnorm.bench import format_sync_table, run_sync_benchmark

    report = run_sync_benchmark(quick=arguments.quick, repeats=arguments.repeats)
    machine = report["machine"]
    print(
        f"CPU {machine['cpu_model']} ({machine['cpu_count']} cores), {report['world_size']} gloo "
        "processes on 127.0.0.1, "
        f"1 thread each, torch {machine['torch']}; training step = forward + backward, "
        f"medians of {report['repeats']} runs (rank 0)"
    )
    print(format_sync_table(report["cases"]))
    arguments.json.write_text(json.dumps(report, indent=1) + "\n")
    print(f"numbers written to {arguments.json}")
    return 0
