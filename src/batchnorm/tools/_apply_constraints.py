"""Running the Keras constraints of every batch-norm layer after each optimizer step.

Keras applies a weight's constraint right after the optimizer updates it; PyTorch optimizers know
nothing of constraints, so this hook does it.
"""

from __future__ import annotations

import weakref
from collections.abc import Set as AbstractSet
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from batchnorm.functional._validation import check_module
from batchnorm.layers import BatchNormalization
from batchnorm.layers._keras_weights import (
    check_updated,
    layer_constraint_projections,
    write_constraint_projections,
)

# Per optimizer, the handle of the hook registered for each model (by id: the hook holds the
# model, so the id cannot be reused while the hook is registered).
_HOOKS: weakref.WeakKeyDictionary[torch.optim.Optimizer, dict[int, RemovableHandle]] = (
    weakref.WeakKeyDictionary()
)


def apply_constraints(model: torch.nn.Module, updated: AbstractSet[int] | None = None) -> None:
    """Apply ``gamma_constraint`` / ``beta_constraint`` of every BatchNormalization in ``model``;
    with ``updated`` (ids of parameters an optimizer step changed), only to those weights.
    Every layer's projection is computed and checked writable before any is written: a layer
    that cannot take its projection leaves every layer as it was."""
    check_module(model)
    updated = check_updated(updated)
    projections = [
        (module, layer_constraint_projections(module, updated))
        for module in model.modules()
        if isinstance(module, BatchNormalization)
    ]
    for module, projected in projections:
        write_constraint_projections(module, projected)


def apply_constraints_after_step(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module
) -> RemovableHandle:
    """Register a hook that applies the constraints after every ``optimizer.step()``, to the
    weights that step changed (the optimizer's parameters with a gradient), as Keras constrains
    only the variables its optimizer updates: a frozen layer's gamma and beta stay as they are.

    Call it once, before the training loop. It is idempotent: calling it again for the same
    optimizer and model registers nothing more and returns the same handle (until
    ``handle.remove()`` detaches the hook; a later call registers it anew).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), BatchNormalization(3, beta_constraint="non_neg"))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> handle = apply_constraints_after_step(optimizer, model)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "`optimizer` must be a torch.optim.Optimizer. Received: optimizer of type "
            f"{type(optimizer).__name__}"
        )
    check_module(model)
    handles = _HOOKS.setdefault(optimizer, {})
    handle = handles.get(id(model))
    if handle is not None and _registered(handle):
        return handle

    def hook(step_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        # The parameters the step changed: the optimizer's, with a gradient. A frozen layer's
        # (not in the optimizer, or without gradients) keep their values, as in Keras.
        updated = {
            id(p)
            for group in step_optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        }
        apply_constraints(model, updated)

    handle = optimizer.register_step_post_hook(hook)
    handles[id(model)] = handle
    return handle


def _registered(handle: RemovableHandle) -> bool:
    hooks = handle.hooks_dict_ref()
    return hooks is not None and handle.id in hooks
