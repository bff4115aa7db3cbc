"""Batch norm with its activation: memory over a training step, and time, fused or not.

Memory. A stack of ``blocks`` x (Conv2d 3x3 without bias -> batch norm -> leaky_relu(0.01)) on an
NCHW input (8 blocks, 64 channels, 56x56, batch 32 by default) takes one training step: forward,
``loss = y.square().mean()``, backward. Three variants of the batch norm and activation:

- ``separate``: ``BatchNormalization(axis=1)`` then ``nn.LeakyReLU(0.01)``. Autograd keeps, per
  block, the conv's output (batch norm's input), batch norm's output (the activation's input) and
  the activation's output (the next conv's input): three tensors of the block's size;
- ``fused``: ``BatchNormalization(axis=1, activation="leaky_relu")``: two (its input and output);
- ``in_place``: the same with ``memory="in_place"``: the output is written over the conv's output
  and the backward recovers what it needs from it: one. Overwriting the conv's output is safe
  because Conv2d's backward needs only its input and weight, not its output.

Each variant runs in a fresh Python process (:func:`measure_step_in_subprocess` runs
:func:`measure_step` there), which builds the stack, trains a one-block stack of the same variant
once at two small sizes (below and above the kernels' threading threshold: Numba loads or
compiles its kernels and the thread pools start, all of which allocates), collects garbage, then
makes the input and takes one step of the real stack:

- ``peak_bytes``, on CPU: the high-water mark of the process's resident memory over the step
  (``VmHWM`` in ``/proc/self/status``, reset by writing ``5`` to ``/proc/self/clear_refs``) less the
  resident memory before it (``VmRSS``). glibc's malloc is told to map every block of 64 KiB or
  more on its own (``MALLOC_MMAP_THRESHOLD_``) so that a freed tensor leaves resident memory at
  once: the high-water mark then follows the live tensors, as an allocator's peak counter would.
  On CUDA: ``torch.cuda.max_memory_allocated`` over the step less the memory allocated before it.
  The peak is everything the step holds at its worst moment: the input, every tensor kept for the
  backward, and in the backward the gradients in flight, each layer's temporaries and the
  weights' gradients (the weights themselves are older than the baseline). The conv's
  outputs and gradients are the same in every variant, so a ratio of two peaks is what a user
  training this stack sees, not the ratio of the batch norm's own memory (the saved bytes come
  closer to that). Where there is no such counter (not Linux, ``clear_refs`` not writable, a
  device other than CPU or CUDA) ``peak_bytes`` is None and ``peak_method`` says why: only the
  saved bytes are reported then.
- ``saved_bytes``: a second forward under ``torch.autograd.graph.saved_tensors_hooks`` records
  every tensor autograd keeps for the backward; the sizes of their distinct storages, less the
  model's parameters, are summed (the in-place output counts once, though the layer and the next
  conv both keep it). Independent of the allocator.

Time. On the large cases, a training forward (under ``no_grad``) and a training forward+backward
of ``BatchNormalization(activation="relu")`` against the same layer followed by ``nn.ReLU`` (and,
for context, torch's ``nn.BatchNorm1d/2d`` followed by ``nn.ReLU`` on the channel-at-dim-1 view),
interleaved as the main benchmark times its cases.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from batchnorm.kernels._jit import PARALLEL_THRESHOLD
from batchnorm.layers import BatchNormalization

MEMORY_VARIANTS = ("separate", "fused", "in_place")
# Blocks at least this large get their own mapping, which free() returns at once.
MMAP_THRESHOLD = 1 << 16
_CHILD = (
    "import sys; from batchnorm.bench._activation import _measure_step_main; "
    "_measure_step_main(sys.argv[1])"
)


def conv_stack(variant: str, blocks: int, channels: int, device: str = "cpu") -> nn.Module:
    """``blocks`` x (Conv2d 3x3 -> batch norm -> leaky_relu(0.01)) in one of ``MEMORY_VARIANTS``;
    the same conv weights (seed 0) in every variant."""
    if variant not in MEMORY_VARIANTS:
        raise ValueError(
            f"`variant` must be one of {list(MEMORY_VARIANTS)}. Received: variant={variant!r}"
        )
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
        if variant == "separate":
            layers += [BatchNormalization(channels, axis=1), nn.LeakyReLU(0.01)]
        else:
            memory: Literal["default", "in_place"] = (
                "in_place" if variant == "in_place" else "default"
            )
            layers.append(
                BatchNormalization(channels, axis=1, activation="leaky_relu", memory=memory)
            )
    return nn.Sequential(*layers).to(device)


def stack_input(batch: int, channels: int, size: int, device: str = "cpu") -> torch.Tensor:
    """The stack's NCHW input batch (seed 0)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, size, size, generator=generator).to(device)


