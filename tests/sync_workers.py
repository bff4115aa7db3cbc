"""Code run inside the gloo processes spawned by test_synchronized.py, and the scenarios they share.

Each scenario is generated from a seed, so the test process rebuilds the concatenated batch and
runs it through the unsynchronized layer (or torch.nn) as the oracle.
"""

from __future__ import annotations

import datetime
import os
import socket
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint

import batchnorm
from batchnorm import BatchNormalization, BatchNormStatistics
from batchnorm.functional import NUMBA_CPU, _synchronized, batch_norm, register_backend

# name -> (per-rank batch sizes by world size, layer kwargs, input trailing shape, mask?)
SCENARIOS: dict[str, dict[str, Any]] = {
    "even": {"sizes": {2: [4, 4], 3: [3, 3, 3]}, "kwargs": {"axis": -1}, "shape": (5,)},
    "uneven_nchw": {
        "sizes": {2: [5, 2], 3: [1, 4, 2]},
        "kwargs": {"axis": 1},
        "shape": (3, 4, 2),
    },
    "empty": {"sizes": {2: [6, 0], 3: [3, 0, 4]}, "kwargs": {"axis": 1}, "shape": (3, 2)},
    "ghost": {
        "sizes": {2: [4, 6], 3: [4, 0, 2]},
        "kwargs": {"axis": -1},
        "shape": (3,),
        "ghost_batches": 2,
    },
    "mask": {
        "sizes": {2: [3, 4], 3: [2, 0, 5]},
        "kwargs": {"axis": 1},
        "shape": (2, 6),
        "mask": True,
    },
    "renorm": {
        "sizes": {2: [5, 3], 3: [2, 3, 4]},
        "kwargs": {
            "axis": -1,
            "renorm": True,
            "renorm_clipping": {"rmin": 0.8, "rmax": 1.25, "dmax": 0.1},
            "renorm_momentum": 0.9,
        },
        "shape": (4,),
    },
    "debiased": {
        "sizes": {2: [3, 5], 3: [2, 2, 3]},
        "kwargs": {
            "axis": -1,
            "moving_average": "debiased",
            "moving_variance_estimator": "unbiased",
        },
        "shape": (3,),
    },
    "multi_axis": {
        "sizes": {2: [2, 3], 3: [2, 2, 1]},
        "kwargs": {"axis": [1, 3]},
        "shape": (2, 3, 3),
    },
}
STEPS = 2
DDP_STEPS = 3
MOMENTUM = 0.8


