"""Viewing a tensor as ``(rows, channels, inner)`` for the CPU kernels, without a copy where possible.

The tensor's dimensions are taken in memory order (largest stride first). When that order is
contiguous and the channel axes form one run in it, ``x`` is a view ``x3[o, c, i]``: NCHW with
axis 1 gives ``(N, C, H*W)``; NHWC, or NCHW in ``torch.channels_last`` memory, gives
``(N*H*W, C, 1)``. Otherwise one explicit copy brings the channel axes together.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class CanonicalLayout(NamedTuple):
    order: tuple[int, ...]  # x.permute(order) is contiguous
    rows: int
    channels: int
    inner: int
    period: int  # rows per sample of the batch axis (ghost-batch grouping)
    channel_permutation: tuple[int, ...]  # sorted channel axes -> their memory order
    copied: bool

    def view(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (shaped like x) as ``(rows, channels, inner)``; copies if its strides differ."""
        shape = (self.rows, self.channels, self.inner)
        if self.order == tuple(range(len(self.order))):
            return tensor.reshape(shape)
        return tensor.permute(self.order).reshape(shape)

    def channels_from_canonical(
        self, tensor: torch.Tensor, channel_shape: tuple[int, ...]
    ) -> torch.Tensor:
        """``(..., channels)`` in memory order back to ``(..., *channel_shape)`` (sorted axes)."""
        memory_shape = [channel_shape[p] for p in self.channel_permutation]
        lead = tensor.shape[:-1]
        shaped = tensor.reshape(*lead, *memory_shape)
        inverse = inverse_permutation(list(self.channel_permutation))
        return shaped.permute([*range(len(lead)), *(len(lead) + i for i in inverse)])


def _memory_order(x: torch.Tensor) -> list[int]:
    # Size-1 dimensions have meaningless strides: they go last, where they cannot break contiguity.
    strides = x.stride()
    return sorted(range(x.ndim), key=lambda d: (-strides[d] if x.shape[d] != 1 else 0, d))


def canonical_layout(
    x: torch.Tensor, axes: tuple[int, ...], batch_outermost: bool
) -> tuple[torch.Tensor, CanonicalLayout]:
    """Returns ``(x_source, layout)`` where ``layout.view(x_source)`` is a free view.

    ``x_source`` is ``x`` itself, or one contiguous copy when no view fits (the channel axes not
    adjacent in memory, or ``batch_outermost`` asked for ghost batches and the batch axis is not
    the slowest-varying one).
    """
    if len(axes) == 1 and x.is_contiguous():
        # The common case, without the search below: NCHW, NHWC, NC, NLC in logical order.
        axis, shape = axes[0], x.shape
        rows, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
        batch_rows = shape[0] if axis > 0 else 1
        if shape[axis] == 1 and inner == 1 and rows > 1 and not batch_outermost:
            # One channel stored one value per row: as rows, every pass would run a loop of one
            # value per row (a (2^20, 1) training forward took 4.3 ms, 14 copies' time). The
            # same memory as a few long planes reads as one vector stream per row block.
            rows = _planes_of_one_channel(rows)
            inner = math.prod(shape) // rows
        return x, CanonicalLayout(
            order=tuple(range(x.ndim)),
            rows=rows,
            channels=shape[axis],
            inner=inner,
            period=max(rows // max(batch_rows, 1), 1),
            channel_permutation=(0,),
            copied=False,
        )
    order = _memory_order(x)
    copied = False
    if not x.permute(order).is_contiguous():
        order, copied = list(range(x.ndim)), True
    positions = sorted(order.index(a) for a in axes)
    adjacent = positions == list(range(positions[0], positions[0] + len(positions)))
    batch_ok = not batch_outermost or x.ndim == 0 or order[0] == 0 or x.shape[0] == 1
    if not adjacent or not batch_ok:
        # Keep the batch first, then every other axis in logical order with the channels together.
        first = min(axes)
        before = [d for d in range(x.ndim) if d not in axes and d < first]
        after = [d for d in range(x.ndim) if d not in axes and d > first]
        order, copied = [*before, *axes, *after], True
        positions = sorted(order.index(a) for a in axes)
    source = x.permute(order).contiguous().permute(inverse_permutation(order)) if copied else x
    start, stop = positions[0], positions[-1] + 1
    sizes = [x.shape[d] for d in order]
    rows = math.prod(sizes[:start])
    memory_channels = [d for d in order if d in axes]
    batch_rows = x.shape[0] if x.ndim and order.index(0) < start else 1
    layout = CanonicalLayout(
        order=tuple(order),
        rows=rows,
        channels=math.prod(sizes[start:stop]),
        inner=math.prod(sizes[stop:]),
        period=max(rows // max(batch_rows, 1), 1),
        channel_permutation=tuple(axes.index(d) for d in memory_channels),
        copied=copied,
    )
    return source, layout


def _planes_of_one_channel(values: int) -> int:
    """The rows for ``values`` of one channel viewed as ``(rows, 1, values / rows)``: the
    largest divisor of ``values`` up to 64, so that the row blocks can go to threads."""
    return max(d for d in range(1, min(values, 64) + 1) if values % d == 0)


def inverse_permutation(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return inverse


def canonical_weights(
    weights: torch.Tensor, layout: CanonicalLayout, axes: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor:
    """A mask with the shape of x minus its channel axes, as a contiguous ``(rows, inner)`` array."""
    remaining = [d for d in range(len(layout.order)) if d not in axes]
    order = [remaining.index(d) for d in layout.order if d not in axes]
    return weights.to(dtype).permute(order).contiguous().reshape(layout.rows, layout.inner)
