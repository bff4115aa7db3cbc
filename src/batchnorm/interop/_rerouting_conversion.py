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
