"""``batchnorm bench``: this package against torch's native batch norm and the copy floor.

Every case is timed in one process with ``torch.utils.benchmark.Timer.blocked_autorange``: each
function is warmed up, then the implementations take turns, round after round, so that drift
hits all of them alike; a time is the median of every block of every round, and its spread the
interquartile range over that median. A ratio of two times is reported with the sum of their
spreads, and a target counts as met only when it holds by more than that spread ("unclear"
otherwise).

torch native is ``nn.BatchNorm1d/2d/3d`` (a module, as this package's layer is; the module in
``eval()`` for inference), on the layout a PyTorch user would use: the channel moved to dim 1 by a
permuted view (channels-last memory for images, a transposed view for sequences; dense inputs
keep dim 1). ``torch.nn.functional.batch_norm`` on the same view is timed beside it ("torch
functional"): the module's own Python costs show on small inputs. The copy floor is one copy of the input into memory
allocated before (``out.copy_(x)``), the least a batch norm that writes its output must pay;
beside it, a copy into fresh memory allocated by NumPy (huge-page advised, as the CPU kernels'
outputs are). ``run_benchmark(allocator_runs=True)`` repeats the cases in a second process with
``THP_MEM_ALLOC_ENABLE=1``, so that torch's allocator gets huge pages too.

Model cases time a whole training step (forward, cross-entropy, backward, Adam) of a small
network with this package's layer against the same network with ``nn.BatchNorm1d/2d``.

Activation cases (:mod:`batchnorm.bench._activation`): the layer with a fused ReLU against the
layer then ``nn.ReLU`` on the large cases, and the peak and saved-for-backward memory of a
conv-BN-activation stack's training step, separate, fused and in place.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

from batchnorm.bench._activation import (
    activation_lines,
    activation_targets,
    fused_functions,
    run_memory_case,
)
from batchnorm.bench._machine import cpu_facts
from batchnorm.functional._canonical_layout import canonical_layout
from batchnorm.kernels import _ahead as ahead
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
    dtype: str = "float32"  # the input's (half precision: float32 parameters, as Keras keeps)


MAIN_CASES = [
    BenchCase("conv-early NCHW", (64, 64, 56, 56), 1, True),
    BenchCase("conv-early NHWC", (64, 56, 56, 64), -1, True),
    BenchCase("conv-late NCHW", (64, 512, 7, 7), 1, False),
    BenchCase("dense NC", (8192, 1024), -1, True),
    BenchCase("sequence NLC", (64, 256, 512), -1, True),
    BenchCase("small-batch NC", (32, 4096), -1, False),
    BenchCase("tiny dense NC", (32, 64), -1, False),
    BenchCase("tiny conv NCHW", (8, 16, 8, 8), 1, False),
    # A few channels stored last (an image batch's RGB): the kernels' virtual rows.
    BenchCase("RGB NHWC", (32, 112, 112, 3), -1, False),
    BenchCase("bfloat16 NCHW", (32, 128, 28, 28), 1, False, dtype="bfloat16"),
]
EXTRA_CASES = [
    BenchCase("renorm NHWC", (64, 56, 56, 64), -1, False, {"renorm": True}),
    BenchCase("ghost NHWC", (64, 56, 56, 64), -1, False, {"virtual_batch_size": 8}),
    BenchCase("mask NLC", (64, 256, 512), -1, False, {"fused": False}, mask=True),
]
# "inference forward+backward": batch norm kept in inference while the model around it trains
# (fine-tuning), gamma and beta still learning.
MODES = ("train forward", "inference", "train forward+backward", "inference forward+backward")
MODEL_CASES = ("mlp 784-1000-10, batch 64", "conv net 3x32x32, batch 32")
# The conv-BN-activation memory case for --quick (the full one: 8 blocks, 64 channels, 56x56,
# batch 32); its tensors (400 KB) are still large enough for malloc to map them on their own.
QUICK_MEMORY_CASE = {"blocks": 2, "channels": 16, "size": 28, "batch": 8}


@dataclass(frozen=True)
class Timing:
    """Median seconds of every timed block, and the interquartile range over the median."""

    seconds: float
    spread: float


def quick_cases() -> tuple[list[BenchCase], list[BenchCase]]:
    """The same layouts at small sizes, for a smoke run (``--quick``)."""

    def shrink(case: BenchCase) -> BenchCase:
        shape = case.shape
        if math.prod(shape) > 100_000:
            shape = tuple(max(2, s // 8) for s in shape)
        return replace(case, shape=shape)

    return [shrink(c) for c in MAIN_CASES], [shrink(c) for c in EXTRA_CASES]


def _synchronizing_timer(device: str) -> Callable[[], float]:
    """A clock that first waits for the device's queued work (``Timer`` does so for CUDA)."""
    if device == "mps":

        def mps_clock() -> float:
            torch.mps.synchronize()
            return time.perf_counter()

        return mps_clock
    if device == "xpu":

        def xpu_clock() -> float:
            torch.xpu.synchronize()
            return time.perf_counter()

        return xpu_clock
    return timeit.default_timer


