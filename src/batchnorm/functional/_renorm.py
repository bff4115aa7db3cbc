"""Batch Renormalization (Ioffe 2017): the r/d correction from the pre-update renorm statistics."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from batchnorm.functional._pinned_read import pinned_read
from batchnorm.functional._validation import check_positive, check_renorm_clipping


def compose_transforms(
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    then_scale: torch.Tensor | None,
    then_offset: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Apply ``(scale, offset)`` first, then ``(then_scale, then_offset)``: tf-keras'
    _compose_transforms, ``(scale * then_scale, offset * then_scale + then_offset)``, a
    missing term the identity (renorm's r and d, an adjustment, composed with gamma and beta)."""
    if then_scale is not None:
        scale = then_scale if scale is None else scale * then_scale
        offset = None if offset is None else offset * then_scale
    if then_offset is not None:
        offset = then_offset if offset is None else offset + then_offset
    return scale, offset


class RenormCorrection(NamedTuple):
    r: torch.Tensor
    d: torch.Tensor
    stddev: torch.Tensor


def renorm_correction(
    mean: torch.Tensor,
    variance: torch.Tensor,
    renorm_mean: torch.Tensor,
    renorm_stddev: torch.Tensor,
    epsilon: float,
    clipping: Mapping[str, float | None] | None,
) -> RenormCorrection:
    """r and d of Batch Renormalization, as tf-keras computes them.

    .. math::
        s = \\sqrt{\\sigma_B^2 + \\epsilon}, \\quad s_r = \\max(\\text{renorm\\_stddev}, \\sqrt{\\epsilon}),
        \\quad r = \\text{clip}_{[r_{min}, r_{max}]}(s / s_r),
        \\quad d = \\text{clip}_{[-d_{max}, d_{max}]}((\\mu_B - \\text{renorm\\_mean}) / s_r)

    Each bound applies only when present in ``clipping`` (keys rmin, rmax, dmax; a None value,
    or ``clipping=None``, is no bound, as in tf-keras and :func:`batch_norm`; checked as
    :func:`batch_norm` checks ``renorm_clipping``: rmax >= rmin, dmax >= 0). r and d carry no
    gradient (tf.stop_gradient); ``stddev`` (s) does, and is the value the renorm moving
    averages track. The training output is ``xhat * (r * gamma) + (d * gamma + beta)``.
    """
    epsilon = check_positive(epsilon, "epsilon")
    clipping = check_renorm_clipping(clipping, "clipping")
    stddev = torch.sqrt(variance + epsilon)
    floor = math.sqrt(epsilon)
    # The step updates both in place afterwards: a compiled backward must not read them again.
    renorm_mean, renorm_stddev = pinned_read(renorm_mean), pinned_read(renorm_stddev)
    renorm_stddev = torch.clamp(renorm_stddev.to(stddev.dtype), min=floor)
    r = stddev.detach() / renorm_stddev
    d = (mean.detach() - renorm_mean.to(mean.dtype)) / renorm_stddev
    if "rmin" in clipping:
        r = torch.clamp(r, min=clipping["rmin"])
    if "rmax" in clipping:
        r = torch.clamp(r, max=clipping["rmax"])
    if "dmax" in clipping:
        d = torch.clamp(d, min=-clipping["dmax"], max=clipping["dmax"])
    return RenormCorrection(r.detach(), d.detach(), stddev)
