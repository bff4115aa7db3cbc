"""torch batch norms frozen by :func:`batchnorm.freeze`: the classes that normalise with the
running statistics in training too, and what a frozen module remembers for
:func:`batchnorm.unfreeze` (the ``_batchnorm_frozen`` state), which conversions carry over
(:func:`carry_freeze`): a frozen torch batch norm converted to this layer is a frozen layer
(``use_global_stats=True``), and back. Before, ``convert`` gave a plain layer whose statistics
trained again (the output 3.2 off after ``model.train()``), and refused a frozen layer going
to torch.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from batchnorm.layers import BatchNormalization

_STATE = "_batchnorm_frozen"


class _FrozenStatistics:
    """Mixin: normalise with the running statistics whatever ``training`` says; never update them."""

    frozen_statistics = True

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        norm = cast(_BatchNorm, self)
        norm._check_input_dim(input)  # type: ignore[no-untyped-call]
        return F.batch_norm(
            input, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps
        )


class FrozenBatchNorm1d(_FrozenStatistics, nn.BatchNorm1d):
    """A :class:`torch.nn.BatchNorm1d` frozen by :func:`batchnorm.freeze` (same state_dict keys)."""


class FrozenBatchNorm2d(_FrozenStatistics, nn.BatchNorm2d):
    """A :class:`torch.nn.BatchNorm2d` frozen by :func:`batchnorm.freeze` (same state_dict keys)."""


class FrozenBatchNorm3d(_FrozenStatistics, nn.BatchNorm3d):
    """A :class:`torch.nn.BatchNorm3d` frozen by :func:`batchnorm.freeze` (same state_dict keys)."""


class FrozenSyncBatchNorm(_FrozenStatistics, nn.SyncBatchNorm):
    """A :class:`torch.nn.SyncBatchNorm` frozen by :func:`batchnorm.freeze` (same state_dict keys)."""


_FROZEN_CLASSES: dict[type, type] = {
    nn.BatchNorm1d: FrozenBatchNorm1d,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.BatchNorm3d: FrozenBatchNorm3d,
    nn.SyncBatchNorm: FrozenSyncBatchNorm,
}


def plain_class(module: nn.Module) -> type:
    """``module``'s class without the subclass torch.nn.utils.parametrize generates over it."""
    cls = type(module)
    return cls.__bases__[0] if parametrize.is_parametrized(module) else cls


def swap_class(module: nn.Module, new_class: type) -> None:
    """Give ``module`` the class ``new_class``, under the generated subclass of a parametrized
    module (whose properties compute the parametrized tensors: assigning ``new_class`` alone
    dropped them, and ``weight`` was gone)."""
    if not parametrize.is_parametrized(module):
        module.__class__ = new_class
        return
    generated = type(module)
    namespace = {k: v for k, v in vars(generated).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(f"Parametrized{new_class.__name__}", (new_class,), namespace)


def is_frozen_torch_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, _FrozenStatistics)


def is_frozen(module: nn.Module) -> bool:
    """Whether :func:`batchnorm.freeze` froze this batch norm (and unfreeze has not undone it)."""
    return _STATE in vars(module)


def carry_freeze(source: nn.Module, target: nn.Module, torch_class: type | None = None) -> None:
    """Freeze ``target`` as :func:`batchnorm.freeze` froze ``source`` (nothing if it did not):
    our layer gets ``use_global_stats=True``, a torch batch norm (of ``torch_class``, its
    unfrozen class) the frozen class; the remembered ``requires_grad`` of weight/bias is that
    of gamma/beta and back. ``target`` holds ``source``'s values already."""
    state = vars(source).get(_STATE)
    if state is None:
        return
    ours = isinstance(target, BatchNormalization)
    names = {"weight": "gamma", "bias": "beta"} if ours else {"gamma": "weight", "beta": "bias"}
    carried: dict[str, Any] = {"statistics": state["statistics"], "affine": state["affine"]}
    if "requires_grad" in state:
        carried["requires_grad"] = {
            ".".join(names.get(part, part) for part in path.split(".")): value
            for path, value in state["requires_grad"].items()
        }
    if state["statistics"]:
        if isinstance(target, BatchNormalization):
            carried["use_global_stats"] = None
            target.use_global_stats = True
        else:
            assert torch_class is not None
            carried["class"] = torch_class
            swap_class(target, _FROZEN_CLASSES[torch_class])
    setattr(target, _STATE, carried)


def unfrozen_use_global_stats(layer: BatchNormalization) -> bool | None:
    """The layer's ``use_global_stats`` as it was before :func:`batchnorm.freeze` set it."""
    state = vars(layer).get(_STATE)
    if state is not None and "use_global_stats" in state:
        return state["use_global_stats"]  # type: ignore[no-any-return]
    return layer.use_global_stats
