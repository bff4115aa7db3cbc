"""Exact per-channel population statistics of every batch norm's input over a pass of data.

Each batch's count, mean and sum of squared deviations (M2) are computed in float64 and merged
with Chan et al.'s pairwise update, so the result is the mean and variance over every sample
seen, whatever the batch sizes (not an average of per-batch variances):

    n = n_a + n_b,  mean = mean_a + d * n_b / n,  M2 = M2_a + M2_b + d^2 * n_a * n_b / n

with ``d = mean_b - mean_a``. Masks weight the samples (``n`` is the sum of the weights). Under
``torch.distributed`` every rank's (n, mean, M2) are gathered and merged in rank order, so every
rank ends with identical numbers.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from batchnorm.functional._batch_norm import check_mask
from batchnorm.functional._validation import check_bool, check_module
from batchnorm.layers import BatchNormalization
from batchnorm.layers._layer_build import build_settings, undo_build
from batchnorm.tools import _batch_norm_modules as bn
from batchnorm.tools._progress import Progress

Forward = Callable[[nn.Module, Any], Any]
Observer = Callable[[str, nn.Module, tuple, dict], None]


@dataclasses.dataclass
class PopulationStatistics:
    """Per-channel ``count`` (sum of sample weights), ``mean`` and ``m2``, float64."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor

    @classmethod
    def zeros(cls, shape: tuple[int, ...], device: Any = None) -> PopulationStatistics:
        def zero() -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        return cls(zero(), zero(), zero())

    @classmethod
    def of_batch(
        cls, x: torch.Tensor, axes: tuple[int, ...], weights: torch.Tensor | None = None
    ) -> PopulationStatistics:
        """Statistics of one batch over every axis but ``axes`` (``weights`` broadcast to ``x``)."""
        x = x.detach().to(torch.float64)
        dims = tuple(i for i in range(x.ndim) if i not in axes)
        if weights is None:
            count = torch.full_like(x.sum(dim=dims), float(x.numel() // max(1, _size(x, axes))))
            mean = x.mean(dim=dims) if x.numel() else torch.zeros_like(count)
            m2 = ((x - _keep(mean, axes, x.ndim)) ** 2).sum(dim=dims)
            return cls(count, mean, m2)
        w = weights.detach().to(torch.float64).broadcast_to(x.shape)
        x = torch.where(w != 0, x, 0.0)  # padding of weight 0 (NaN, inf) adds exactly 0
        count = w.sum(dim=dims)
        mean = torch.where(count > 0, (w * x).sum(dim=dims) / count.clamp(min=1e-300), 0.0)
        m2 = (w * (x - _keep(mean, axes, x.ndim)) ** 2).sum(dim=dims)
        return cls(count, mean, m2)

    def merged(self, other: PopulationStatistics) -> PopulationStatistics:
        """Chan's parallel combination of two sets of samples."""
        count = self.count + other.count
        safe = count.clamp(min=1e-300)
        delta = other.mean - self.mean
        positive = count > 0
        mean = torch.where(positive, self.mean + delta * other.count / safe, 0.0)
        m2 = (
            self.m2
            + other.m2
            + torch.where(positive, delta**2 * self.count * other.count / safe, 0.0)
        )
        return PopulationStatistics(count, mean, m2)

    def variance(self, unbiased: bool) -> torch.Tensor:
        """``M2 / n`` or, unbiased, ``M2 / (n - 1)`` (``M2 / n`` where ``n <= 1``)."""
        biased = self.m2 / self.count.clamp(min=1e-300)
        if not unbiased:
            return torch.where(self.count > 0, biased, 0.0)
        corrected = self.m2 / (self.count - 1).clamp(min=1e-300)
        return torch.where(self.count > 1, corrected, torch.where(self.count > 0, biased, 0.0))


def _size(x: torch.Tensor, axes: tuple[int, ...]) -> int:
    size = 1
    for a in axes:
        size *= x.shape[a]
    return size


def _keep(tensor: torch.Tensor, axes: tuple[int, ...], ndim: int) -> torch.Tensor:
    view = [1] * ndim
    for a, size in zip(axes, tensor.shape, strict=True):
        view[a] = size
    return tensor.reshape(view)


@dataclasses.dataclass
class PopulationPass:
    """The result of :func:`collect_population_statistics`."""

    statistics: dict[str, PopulationStatistics]
    batches: int
    smallest_batch: dict[str, int]


def model_input(batch: Any) -> Any:
    """The model input in a batch: the tensor itself, the first element of a tuple/list, or the
    ``"input"`` entry of a dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "input" not in batch:
            raise TypeError(
                'A dict batch must hold the model input under "input" (or pass `forward=`). '
                f"Received: a dict with keys {sorted(map(str, batch))}"
            )
        return batch["input"]
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise TypeError(
        "Each batch must be a tensor, a non-empty tuple/list (input first) or a dict with "
        f'"input" (or pass `forward=`). Received: a batch of type {type(batch).__name__}'
    )


def _default_forward(model: nn.Module, batch: Any) -> Any:
    x = model_input(batch)
    device = next(iter(list(model.parameters()) + list(model.buffers())), None)
    if isinstance(x, torch.Tensor) and device is not None and x.device != device.device:
        x = x.to(device.device)
    return model(x)


def check_num_batches(num_batches: Any) -> int | None:
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise ValueError(
            f"`num_batches` must be a positive int or None. Received: num_batches={num_batches!r}"
        )
    return num_batches


def check_model_and_batches(
    model: Any, batches: Any, num_batches: Any, caller: str, progress: Any, forward: Any
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the batch norms of ``model``, after checking the arguments ``caller`` shares."""
    check_module(model)
    check_num_batches(num_batches)
    check_bool(progress, "progress")
    if forward is not None and not callable(forward):
        raise TypeError(
            "`forward` must be a callable forward(model, batch) or None. "
            f"Received: forward={forward!r}"
        )
    layers = bn.batch_norm_modules(model)
    if not layers:
        raise ValueError(
            f"`{caller}` found no batch-norm layer (batchnorm.BatchNormalization or "
            f"torch.nn.BatchNorm*) in the model. Received: model of type {type(model).__name__}"
        )
    if isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(
            "`batches` must be an iterable of batches (a DataLoader, a list of tensors...). "
            f"Received: batches of type {type(batches).__name__}"
        )
    return layers


@torch.no_grad()
def collect_population_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    num_batches: int | None = None,
    progress: bool = False,
    label: str = "batchnorm",
    forward: Forward | None = None,
    observe: Observer | None = None,
) -> PopulationPass:
    """Run ``batches`` through ``model`` with its batch norms in training mode and every other
    module in eval mode (dropout off), and gather each batch norm's input statistics.

    Batch norms normalise with their batch statistics as in training, so each layer sees the
    activations it sees in training; their buffers are restored after every batch (nothing is
    updated, renorm corrections stay the same across batches) and every module's mode is put
    back at the end. ``observe(name, module, args, kwargs)`` is called before each batch norm call
    of the first batch (buffers not yet touched).
    """
    layers = bn.batch_norm_modules(model)
    run = _default_forward if forward is None else forward
    totals: dict[str, PopulationStatistics] = {}
    smallest: dict[str, int] = {}
    first_batch = [True]

    def pre_hook(name: str) -> Callable[..., tuple[tuple, dict] | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            x = args[0] if args else kwargs.get("x", kwargs.get("input"))
            if not isinstance(x, torch.Tensor) or x.ndim == 0:
                return None
            if isinstance(module, BatchNormalization):
                if module._input_rank is None and name not in unbuilt:
                    unbuilt[name] = _build_state(module)
                # What its first call is about to do (idempotent after it): weights for a lazy
                # layer, and the fused path decided for fused=None (a mask counts or not).
                module.build(x.shape)
            # A lazy layer has materialised by now (torch's own pre-hook ran first): its
            # buffers as built are what to restore, not what the first batch made of them.
            saved[name].update(_buffer_copies(module, exclude=saved[name]))
            if observe is not None and first_batch[0]:
                observe(name, module, args, kwargs)
            axes = bn.channel_axes(module, x.ndim)
            weights = _mask_weights(module, args, kwargs, x, axes)
            statistics = PopulationStatistics.of_batch(x, axes, weights)
            totals[name] = totals[name].merged(statistics) if name in totals else statistics
            batch = x.shape[0] if 0 not in axes else 1
            if isinstance(module, BatchNormalization) and module.virtual_batch_size:
                batch = min(batch, module.virtual_batch_size)
            smallest[name] = min(smallest.get(name, batch), batch)
            return in_place_input_copied(module, args, kwargs)

        return hook

    modes = {module: module.training for module in model.modules()}
    saved = {name: _buffer_copies(module) for name, module in layers}
    # Layers the pass builds, as they were: a pass that raises leaves them unbuilt again.
    unbuilt: dict[str, _BuildState] = {}
    handles = []
    for name, module in layers:
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
    model.eval()
    for _, module in layers:
        # The flag only: train() recurses into a batch norm's children (timm's BatchNormAct2d
        # holds its dropout as `drop`), which switched dropout on.
        module.training = True
    length = _length(batches)
    total = length if num_batches is None else min(num_batches, length or num_batches)
    bar = Progress(label, total, enabled=progress)
    count = 0
    completed = False
    try:
        # islice: no batch beyond the last one used is drawn from the iterable (a generator or
        # a shared iterator keeps it).
        for batch in itertools.islice(batches, num_batches):
            run(model, batch)
            _restore(layers, saved)
            first_batch[0] = False
            count += 1
            bar.update()
        completed = True
    finally:
        bar.close()
        _restore(layers, saved)
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
        if not completed:
            modules = dict(layers)
            for name, state in unbuilt.items():
                # as a first call that raises undoes its own build
                undo_build(modules[name], state.settings, state.placeholders)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        totals, count = _gathered(layers, totals, count)
    return PopulationPass(totals, count, smallest)


def in_place_input_copied(
    module: nn.Module, args: tuple, kwargs: dict
) -> tuple[tuple, dict] | None:
    """A forward pre-hook's result giving a ``memory="in_place"`` layer a copy of its input (its
    training call writes over its input), so that the caller's batch, or the activation a later
    module reads, stays as it was; None (arguments unchanged) for any other module."""
    if not isinstance(module, BatchNormalization) or module.memory != "in_place":
        return None
    x = args[0] if args else kwargs.get("x", kwargs.get("input"))
    if not isinstance(x, torch.Tensor):
        return None
    if args:
        return (x.clone(), *args[1:]), kwargs
    key = "x" if "x" in kwargs else "input"
    return args, {**kwargs, key: x.clone()}


@dataclasses.dataclass
class _BuildState:
    """An unbuilt layer's build settings and the placeholders its build materialises."""

    settings: dict[str, Any]
    placeholders: list[str]


def _build_state(layer: BatchNormalization) -> _BuildState:
    tensors = {**layer._parameters, **layer._buffers}
    return _BuildState(
        build_settings(layer),
        [name for name, t in tensors.items() if t is not None and nn.parameter.is_lazy(t)],
    )


def _buffer_copies(module: nn.Module, exclude: Mapping[str, Any] = {}) -> dict[str, torch.Tensor]:
    """Copies of ``module``'s materialised buffers (lazy ones have no values yet), but those
    named in ``exclude``."""
    return {
        k: v.clone()
        for k, v in module._buffers.items()
        if v is not None and not nn.parameter.is_lazy(v) and k not in exclude
    }


def _mask_weights(
    module: nn.Module, args: tuple, kwargs: dict, x: torch.Tensor, axes: tuple[int, ...]
) -> torch.Tensor | None:
    # The hook has built the layer: ``fused`` is decided (before, None read as not fused).
    if not isinstance(module, BatchNormalization) or module.fused:
        return None  # a fused layer ignores masks, as tf-keras does
    mask = args[2] if len(args) > 2 else kwargs.get("mask")
    if mask is None:
        return None
    # The layer's own reading (Keras' shape first: x without its last axis), so the statistics
    # weigh what the layer's training call weighs.
    return check_mask(torch.as_tensor(mask, device=x.device), x, axes)


def _length(batches: Any) -> int | None:
    try:
        return len(batches)
    except TypeError:
        return None


def _restore(
    layers: list[tuple[str, nn.Module]], saved: dict[str, dict[str, torch.Tensor]]
) -> None:
    for name, module in layers:
        for key, value in saved[name].items():
            buffer = module._buffers.get(key)
            if buffer is not None:
                buffer.copy_(value)


def _gathered(
    layers: list[tuple[str, nn.Module]], totals: dict[str, PopulationStatistics], count: int
) -> tuple[dict[str, PopulationStatistics], int]:
    """Merge every rank's statistics in rank order (identical on every rank)."""
    import torch.distributed as dist

    shapes = {}
    for name, module in layers:
        buffers = bn.statistics_buffers(module)
        if name in totals:
            shapes[name] = tuple(totals[name].mean.shape)
        elif buffers is not None:
            shapes[name] = tuple(buffers[0].shape)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    pieces = [torch.tensor([float(count)], dtype=torch.float64, device=device)]
    for name, shape in shapes.items():
        local = totals.get(name) or PopulationStatistics.zeros(shape)
        pieces += [t.reshape(-1).to(device=device) for t in (local.count, local.mean, local.m2)]
    flat = torch.cat(pieces)
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    merged: dict[str, PopulationStatistics] = {}
    total_batches = 0
    for vector in gathered:
        vector = vector.cpu()
        total_batches += int(vector[0].item())
        offset = 1
        for name, shape in shapes.items():
            size = 1
            for s in shape:
                size *= s
            parts = [
                vector[offset + i * size : offset + (i + 1) * size].reshape(shape) for i in range(3)
            ]
            offset += 3 * size
            statistics = PopulationStatistics(*parts)
            merged[name] = merged[name].merged(statistics) if name in merged else statistics
    merged = {name: s for name, s in merged.items() if bool((s.count > 0).any())}
    return merged, total_batches
