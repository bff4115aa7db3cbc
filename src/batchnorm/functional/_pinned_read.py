"""A read of a buffer that the same compiled step then updates, kept for the backward.

``torch.compile`` (inductor) partitions a training step's graph with the min-cut partitioner,
which recomputes cheap values in the backward instead of saving them, reading their inputs
again there. A buffer that the forward updates in place is then read after the update: Batch
Renormalization's ``r = sigma_B / sigma`` and ``d = (mu_B - mu) / sigma`` were recomputed from
``renorm_mean`` and ``renorm_stddev`` already stepped, and gamma's, beta's and x's gradients
were off (by 3e-3 on a (8, 4) Linear-renorm-Linear step; ``aot_eager``, which recomputes
nothing, was right). pytorch pull request 197039 (open) fixes the partitioner.

Until then the values are read through :func:`pinned_read`, a custom operator (an identity
copy) while ``torch.compile`` traces: the partitioner recomputes only operators on its
allowlist, so it saves the copy for the backward. Eager calls read the tensor itself.

Inside a checkpoint that the compiled graph contains, the backward recomputes everything, that
operator too (1.5e-2 off on the same step). Run inside a backward, the operator therefore
returns the copy that its last run outside one made for the same buffer: the values the
forward read, where the layer ran once since (a layer called twice before the backward, or
one shared by two checkpointed blocks, gets its last call's; the eager path warns there, see
:mod:`batchnorm.layers._recomputation`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch


def recomputing() -> bool:
    """Whether autograd's engine is running a backward on this thread, where a checkpoint
    recomputes a forward (``torch._C._current_graph_task_id()`` is -1 outside one)."""
    return bool(torch._C._current_graph_task_id() != -1)


# The copy that the last read of each buffer outside a backward made, by the buffer's memory
# address (the least recently read dropped first beyond _KEPT).
_LAST_COPY: OrderedDict[int, torch.Tensor] = OrderedDict()
_KEPT = 256


@torch.library.custom_op("batchnorm::pinned_read", mutates_args=())
def _pinned_read_op(tensor: torch.Tensor) -> torch.Tensor:
    address = tensor.data_ptr()
    if recomputing():  # a compiled checkpoint's recomputation
        copy = _LAST_COPY.get(address)
        if copy is not None and copy.shape == tensor.shape and copy.dtype == tensor.dtype:
            return copy.clone()
    copy = tensor.clone()
    _LAST_COPY[address] = copy
    _LAST_COPY.move_to_end(address)
    while len(_LAST_COPY) > _KEPT:
        _LAST_COPY.popitem(last=False)
    return copy.clone()


@_pinned_read_op.register_fake
def _(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(tensor)


def pinned_read(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a compiled graph's backward must see it: before the step updates it. A copy
    through an operator the partitioner does not recompute while ``torch.compile`` traces (not
    under ``torch.onnx.export``, which has no translation for it); ``tensor`` itself otherwise.
    Detached: what reads it here carries no gradient (renorm's r and d)."""
    if torch.compiler.is_compiling() and not torch.onnx.is_in_onnx_export():
        result: torch.Tensor = _pinned_read_op(tensor.detach())
        return result
    return tensor
