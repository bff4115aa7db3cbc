"""gamma and beta rerouted by torch's utilities: ``torch.nn.utils.parametrize`` and
``torch.nn.utils.prune``.

``register_parametrization(layer, "gamma", f)`` moves gamma out of the layer's ``_parameters``
into ``layer.parametrizations.gamma.original`` and makes ``layer.gamma`` a property computing
``f(original)`` on each access. ``prune.l1_unstructured(layer, "gamma", amount)`` moves it to
``gamma_orig`` and sets the attribute ``layer.gamma = gamma_orig * gamma_mask`` before each call.
Either way ``layer.gamma`` is differentiable to the parameter behind it. A call reads gamma and
beta from ``_parameters`` (an attribute lookup through ``nn.Module.__getattr__`` costs more on
small inputs) and, where they are rerouted, the attributes: before, it normalised without gamma
(not in ``_parameters`` any more) and the parameter behind it got no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize


def rerouted(module: nn.Module) -> bool:
    """Whether a tensor of the module is parametrized, or gamma or beta pruned."""
    attributes = vars(module)
    return "parametrizations" in module._modules or "gamma" in attributes or "beta" in attributes


def affine_tensors(layer: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(gamma, beta)`` as a call uses them: the parameters (None where the layer has no scale
    or no offset), or the rerouted attributes."""
    parameters = layer._parameters
    if not rerouted(layer):
        return parameters.get("gamma"), parameters.get("beta")
    return getattr(layer, "gamma", None), getattr(layer, "beta", None)


def parameters_behind(module: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters that the tensor ``name`` comes from, with their paths in ``module``
    (:meth:`~torch.nn.Module.get_parameter`): itself where it is a parameter, the originals of
    its parametrization, or the pruned original (``name + "_orig"``); none otherwise."""
    if parametrize.is_parametrized(module, name):
        originals: nn.Module = module.parametrizations[name]  # type: ignore[index, assignment]
        return [
            (f"parametrizations.{name}.{path}", p)
            for path, p in originals.named_parameters(recurse=False)
        ]
    for path in (name, f"{name}_orig"):
        tensor = module._parameters.get(path)
        if isinstance(tensor, nn.Parameter):
            return [(path, tensor)]
    return []