def training_step(model: nn.Module, x: torch.Tensor) -> float:
    """Forward, ``loss = y.square().mean()``, backward; the loss."""
    loss = model(x).square().mean()
    loss.backward()  # type: ignore[no-untyped-call]
    return float(loss.detach())


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward after one training forward
    of ``model`` and the loss, the model's parameters left out."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).square().mean()
    return sum(storages.values())


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as file:
        found = re.search(rf"^{field}:\s+(\d+) kB", file.read(), re.MULTILINE)
    if found is None:
        raise OSError(f"no {field} in /proc/self/status")
    return int(found.group(1))


def _reset_peak_rss() -> str | None:
    """Reset the kernel's high-water mark of resident memory; why it cannot be, or None."""
    if not sys.platform.startswith("linux"):
        return f"no resident-memory peak counter on {sys.platform}"
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        _status_kib("VmHWM")
    except OSError as error:
        return f"cannot reset the resident-memory peak (/proc/self/clear_refs): {error}"
    return None


def measure_step(
    variant: str, blocks: int, channels: int, size: int, batch: int, device: str = "cpu"
) -> dict[str, Any]:
    """One variant's training step in this process: its peak memory (see the module docstring),
    its saved-for-backward bytes and its loss. Meant for a fresh process (:func:`run_memory_case`
    starts one per variant): the peak is only clean there."""
    kind = torch.device(device).type
    model = conv_stack(variant, blocks, channels, device)
    # Warm-up: a small stack of the same variant, serial and threaded kernels both.
    warm = conv_stack(variant, 1, channels, device)
    warm_batch = -(-2 * PARALLEL_THRESHOLD // (channels * 32 * 32))
    for shape in ((2, 4), (warm_batch, 32)):
        training_step(warm, stack_input(shape[0], channels, shape[1], device))
    del warm
    gc.collect()
    peak: int | None = None
    if kind == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss = training_step(model, stack_input(batch, channels, size, device))
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device) - before, "cuda allocator"
    else:
        problem = _reset_peak_rss() if kind == "cpu" else f"no peak counter for {kind}"
        if problem is None:
            before = _status_kib("VmRSS")
            loss = training_step(model, stack_input(batch, channels, size, device))
            peak, method = (_status_kib("VmHWM") - before) * 1024, "resident memory"
        else:
            loss = training_step(model, stack_input(batch, channels, size, device))
            method = f"none ({problem}): saved bytes only"
    model.zero_grad(set_to_none=True)
    saved = saved_bytes(model, stack_input(batch, channels, size, device))
    return {"peak_bytes": peak, "peak_method": method, "saved_bytes": saved, "loss": loss}


def _measure_step_main(arguments: str) -> None:
    """The child process's entry: :func:`measure_step` of JSON arguments, printed as JSON."""
    print(json.dumps(measure_step(**json.loads(arguments))))


def measure_step_in_subprocess(
    variant: str, blocks: int, channels: int, size: int, batch: int, device: str = "cpu"
) -> dict[str, Any]:
    """:func:`measure_step` in a fresh Python process (malloc's mmap threshold fixed there)."""
    arguments = {"variant": variant, "blocks": blocks, "channels": channels}
    arguments.update(size=size, batch=batch, device=device)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(arguments)],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"the memory measure of variant {variant!r} failed in its process "
            f"(exit status {done.returncode}):\n{done.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_memory_case(
    blocks: int = 8, channels: int = 64, size: int = 56, batch: int = 32, device: str = "cpu"
) -> dict[str, Any]:
    """Each variant's peak and saved bytes over one training step (one fresh process each), and
    the ratios of fused and in-place to separate (None where the peak was not measured)."""
    variants = {
        variant: measure_step_in_subprocess(variant, blocks, channels, size, batch, device)
        for variant in MEMORY_VARIANTS
    }
    result: dict[str, Any] = {
        "shape": [batch, channels, size, size],
        "blocks": blocks,
        "activation": "leaky_relu",
        "peak_method": variants["separate"]["peak_method"],
    }
    for key in ("peak_bytes", "saved_bytes", "loss"):
        result[key] = {variant: numbers[key] for variant, numbers in variants.items()}
    for key in ("peak_bytes", "saved_bytes"):
        base = result[key]["separate"]
        result[key.replace("bytes", "ratio")] = {
            variant: None if base is None or numbers is None or base <= 0 else numbers / base
            for variant, numbers in result[key].items()
        }
    return result


