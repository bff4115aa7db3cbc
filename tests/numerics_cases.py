"""Draws of the numerics searches: shapes, channel axes, ghost batches, memory layouts, masks with
padding far from the data, offsets up to |mean| / std = 1e6 and magnitudes up to 1e30
(tests/test_numerics_search.py, tests/test_half_kernels.py)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st


@st.composite
def numerics_cases(draw):
    rank = draw(st.integers(2, 4))
    shape = [draw(st.integers(2, 9)) for _ in range(rank)]
    axis = draw(st.integers(1, rank - 1))
    # ghost batches of one or two samples (virtual_batch_size), the batch a multiple of them
    ghost = draw(st.sampled_from([None, 1, 2]))
    if ghost is not None:
        shape[0] = ghost * draw(st.integers(2, 4))
    return {
        "ghost": ghost,
        "shape": shape,
        "axis": axis,
        # memory order: logical, channels last (the axis moved innermost), or reversed
        "layout": draw(st.sampled_from(["contiguous", "channels_last", "reversed"])),
        "mask": draw(st.sampled_from([None, "keras", "per_position"])),
        "padding": draw(st.sampled_from([0.0, -1e4, 1e9])),
        "offset_ratio": draw(st.sampled_from([0.0, 1.0, 1e3, 1e6])),
        "magnitude": draw(st.sampled_from([1.0, 1e-20, 1e18, 1e19, 1e24, 1e30])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def laid_out(x: np.ndarray, axis: int, layout: str) -> torch.Tensor:
    """x as a tensor whose memory order is ``layout``: logical, channel axis innermost or reversed."""
    tensor = torch.from_numpy(x)
    if layout == "contiguous":
        return tensor
    order = (
        [d for d in range(x.ndim) if d != axis] + [axis]
        if layout == "channels_last"
        else list(reversed(range(x.ndim)))
    )
    inverse = [order.index(d) for d in range(x.ndim)]
    return tensor.permute(order).contiguous().permute(inverse)
