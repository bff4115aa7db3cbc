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

Writes (``set_weights``, constraints, ``reset_parameters``) go to the parameters behind
(:func:`write_weight`): before, they went into the computed tensor, which the next access or call
computed afresh, so a parametrized or pruned gamma ignored ``set_weights`` and its constraint
silently, and ``reset_parameters`` skipped it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize, prune


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


def affine_parameters_behind(
    module: nn.Module, names: tuple[str, str] = ("gamma", "beta")
) -> list[tuple[str, nn.Parameter]]:
    """:func:`parameters_behind` of the scale and the offset (``names``: gamma and beta, or a
    torch batch norm's weight and bias), in that order: what ``trainable`` and ``freeze`` set."""
    return [named for name in names for named in parameters_behind(module, name)]


def check_writable(module: Any, name: str) -> None:
    """Raise ValueError where :func:`write_weight` cannot write ``name``: a parametrization
    without ``right_inverse`` (checked before anything is written)."""
    if not parametrize.is_parametrized(module, name):
        return
    chain: parametrize.ParametrizationList = module.parametrizations[name]
    missing = [type(p).__name__ for p in chain if not hasattr(p, "right_inverse")]
    if missing:
        raise ValueError(
            f"`{name}` is parametrized by {', '.join(missing)}, which has no right_inverse: a "
            f"value for `{name}` (set_weights, a constraint) cannot be written to the parameter "
            "behind it. Give the parametrization a right_inverse method, or write "
            f"`parametrizations.{name}.original` directly. Received: parametrizations "
            f"{[type(p).__name__ for p in chain]}"
        )


def write_weight(module: Any, name: str, value: torch.Tensor) -> None:
    """Make the tensor ``name`` equal ``value``, in place, through whatever computes it.

    A plain parameter or buffer is copied into. A parametrized one has its originals written as
    ``register_parametrization`` sets them: ``value`` through each parametrization's
    ``right_inverse``, last first, the identity where one has none (callers that must not guess
    refuse those first with :func:`check_writable`); torch's own assignment would raise there, and
    it swaps the originals' storage where this copies into it. A pruned one has its original
    (``name + "_orig"``) copied into and the attribute recomputed, masked, as the next call would
    (torch's own load of a pruned module's state writes the original too).
    """
    with torch.no_grad():
        if parametrize.is_parametrized(module, name):
            chain: parametrize.ParametrizationList = module.parametrizations[name]
            inverted: Any = value
            for parametrization in reversed(chain):
                inverse = getattr(parametrization, "right_inverse", None)
                if inverse is not None:
                    inverted = inverse(inverted)
            if chain.is_tensor:
                chain.original.copy_(inverted)
            else:
                for index, part in enumerate(inverted):
                    getattr(chain, f"original{index}").copy_(part)
            return
        original = module._parameters.get(f"{name}_orig")
        if original is not None and name in vars(module):
            original.copy_(value)
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name:
                    setattr(module, name, hook.apply_mask(module))  # type: ignore[no-untyped-call]
            return
        getattr(module, name).copy_(value)