def scenario_data(name: str, world_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """Per-step inputs and cotangents for every rank, and the per-rank ghost-batch sizes."""
    spec = SCENARIOS[name]
    sizes = spec["sizes"][world_size]
    generator = torch.Generator().manual_seed(zlib.crc32(f"{name}{world_size}".encode()))
    steps = []
    for step in range(STEPS):
        total = sum(sizes)
        x = torch.randn(total, *spec["shape"], generator=generator, dtype=dtype) * 2 + step + 1
        cotangent = torch.randn(x.shape, generator=generator, dtype=dtype)
        mask = None
        if spec.get("mask"):
            axes = batchnorm.functional._validation.normalize_axes(spec["kwargs"]["axis"], x.ndim)
            mask_shape = [size for i, size in enumerate(x.shape) if i not in axes]
            mask = (torch.rand(mask_shape, generator=generator) > 0.4).to(dtype)
        steps.append({"x": x, "cotangent": cotangent, "mask": mask})
    ghosts = spec.get("ghost_batches")
    virtual = None if ghosts is None else [max(size // ghosts, 1) for size in sizes]
    return {"sizes": sizes, "steps": steps, "virtual_batch_sizes": virtual, "ghosts": ghosts}


def make_layer(name: str, dtype: torch.dtype, virtual_batch_size: int | None, **extra: Any):
    kwargs = dict(SCENARIOS[name]["kwargs"])
    kwargs.update(momentum=MOMENTUM, epsilon=1e-3, dtype=str(dtype).removeprefix("torch."))
    kwargs.update(virtual_batch_size=virtual_batch_size, fused=False)
    torch.manual_seed(0)
    layer = BatchNormalization(**kwargs, **extra)
    with torch.no_grad():
        x = torch.zeros(4, *SCENARIOS[name]["shape"], dtype=dtype)
        layer.build(x.shape)
        layer.gamma.copy_(torch.linspace(0.5, 1.5, layer.gamma.numel()).reshape(layer.gamma.shape))
        layer.beta.copy_(torch.linspace(-1, 1, layer.beta.numel()).reshape(layer.beta.shape))
    return layer


def run_scenario(layer: nn.Module, steps: list[dict[str, Any]], rows: slice) -> dict[str, Any]:
    """Two training steps (gradients of the first), then an inference call; all on ``rows``."""
    result: dict[str, Any] = {}
    for index, step in enumerate(steps):
        x = step["x"][rows].clone().requires_grad_(True)
        mask = None if step["mask"] is None else step["mask"][rows]
        y = layer(x, training=True, mask=mask) if mask is not None else layer(x, training=True)
        if index == 0:
            (y * step["cotangent"][rows]).sum().backward()
            result["y"] = y.detach()
            result["x_grad"] = x.grad
            result["gamma_grad"] = layer.gamma.grad.clone()
            result["beta_grad"] = layer.beta.grad.clone()
    result["statistics"] = {
        k: v.clone() for k, v in layer.state_dict().items() if "moving" in k or "renorm" in k
    }
    result["inference"] = layer(steps[0]["x"][rows], training=False).detach()
    return result


class CollectiveCounter:
    """Counts the collectives torch.distributed runs (to prove inference communicates nothing)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        for name in ("all_gather", "all_reduce"):
            original = getattr(dist, name)
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return original(*args, **kwargs)

        return counted


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(worker: Callable[..., None], world_size: int, directory: Path, *args: Any) -> None:
    """Run ``worker(rank, world_size, directory, *args)`` in ``world_size`` gloo processes."""
    port = free_port()
    mp.start_processes(
        _entry,
        args=(worker, world_size, port, directory, args),
        nprocs=world_size,
        join=True,
        start_method="spawn",
    )


def _entry(
    rank: int, worker: Callable[..., None], world_size: int, port: int, directory: Path, args: tuple
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        worker(rank, world_size, directory, *args)
    except Exception:
        (directory / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def suite_worker(rank: int, world_size: int, directory: Path, tasks: list[str]) -> None:
    """Run ``tasks`` in order in one set of processes (each spawn costs seconds of imports).

    "layers-float64" / "layers-float32", "torch-ops" (layers-float64 with the torch-op backend,
    the path other devices take), "ddp", "fsdp", "fsdp-bfloat16", "fsdp-checkpoint" and "errors" (last: it shuts
    the group down).
    """
    for task in tasks:
        if task == "torch-ops":
            register_backend("cpu", None)
            layer_worker(rank, world_size, directory, torch.float64, prefix="torch-ops-")
            register_backend("cpu", NUMBA_CPU)
        elif task.startswith("layers-"):
            layer_worker(rank, world_size, directory, getattr(torch, task.removeprefix("layers-")))
        elif task == "ddp":
            ddp_worker(rank, world_size, directory, DDP_STEPS)
        elif task == "fsdp":
            fsdp_worker(rank, world_size, directory, DDP_STEPS)
        elif task == "fsdp-bfloat16":
            fsdp_worker(rank, world_size, directory, DDP_STEPS, mixed_precision=True)
        elif task == "fsdp-checkpoint":
            fsdp_worker(rank, world_size, directory, DDP_STEPS, checkpointed=True)
        elif task == "errors":
            error_worker(rank, world_size, directory)
        if dist.is_initialized():
            dist.barrier()


def layer_worker(
    rank: int, world_size: int, directory: Path, dtype: torch.dtype, prefix: str = ""
) -> None:
    """Every scenario through a synchronized layer; results to ``<dtype>-rank{r}.pt``."""
    counter = CollectiveCounter()
    results: dict[str, Any] = {}
    for name in SCENARIOS:
        data = scenario_data(name, world_size, dtype)
        sizes = data["sizes"]
        start = sum(sizes[:rank])
        virtual = None if data["virtual_batch_sizes"] is None else data["virtual_batch_sizes"][rank]
        layer = make_layer(name, dtype, virtual, synchronized=True)
        counter.calls.clear()
        result = run_scenario(layer, data["steps"], slice(start, start + sizes[rank]))
        result["collectives"] = list(counter.calls)
        results[name] = result
    # use_global_stats: False normalises inference with the local batch, True always uses the
    # moving statistics; neither communicates outside a training call that uses batch statistics.
    x = torch.randn(3 + rank, 4, dtype=dtype)
    counter.calls.clear()
    same = True
    for use_global_stats, training in ((False, False), (True, True)):
        kwargs = {"use_global_stats": use_global_stats, "dtype": str(dtype).replace("torch.", "")}
        synchronized = BatchNormalization(4, synchronized=True, **kwargs)
        local = BatchNormalization(4, fused=False, **kwargs)
        same = same and torch.equal(synchronized(x, training=training), local(x, training=training))
    results["global_stats"] = {"collectives": list(counter.calls), "same_as_local": same}
    # A torch model converted with convert_sync, against torch.nn.BatchNorm2d on the full batch.
    converted = batchnorm.convert_sync(torch_batch_norm(dtype))
    data = scenario_data("uneven_nchw", world_size, dtype)
    sizes = data["sizes"]
    start = sum(sizes[:rank])
    results["torch_converted"] = run_scenario(
        converted, data["steps"], slice(start, start + sizes[rank])
    )
    torch.save(results, directory / f"{prefix}{dtype}-rank{rank}.pt".replace("torch.", ""))


def cuda_worker(rank: int, world_size: int, directory: Path) -> None:
    """Every scenario with the layer and the data on CUDA (both processes share the GPU; gloo
    moves the statistics through host memory); results, on the CPU, to ``cuda-rank{r}.pt``."""
    results: dict[str, Any] = {}
    for name in SCENARIOS:
        data = scenario_data(name, world_size, torch.float32)
        sizes = data["sizes"]
        start = sum(sizes[:rank])
        virtual = None if data["virtual_batch_sizes"] is None else data["virtual_batch_sizes"][rank]
        layer = make_layer(name, torch.float32, virtual, synchronized=True).to("cuda")
        steps = [
            {key: None if value is None else value.to("cuda") for key, value in step.items()}
            for step in data["steps"]
        ]
        result = run_scenario(layer, steps, slice(start, start + sizes[rank]))
        results[name] = _to_cpu(result)
    torch.save(results, directory / f"cuda-rank{rank}.pt")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    return value


def torch_batch_norm(dtype: torch.dtype) -> nn.BatchNorm2d:
    module = nn.BatchNorm2d(3, momentum=0.3, eps=1e-4).to(dtype)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.5, 1.0, 1.5]))
        module.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
        module.running_var.fill_(2.0)
    return module


def error_worker(rank: int, world_size: int, directory: Path) -> None:
    """Error paths: each must raise on every rank, and leave the group usable."""
    messages: dict[str, str] = {}

    def attempt(name: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except (ValueError, RuntimeError) as error:
            messages[name] = f"{type(error).__name__}: {error}"
        else:
            messages[name] = "no error"

    channels = 3 if rank == 0 else 4
    layer = BatchNormalization(channels, synchronized=True)
    attempt("channels", lambda: layer(torch.randn(4, channels), training=True))
    state_after = layer.moving_mean.clone()
    messages["channels_state_unchanged"] = str(
        bool(torch.equal(state_after, torch.zeros(channels)))
    )
    ghost_layer = BatchNormalization(3, synchronized=True, virtual_batch_size=2)
    attempt("ghosts", lambda: ghost_layer(torch.randn(4 + 2 * rank, 3), training=True))
    # The group still works after the errors above.
    good = BatchNormalization(3, synchronized=True)
    attempt("recovered", lambda: good(torch.randn(4, 3), training=True))
    call_order_errors(rank, attempt, messages)

    # Twice differentiable it is not: the second derivative raises, on every rank.
    def second_derivative() -> None:
        x = torch.randn(4, 3, requires_grad=True)
        (dx,) = torch.autograd.grad((good(x, training=True) ** 3).sum(), x, create_graph=True)
        dx.sum().backward()

    attempt("double_backward", second_derivative)

    # A loss linear in the output: no incoming gradient requires grad, and the gradient came
    # back with no graph, so a gradient penalty was dropped without a word.
    def gradient_penalty() -> None:
        x = torch.randn(4, 3, requires_grad=True)
        task = (good(x, training=True) * torch.randn(4, 3)).sum()
        (dx,) = torch.autograd.grad(task, x, create_graph=True)
        (task + (dx**2).sum()).backward()

    attempt("gradient_penalty", gradient_penalty)
    # Every rank empty: nothing to learn, the statistics stay as they were.
    before = {k: v.clone() for k, v in good.state_dict().items()}
    empty_y = good(torch.randn(0, 3), training=True)
    unchanged = all(torch.equal(before[k], v) for k, v in good.state_dict().items())
    messages["all_empty_unchanged"] = str(unchanged and empty_y.shape == (0, 3))
    # A group of one behaves exactly as the unsynchronized layer; a non-member is refused.
    solo = dist.new_group([0])
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(rank))
    statistics = BatchNormStatistics(torch.zeros(3), torch.ones(3))
    if rank == 0:
        alone = BatchNormalization(3, synchronized=True, process_group=solo)
        local = BatchNormalization(3, fused=False)
        same = torch.equal(alone(x, training=True), local(x, training=True))
        same = same and torch.equal(alone.moving_variance, local.moving_variance)
        messages["group_of_one_equal"] = str(same)
    else:
        attempt("non_member", lambda: BatchNormalization(3, synchronized=True, process_group=solo))
        attempt(
            "non_member_functional",
            lambda: batch_norm(x, statistics, training=True, synchronized=True, process_group=solo),
        )
    # A rank that never joins the collective: the other one times out with a clear error.
    short = dist.new_group(list(range(world_size)), timeout=datetime.timedelta(seconds=2))
    if rank == 0:
        waiting = BatchNormalization(3, synchronized=True, process_group=short)
        attempt("timeout", lambda: waiting(torch.randn(4, 3), training=True))
    dist.barrier()
    dist.destroy_process_group()
    # A specific group asked for after torch.distributed is shut down.
    stale = BatchNormalization(3, synchronized=True, process_group=short)
    attempt("not_initialized", lambda: stale(torch.randn(4, 3), training=True))
    torch.save(messages, directory / f"errors{rank}.pt")


def call_order_errors(
    rank: int, attempt: Callable[[str, Callable[[], Any]], None], messages: dict[str, str]
) -> None:
    """Ranks that call synchronized layers in different orders, after first calls in one order."""
    small, large = (
        BatchNormalization(8, synchronized=True),
        BatchNormalization(16, synchronized=True),
    )
    x8, x16 = torch.randn(4, 8), torch.randn(4, 16)
    small(x8, training=True)
    large(x16, training=True)
    before = [small.moving_mean.clone(), large.moving_mean.clone()]
    counter = CollectiveCounter()
    attempt(
        "order_sizes", lambda: small(x8, training=True) if rank == 0 else large(x16, training=True)
    )
    messages["order_sizes_collectives"] = " ".join(counter.calls)
    after = [small.moving_mean, large.moving_mean]
    unchanged = all(torch.equal(old, new) for old, new in zip(before, after, strict=True))
    messages["order_sizes_state_unchanged"] = str(unchanged)
    # A layer larger than any before on the group, against a known one: the headers still pair.
    larger = BatchNormalization(32, synchronized=True)
    attempt(
        "order_new_larger",
        lambda: (
            small(x8, training=True) if rank == 0 else larger(torch.randn(4, 32), training=True)
        ),
    )
    # Two layers of the same size, swapped: nothing in the exchange tells them apart.
    twins = [BatchNormalization(8, synchronized=True) for _ in range(2)]
    for twin in twins:
        twin(x8, training=True)
    swapped = twins if rank == 0 else twins[::-1]
    attempt("order_equal_sizes", lambda: [twin(x8, training=True) for twin in swapped])

    # Backward through different calls: rank 0 through the small layer's, rank 1 the large one's.
    def backward_through_one_call() -> None:
        y_small = small(x8.clone().requires_grad_(True), training=True)
        y_large = large(x16.clone().requires_grad_(True), training=True)
        (y_small if rank == 0 else y_large).sum().backward()

    attempt("order_backward", backward_through_one_call)
    attempt(
        "order_backward_recovered",
        lambda: (small(x8, training=True).sum() + large(x16, training=True).sum()).backward(),
    )
    # A rank that counted a call whose collective never ran (simulated by its counter): the next
    # call is refused on every rank, the one after it works.
    if rank == 1:
        _synchronized._group_state(dist.group.WORLD).calls += 1
    attempt("out_of_step", lambda: small(x8, training=True))
    attempt("realigned", lambda: small(x8, training=True))


class SmallCnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4, momentum=0.2)
        self.head = nn.Linear(4 * 5 * 5, 2)
        self.checkpointed = False  # conv-norm-relu under torch.utils.checkpoint (non-reentrant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            features = checkpoint(self.block, x, use_reentrant=False)
        else:
            features = self.block(x)
        return self.head(features.flatten(1))

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.conv(x)))


def cnn_data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(8, 3, 5, 5, generator=generator, dtype=torch.float64),
            torch.randn(8, 2, generator=generator, dtype=torch.float64),
        )
        for _ in range(steps)
    ]


def cnn_model() -> SmallCnn:
    torch.manual_seed(3)
    return SmallCnn().double()


def train_on_shares(model: nn.Module, rank: int, world_size: int, steps: int) -> None:
    """SGD on the small CNN's data, this rank taking its share of every batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    share = 8 // world_size
    for x, target in cnn_data(steps):
        rows = slice(rank * share, (rank + 1) * share)
        loss = nn.functional.mse_loss(model(x[rows]), target[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def ddp_worker(rank: int, world_size: int, directory: Path, steps: int) -> None:
    """The small CNN, converted, under DistributedDataParallel; final weights to ``ddp{r}.pt``."""
    model = nn.parallel.DistributedDataParallel(batchnorm.convert_sync(cnn_model()))
    train_on_shares(model, rank, world_size, steps)
    torch.save(model.module.state_dict(), directory / f"ddp{rank}.pt")


def fsdp_worker(
    rank: int,
    world_size: int,
    directory: Path,
    steps: int,
    mixed_precision: bool = False,
    checkpointed: bool = False,
) -> None:
    """The small CNN, converted, sharded by FSDP2 (``fully_shard``: the batch norm layer in a
    shard of its own, then the rest); final weights to ``fsdp{r}.pt``. With
    ``mixed_precision``, a float32 model that FSDP2 runs in bfloat16 (``MixedPrecisionPolicy``:
    parameters and inputs cast for the forward, gradients reduced in float32); final weights
    to ``fsdp-bfloat16{r}.pt``. With ``checkpointed``, the conv-norm-relu block under
    activation checkpointing (its moving statistics step once a step); to
    ``fsdp-checkpoint{r}.pt``.

    FSDP2 frees each unsharded parameter's memory after the forward and refills it for the
    backward by resizing its storage, which a storage NumPy had viewed through
    ``Tensor.numpy()`` refused."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = batchnorm.convert_sync(cnn_model())
    model.checkpointed = checkpointed
    policy = MixedPrecisionPolicy()
    if mixed_precision:
        model = model.float()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model.norm, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    train_on_shares(model, rank, world_size, steps)
    state = {
        key: value.full_tensor() if isinstance(value, dist.tensor.DTensor) else value
        for key, value in model.state_dict().items()
    }
    suffix = "-bfloat16" if mixed_precision else "-checkpoint" if checkpointed else ""
    torch.save(state, directory / f"fsdp{suffix}{rank}.pt")
