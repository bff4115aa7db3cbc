"""Conversions keep a batch norm's rerouted scale and offset: parametrized or pruned.

A ``torch.nn.utils.parametrize`` parametrization of torch's ``weight`` (a positive scale, say)
or ``torch.nn.utils.prune`` pruning of it (network slimming prunes batch norm scales) becomes the
same on the layer's ``gamma`` (and ``bias`` on ``beta``), and back: copies of the
parametrization modules, registered in the same order, with the parameters behind them
(``parametrizations.weight.original``, ``weight_orig``) copied, and the pruning mask. The
converted module then computes the same scale, and training moves the same parameters behind it.
Before, the conversion took the computed tensor (the parametrization or mask baked in, as
``prune.remove`` does): a model converted to train on lost its constraint or its pruning.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm


def carry_rerouting(source: nn.Module, target: nn.Module, names: Iterable[tuple[str, str]]) -> None:
    """Reroute each ``target_name`` of ``target`` as ``source_name`` is rerouted on ``source``;
    ``target_name`` holds the computed value already (a plain parameter)."""
    for source_name, target_name in names:
        if parametrize.is_parametrized(source, source_name):
            _carry_parametrization(source, target, source_name, target_name)
        elif _pruned(source, source_name):
            _carry_pruning(source, target, source_name, target_name)


def _carry_parametrization(
    source: nn.Module, target: nn.Module, source_name: str, target_name: str
) -> None:
    chain: nn.Module = source.parametrizations[source_name]  # type: ignore[index, assignment]
    for parametrization in chain.children():
        # unsafe: the originals are copied below, whatever right_inverse made of the value
        parametrize.register_parametrization(
            target, target_name, copy.deepcopy(parametrization), unsafe=True
        )
    made: nn.Module = target.parametrizations[target_name]  # type: ignore[index, assignment]
    behind = dict(made.named_parameters(recurse=False))
    originals = dict(chain.named_parameters(recurse=False))
    if behind.keys() != originals.keys():
        raise ValueError(
            f"The parametrization of `{source_name}` made {sorted(behind)} from the converted "
            f"value where the module holds {sorted(originals)}: it cannot be carried over."
        )
    for name, original in originals.items():
        _copy_parameter(original, behind[name])


def _pruned(module: nn.Module, name: str) -> bool:
    return (
        f"{name}_orig" in module._parameters
        and f"{name}_mask" in module._buffers
        and any(
            isinstance(hook, prune.BasePruningMethod)
            and getattr(hook, "_tensor_name", None) == name
            for hook in module._forward_pre_hooks.values()
        )
    )


def _carry_pruning(
    source: nn.Module, target: nn.Module, source_name: str, target_name: str
) -> None:
    mask = source._buffers[f"{source_name}_mask"]
    assert mask is not None
    behind = target._parameters[target_name]
    assert behind is not None
    prune.custom_from_mask(target, target_name, mask.detach().to(behind.dtype))  # type: ignore[no-untyped-call]
    original = source._parameters[f"{source_name}_orig"]
    assert original is not None
    _copy_parameter(original, target._parameters[f"{target_name}_orig"])


def _copy_parameter(source: torch.Tensor, target: torch.Tensor | None) -> None:
    assert target is not None
    with torch.no_grad():
        target.copy_(source.detach().to(target.dtype))
    target.requires_grad_(source.requires_grad)


def refuse_hooked_weights(module: nn.Module) -> None:
    """Raise where ``module``'s scale or offset is recomputed by an old-style hook
    (``torch.nn.utils.weight_norm`` / ``spectral_norm``): a conversion took the computed tensor
    as a plain parameter, so the converted module trained another parameter than the original
    (weight_g and weight_v), silently."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)):
            raise ValueError(
                f"{type(module).__name__}'s `{hook.name}` is computed by "
                f"torch.nn.utils.{'weight_norm' if isinstance(hook, WeightNorm) else 'spectral_norm'}"
                "'s forward hook, which a conversion cannot carry: use torch.nn.utils."
                "parametrizations' version (carried over), or remove it first. "
                f"Received: a {type(hook).__name__} hook on `{hook.name}`"
            )


def carry_hooks(source: nn.Module, target: nn.Module) -> None:
    """Register ``source``'s forward, forward pre- and backward hooks on ``target`` (pruning's
    are carried by :func:`carry_rerouting`; old-style weight_norm's are refused before, by the
    conversions' :func:`refuse_hooked_weights`): a converted model ran none of them. The handles
    the caller holds still name ``source``'s registrations."""
    for key, hook in source._forward_pre_hooks.items():
        # Not pruning's (carried with the mask), nor the module's own (a lazy module's
        # initialisation, a bound method of ``source``: the new module has its own or none).
        if not isinstance(hook, prune.BasePruningMethod) and not _own_hook(source, hook):
            target._forward_pre_hooks[key] = hook
            if key in source._forward_pre_hooks_with_kwargs:
                target._forward_pre_hooks_with_kwargs[key] = True
    for key, hook in source._forward_hooks.items():
        if _own_hook(source, hook):
            continue
        target._forward_hooks[key] = hook
        for flags in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
            if key in getattr(source, flags):
                getattr(target, flags)[key] = True
    target._backward_pre_hooks.update(source._backward_pre_hooks)
    target._backward_hooks.update(source._backward_hooks)
    if source._backward_hooks or source._backward_pre_hooks:
        target._is_full_backward_hook = source._is_full_backward_hook


def _own_hook(module: nn.Module, hook: object) -> bool:
    return getattr(hook, "__self__", None) is module
