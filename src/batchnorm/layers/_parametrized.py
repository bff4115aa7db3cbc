"""gamma and beta under ``torch.nn.utils.parametrize``.

``register_parametrization(layer, "gamma", f)`` moves gamma out of the layer's ``_parameters``
into ``layer.parametrizations.gamma.original`` and makes ``layer.gamma`` compute
``f(original)`` on each access, differentiable to the original. A call reads gamma and beta
from ``_parameters`` (an attribute lookup through ``nn.Module.__getattr__`` costs more on small
inputs); where a parametrization is registered it reads the attributes instead: it normalised
with no gamma at all before (a parametrized gamma is not in ``_parameters``), and the original
got no gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize


def has_parametrizations(module: nn.Module) -> bool:
    """Whether any of the module's own tensors is parametrized (what ``parametrize`` adds)."""
    return "parametrizations" in module._modules


def affine_tensors(layer: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(gamma, beta)`` as a call uses them: the parameters (None where the layer has no scale
    or no offset), or their parametrized values."""
    parameters = layer._parameters
    if not has_parametrizations(layer):
        return parameters.get("gamma"), parameters.get("beta")
    return getattr(layer, "gamma", None), getattr(layer, "beta", None)


def parameters_behind(module: nn.Module, name: str) -> list[tuple[str, nn.Parameter]]:
    """The parameters that the tensor ``name`` comes from, with their paths in ``module``
    (:meth:`~torch.nn.Module.get_parameter`): itself where it is a parameter, the originals of
    its parametrization where it has one, none otherwise."""
    if parametrize.is_parametrized(module, name):
        originals: nn.Module = module.parametrizations[name]  # type: ignore[index, assignment]
        return [
            (f"parametrizations.{name}.{path}", p)
            for path, p in originals.named_parameters(recurse=False)
        ]
    tensor = getattr(module, name, None)
    return [(name, tensor)] if isinstance(tensor, nn.Parameter) else []
