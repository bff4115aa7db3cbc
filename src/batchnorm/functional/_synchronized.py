"""Synchronized batch norm: global batch statistics over a torch.distributed process group.

Each rank computes, per ghost batch and channel, its count ``n_r`` (sum of weights), mean and
centred sum of squares ``M2_r``; one ``all_gather`` shares them and every rank combines them with
the parallel variance formula (Chan, Golub and LeVeque 1979),

.. math::
    N = \\sum_r n_r, \\quad \\mu = \\frac{1}{N} \\sum_r n_r \\mu_r, \\quad
    \\sigma^2 = \\frac{1}{N} \\sum_r \\left( M2_r + n_r (\\mu_r - \\mu)^2 \\right),

which is exact for uneven batches and for ranks with an empty batch (``n_r = 0``), and keeps the
accuracy of centred sums. Every rank combines the same gathered tensor in the same order, so the
global statistics (and so the moving statistics) are bitwise identical on every rank.

The backward all-reduces the two per-channel sums ``sum(g)`` and ``sum(g * xhat)`` (``g = dy *
scale``), so the input gradient is that of one process running the concatenated batch:

.. math::
    \\frac{\\partial L}{\\partial x_i} = \\frac{1}{\\sqrt{\\sigma^2 + \\epsilon}} \\left( g_i -
    \\frac{w_i}{N} \\left( \\sum_j g_j + \\hat{x}_i \\sum_j g_j \\hat{x}_j \\right) \\right)

with the sums over the global batch. Gradients of scale and offset stay local (DDP reduces them).

Ghost batches: global ghost batch ``j`` is the union of every rank's ghost batch ``j``, as
tf-keras' synchronized layer sums per-replica ghost statistics; so every rank with a non-empty
batch must hold the same number of ghost batches (``local batch / virtual_batch_size``).

Before the statistics, a small ``all_gather`` of each rank's channel shape and ghost-batch count
makes disagreements between ranks an error on every rank instead of a hang or garbage.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from batchnorm.functional._backend import BatchNormBackend, Moments
from batchnorm.functional._torch_ops import divide_no_nan

# Per rank: channel-shape rank, channel count, shape code, ghost batches, element count.
_HEADER_SIZE = 5


def check_synchronized(synchronized: Any, process_group: Any, fused: Any) -> tuple[bool, Any]:
    """Validate a layer's ``synchronized`` / ``process_group`` arguments (tf-keras' rules)."""
    if not isinstance(synchronized, bool):
        raise TypeError(
            f"`synchronized` must be True or False. Received: synchronized={synchronized!r}"
        )
    if synchronized and fused is True:
        raise ValueError(
            "`fused=True` is not supported when `synchronized=True`. "
            f"Received: fused={fused!r}, synchronized={synchronized!r}"
        )
    if process_group is not None and not synchronized:
        raise ValueError(
            "`process_group` is only used with `synchronized=True`. "
            f"Received: process_group={process_group!r}, synchronized={synchronized!r}"
        )
    if _is_non_member(process_group):
        raise ValueError(
            "This process is not a member of `process_group` (torch.distributed.new_group "
            "returns GroupMember.NON_GROUP_MEMBER on ranks outside the group). "
            f"Received: process_group={process_group!r}"
        )
    if process_group is not None and not (
        dist.is_available() and isinstance(process_group, dist.ProcessGroup)
    ):
        raise TypeError(
            "`process_group` must be a torch.distributed.ProcessGroup or None. "
            f"Received: process_group={process_group!r}"
        )
    return synchronized, process_group


def _is_non_member(process_group: Any) -> bool:
    return (
        dist.is_available()
        and isinstance(process_group, int)
        and process_group == dist.GroupMember.NON_GROUP_MEMBER
    )


def synchronizes(process_group: Any) -> bool:
    """Whether a synchronized layer with ``process_group`` communicates now."""
    return resolve_process_group(process_group) is not None


def resolve_process_group(process_group: Any) -> Any:
    """The group to synchronize over, or None when there is nothing to synchronize.

    ``None`` means the default group (WORLD) when torch.distributed is initialised, and no
    synchronization otherwise; a group of one rank needs no communication either.
    """
    initialized = dist.is_available() and dist.is_initialized()
    if not initialized:
        if process_group is not None:
            raise RuntimeError(
                "Synchronized batch norm was given a `process_group` but torch.distributed is "
                "not initialised: call torch.distributed.init_process_group first (torchrun sets "
                f"up its environment). Received: process_group={process_group!r}"
            )
        return None
    group = dist.group.WORLD if process_group is None else process_group
    if _is_non_member(group) or dist.get_rank(group) < 0:
        raise ValueError(
            "This process is not a member of the `process_group` given to synchronized batch "
            f"norm (global rank {dist.get_rank()}). Received: process_group={process_group!r}"
        )
    return group if dist.get_world_size(group) > 1 else None


def collective_error(operation: str, group: Any, error: Exception) -> RuntimeError:
    timeout = _group_timeout(group)
    return RuntimeError(
        f"Synchronized batch norm: {operation} over a process group of "
        f"{dist.get_world_size(group)} ranks failed (this is rank {dist.get_rank(group)}"
        f"{timeout}). Every rank must call the layer in training mode the same number of times, "
        "and run backward through it when any rank does; a rank that stopped, crashed or fell "
        f"behind makes the others fail here. Cause: {error}"
    )


def _group_timeout(group: Any) -> str:
    try:
        options = group._get_backend(torch.device("cpu")).options
        return f", timeout {options._timeout.total_seconds():g} s"
    except (AttributeError, RuntimeError):
        return ""


def _all_gather(tensor: torch.Tensor, group: Any, what: str) -> torch.Tensor:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(gathered, tensor, group=group)
    except RuntimeError as error:
        raise collective_error(f"all_gather of {what}", group, error) from error
    return torch.stack(gathered)


def _shape_code(shape: tuple[int, ...]) -> int:
    code = 0
    for size in shape:
        code = (code * 1_000_003 + size + 1) % (2**61 - 1)
    return code


def agree_on_layout(
    x: torch.Tensor, channel_shape: tuple[int, ...], ghost_batches: int, group: Any
) -> int:
    """Check the ranks agree on channels and ghost batches; return the ghost-batch count.

    A rank with an empty batch takes the ghost-batch count of the others.
    """
    local = [len(channel_shape), math.prod(channel_shape), _shape_code(channel_shape)]
    header = torch.tensor([*local, ghost_batches, x.numel()], dtype=torch.int64, device=x.device)
    table = _all_gather(header, group, "the channel shapes").cpu().tolist()
    if any(row[:3] != table[0][:3] for row in table):
        described = ", ".join(f"rank {r}: {row[1]} channels" for r, row in enumerate(table))
        raise ValueError(
            "Synchronized batch norm needs the same channel shape on every rank of the process "
            f"group. Received: {described} (this rank: channel shape {channel_shape})"
        )
    counts = {row[3] for row in table if row[4] > 0}
    if len(counts) > 1:
        described = ", ".join(f"rank {r}: {row[3]}" for r, row in enumerate(table) if row[4] > 0)
        raise ValueError(
            "With `virtual_batch_size`, every rank with a non-empty batch must hold the same "
            "number of ghost batches (global ghost batch j is the union of the ranks' ghost "
            f"batches j). Received ghost batches per rank: {described}"
        )
    return counts.pop() if counts else max(ghost_batches, 1)


def synchronized_moments(
    x: torch.Tensor,
    axes: tuple[int, ...],
    weights: torch.Tensor | None,
    ghost_batches: int,
    backend: BatchNormBackend,
    group: Any,
    check_layout: bool = True,
) -> tuple[Moments, bool]:
    """Global per-ghost-batch mean, biased variance and total weight (detached), by Chan's formula.

    Returns the moments, each of shape ``(ghost_batches, *channel_shape)`` and identical on every
    rank of ``group`` (``ghost_batches`` as agreed, see :func:`agree_on_layout`), and whether the
    global batch has any element. ``check_layout=False`` skips the agreement (one collective
    instead of two): only for callers that know every rank has the same channel shape and ghost
    batch count, as a built layer without ghost batches that has been checked once.
    """
    channel_shape = tuple(x.shape[a] for a in axes)
    if check_layout:
        ghost_batches = agree_on_layout(x, channel_shape, ghost_batches, group)
    with torch.no_grad():
        local = backend.batch_moments(x.detach(), axes, weights, ghost_batches)
        count = local.total_weight.to(torch.float64)
        # An empty batch has a NaN mean with torch ops; it weighs nothing, so it becomes 0.
        present = count > 0
        mean = torch.where(present, local.mean.to(torch.float64), 0.0)
        squares = torch.where(present, local.variance.to(torch.float64) * count, 0.0)
        elements = torch.full((1,), float(x.numel()), dtype=torch.float64, device=x.device)
        packed = torch.cat([torch.stack([count, mean, squares]).flatten(), elements])
        gathered = _all_gather(packed, group, "the batch statistics")
        any_elements = bool((gathered[:, -1] > 0).any())
        ranks = gathered.shape[0]
        counts, means, squares = gathered[:, :-1].reshape(ranks, 3, ghost_batches, -1).unbind(1)
        total = counts.sum(dim=0)
        global_mean = divide_no_nan((counts * means).sum(dim=0), total)
        spread = squares + counts * (means - global_mean).square()
        global_variance = divide_no_nan(spread.sum(dim=0), total)
    shape = (ghost_batches, *channel_shape)
    moments = Moments(
        global_mean.reshape(shape), global_variance.reshape(shape), total.reshape(shape)
    )
    return moments, any_elements


def communicated_bytes(
    channels: int, ghost_batches: int = 1, world_size: int = 2, check_layout: bool = False
) -> dict[str, int]:
    """Payload bytes per rank and training step (forward + backward) for ``channels`` channels.

    The forward all_gathers ``3 * ghost_batches * channels + 1`` float64 (plus the 5-int64 layout
    check on a layer's first call and with ghost batches); the backward all-reduces
    ``2 * ghost_batches * channels`` float64.
    """
    forward = (3 * ghost_batches * channels + 1) * 8 + (_HEADER_SIZE * 8 if check_layout else 0)
    return {
        "forward_sent": forward,
        "forward_received": (world_size - 1) * forward,
        "backward_all_reduce": 2 * ghost_batches * channels * 8,
    }
