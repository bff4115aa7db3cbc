"""Running the Keras constraints of every batch-norm layer after each optimizer step.

Keras applies a weight's constraint right after the optimizer updates it; PyTorch optimizers know
nothing of constraints, so this hook does it.
"""

from __future__ import annotations

from typing import Any

import torch

from batchnorm.layers import BatchNormalization


def apply_constraints(model: torch.nn.Module) -> None:
    """Apply ``gamma_constraint`` / ``beta_constraint`` of every BatchNormalization in ``model``."""
    for module in model.modules():
        if isinstance(module, BatchNormalization):
            module.apply_constraints()


def apply_constraints_after_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> Any:
    """Register a hook that applies the constraints after every ``optimizer.step()``.

    Returns the hook handle; ``handle.remove()`` detaches it.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), BatchNormalization(3, beta_constraint="non_neg"))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> handle = apply_constraints_after_step(optimizer, model)
    """

    def hook(_optimizer: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        apply_constraints(model)

    return optimizer.register_step_post_hook(hook)