def fused_functions(
    shape: tuple[int, ...], axis: int, device: str = "cpu"
) -> dict[str, dict[str, Callable[[], Any]]]:
    """Per mode, the layer with ``activation="relu"`` ("fused"), the layer then ``nn.ReLU``
    ("separate") and torch's ``nn.BatchNorm1d/2d`` then ``nn.ReLU`` ("torch")."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(device)
    axis %= len(shape)
    channels = shape[axis]
    fused = BatchNormalization(channels, axis=axis, activation="relu", device=device)
    plain = BatchNormalization(channels, axis=axis, device=device)
    module_class = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
    native = module_class[len(shape)](channels, eps=1e-3, momentum=0.01, device=device)
    relu = nn.ReLU()
    x_grad = x.clone().requires_grad_()
    upstream = torch.randn_like(x)

    def channel_first(tensor: torch.Tensor) -> torch.Tensor:
        # The view a PyTorch user hands to nn.BatchNorm*: the channel at dim 1.
        return tensor if axis == 1 else tensor.movedim(axis, 1)

    torch_x, torch_x_grad, torch_upstream = map(channel_first, (x, x_grad, upstream))

    def fused_forward() -> Any:
        with torch.no_grad():
            return fused(x, training=True)

    def separate_forward() -> Any:
        with torch.no_grad():
            return relu(plain(x, training=True))

    def torch_forward() -> Any:
        with torch.no_grad():
            return relu(native(torch_x))

    def fused_backward() -> None:
        x_grad.grad = None
        fused(x_grad, training=True).backward(upstream)  # type: ignore[no-untyped-call]

    def separate_backward() -> None:
        x_grad.grad = None
        relu(plain(x_grad, training=True)).backward(upstream)  # type: ignore[no-untyped-call]

    def torch_backward() -> None:
        x_grad.grad = None
        relu(native(torch_x_grad)).backward(torch_upstream)  # type: ignore[no-untyped-call]

    return {
        "train forward": {
            "fused": fused_forward,
            "separate": separate_forward,
            "torch": torch_forward,
        },
        "train forward+backward": {
            "fused": fused_backward,
            "separate": separate_backward,
            "torch": torch_backward,
        },
    }


def activation_targets(
    fused: list[dict[str, Any]], memory: dict[str, Any] | None
) -> list[tuple[str, float, float, float]]:
    """(target, measured, spread, bound): fused / separate <= 0.8 per fused case and mode, and
    in-place / separate peak memory <= 0.6 (one measurement: spread 0), the saved-bytes ratio
    beside it; no memory target where the peak could not be measured."""
    targets: list[tuple[str, float, float, float]] = []
    for result in fused:
        for mode, numbers in result["modes"].items():
            ratio = numbers["ratio"]
            targets.append(
                (
                    f"{result['name']}: fused relu / BN then ReLU ({mode})",
                    ratio["value"],
                    ratio["spread"],
                    0.8,
                )
            )
    if memory is not None and memory["peak_ratio"]["in_place"] is not None:
        targets.append(
            (
                f"{_memory_case_name(memory)}: in-place / separate, peak memory of a training "
                f"step (saved for backward: {memory['saved_ratio']['in_place']:.2f})",
                memory["peak_ratio"]["in_place"],
                0.0,
                0.6,
            )
        )
    return targets


def _memory_case_name(memory: dict[str, Any]) -> str:
    shape = "x".join(map(str, memory["shape"]))
    return f"{memory['blocks']} x conv-BN-{memory['activation']} {shape}"


def _fused_lines(fused: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "| fused activation | shape | mode | fused ms | BN then ReLU ms | torch BN then ReLU ms "
        "| fused / BN then ReLU (spread) | fused / torch's (spread) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in fused:
        for mode, numbers in result["modes"].items():
            seconds, ratio, to_torch = (
                numbers["seconds"],
                numbers["ratio"],
                numbers["ratio_to_torch"],
            )
            lines.append(
                f"| {result['name']} | {'x'.join(map(str, result['shape']))} | {mode} | "
                f"{seconds['fused'] * 1e3:.2f} | {seconds['separate'] * 1e3:.2f} | "
                f"{seconds['torch'] * 1e3:.2f} | {ratio['value']:.2f} (+-{ratio['spread']:.2f}) | "
                f"{to_torch['value']:.2f} (+-{to_torch['spread']:.2f}) |"
            )
    return lines


def _memory_lines(memory: dict[str, Any]) -> list[str]:
    def megabytes(value: float | None) -> str:
        return "-" if value is None else f"{value / 2**20:.1f}"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        "",
        f"| {_memory_case_name(memory)}, training step | peak MB | saved for backward MB "
        "| peak / separate | saved / separate |",
        "|---|---|---|---|---|",
    ]
    for variant, saved in memory["saved_bytes"].items():
        lines.append(
            f"| {variant} | {megabytes(memory['peak_bytes'][variant])} | {megabytes(saved)} "
            f"| {ratio(memory['peak_ratio'][variant])} | {ratio(memory['saved_ratio'][variant])} |"
        )
    lines.append(f"\npeak measured by: {memory['peak_method']}")
    return lines


def activation_lines(fused: list[dict[str, Any]], memory: dict[str, Any] | None) -> list[str]:
    """The Markdown tables of the fused timing and of the memory case (those present)."""
    return (_fused_lines(fused) if fused else []) + (
        _memory_lines(memory) if memory is not None else []
    )