def interleaved_timings(
    functions: dict[str, Callable[[], Any]],
    rounds: int,
    min_run_time: float = 0.05,
    device: str = "cpu",
) -> dict[str, Timing]:
    """Each function timed by ``blocked_autorange`` once per round, round-robin, after a warm-up.

    On CUDA, ``Timer`` synchronises the device around every timed block; on MPS and XPU the clock
    synchronises itself. The functions run with the process's thread count (``Timer`` would set
    torch, and so the kernels, to one thread)."""
    threads = torch.get_num_threads()
    for function in functions.values():
        function()
        function()
    # With a cold cache the warm-up compiled and left helpers compiling the threaded builds
    # (batchnorm.kernels._ahead); the timing waits for them and loads their builds first.
    ahead.finish_helpers()
    for function in functions.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    clock = _synchronizing_timer(device)
    for _ in range(rounds):
        for name, function in functions.items():
            measurement = Timer(
                "f()",
                globals={"f": function},
                timer=clock,
                num_threads=threads,
            ).blocked_autorange(min_run_time=min_run_time)
            times[name].extend(measurement.times)
    timings = {}
    for name, values in times.items():
        median = statistics.median(values)
        if len(values) > 1:
            quartiles = statistics.quantiles(values, n=4)
            timings[name] = Timing(median, (quartiles[2] - quartiles[0]) / median)
        else:  # one block (a function slower than min_run_time, one round): no evidence of
            # its spread, which was reported as 0 and let a verdict look certain
            timings[name] = Timing(median, _UNKNOWN_SPREAD)
    return timings


# The relative spread given to a single measurement: only a margin of 2x decides its verdict.
_UNKNOWN_SPREAD = 1.0


def _torch_layout(x: torch.Tensor, axis: int) -> torch.Tensor:
    """The view a PyTorch user hands to F.batch_norm: channel at dim 1."""
    axis = axis % x.ndim
    return x if axis == 1 else x.movedim(axis, 1)


