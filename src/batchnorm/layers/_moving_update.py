"""Writing a training call's new moving statistics into the layer's buffers, under
``torch.func`` transforms too.

The update ``moving = moving * momentum + batch * (1 - momentum)`` is not differentiated (it runs
under ``torch.no_grad()``, as in tf-keras and torch). Under ``torch.func.grad``, ``vjp``,
``jacrev``, ``jvp`` or ``hessian`` the batch statistics are wrappers that carry the transform's
derivatives, and torch.func refuses to copy them into a tensor captured from outside the
transform ("attempted to call in-place operation (aten::copy_) that would mutate a captured
Tensor"): a MAML-style inner loop (``grad`` of a loss through a model in training mode) failed on
the layer. ``torch.nn.BatchNorm2d`` fails there as well, and torch's way out,
``torch.func.replace_all_batch_norm_modules_`` (no running statistics at all), does not reach
this layer. The buffers are written with the values the wrappers hold (:func:`primal`), as the
same call outside the transform writes them, with the transforms above the buffers' own level
set aside for the copy (:func:`transforms_above`).

Under ``torch.func.vmap`` each vmapped batch has statistics of its own, which one buffer cannot
hold: stacked buffers (``torch.func.stack_module_state`` and ``functional_call``, as for model
ensembles) take them, and unstacked ones get a clear error, as torch's batch norm gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

_functorch = torch._C._functorch


def primal(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` unwrapped from the functorch derivative wrappers (``grad``, ``jvp`` levels)
    above ``target``'s level, so that writing it into ``target`` mutates nothing the transforms
    track. A vmap level above ``target``'s is left as it is (see :func:`write_moving_statistics`)."""
    floor = _functorch.maybe_get_level(target)  # -1 for a plain tensor
    while (
        _functorch.is_functorch_wrapped_tensor(value)
        and _functorch.maybe_get_level(value) > floor
        and not _functorch.is_batchedtensor(value)
    ):
        value = _functorch.get_unwrapped(value)
    return value


def write_moving_statistics(
    name: str,
    buffers: Iterable[torch.Tensor | None],
    updated: Iterable[torch.Tensor | None],
) -> None:
    """Copy each updated statistic into its buffer (the layer ``name``'s), under no_grad; every
    value is checked before any is written.

    Outside the transforms, a plain copy. Traced by ``torch.compile`` too: functorch's functions
    used below do not trace, so inside a compiled ``grad`` the copy into the layer's own buffers
    fails as ``nn.BatchNorm1d``'s does, changing nothing. (Running it eagerly instead, through
    ``torch.compiler.disable``, a graph break or an error raised here, made torch.compile fall
    back to eager inside the transform and mark the layer's ``forward`` skipped for every later
    compile in the process.)"""
    pairs = [
        (old, new)
        for old, new in zip(buffers, updated, strict=True)
        if old is not None and new is not None and new is not old
    ]
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        # torch.export records a no_grad block as a higher-order op whose saved program
        # torch.export.load refuses (SpecViolationError, "missing val field"): exporting, the
        # values are detached instead (the buffers themselves never require grad there).
        exporting = torch.compiler.is_exporting()
        if exporting:
            pairs = [(old, new.detach()) for old, new in pairs]
        with contextlib.nullcontext() if exporting else torch.no_grad():
            for old, new in pairs:
                # Through a 1-element view: torch.compile (aot_eager, inductor) drops an in-place
                # write into a 0-d float64 buffer (Caffe's scale factor stayed 0, so a debiased
                # average was the last batch's statistics); a 1-d view of it is written.
                if old.ndim == 0:
                    old.view(-1).copy_(new.reshape(-1))
                else:
                    old.copy_(new)
        return
    write_primal_values(name, pairs)


def write_primal_values(name: str, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Each pair's :func:`writable_value` copied into its buffer with the transforms above the
    buffer set aside."""
    pairs = [(old, writable_value(name, new, old)) for old, new in pairs]
    with torch.no_grad():
        for old, value in pairs:
            with transforms_above(_functorch.maybe_get_level(old)):
                old.copy_(value)


def writable_value(name: str, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """:func:`primal` of ``new`` for ``old``; a RuntimeError where it is vmapped above ``old``."""
    value = primal(new, old)
    if _functorch.is_batchedtensor(value) and _functorch.maybe_get_level(
        value
    ) > _functorch.maybe_get_level(old):
        raise RuntimeError(
            f"Layer {name} is called in training under torch.func.vmap: each vmapped batch "
            "has its own statistics, and the layer's moving statistics, not vmapped, cannot "
            "take them all. Pass stacked moving statistics in (torch.func.stack_module_state "
            "and torch.func.functional_call, as for an ensemble of models), or call the "
            f"layer with training=False. Received: statistics of shape {tuple(value.shape)} "
            f"per vmapped batch for a buffer of shape {tuple(old.shape)}"
        )
    return value


@contextlib.contextmanager
def transforms_above(level: int) -> Iterator[None]:
    """Set aside the functorch transforms above ``level`` (-1: all of them) for the block:
    torch.func refuses any in-place operator on a tensor of a lower level than the innermost
    transform's, whatever its arguments."""
    set_aside = []
    try:
        while True:
            interpreter = _functorch.peek_interpreter_stack()
            if interpreter is None or interpreter.level() <= level:
                break
            set_aside.append(_functorch.pop_dynamic_layer_stack())
        yield
    finally:
        while set_aside:
            _functorch.push_dynamic_layer_stack(set_aside.pop())
