"""An independent copy of a model, for the tools that run one without changing the original."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def model_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy``, with each computed tensor a module keeps as a plain attribute (pruning's
    and ``torch.nn.utils.weight_norm``'s weight, which their hooks recompute on every call and
    which deepcopy refuses after a forward with gradients: "Only Tensors created explicitly by
    the user...") copied detached."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)