def _mode_functions(case: BenchCase, x: torch.Tensor) -> dict[str, dict[str, Callable[[], Any]]]:
    channels, device = x.shape[case.axis], x.device
    layer = BatchNormalization(channels, axis=case.axis, device=device, **case.options)
    mask = None
    if case.mask:
        mask = (torch.rand([s for i, s in enumerate(x.shape) if i != case.axis % x.ndim]) > 0.2).to(
            device
        )
    torch_x = _torch_layout(x, case.axis)
    module_class = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    module = module_class[x.ndim](channels, eps=1e-3, momentum=0.01, device=device)
    frozen = copy.deepcopy(module).eval()
    weight = torch.ones(channels, requires_grad=True, device=device)
    bias = torch.zeros(channels, requires_grad=True, device=device)
    running_mean = torch.zeros(channels, device=device)
    running_var = torch.ones(channels, device=device)
    x_grad = x.detach().clone().requires_grad_()
    torch_x_grad = _torch_layout(x_grad, case.axis)
    upstream = torch.randn_like(x)
    torch_upstream = _torch_layout(upstream, case.axis)

    def ours_train() -> Any:
        with torch.no_grad():
            return layer(x, training=True, mask=mask)

    # A variant (renorm, ghost batches, a mask) is timed beside the plain layer on the same
    # input, in the same interleaved rounds: their ratio is not the ratio of two runs minutes
    # apart, between which this machine's memory speed moves by up to 2x.
    plain = BatchNormalization(channels, axis=case.axis, device=device)

    def plain_train() -> Any:
        with torch.no_grad():
            return plain(x, training=True)

    def ours_inference() -> Any:
        with torch.no_grad():
            return layer(x, training=False)

    def ours_backward() -> Any:
        x_grad.grad = None
        layer(x_grad, training=True, mask=mask).backward(upstream)  # type: ignore[no-untyped-call]

    def ours_inference_backward() -> Any:
        x_grad.grad = None
        layer(x_grad, training=False).backward(upstream)  # type: ignore[no-untyped-call]

    def torch_train() -> Any:
        with torch.no_grad():
            return module(torch_x)

    def torch_inference() -> Any:
        with torch.no_grad():
            return frozen(torch_x)

    def torch_backward() -> Any:
        x_grad.grad = None
        module(torch_x_grad).backward(torch_upstream)  # type: ignore[no-untyped-call]

    def torch_inference_backward() -> Any:
        x_grad.grad = None
        frozen(torch_x_grad).backward(torch_upstream)  # type: ignore[no-untyped-call]

    def functional(training: bool, source: torch.Tensor) -> torch.Tensor:
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

    def functional_train() -> Any:
        with torch.no_grad():
            return functional(True, torch_x)

    def functional_inference() -> Any:
        with torch.no_grad():
            return functional(False, torch_x)

    def functional_backward() -> Any:
        x_grad.grad = None
        functional(True, torch_x_grad).backward(torch_upstream)  # type: ignore[no-untyped-call]

    def functional_inference_backward() -> Any:
        x_grad.grad = None
        functional(False, torch_x_grad).backward(torch_upstream)  # type: ignore[no-untyped-call]

    return {
        "train forward": {
            "batchnorm": ours_train,
            "torch": torch_train,
            "torch functional": functional_train,
            **({"plain": plain_train} if case.options or case.mask else {}),
        },
        "inference": {
            "batchnorm": ours_inference,
            "torch": torch_inference,
            "torch functional": functional_inference,
        },
        "train forward+backward": {
            "batchnorm": ours_backward,
            "torch": torch_backward,
            "torch functional": functional_backward,
        },
        "inference forward+backward": {
            "batchnorm": ours_inference_backward,
            "torch": torch_inference_backward,
            "torch functional": functional_inference_backward,
        },
    }


def _ratio(numerator: Timing, denominator: Timing) -> dict[str, float]:
    return {
        "value": numerator.seconds / denominator.seconds,
        "spread": numerator.spread + denominator.spread,
    }


