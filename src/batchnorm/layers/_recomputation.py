"""One update of the moving statistics per training step under activation checkpointing.

``torch.utils.checkpoint`` (reentrant or not) runs a checkpointed forward a second time while
autograd computes the gradients, to get back the tensors it did not keep. A batch norm in
training mode then steps its moving statistics twice per step: ``nn.BatchNorm2d`` does (pytorch
issue 96136, open), so the moving averages of a checkpointed model drift from those of the same
model trained without it (with momentum ``m`` per step, as if trained with ``m ** 2``).

The layer takes a training call made while autograd's engine runs a backward
(``torch._C._current_graph_task_id() != -1``; -1 outside one) for the recomputation. That call
computes what the first one did, through the same path (the checkpoint checks that it saves the
same tensors), then its buffers get back the values they held before it: the update happens
once, in the forward.

Batch Renormalization's correction ``r = sigma_B / sigma``, ``d = (mu_B - mu) / sigma`` reads
the renorm statistics (``renorm_mean``, ``renorm_stddev``), which the forward has already
stepped: the recomputation gets the values they held before that forward. A renorm training
step that a checkpoint may recompute (one under ``no_grad``, as the reentrant checkpoint runs
its forward, or under saved-tensor hooks, as the non-reentrant one does) remembers them, with
their versions after the step. Where the layer was called again since, or another of its calls
was recomputed first (a layer shared by several checkpointed blocks), what was remembered is not
what the call being recomputed read: it then reads the buffers as they are, with a warning. (The
non-reentrant checkpoint takes only the tensors saved for the backward from the recomputation:
there the gradients still matched training without checkpointing in the cases tried, a fused
ReLU included; the reentrant one's did not.)

A training call that a backward hook makes during a backward is taken for a recomputation too.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch.utils._python_dispatch import _disable_current_modes

from batchnorm.functional import BatchNormStatistics
from batchnorm.functional._pinned_read import recomputing

_STATISTICS = BatchNormStatistics._fields
# The innermost saved-tensor hooks (None where none are active): torch 2.13 takes whether to
# ignore tracing, some earlier versions nothing; where torch has no such function, every renorm
# step counts as one that a checkpoint may recompute.
_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saved_tensor_hooks_active() -> bool:
    if _top_hooks is None:
        return True
    try:
        return _top_hooks(False) is not None
    except TypeError:
        return _top_hooks() is not None


class RecomputedLayer(Protocol):
    """What these functions read and set on a :class:`~batchnorm.BatchNormalization` layer."""

    name: str
    renorm: bool
    _buffers: dict[str, torch.Tensor | None]


def guards_step(renorm: bool) -> bool:
    """Whether a training call of a layer goes through :func:`step_once`: a recomputation, or a
    renorm layer's call that a checkpoint may recompute (the reentrant checkpoint runs its
    forward under ``no_grad``, the non-reentrant one under saved-tensor hooks). Other calls
    skip remembering the renorm statistics (3-4 us on a small renorm step)."""
    return recomputing() or (
        renorm and (not torch.is_grad_enabled() or _saved_tensor_hooks_active())
    )


def _statistics(layer: RecomputedLayer) -> list[torch.Tensor]:
    buffers = layer._buffers
    return [t for t in (buffers.get(name) for name in _STATISTICS) if t is not None]


def _versions(tensors: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(t._version for t in tensors)


@contextlib.contextmanager
def _unseen() -> Iterator[None]:
    """Bookkeeping that no dispatch mode sees and autograd does not record: selective activation
    checkpointing (``create_selective_checkpoint_contexts``) replays the forward's operators in
    the recomputation and failed on copies that only one of them made ("aten.clone.default
    encountered during backward but not found in storage"); FlopCounterMode and memory trackers
    would count them."""
    with torch.no_grad(), _disable_current_modes():
        yield


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    with _unseen():
        return [t.clone() for t in tensors]


def _write_unversioned(tensors: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Copy ``values`` into ``tensors`` without bumping their version counters (through
    ``.data``, which shares the memory but not the counter): what the call saved for its
    backward stays valid."""
    with _unseen():
        for tensor, value in zip(tensors, values, strict=True):
            tensor.data.copy_(value)


def _corrected_by(layer: RecomputedLayer) -> list[torch.Tensor]:
    """The buffers Batch Renormalization's correction reads (none without renorm)."""
    buffers = layer._buffers
    if not layer.renorm:
        return []
    return [t for t in (buffers.get("renorm_mean"), buffers.get("renorm_stddev")) if t is not None]


def step_once(
    layer: RecomputedLayer, run: Callable[[], torch.Tensor | None]
) -> torch.Tensor | None:
    """``run()``, a training call of ``layer`` that steps its moving statistics, made so that a
    checkpoint's recomputation of it steps nothing (see the module docstring).

    Called with the layer's lock held, where :func:`guards_step`."""
    corrected = _corrected_by(layer)
    if not recomputing():  # a renorm layer's forward: remember what its correction reads
        before = _copies(corrected)
        y = run()
        vars(layer)["_renorm_before"] = (_versions(corrected), before)
        return y
    statistics = _statistics(layer)
    after = _copies(statistics)
    if corrected:
        remembered = vars(layer).get("_renorm_before")
        if remembered is not None and remembered[0] == _versions(corrected):
            _write_unversioned(corrected, remembered[1])
        else:
            warnings.warn(
                f"Layer {layer.name} (renorm=True) is recomputed by activation checkpointing "
                "after another training call of the same layer: its renorm correction reads "
                "the renorm statistics as they are now, not as the recomputed call read them.",
                UserWarning,
                stacklevel=4,
            )
    try:
        return run()
    finally:
        # The call bumped the versions, so a second recomputation since the forward (of
        # another call of a shared layer) no longer matches what was remembered, and warns.
        _write_unversioned(statistics, after)
