"""Freeze batch norms so that ``model.train()`` does not wake their statistics up again."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from batchnorm.functional._validation import check_bool
from batchnorm.interop._frozen_batch_norm import (  # the classes keep this import path too
    _FROZEN_CLASSES,
    _STATE,
    is_frozen,
    is_frozen_torch_batch_norm,
    plain_class,
    swap_class,
)
from batchnorm.interop._frozen_batch_norm import FrozenBatchNorm1d as FrozenBatchNorm1d
from batchnorm.interop._frozen_batch_norm import FrozenBatchNorm2d as FrozenBatchNorm2d
from batchnorm.interop._frozen_batch_norm import FrozenBatchNorm3d as FrozenBatchNorm3d
from batchnorm.interop._frozen_batch_norm import FrozenSyncBatchNorm as FrozenSyncBatchNorm
from batchnorm.layers import BatchNormalization
from batchnorm.tools._batch_norm_modules import (
    batch_norm_modules,
    display_name,
    named_affine_parameters,
    statistics_buffers,
)


def freeze(model: nn.Module, *, statistics: bool = True, affine: bool = True) -> nn.Module:
    """Freeze every batch norm in ``model``, through any number of ``model.train()`` calls.

    A frozen layer normalises with its moving statistics,
    ``y = gamma * (x - moving_mean) / sqrt(moving_variance + epsilon) + beta``, in training and
    in inference, and never updates them, until :func:`unfreeze`. Our
    :class:`~batchnorm.BatchNormalization` gets ``use_global_stats=True``; torch's
    BatchNorm1d/2d/3d and SyncBatchNorm get their class swapped to a frozen subclass
    (``FrozenBatchNorm2d`` ...) that keeps the state_dict keys, pickles and deep-copies.
    The previous settings are remembered on the module for :func:`unfreeze`.

    Args:
        model: a batch norm or a model containing some.
        statistics: freeze the moving statistics (default True).
        affine: also stop gradients to gamma/beta (``requires_grad=False``; default True).
            With ``affine=False`` gamma and beta keep training on the frozen statistics.

    Returns:
        ``model``, frozen in place.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ValueError: it holds no batch norm, or a
        torch batch norm without running statistics (``track_running_stats=False``) or of a
        subclass that cannot be frozen, or (with ``affine``) a torch Lazy batch norm not yet
        initialised. Nothing is changed when it raises.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> _ = batchnorm.freeze(model).train()  # statistics stay frozen in training mode
    """
    statistics, affine = check_bool(statistics, "statistics"), check_bool(affine, "affine")
    if not statistics and not affine:
        raise ValueError(
            "`freeze` needs something to freeze: `statistics` or `affine` must be True. "
            f"Received: statistics={statistics}, affine={affine}"
        )
    layers = _batch_norms_of(model, "freeze")
    for name, module in layers:  # every check before anything is changed
        _check_freezable(name, module, statistics=statistics, affine=affine)
    for _, module in layers:
        _unfreeze_module(module)
        _freeze_module(module, statistics=statistics, affine=affine)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze` on every batch norm of ``model``: previous statistics mode and
    ``requires_grad`` come back; the statistics themselves are unchanged. Returns ``model``."""
    for _, module in _batch_norms_of(model, "unfreeze"):
        _unfreeze_module(module)
    return model


@contextlib.contextmanager
def frozen(
    model: nn.Module, *, statistics: bool = True, affine: bool = True
) -> Iterator[nn.Module]:
    """Context manager: ``model`` frozen as by :func:`freeze` inside, as it was on exit.

    Example:
        >>> with batchnorm.frozen(model):
        ...     train_head(model)
    """
    layers = _batch_norms_of(model, "frozen")
    before = {id(module): dict(vars(module)[_STATE]) for _, module in layers if is_frozen(module)}
    # freeze drops gamma's and beta's gradients (an optimizer would step them); the block
    # gives back those accumulated before it (a loss's backward, then an auxiliary one inside).
    gradients = [
        (p, p.grad) for _, module in layers for _, p in named_affine_parameters(module) if affine
    ]  # with affine=False nothing is dropped, and gamma and beta keep training in the block
    freeze(model, statistics=statistics, affine=affine)
    try:
        yield model
    finally:
        for _, module in layers:
            _unfreeze_module(module)
            if id(module) in before:
                flags = before[id(module)]
                _freeze_module(module, statistics=flags["statistics"], affine=flags["affine"])
        for parameter, gradient in gradients:
            parameter.grad = gradient


