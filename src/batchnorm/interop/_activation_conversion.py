"""Batch norms fused with an activation, from timm and inplace_abn, as :class:`BatchNormalization`
options; and a layer's activation as the torch module that follows torch's batch norm.

Recognised by class name and attributes (neither package is imported):

- timm's ``BatchNormAct2d`` (a torch.nn.BatchNorm2d) and ``SyncBatchNormAct`` (a
  torch.nn.SyncBatchNorm) compute ``act(drop(batch_norm(x)))`` with ``drop`` and ``act`` modules.
  ``act`` becomes the layer's activation when it is exactly torch.nn.ReLU, LeakyReLU (its
  ``negative_slope``), ELU (its ``alpha`` > 0) or Identity and ``drop`` is Identity; otherwise
  ``drop`` and ``act`` are kept, unchanged, as modules after a layer without activation.
- inplace_abn's ``ABN``, ``InPlaceABN`` and ``InPlaceABNSync`` compute
  ``act(gamma * x_hat + beta)`` with ``activation`` "relu", "leaky_relu", "elu" or "identity" and
  its ``activation_param``. ABN scales by ``weight``; InPlaceABN and InPlaceABNSync (inplace_abn
  1.x kernels) by ``gamma = |weight| + eps``, kept positive so their backward can divide by it:
  the layer's gamma is that value, so outputs, input gradients and statistics are equal, and
  ``d gamma = sign(weight) * d weight`` (equal steps of plain SGD keep ``gamma = |weight| + eps``
  while ``weight`` does not cross 0). InPlaceABN trains with ``memory="in_place"``;
  InPlaceABNSync becomes ``synchronized=True`` over its ``group`` with ``memory="default"``
  (the layer cannot do both: same numbers, the input is no longer overwritten).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.functional._activation import ACTIVATIONS, check_activation
from batchnorm.layers import BatchNormalization

_TIMM_CLASSES: dict[str, type[_BatchNorm]] = {
    "BatchNormAct2d": nn.BatchNorm2d,
    "SyncBatchNormAct": nn.SyncBatchNorm,
}
_INPLACE_ABN_CLASSES = ("ABN", "InPlaceABN", "InPlaceABNSync")
_INPLACE_ABN_ATTRIBUTES = (
    "num_features",
    "eps",
    "momentum",
    "affine",
    "track_running_stats",
    "activation",
    "activation_param",
    "weight",
    "bias",
    "running_mean",
    "running_var",
)
# inplace_abn's autograd function knows these three; its InPlaceABN raises for "relu".
_IN_PLACE_ABN_ACTIVATIONS = ("leaky_relu", "elu", "identity")


@dataclasses.dataclass(frozen=True)
class ActivatedBatchNorm:
    """How a batch norm with an activation becomes a :class:`BatchNormalization`.

    Attributes:
        source: what it is, for messages ("timm BatchNormAct2d").
        layer_options: the layer's arguments beyond those of a plain torch batch norm
            (activation, activation_param, memory, synchronized, process_group).
        following: modules kept after the layer, in order (timm's ``drop`` and an ``act`` the
            layer cannot compute); empty when the layer alone computes the module.
        absolute_scale: the module scales by ``|weight| + eps`` (InPlace-ABN), not ``weight``.
    """

    source: str
    layer_options: Mapping[str, Any]
    following: tuple[nn.Module, ...] = ()
    absolute_scale: bool = False

    def finish(self, module: Any, layer: BatchNormalization) -> None:
        """Correct what copying ``weight`` into gamma got wrong: InPlace-ABN's ``|weight| + eps``."""
        if not self.absolute_scale or module.weight is None:
            return
        with torch.no_grad():
            scale = module.weight.detach().abs() + float(module.eps)
            layer.gamma.copy_(scale.to(dtype=layer.gamma.dtype))


