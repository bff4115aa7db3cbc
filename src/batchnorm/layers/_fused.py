"""tf-keras' choice between its fused and non-fused batch-norm paths.

It matters beyond speed: the fused path stores the Bessel-corrected batch variance in
``moving_variance``, the non-fused path the biased one, and the fused path ignores ``mask``.
"""

from __future__ import annotations

from typing import Any

import torch

from batchnorm.functional._validation import check_axis_type


def fused_unsupported_reason(
    *,
    axis: list[int],
    renorm: bool,
    virtual_batch_size: int | None,
    adjustment_given: bool,
    compute_dtype: torch.dtype,
) -> str | None:
    """Why ``fused=True`` cannot be honoured (tf-keras' ``_raise_if_fused_cannot_be_used``), or None."""
    if renorm:
        return (
            "Passing both `fused=True` and `renorm=True` is not supported (pass fused=None or "
            "False with renorm). Received: fused=True, renorm=True"
        )
    if len(axis) > 1 or axis[0] not in (-4, -3, -1, 1, 3, 4):
        return (
            "Passing `fused=True` is only supported when axis is 1 or 3 for input rank 4, "
            f"or 1 or 4 for input rank 5. Received: axis={axis}"
        )
    if virtual_batch_size is not None:
        return (
            "Passing `fused=True` is not supported when `virtual_batch_size` is specified. "
            f"Received: fused=True, virtual_batch_size={virtual_batch_size}"
        )
    if adjustment_given:
        return (
            "Passing `fused=True` is not supported when `adjustment` is specified. "
            "Received: fused=True with an adjustment"
        )
    if compute_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return (
            "Passing `fused=True` is only supported when the compute dtype is float16, bfloat16 "
            f"or float32. Received: dtype={compute_dtype}"
        )
    return None


def unfused_if_synchronized(
    fused: bool | None, synchronized: bool, reason: str | None = None
) -> bool | None:
    """``fused``, None made False where the layer cannot fuse: it is ``synchronized`` (tf-keras
    refuses ``fused=True`` with it, which
    :func:`batchnorm.functional._synchronized.check_synchronized` checks), or its options rule
    fusing out (``reason``, :func:`layer_fusing_reason`): the constructor's decision, made again
    for settings assigned since (renorm, ghost batches or an adjustment assigned before the
    first call left None, and the build took the fused path: the Bessel-corrected variance)."""
    return False if fused is None and (synchronized or reason is not None) else fused


def built_path(
    layer: Any, fused: bool | None, synchronized: bool, axes: tuple[int, ...], rank: int
) -> bool:
    """The path ``layer``, built for inputs of ``rank`` with channel ``axes``, takes for the
    ``fused`` argument and ``synchronized`` with its other settings as they are now: what the
    build decides, and the ``fused`` and ``synchronized`` setters decide again on a built layer."""
    automatic = unfused_if_synchronized(fused, synchronized, layer_fusing_reason(layer))
    return resolve_fused_at_build(automatic, axes, rank)


def layer_fusing_reason(layer: Any) -> str | None:
    """:func:`fused_unsupported_reason` for ``layer``'s current settings."""
    return fused_unsupported_reason(
        axis=check_axis_type(layer.axis),
        renorm=layer.renorm,
        virtual_batch_size=layer.virtual_batch_size,
        adjustment_given=layer.adjustment is not None,
        compute_dtype=layer.dtype_policy.compute_dtype,
    )


def resolve_fused_at_build(fused: bool | None, axes: tuple[int, ...], rank: int) -> bool:
    """tf-keras' build-time resolution: fused needs rank 4 or 5 with the channel first or last.

    ``fused=None`` on rank 4/5 with an unusable axis silently falls back on rank 5 but raises on
    rank 4, exactly as tf-keras does.
    """
    if fused is False:
        return False
    if rank not in (4, 5):
        if fused:
            raise ValueError(
                "Batch normalization layers with `fused=True` only support 4D or 5D input "
                f"tensors. Received: an input of rank {rank}"
            )
        return False
    if axes in ((1,), (rank - 1,)):
        return True
    if rank == 5:
        return False
    raise ValueError(
        "Unsupported axis. The use of `fused=True` is only possible with `axis=1` or `axis=3` "
        f"for 4D input tensors. Received: axis={axes}"
    )
