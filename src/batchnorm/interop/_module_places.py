"""Every place in a model where a module sits, a module registered under several names at each."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def module_places(
    model: nn.Module, selected: Callable[[nn.Module], bool]
) -> list[tuple[nn.Module, str, nn.Module]]:
    """``(parent, name, child)`` for every child of every module of ``model`` that ``selected``
    picks. ``named_children()`` and ``modules()`` list a module once: a batch norm held under two
    names (twice in a Sequential, or as an attribute and in a block) was replaced at its first
    place only, and the other place kept running it."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent._modules.items()
        if child is not None and selected(child)
    ]
