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

One collective per forward: each rank's ``all_gather`` payload is a header of 5 numbers (its
call number on the process group, channel count, channel-shape code, ghost batches, element count)
and its statistics, and every rank checks the gathered headers before it combines anything.
``all_gather`` needs the same size on every rank, and ranks that disagree on the layer cannot agree
on a size, so the statistics are padded to the group's channel slots: the largest
``ghost_batches * channels`` of any call on the group so far, alike on every rank because it only
grows from gathered headers. A call that needs more slots (a group's first call, a layer larger
than any before) gathers once more at the grown size, after its headers passed. The backward pads
its sums to the channel slots too and appends ``v`` and ``v**2``, ``v`` the number of the forward
call it differentiates: after the sum, ``world_size * sum(v**2) == sum(v)**2`` exactly when every
rank differentiates the same call.

Detected, with the same error on every rank, and the group usable afterwards:

- ranks calling layers of different channel shapes, in any call, or holding different numbers
  of ghost batches;
- ranks whose call numbers differ (a rank counted a call whose collective never ran: it failed on
  some ranks only, or a rank went on after an error); the numbers are realigned;
- ranks running the backward of different calls together (a rank skipped a layer's backward).

Not detected: layers of the same channel shape called in a different order, or one in place of the
other (collectives pair in order, so the ranks always agree on the number of the call they are in):
their statistics mix. Nor a forward on one rank against a backward on another (an ``all_gather``
against an ``all_reduce``), which the backend reports or hangs on.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any

import torch
import torch.distributed as dist

from batchnorm.functional._backend import BatchNormBackend, Moments
from batchnorm.functional._torch_ops import divide_no_nan

# Per rank, ahead of its statistics: call number on the group, channel count, channel-shape code,
# ghost batches, element count (float64, so every value stays below 2**53).
_HEADER_SIZE = 5
# The backward's check after its gradient sums: the call number v (modulo a bound) and v**2.
_CHECK_SIZE = 2


@dataclasses.dataclass
class _GroupState:
    """What the ranks of a process group know alike, since it changes only with gathered data."""

    calls: int = 0  # synchronized training calls this rank started on the group
    channel_slots: int = 0  # the largest ghost_batches * channels exchanged on the group


# Keyed by the group object, so a destroyed group's state goes with it.
_GROUP_STATES: weakref.WeakKeyDictionary[Any, _GroupState] = weakref.WeakKeyDictionary()


def _group_state(group: Any) -> _GroupState:
    state = _GROUP_STATES.get(group)
    if state is None:
        state = _GROUP_STATES[group] = _GroupState()
    return state


def current_call(group: Any) -> int:
    """The number of the latest synchronized call on ``group`` (what its backward checks)."""
    return _group_state(group).calls


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
        code = (code * 1_000_003 + size + 1) % (2**31 - 1)
    return code


def _local_statistics(
    x: torch.Tensor,
    axes: tuple[int, ...],
    weights: torch.Tensor | None,
    ghost_batches: int,
    backend: BatchNormBackend,
) -> torch.Tensor:
    """Count, mean and centred sum of squares per ghost batch and channel, flat float64.

    Empty for an empty batch: it weighs nothing, and its rank may not know the ghost-batch count.
    """
    if x.numel() == 0:
        return x.new_zeros(0, dtype=torch.float64)
    local = backend.batch_moments(x.detach(), axes, weights, ghost_batches)
    count = local.total_weight.to(torch.float64)
    # A channel without weight has a NaN mean with torch ops; it weighs nothing, so it becomes 0.
    present = count > 0
    mean = torch.where(present, local.mean.to(torch.float64), 0.0)
    squares = torch.where(present, local.variance.to(torch.float64) * count, 0.0)
    return torch.stack([count, mean, squares]).flatten()


def _gather(
    header: list[int], statistics: torch.Tensor, slots: int, group: Any
) -> tuple[torch.Tensor, list[list[int]]]:
    """All-gather header + statistics padded to ``3 * slots``; the statistics only if they fit."""
    payload = statistics.new_zeros(_HEADER_SIZE + 3 * slots)
    payload[:_HEADER_SIZE] = torch.tensor(header, dtype=torch.float64)
    if statistics.numel() <= 3 * slots:
        payload[_HEADER_SIZE : _HEADER_SIZE + statistics.numel()] = statistics
    gathered = _all_gather(payload, group, "the batch statistics")
    table = [[int(value) for value in row] for row in gathered[:, :_HEADER_SIZE].cpu().tolist()]
    return gathered, table


def _agreed_ghost_batches(
    table: list[list[int]], state: _GroupState, channel_shape: tuple[int, ...]
) -> int:
    """Check the gathered headers; return the ghost-batch count of the ranks with elements.

    Every rank sees the same table, so every rank raises the same error, and the group state stays
    the same on every rank. A rank with an empty batch takes the ghost-batch count of the others.
    """
    calls = [row[0] for row in table]
    if len(set(calls)) > 1:
        state.calls = max(calls)
        described = ", ".join(f"rank {r}: {call}" for r, call in enumerate(calls))
        raise RuntimeError(
            "Synchronized batch norm: the ranks of the process group are out of step (a "
            "collective of an earlier synchronized call failed on some ranks only, or a rank "
            "went on after an error), so this call is refused on every rank and the ranks' call "
            f"numbers are realigned. Received synchronized call number per rank: {described}"
        )
    if any(row[1:3] != table[0][1:3] for row in table):
        described = ", ".join(f"rank {r}: {row[1]} channels" for r, row in enumerate(table))
        raise ValueError(
            "Synchronized batch norm needs the same channel shape on every rank of the process "
            "group in every call: every rank must call the same synchronized layers in the same "
            f"order. Received in synchronized call {calls[0]} on the group: {described} (this "
            f"rank: channel shape {channel_shape})"
        )
    counts = {row[3] for row in table if row[4] > 0}
    if len(counts) > 1:
        described = ", ".join(f"rank {r}: {row[3]}" for r, row in enumerate(table) if row[4] > 0)
        raise ValueError(
            "With `virtual_batch_size`, every rank with a non-empty batch must hold the same "
            "number of ghost batches (global ghost batch j is the union of the ranks' ghost "
            f"batches j). Received in synchronized call {calls[0]}, ghost batches per rank: "
            f"{described}"
        )
    return counts.pop() if counts else max(*(row[3] for row in table), 1)


def synchronized_moments(
    x: torch.Tensor,
    axes: tuple[int, ...],
    weights: torch.Tensor | None,
    ghost_batches: int,
    backend: BatchNormBackend,
    group: Any,
) -> tuple[Moments, bool]:
    """Global per-ghost-batch mean, biased variance and total weight (detached), by Chan's formula.

    Returns the moments, each of shape ``(ghost_batches, *channel_shape)`` and identical on every
    rank of ``group`` (``ghost_batches`` as the ranks with elements hold it), and whether the
    global batch has any element. Every call checks that the ranks agree on the channel shape, the
    ghost-batch count and the call number, in the one ``all_gather`` that carries the statistics
    (a second one only when the call needs more channel slots than the group had, see the module
    docstring), and raises the same error on every rank if not.
    """
    channel_shape = tuple(x.shape[a] for a in axes)
    channels = math.prod(channel_shape)
    state = _group_state(group)
    state.calls += 1
    header = [state.calls, channels, _shape_code(channel_shape), ghost_batches, x.numel()]
    with torch.no_grad():
        local = _local_statistics(x, axes, weights, ghost_batches, backend)
        gathered, table = _gather(header, local, state.channel_slots, group)
        ghost_batches = _agreed_ghost_batches(table, state, channel_shape)
        any_elements = any(row[4] > 0 for row in table)
        shape = (ghost_batches, *channel_shape)
        if not any_elements:
            zeros = torch.zeros(shape, dtype=torch.float64, device=x.device)
            return Moments(zeros, zeros.clone(), zeros.clone()), False
        slots = ghost_batches * channels
        if slots > state.channel_slots:
            state.channel_slots = slots
            gathered, _ = _gather(header, local, slots, group)
        ranks = gathered.shape[0]
        statistics = gathered[:, _HEADER_SIZE : _HEADER_SIZE + 3 * slots]
        counts, means, squares = statistics.reshape(ranks, 3, ghost_batches, -1).unbind(1)
        total = counts.sum(dim=0)
        global_mean = divide_no_nan((counts * means).sum(dim=0), total)
        spread = squares + counts * (means - global_mean).square()
        global_variance = divide_no_nan(spread.sum(dim=0), total)
    moments = Moments(
        global_mean.reshape(shape), global_variance.reshape(shape), total.reshape(shape)
    )
    return moments, True


def reduce_gradient_sums(sums: torch.Tensor, group: Any, call: int) -> torch.Tensor:
    """All-reduce (sum) the backward's local gradient sums of synchronized call ``call``.

    The sums are padded to the group's channel slots, so every rank sends the same size whatever
    layer it differentiates, and followed by ``v = call % bound`` and ``v**2`` (``bound`` keeps
    ``world_size * v**2`` exact in float64): the ranks differentiate the same call exactly when
    ``world_size * sum(v**2) == sum(v)**2``. Otherwise every rank raises a RuntimeError naming
    each rank's call (one more, fixed-size, ``all_gather`` for the message).

    Shape:
        ``sums``: any, float64 after the sum; the result has its shape.
    """
    size = sums.numel()
    world_size = dist.get_world_size(group)
    slots = max(_group_state(group).channel_slots, math.ceil(size / 2))
    tag = call % math.isqrt(2**53 // world_size)
    payload = torch.zeros(2 * slots + _CHECK_SIZE, dtype=torch.float64, device=sums.device)
    payload[:size] = sums.flatten()
    payload[-_CHECK_SIZE:] = torch.tensor([tag, tag * tag], dtype=torch.float64)
    try:
        dist.all_reduce(payload, group=group)
    except RuntimeError as error:
        raise collective_error("all_reduce of the gradient sums", group, error) from error
    total, total_squares = (int(value) for value in payload[-_CHECK_SIZE:].tolist())
    if world_size * total_squares != total * total:
        local = torch.tensor([call, size], dtype=torch.int64, device=sums.device)
        table = _all_gather(local, group, "the backward call numbers").cpu().tolist()
        described = ", ".join(
            f"rank {r}: call {row[0]} ({row[1]} gradient sums)" for r, row in enumerate(table)
        )
        raise RuntimeError(
            "Synchronized batch norm: the ranks ran the backward of different synchronized calls "
            "together; every rank must run backward through the same layer calls, in the same "
            f"order. Received per rank: {described}"
        )
    return payload[:size].reshape(sums.shape)


def communicated_bytes(
    channels: int, ghost_batches: int = 1, world_size: int = 2, first_call: bool = False
) -> dict[str, int]:
    """Payload bytes per rank and training step (forward + backward) for ``channels`` channels.

    For the largest layer of its group (smaller layers are padded to the largest): the forward
    all_gathers the header and ``3 * ghost_batches * channels`` float64 (``first_call``: plus the
    header alone, gathered first on a group's first call); the backward all-reduces
    ``2 * ghost_batches * channels`` float64 and the 2-number check.
    """
    slots = ghost_batches * channels
    forward = (_HEADER_SIZE + 3 * slots) * 8 + (_HEADER_SIZE * 8 if first_call else 0)
    return {
        "forward_sent": forward,
        "forward_received": (world_size - 1) * forward,
        "backward_all_reduce": (2 * slots + _CHECK_SIZE) * 8,
    }