def run_case(
    case: BenchCase, rounds: int, modes: tuple[str, ...] = MODES, device: str = "cpu"
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(case.shape, generator=generator).to(device, getattr(torch, case.dtype))
    functions = _mode_functions(case, x)
    ghost = bool(case.options.get("virtual_batch_size"))
    _, layout = canonical_layout(x, (case.axis % x.ndim,), ghost)
    result: dict[str, Any] = {**asdict(case), "input_copy": layout.copied, "modes": {}}
    preallocated = torch.empty_like(x)
    copies: dict[str, Callable[[], Any]] = {
        "floor": lambda: preallocated.copy_(x),
        "fresh floor": lambda: fresh_copy(x),
        "clone": x.clone,
    }
    floor_timings: dict[str, list[Timing]] = {name: [] for name in copies}
    for mode in modes:
        timings = interleaved_timings({**copies, **functions[mode]}, rounds, device=device)
        for name in copies:
            floor_timings[name].append(timings.pop(name))
        result["modes"][mode] = {
            "seconds": {name: t.seconds for name, t in timings.items()},
            "spread": {name: t.spread for name, t in timings.items()},
            "ratio_to_torch": _ratio(timings["batchnorm"], timings["torch"]),
            "speedup_over_torch": timings["torch"].seconds / timings["batchnorm"].seconds,
        }
    # One floor per case, over every mode (each mode timed it beside its own functions).
    floors = {
        name: Timing(statistics.median(t.seconds for t in values), max(t.spread for t in values))
        for name, values in floor_timings.items()
    }
    result["floor_seconds"] = floors["floor"].seconds
    result["fresh_floor_seconds"] = floors["fresh floor"].seconds
    result["clone_seconds"] = floors["clone"].seconds
    for numbers in result["modes"].values():
        for key, floor in (("floor_multiple", "floor"), ("fresh_floor_multiple", "fresh floor")):
            numbers[key] = {
                name: t / floors[floor].seconds for name, t in numbers["seconds"].items()
            }
        numbers["floor_spread"] = numbers["spread"]["batchnorm"] + floors["floor"].spread
    return result


def run_fused_case(case: BenchCase, rounds: int, device: str = "cpu") -> dict[str, Any]:
    """The layer with ``activation="relu"`` against the layer then ``nn.ReLU`` (and torch's batch
    norm then ``nn.ReLU``), in a training forward and a training forward+backward."""
    functions = fused_functions(case.shape, case.axis, device)
    result: dict[str, Any] = {"name": case.name, "shape": list(case.shape), "modes": {}}
    for mode, group in functions.items():
        timings = interleaved_timings(group, rounds, device=device)
        result["modes"][mode] = {
            "seconds": {name: t.seconds for name, t in timings.items()},
            "spread": {name: t.spread for name, t in timings.items()},
            "ratio": _ratio(timings["fused"], timings["separate"]),
            "ratio_to_torch": _ratio(timings["fused"], timings["torch"]),
        }
    return result


def fresh_copy(x: torch.Tensor) -> torch.Tensor:
    """One out-of-place copy of ``x`` into new NumPy-allocated (huge-page advised) memory; on
    other devices into memory new from torch's allocator."""
    if not x.is_cpu:
        return torch.empty_like(x).copy_(x)
    # In x's own dtype: a bfloat16 input was copied into float64 memory four times its size.
    bits = {torch.float16: np.int16, torch.bfloat16: np.int16}.get(x.dtype)
    if bits is not None:
        fresh = torch.from_numpy(np.empty(tuple(x.shape), bits)).view(x.dtype)
    else:
        fresh = torch.from_numpy(np.empty(tuple(x.shape), _NUMPY_DTYPES[x.dtype]))
    return fresh.copy_(x)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _model(name: str, ours: bool, device: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small network with our layer or torch's, its input batch and labels (fixed seed)."""
    torch.manual_seed(0)
    if name.startswith("mlp"):
        norm1: nn.Module = (
            BatchNormalization(1000) if ours else nn.BatchNorm1d(1000, eps=1e-3, momentum=0.01)
        )
        model: nn.Module = nn.Sequential(
            nn.Linear(784, 1000), nn.ReLU(), norm1, nn.Linear(1000, 10)
        )
        x = torch.rand(64, 784)
    else:

        def norm(channels: int) -> nn.Module:
            if ours:
                return BatchNormalization(channels, axis=1)
            return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)

        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            norm(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            norm(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 10),
        )
        x = torch.rand(32, 3, 32, 32)
    labels = torch.randint(0, 10, (x.shape[0],))
    return model.to(device), x.to(device), labels.to(device)


def run_model_case(name: str, rounds: int, device: str = "cpu") -> dict[str, Any]:
    """One training step (forward, loss, backward, Adam step) with each batch norm."""
    steps: dict[str, Callable[[], Any]] = {}
    for label, ours in (("batchnorm", True), ("torch", False)):
        model, x, labels = _model(name, ours, device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(
            model: nn.Module = model,
            x: torch.Tensor = x,
            labels: torch.Tensor = labels,
            optimizer: torch.optim.Optimizer = optimizer,
        ) -> None:
            optimizer.zero_grad()
            F.cross_entropy(model(x), labels).backward()  # type: ignore[no-untyped-call]
            optimizer.step()

        steps[label] = step
    timings = interleaved_timings(steps, rounds, device=device)
    return {
        "name": name,
        "seconds": {label: t.seconds for label, t in timings.items()},
        "spread": {label: t.spread for label, t in timings.items()},
        "ratio_to_torch": _ratio(timings["batchnorm"], timings["torch"]),
    }


# Prints the seconds to the end of the training step (import, forward, backward), then to the
# end of the inference call after it.
# The input is made before the clock starts (the 32x64x56x56 one takes 0.04 s): the user's data,
# not the first call's cost.
_FIRST_CALL = (
    "import sys, time, torch; "
    "shape = tuple(int(s) for s in sys.argv[1].split(',')); axis = int(sys.argv[2]); "
    "x = torch.randn(shape, requires_grad=True); t = time.perf_counter(); import batchnorm; "
    "layer = batchnorm.BatchNormalization(shape[axis], axis=axis); "
    "layer(x, training=True).sum().backward(); print(time.perf_counter() - t); "
    "layer(x, training=False); print(time.perf_counter() - t)"
)

# The first-call inputs, (shape, channel axis): a tiny one (the serial kernels), an early conv
# layer's (the threaded ones, which cost more to compile), both channels first, and a dense
# batch with Keras' default axis -1 (channels last: the rows kernels).
FIRST_CALL_INPUTS = {
    "small": ((4, 3, 5), 1),
    "conv": ((32, 64, 56, 56), 1),
    "dense": ((64, 1000), -1),
}

# The first-call targets: seconds to the end of a first training step, with Numba's
# cache empty ("cold") and filled ("warm").
FIRST_STEP_BOUNDS = {"cold": 3.0, "warm": 0.5}


def first_call_seconds(rounds: int = 2) -> dict[str, dict[str, Any]]:
    """Import plus a first training step (forward and backward) and inference call, per input of
    :data:`FIRST_CALL_INPUTS`, in two fresh processes that share an empty Numba cache folder:
    the first compiles the kernels it needs ("cold_cache"), the second finds them on disk
    ("warm_cache"); "cold_step" and "warm_step" are the same processes' seconds to the end of
    the training step, before the inference call (which may wait for the helper compiling its
    kernel: :mod:`batchnorm.kernels._ahead`).

    ``rounds`` pairs of processes, each pair with a new empty cache folder: each figure is the
    median of its rounds, and its spread (``"spread"``, by name) the range over the median.

    The processes find Python's bytecode of the package compiled, as after ``pip install``
    (which compiles it) or any earlier import: an environment with
    ``PYTHONDONTWRITEBYTECODE=1`` compiles the package's sources in every process (0.08 s on
    the 2-core Intel VM), which is not the first call's cost; that variable is dropped and one
    untimed import writes the bytecode first."""
    environment = {
        name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"
    }
    subprocess.run([sys.executable, "-c", "import batchnorm"], env=environment, check=True)
    seconds: dict[str, dict[str, Any]] = {}
    for label, (shape, axis) in FIRST_CALL_INPUTS.items():
        runs: dict[str, list[float]] = {
            f"{cache}_{span}": [] for cache in ("cold", "warm") for span in ("cache", "step")
        }
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as folder:
                env = {**environment, "NUMBA_CACHE_DIR": folder}
                for cache in ("cold", "warm"):
                    step, total = _first_call_process(shape, axis, env)
                    runs[f"{cache}_step"].append(step)
                    runs[f"{cache}_cache"].append(total)
        medians = {name: statistics.median(values) for name, values in runs.items()}
        seconds[label] = {"shape": list(shape), "axis": axis, **medians}
        seconds[label]["spread"] = {
            name: (max(values) - min(values)) / medians[name] for name, values in runs.items()
        }
    return seconds


def _first_call_process(
    shape: tuple[int, ...], axis: int, env: dict[str, str]
) -> tuple[float, float]:
    """One fresh process of :data:`_FIRST_CALL`: seconds to the end of the training step, and
    to the end of the inference call; after it, until the helpers it left have ended."""
    process = subprocess.Popen(
        [sys.executable, "-c", _FIRST_CALL, ",".join(map(str, shape)), str(axis)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=hasattr(os, "killpg"),
    )
    output, _ = process.communicate()
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, process.args, output)
    _wait_for_helpers(process.pid)
    step, total = (float(line) for line in output.strip().splitlines()[-2:])
    return step, total


def _wait_for_helpers(session: int, timeout: float = 120.0) -> None:
    """Until the processes a first-call process left (its helpers compiling ahead, which finish
    writing Numba's cache after it ends: :mod:`batchnorm.kernels._ahead`) have ended, so that
    the next process finds the whole cache and shares the CPUs with none of them."""
    if not hasattr(os, "killpg"):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(session, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _verdict(value: float, spread: float, bound: float) -> str:
    """ "met" when value <= bound by more than the spread, "NO" when above it by more, else
    "unclear"."""
    if value * (1 + spread) <= bound:
        return "met"
    if value * (1 - spread) > bound:
        return "NO"
    return "unclear"


_VERDICT_RANK = {"met": 0, "unclear": 1, "NO": 2}
T = TypeVar("T")


def _worst(measured: dict[T, tuple[float, float]], bound: float) -> T:
    """The key (mode or case) that decides a target over several, of ``{key: (value, spread)}``:
    the worst verdict first (a mode clearly over the bound, or unclear, outranks a larger value
    judged alone), then the largest value. Taking the largest value alone printed "met" beside a
    mode whose spread crossed the bound, and "unclear" beside one clearly over it."""

    def rank(key: T) -> tuple[int, float]:
        value, spread = measured[key]
        return _VERDICT_RANK[_verdict(value, spread, bound)], value

    return max(measured, key=rank)


def summarise(
    main: list[dict[str, Any]],
    extra: list[dict[str, Any]],
    models: list[dict[str, Any]],
    fused: list[dict[str, Any]] | None = None,
    memory: dict[str, Any] | None = None,
    first_call: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The issues' targets, each with the measured value, its spread and a verdict.

    ``fused`` (:func:`run_fused_case` results) adds fused / separate <= 0.8 per case and mode;
    ``memory`` (:func:`run_memory_case`) adds in-place / separate peak memory <= 0.6, a single
    measurement (spread 0), left out where the peak could not be measured; ``first_call``
    (:func:`first_call_seconds`) adds the first training step's seconds per input, cold and
    warm (:data:`FIRST_STEP_BOUNDS`)."""
    targets: list[tuple[str, float, float, float]] = []
    for r in main:
        bound = 0.8 if r["large"] else 1.0
        ratios = {m: r["modes"][m]["ratio_to_torch"] for m in MODES}
        worst = _worst({m: (q["value"], q["spread"]) for m, q in ratios.items()}, bound)
        ratio = r["modes"][worst]["ratio_to_torch"]
        targets.append(
            (
                f"{r['name']}: time / torch's ({worst}, worst mode)",
                ratio["value"],
                ratio["spread"],
                bound,
            )
        )
    large = [r for r in main if r["large"]]
    # The floor targets; none for the inference backward.
    floor_bounds = dict(zip(MODES[:3], (1.8, 1.3, 3.5), strict=True)) if large else {}
    for mode, bound in floor_bounds.items():
        multiples = {
            i: (r["modes"][mode]["floor_multiple"]["batchnorm"], r["modes"][mode]["floor_spread"])
            for i, r in enumerate(large)
        }
        worst_case = large[_worst(multiples, bound)]
        numbers = worst_case["modes"][mode]
        targets.append(
            (
                f"large cases: {mode} / copy floor (worst: {worst_case['name']})",
                numbers["floor_multiple"]["batchnorm"],
                numbers["floor_spread"],
                bound,
            )
        )
    for model in models:
        ratio = model["ratio_to_torch"]
        targets.append((f"{model['name']}: step / torch's", ratio["value"], ratio["spread"], 1.0))
    for r in extra:
        ours = r["modes"]["train forward"]
        targets.append(
            (
                f"{r['name']}: train forward / plain",
                ours["seconds"]["batchnorm"] / ours["seconds"]["plain"],
                ours["spread"]["batchnorm"] + ours["spread"]["plain"],
                1.3,
            )
        )
    targets += activation_targets(fused or [], memory)
    for label, first in (first_call or {}).items():
        shape = "x".join(map(str, first["shape"]))
        for cache, bound in FIRST_STEP_BOUNDS.items():
            targets.append(
                (
                    f"{label} {shape}: first training step, {cache} cache, seconds",
                    first[f"{cache}_step"],
                    first["spread"][f"{cache}_step"],
                    bound,
                )
            )
    return {
        "targets": [
            {
                "target": f"{name} <= {bound}",
                "measured": value,
                "spread": spread,
                "verdict": _verdict(value, spread, bound),
                "met": _verdict(value, spread, bound) == "met",
            }
            for name, value, spread, bound in targets
        ]
    }


def _ratio_text(ratio: dict[str, float] | None) -> str:
    return "-" if ratio is None else f"{ratio['value']:.2f} (+-{ratio['spread']:.2f})"


def format_table(report: dict[str, Any]) -> str:
    """Markdown tables: every case and mode, the model steps, the fused activation and the
    conv-BN-activation memory (when the report has them), the targets."""
    thp = report.get("huge_page_run")
    thp_ratios = {}
    if thp is not None:
        for r in [*thp["cases"], *thp["extra_cases"]]:
            for mode, numbers in r["modes"].items():
                thp_ratios[(r["name"], mode)] = numbers["ratio_to_torch"]
    lines = [
        "| case | shape | mode | batchnorm ms | torch ms | torch functional ms | ours / torch (spread) "
        "| ours / torch, THP allocator | ours x floor | ours x fresh floor | torch x floor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in [*report["cases"], *report["extra_cases"]]:
        for mode, numbers in result["modes"].items():
            ratio = numbers["ratio_to_torch"]
            other = thp_ratios.get((result["name"], mode))
            lines.append(
                f"| {result['name']} | {'x'.join(map(str, result['shape']))} | {mode} | "
                f"{numbers['seconds']['batchnorm'] * 1e3:.3f} | {numbers['seconds']['torch'] * 1e3:.3f} | "
                f"{numbers['seconds']['torch functional'] * 1e3:.3f} | "
                f"{ratio['value']:.2f} (+-{ratio['spread']:.2f}) | "
                f"{_ratio_text(other)} | "
                f"{numbers['floor_multiple']['batchnorm']:.2f} | "
                f"{numbers['fresh_floor_multiple']['batchnorm']:.2f} | "
                f"{numbers['floor_multiple']['torch']:.2f} |"
            )
    lines += [
        "",
        "| training step | batchnorm ms | torch ms | ours / torch (spread) |",
        "|---|---|---|---|",
    ]
    for model in report["models"]:
        ratio = model["ratio_to_torch"]
        lines.append(
            f"| {model['name']} | {model['seconds']['batchnorm'] * 1e3:.2f} | "
            f"{model['seconds']['torch'] * 1e3:.2f} | {ratio['value']:.2f} (+-{ratio['spread']:.2f}) |"
        )
    lines += activation_lines(report.get("fused_activation") or [], report.get("memory"))
    lines += ["", "| target | measured (spread) | verdict |", "|---|---|---|"]
    for target in report["summary"]["targets"]:
        lines.append(
            f"| {target['target']} | {target['measured']:.2f} (+-{target['spread']:.2f}) "
            f"| {target['verdict']} |"
        )
    return "\n".join(lines)


def run_benchmark(
    *,
    quick: bool,
    repeats: int,
    compile_time: bool,
    progress: bool = True,
    allocator_runs: bool = False,
    device: str = "cpu",
    activation: bool = True,
) -> dict[str, Any]:
    """Time every case (and, with ``compile_time``, the first call in fresh processes).

    ``repeats`` is the number of interleaved rounds. ``allocator_runs`` times the cases again in
    a second process with ``THP_MEM_ALLOC_ENABLE=1`` (``report["huge_page_run"]``). ``device``
    ("cpu", "cuda", "mps", ...) holds every tensor and module; off the CPU there is no
    first-call (JIT) timing and no second allocator run, which concern the CPU kernels.
    ``progress`` draws a bar over the cases on stderr when it is a terminal, and writes one
    closing line when it is not. ``activation`` adds the fused-activation timing of the large
    cases (``report["fused_activation"]``) and the conv-BN-activation memory case, one fresh
    process per variant (``report["memory"]``; small sizes with ``quick``).
    """
    main_cases, extra_cases = quick_cases() if quick else (MAIN_CASES, EXTRA_CASES)
    on_cpu = torch.device(device).type == "cpu"
    compile_time, allocator_runs = compile_time and on_cpu, allocator_runs and on_cpu
    report: dict[str, Any] = {
        "device": str(device),
        "device_name": _device_name(device),
        "machine": {
            "threads": torch.get_num_threads(),
            **cpu_facts(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "platform": sys.platform,
            "huge_pages_for_torch": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1",
        },
        "quick": quick,
        "repeats": repeats,
    }
    steps = len(main_cases) + len(extra_cases) + len(MODEL_CASES)
    steps += (1 if compile_time else 0) + (1 if allocator_runs else 0) + (2 if activation else 0)
    bar = Progress("bench", steps, unit="step", enabled=progress, summary=True)
    try:
        if compile_time:
            report["first_call_seconds"] = first_call_seconds()
            bar.update()
        main_results, extra_results, model_results = [], [], []
        for case in main_cases:
            main_results.append(run_case(case, repeats, device=device))
            bar.update()
        for case in extra_cases:
            extra_results.append(run_case(case, repeats, modes=("train forward",), device=device))
            bar.update()
        for name in MODEL_CASES:
            model_results.append(run_model_case(name, repeats, device=device))
            bar.update()
        fused_results: list[dict[str, Any]] = []
        memory: dict[str, Any] | None = None
        if activation:
            for case in main_cases:
                if case.large:
                    fused_results.append(run_fused_case(case, repeats, device=device))
            bar.update()
            memory = run_memory_case(**(QUICK_MEMORY_CASE if quick else {}), device=device)
            bar.update()
        if allocator_runs:
            report["huge_page_run"] = _huge_page_run(quick, repeats)
            bar.update()
    finally:
        bar.close()
    report["cases"] = main_results
    report["extra_cases"] = extra_results
    report["models"] = model_results
    report["copy_bandwidth"] = copy_bandwidth(main_results)
    if activation:
        report["fused_activation"] = fused_results
        report["memory"] = memory
    report["summary"] = summarise(
        main_results,
        extra_results,
        model_results,
        fused_results,
        memory,
        report.get("first_call_seconds"),
    )
    return report


def copy_bandwidth(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The memory speed of the run: the copy floor of the case with the largest input, as
    ``{"case", "megabytes", "seconds", "gigabytes_per_second"}`` (bytes read plus bytes written,
    over the floor's median time).

    Every floor multiple is over this copy, and on a shared machine it moves by itself: on the
    2-core AMD EPYC machine a 33.5 MB copy took 0.46-0.58 ms for minutes at a time (part of it
    from the L3 cache), then 0.92-1.07 ms, while the kernels' passes, partly compute-bound,
    moved less; the floor multiples of two runs minutes apart differed by up to 1.6x.
    """
    largest = max(results, key=_input_bytes)
    size = _input_bytes(largest)
    seconds = largest["floor_seconds"]
    return {
        "case": largest["name"],
        "megabytes": size / 1e6,
        "seconds": seconds,
        "gigabytes_per_second": 2 * size / seconds / 1e9,
    }


def _input_bytes(result: dict[str, Any]) -> int:
    """The bytes of a case's input, from its shape and dtype name."""
    itemsize: int = getattr(torch, result["dtype"]).itemsize
    elements: int = math.prod(result["shape"])
    return elements * itemsize


def _device_name(device: str) -> str:
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return kind


_HUGE_PAGE_CHILD = (
    "import json, pathlib, sys; from batchnorm.bench._benchmark import run_benchmark; "
    "report = run_benchmark(quick=sys.argv[1] == 'quick', repeats=int(sys.argv[2]), "
    "compile_time=False, progress=False, activation=False); "
    "pathlib.Path(sys.argv[3]).write_text(json.dumps(report))"
)


def _huge_page_run(quick: bool, repeats: int) -> dict[str, Any]:
    """The same cases (not the activation ones) in a child process whose torch allocator asks
    for huge pages."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "bench.json")
        mode = "quick" if quick else "full"
        command = [sys.executable, "-c", _HUGE_PAGE_CHILD, mode, str(repeats), path]
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}
        subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        with open(path) as file:
            child: dict[str, Any] = json.load(file)
    return {key: child[key] for key in ("machine", "cases", "extra_cases", "models", "summary")}
