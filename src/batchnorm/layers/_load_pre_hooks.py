"""torch's ``load_state_dict`` pre-hooks, run where torch runs them: before a layer reads a
checkpoint.

``torch.nn.Module._load_from_state_dict`` starts by calling the module's
``_load_state_dict_pre_hooks``, which is how a legacy checkpoint is fixed up (keys renamed,
tensors reshaped). The layers override it to check everything before writing anything, so they
call the hooks first themselves (:func:`run_load_pre_hooks`) and torch's copy with the hooks set
aside (:func:`load_pre_hooks_set_aside`), so that each runs once. Before session 53 the checks
came first: a renaming hook was refused as missing keys, and still ran inside the copy (gamma
written by a load that raised).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch


def run_load_pre_hooks_first(
    module: torch.nn.Module,
    built: bool,
    state_dict: Mapping[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    incompatible: tuple[list[str], list[str], list[str]],
) -> contextlib.AbstractContextManager[None]:
    """On a ``built`` module: its load pre-hooks on the checkpoint now, as torch's
    ``_load_from_state_dict`` calls them (``incompatible`` is torch's missing keys, unexpected
    keys and error messages), and the context to run torch's copy in, with them set aside. On
    an unbuilt one: nothing now, and a context that changes nothing, so that torch's copy runs
    them once the layer has taken the checkpoint's shape, as torch's lazy modules run a user's
    hooks after their own materialises them (a hook may read the weights; a renaming hook
    cannot help an unbuilt layer, nor a torch Lazy module)."""
    if not built:
        return contextlib.nullcontext()
    missing_keys, unexpected_keys, error_msgs = incompatible
    for hook in module._load_state_dict_pre_hooks.values():
        hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    return load_pre_hooks_set_aside(module)


@contextlib.contextmanager
def load_pre_hooks_set_aside(module: torch.nn.Module) -> Iterator[None]:
    """No load pre-hooks on ``module`` inside (:func:`run_load_pre_hooks_first` ran them)."""
    hooks = module._load_state_dict_pre_hooks
    vars(module)["_load_state_dict_pre_hooks"] = OrderedDict()
    try:
        yield
    finally:
        vars(module)["_load_state_dict_pre_hooks"] = hooks