def is_activated_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` is one of timm's or inplace_abn's batch norms with an activation."""
    return _is_timm(module) or _is_inplace_abn(module)


def holds_unknown_activation(module: nn.Module) -> bool:
    """A torch batch norm subclass with an ``act`` module that is not a class known here: its
    forward, which the conversion would replace, probably applies ``act``."""
    return (
        isinstance(module, _BatchNorm)
        and isinstance(getattr(module, "act", None), nn.Module)
        and not _is_timm(module)
    )


def describe(module: nn.Module) -> ActivatedBatchNorm:
    """The conversion of a module :func:`is_activated_batch_norm` accepts; ValueError for one
    whose computation the layer cannot reproduce (the reason and the value in the message)."""
    if _is_timm(module):
        return _describe_timm(module)
    return _describe_inplace_abn(module)


def torch_activation(layer: BatchNormalization) -> nn.Module | None:
    """The torch module computing ``layer``'s activation; None for none or "identity"."""
    activation = check_activation(layer.activation, layer.activation_param)
    if activation is None or activation.name == "identity":
        return None
    if activation.name == "relu":
        return nn.ReLU()
    assert activation.parameter is not None
    if activation.name == "leaky_relu":
        return nn.LeakyReLU(activation.parameter)
    return nn.ELU(activation.parameter)


def _is_timm(module: nn.Module) -> bool:
    base = _TIMM_CLASSES.get(type(module).__name__)
    return base is not None and isinstance(module, base)


def _is_inplace_abn(module: nn.Module) -> bool:
    return (
        type(module).__name__ in _INPLACE_ABN_CLASSES
        and not isinstance(module, _BatchNorm)
        and all(hasattr(module, name) for name in _INPLACE_ABN_ATTRIBUTES)
    )


def _describe_timm(module: nn.Module) -> ActivatedBatchNorm:
    source = f"timm {type(module).__name__}"
    drop, act = (_unless_identity(getattr(module, name, None)) for name in ("drop", "act"))
    fused = _layer_activation(act) if drop is None else None
    if fused is not None:
        return ActivatedBatchNorm(source, fused)
    return ActivatedBatchNorm(source, {}, tuple(m for m in (drop, act) if m is not None))


def _unless_identity(module: Any) -> nn.Module | None:
    return None if module is None or type(module) is nn.Identity else module


def _layer_activation(act: nn.Module | None) -> dict[str, Any] | None:
    """The layer options computing ``act`` (an exact torch class: a subclass may compute
    anything); None when the layer cannot."""
    if act is None:
        return {}
    if type(act) is nn.ReLU:
        return {"activation": "relu"}
    if type(act) is nn.LeakyReLU:
        options = {"activation": "leaky_relu", "activation_param": act.negative_slope}
    elif type(act) is nn.ELU:
        options = {"activation": "elu", "activation_param": act.alpha}
    else:
        return None
    try:
        check_activation(options["activation"], options["activation_param"])
    except ValueError:  # an ELU with alpha <= 0, a slope that is not finite
        return None
    return options


def _describe_inplace_abn(module: Any) -> ActivatedBatchNorm:
    kind = type(module).__name__
    source = f"inplace_abn {kind}"
    name = module.activation
    parameter = module.activation_param if name in ("leaky_relu", "elu") else None
    if name not in ACTIVATIONS:
        raise ValueError(
            f"{source} cannot be converted: its `activation` must be one of "
            f"{list(ACTIVATIONS)}. Received: activation={name!r}"
        )
    try:
        activation = check_activation(name, parameter)
    except ValueError as error:
        raise ValueError(f"{source} cannot be converted: {error}") from error
    in_place, synchronized = kind == "InPlaceABN", kind == "InPlaceABNSync"
    if (in_place or synchronized) and name not in _IN_PLACE_ABN_ACTIVATIONS:
        raise ValueError(
            f"{source} cannot be converted: inplace_abn's in-place kernels compute "
            f"{list(_IN_PLACE_ABN_ACTIVATIONS)} only (its forward raises for {name!r}). "
            f"Received: activation={name!r}"
        )
    if in_place and activation is not None and not activation.invertible:
        raise ValueError(
            f"{source} cannot be converted: in-place training recovers the input by inverting "
            f"the activation, which {name!r} with activation_param={parameter!r} is not "
            "(inplace_abn's backward would divide by that slope). "
            f"Received: activation_param={parameter!r}"
        )
    options: dict[str, Any] = {
        "activation": name,
        "activation_param": None if parameter is None else float(parameter),
        "memory": "in_place" if in_place else "default",
    }
    if synchronized:
        options.update(synchronized=True, process_group=getattr(module, "group", None))
    return ActivatedBatchNorm(source, options, absolute_scale=in_place or synchronized)
