"""Draws of the numerics searches: shapes, channel axes, ghost batches, memory layouts, masks with
padding far from the data (Keras' with the channel axis not last vary inside each channel: the
composed torch-op path), offsets up to |mean| / std = 1e6 and magnitudes up to 1e30
(tests/test_numerics_search.py, tests/test_gradient_search.py, tests/test_half_kernels.py)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import assume
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


def numerics_inputs(case):
    """``(rng, x, mask, weights)`` of a draw: x of the draw's offsets and magnitude (float64, its
    values fit in float32), ghost batches far apart too, masked positions set to the padding;
    the boolean mask as the layer takes it and its weights broadcast to x (None without); the
    generator, to draw what else a test needs after these."""
    rng = np.random.default_rng(case["seed"])
    shape, axis, ghost = case["shape"], case["axis"], case.get("ghost")
    channels = shape[axis]
    count = 1 if ghost is None else shape[0] // ghost  # ghost batches; sample o is in o % count
    scale = case["magnitude"]
    means = rng.normal(size=channels) * case["offset_ratio"] * scale
    x = rng.normal(size=shape) * scale + np.expand_dims(
        means, [d for d in range(len(shape)) if d != axis]
    )
    if ghost is not None:  # ghost batches far apart too
        apart = rng.normal(size=count) * case["offset_ratio"] * scale
        x = x + np.expand_dims(apart[np.arange(shape[0]) % count], list(range(1, len(shape))))
    mask = weights = None
    if case["mask"] is not None:
        # A Keras mask drops x's last axis: one weight per position where that is the channel
        # axis, else weights that vary inside each channel (the composed torch-op path). A mask
        # shaped like x without the channel axis is one weight per position; where both shapes
        # coincide, the layer reads Keras'.
        per_position = [s for d, s in enumerate(shape) if d != axis]
        mask_shape = shape[:-1] if case["mask"] == "keras" else per_position
        keras_style = mask_shape == shape[:-1]
        mask = rng.uniform(size=mask_shape) > 0.3
        weights = np.expand_dims(mask, -1 if keras_style else axis).astype(np.float64)
        weights = np.broadcast_to(weights, shape)
        # every channel of every ghost batch has a value
        channel_last = np.moveaxis(weights, axis, -1)
        for g in range(count):
            assume(np.all(channel_last[g::count].reshape(-1, channels).sum(axis=0) > 0))
        x = np.where(weights > 0, x, case["padding"] * scale)
    assume(np.abs(x).max() < 3e38)  # the data fit in float32
    return rng, x, mask, weights


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