def _batch_norms_of(model: Any, function: str) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`{function}` takes an nn.Module (a batch norm or a model holding some). "
            f"Received: model of type {type(model).__name__}"
        )
    layers = batch_norm_modules(model)
    if not layers:
        raise ValueError(
            f"`{function}` found no batch-norm layer (batchnorm.BatchNormalization or "
            f"torch.nn.BatchNorm*) in the model. Received: model of type {type(model).__name__}"
        )
    return layers


def _check_freezable(name: str, module: nn.Module, *, statistics: bool, affine: bool) -> None:
    if isinstance(module, BatchNormalization):
        return  # its placeholders take requires_grad_, and keep it when they materialise
    if statistics and statistics_buffers(module) is None:
        raise ValueError(
            f"Cannot freeze the statistics of {display_name(name)} ({type(module).__name__}): it "
            "has no running statistics (track_running_stats=False or not initialised). Use "
            "freeze(model, statistics=False) to freeze only gamma/beta."
        )
    if statistics and (
        plain_class(module) not in _FROZEN_CLASSES and not is_frozen_torch_batch_norm(module)
    ):
        raise ValueError(
            f"Cannot freeze the statistics of {display_name(name)}: class "
            f"{plain_class(module).__qualname__} is not one of torch.nn.BatchNorm1d/2d/3d or "
            "SyncBatchNorm."
        )
    # torch's placeholders refuse requires_grad_ ("Attempted to use an uninitialized parameter").
    lazy = [path for path, p in named_affine_parameters(module) if nn.parameter.is_lazy(p)]
    if affine and lazy:
        raise ValueError(
            f"Cannot freeze gamma/beta of {display_name(name)} ({type(module).__name__}): they "
            "are not initialised yet; run the model once first. Received: uninitialised "
            f"{', '.join(lazy)}"
        )


def _freeze_module(module: nn.Module, *, statistics: bool, affine: bool) -> None:
    state: dict[str, Any] = {"statistics": statistics, "affine": affine}
    if statistics:
        if isinstance(module, BatchNormalization):
            state["use_global_stats"] = module.use_global_stats
            module.use_global_stats = True
        elif not is_frozen_torch_batch_norm(module):
            state["class"] = plain_class(module)
            swap_class(module, _FROZEN_CLASSES[state["class"]])
    if affine:
        named = named_affine_parameters(module)
        state["requires_grad"] = {path: p.requires_grad for path, p in named}
        for _, parameter in named:
            parameter.requires_grad_(False)
            # A gradient left from before would still move it: optimizers step every
            # parameter with a .grad (zero_grad(set_to_none=False) keeps one, momentum and
            # weight decay act on a zero one).
            parameter.grad = None
    setattr(module, _STATE, state)


def _unfreeze_module(module: nn.Module) -> None:
    state = vars(module).pop(_STATE, None)
    if state is None:
        return
    if "use_global_stats" in state:
        module.use_global_stats = state["use_global_stats"]
    if "class" in state:
        swap_class(module, state["class"])
    for path, requires_grad in state.get("requires_grad", {}).items():
        parameter = _parameter_now(module, path)
        if parameter is not None:
            parameter.requires_grad_(requires_grad)


def _parameter_now(module: nn.Module, path: str) -> nn.Parameter | None:
    """The parameter frozen at ``path``, where it is now: a parametrization registered or
    removed since moves it between ``weight`` and ``parametrizations.weight.original``; None
    if it is gone."""
    prefix, suffix = "parametrizations.", ".original"
    moved = (
        path[len(prefix) : -len(suffix)]
        if path.startswith(prefix) and path.endswith(suffix)
        else f"{prefix}{path}{suffix}"
    )
    for candidate in (path, moved):
        try:
            return module.get_parameter(candidate)
        except AttributeError:
            continue
    return None
