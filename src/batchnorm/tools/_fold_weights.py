"""Fold a batch norm's inference transform into the weight and bias of the layer before it."""

from __future__ import annotations

import numbers

import torch

from batchnorm.functional._validation import check_bool, check_positive, check_tensor


def fold_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    variance: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    epsilon: float,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one layer that computes ``batch_norm(layer(x))`` at inference.

    With ``s = gamma / sqrt(variance + epsilon)`` per output channel,

    .. math::
        W' = s \\cdot W, \\qquad b' = s \\cdot (b - \\mu) + \\beta

    where ``W`` is scaled along its output-channel dimension: dim 0 for Linear and Conv
    (``(out, in / groups, *kernel)``), and for ConvTranspose (``(in, out / groups, *kernel)``)
    dim 1 within each of the ``groups`` blocks of dim 0. Computed in float64, returned in
    ``weight``'s dtype. ``variance`` is the stored moving variance, used as inference uses it
    (whichever estimator the layer stores). This is the tensor-level companion of
    :func:`batchnorm.fold`, like torch's ``fuse_conv_bn_weights``.

    Args:
        weight: the layer's weight. Every tensor must be floating-point (an integer one was
            folded and truncated) and on ``weight``'s device.
        bias: its bias, or None (taken as 0).
        mean, variance: the batch norm's moving statistics, shape ``(C_out,)``.
        gamma, beta: its scale and offset, or None (taken as 1 and 0).
        epsilon: added to the variance, a finite number > 0.
        transposed: ``weight`` is a ConvTranspose weight.
        groups: the ConvTranspose's groups (only used with ``transposed``).

    Returns:
        ``(folded_weight, folded_bias)``, new tensors (not Parameters), detached: no gradient
        flows back to any argument.

    Shape:
        ``weight``: ``(C_out, ...)`` or, transposed, ``(C_in, C_out / groups, ...)``; bias, mean,
        variance, gamma, beta: ``(C_out,)``.

    Example:
        >>> conv, bn = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8).eval()
        >>> w, b = fold_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
        ...                     bn.weight, bn.bias, bn.eps)
    """
    transposed = check_bool(transposed, "transposed")
    for name, required in (("weight", weight), ("mean", mean), ("variance", variance)):
        check_tensor(required, name)
    for name, optional in (("bias", bias), ("gamma", gamma), ("beta", beta)):
        check_tensor(optional, name, optional=True)
    if weight.ndim < 2:
        raise ValueError(
            "`weight` must have at least 2 dims (out, in, ...). "
            f"Received: weight.shape={tuple(weight.shape)}"
        )
    if (
        isinstance(groups, bool)  # True was taken as groups=1
        or not isinstance(groups, numbers.Integral)
        or groups < 1
        or (transposed and weight.shape[0] % groups)
    ):
        raise ValueError(
            "`groups` must be a positive int dividing weight.shape[0]. "
            f"Received: groups={groups!r} for weight.shape={tuple(weight.shape)}"
        )
    groups = int(groups)
    out_channels = weight.shape[1] * groups if transposed else weight.shape[0]
    named = {
        "weight": weight,
        "bias": bias,
        "mean": mean,
        "variance": variance,
        "gamma": gamma,
        "beta": beta,
    }
    for name, tensor in named.items():
        if tensor is None:
            continue
        if not tensor.is_floating_point():
            raise TypeError(
                f"`{name}` must be a floating-point tensor. Received: {name}.dtype={tensor.dtype}"
            )
        if name != "weight" and tuple(tensor.shape) != (out_channels,):
            raise ValueError(
                f"`{name}` must have one value per output channel, shape ({out_channels},). "
                f"Received: {name}.shape={tuple(tensor.shape)}"
            )
        if tensor.device != weight.device:
            raise ValueError(
                f"`{name}` must be on the device of `weight`, {weight.device}. "
                f"Received: {name}.device={tensor.device}"
            )
    # batch_norm's check: an infinite epsilon folded every weight to 0.
    epsilon = check_positive(epsilon, "epsilon")
    wide = torch.float64
    scale = torch.rsqrt(variance.detach().to(wide) + epsilon)
    if gamma is not None:
        scale = scale * gamma.detach().to(wide)
    shift = (
        -mean.detach().to(wide) if bias is None else bias.detach().to(wide) - mean.detach().to(wide)
    )
    folded_bias = shift * scale
    if beta is not None:
        folded_bias = folded_bias + beta.detach().to(wide)
    kernel_dims = [1] * (weight.ndim - 2)
    if transposed:
        blocks = weight.detach().to(wide).reshape(groups, -1, *weight.shape[1:])
        folded = blocks * scale.reshape(groups, 1, -1, *kernel_dims)
        folded_weight = folded.reshape(weight.shape)
    else:
        folded_weight = weight.detach().to(wide) * scale.reshape(-1, 1, *kernel_dims)
    folded_weight = folded_weight.to(weight.dtype)
    if weight.is_contiguous(memory_format=torch.channels_last) and weight.ndim == 4:
        folded_weight = folded_weight.contiguous(memory_format=torch.channels_last)
    return folded_weight, folded_bias.to(weight.dtype if bias is None else bias.dtype)
