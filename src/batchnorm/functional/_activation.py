"""Activations fused with batch norm: what they compute, their derivative read from their output,
and their inverse (which in-place training needs to recover the normalised input).

With ``z = gamma * x_hat + beta`` the batch-norm output and ``y = f(z)``:

==============  ==========================  ===================  =====================
name            ``f(z)``                    ``f'`` from ``y``     ``f^{-1}(y)``
==============  ==========================  ===================  =====================
``identity``    ``z``                       1                    ``y``
``relu``        ``max(z, 0)``               ``y > 0``            not invertible
``leaky_relu``  ``z`` if > 0 else ``a z``   1 if ``y > 0`` else a  ``y`` or ``y / a``
``elu``         ``z`` if > 0 else           1 if ``y > 0`` else    ``y`` or
                ``a (exp(z) - 1)``          ``y + a``            ``log1p(y / a)``
==============  ==========================  ===================  =====================

``a`` is ``activation_param`` (leaky_relu: negative slope, default 0.01, as torch; elu: alpha,
default 1.0). leaky_relu is invertible for ``a > 0``, elu for ``a > 0``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

ActivationName = Literal["identity", "relu", "leaky_relu", "elu"]
ACTIVATIONS: tuple[str, ...] = ("identity", "relu", "leaky_relu", "elu")
_DEFAULT_PARAMETER = {"leaky_relu": 0.01, "elu": 1.0}


@dataclasses.dataclass(frozen=True)
class Activation:
    """A validated activation: its name and parameter (None where it takes none)."""

    name: str
    parameter: float | None = None

    @property
    def invertible(self) -> bool:
        return self.name == "identity" or (
            self.name in ("leaky_relu", "elu") and self.parameter is not None and self.parameter > 0
        )


def check_activation(name: Any, parameter: Any = None) -> Activation | None:
    """``activation`` / ``activation_param`` checked: None (no activation) or an :class:`Activation`."""
    if name is None:
        if parameter is not None:
            raise ValueError(
                "`activation_param` needs an `activation`. "
                f"Received: activation=None, activation_param={parameter!r}"
            )
        return None
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"`activation` must be None or one of {list(ACTIVATIONS)}. Received: activation={name!r}"
        )
    if name in ("identity", "relu"):
        if parameter is not None:
            raise ValueError(
                f"`activation_param` does not apply to activation={name!r}. "
                f"Received: activation_param={parameter!r}"
            )
        return Activation(name)
    if parameter is None:
        return Activation(name, _DEFAULT_PARAMETER[name])
    if (
        isinstance(parameter, bool)
        or not isinstance(parameter, numbers.Real)
        or not -math.inf < float(parameter) < math.inf  # not math.isfinite: check_renorm_clipping
    ):
        raise ValueError(
            f"`activation_param` must be a finite number for activation={name!r}. "
            f"Received: activation_param={parameter!r}"
        )
    if name == "elu" and parameter <= 0:
        raise ValueError(
            f"`activation_param` (elu's alpha) must be > 0. Received: activation_param={parameter!r}"
        )
    return Activation(name, float(parameter))


def activation_keyword(activation: Activation | None) -> dict[str, Activation]:
    """``{"activation": activation}``, or nothing without one: what backends are called with, so
    that backends registered from elsewhere that take no activation never see the keyword."""
    return {} if activation is None else {"activation": activation}


def elu_inverse_floor(dtype: torch.dtype | np.dtype) -> float:
    """The most negative ``z`` elu's inverse returns in ``dtype`` (see :func:`invert`)."""
    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) else np.finfo(dtype).eps
    return math.log(float(eps) / 2)


def activate(z: torch.Tensor, activation: Activation | None) -> torch.Tensor:
    """``f(z)``, differentiable (torch's own activation ops)."""
    if activation is None or activation.name == "identity":
        return z
    if activation.name == "relu":
        return F.relu(z)
    assert activation.parameter is not None
    if activation.name == "leaky_relu":
        return F.leaky_relu(z, activation.parameter)
    return F.elu(z, activation.parameter)


def activate_(z: torch.Tensor, activation: Activation | None) -> torch.Tensor:
    """``f(z)`` written over ``z`` (no autograd: for in-place training's forward)."""
    if activation is None or activation.name == "identity":
        return z
    if activation.name == "relu":
        return z.relu_()
    assert activation.parameter is not None
    if activation.name == "leaky_relu":
        return F.leaky_relu_(z, activation.parameter)
    return F.elu_(z, activation.parameter)


def derivative_from_output(y: torch.Tensor, activation: Activation | None) -> torch.Tensor | None:
    """``f'(z)`` computed from ``y = f(z)``; None for the identity (1 everywhere)."""
    if activation is None or activation.name == "identity":
        return None
    positive = y > 0
    if activation.name == "relu":
        return positive.to(y.dtype)
    assert activation.parameter is not None
    if activation.name == "leaky_relu":
        return torch.where(positive, y.new_ones(()), y.new_full((), activation.parameter))
    return torch.where(positive, torch.ones_like(y), y + activation.parameter)


def gradient_through_output(
    grad: torch.Tensor, y: torch.Tensor, activation: Activation
) -> torch.Tensor:
    """``grad * f'(z)`` from ``y = f(z)``, in one pass of torch's own backward op read from the
    output (exact element-wise arithmetic: a select, leaky_relu's ``grad * a``, elu's
    ``grad * (y + alpha)``). Only where ``y``'s sign is ``z``'s: relu, and the invertible
    activations (see :attr:`Activation.invertible`)."""
    assert activation.name == "relu" or activation.invertible
    aten = torch.ops.aten
    result: torch.Tensor
    if activation.name == "relu":
        result = aten.threshold_backward(grad, y, 0)
    elif activation.name == "leaky_relu":
        result = aten.leaky_relu_backward(grad, y, activation.parameter, True)
    else:
        result = aten.elu_backward(grad, activation.parameter, 1, 1, True, y)
    return result


def invert(y: torch.Tensor, activation: Activation | None) -> torch.Tensor:
    """``z = f^{-1}(y)``; only for invertible activations (see :attr:`Activation.invertible`).

    elu's inverse ``log1p(y / alpha)`` is -inf where ``y`` rounded to ``-alpha`` (``z`` below
    about -17 in float32, -37 in float64): there ``f'(z) = y + alpha = 0``, so the gradient
    reaching ``z`` is 0, and ``z`` is clamped to the most negative value that still rounds to a
    distinct ``y``, which keeps the batch sums finite. Where ``-alpha`` itself rounds below
    ``alpha`` (alpha 0.85 in float32; half precision at moderate ``z``), ``y / alpha`` falls
    below -1 and log1p gave NaN, which spread over the channel's gradients: it is clamped to
    -1 first (a NaN ``y`` stays NaN).
    """
    if activation is None or activation.name == "identity":
        return y
    assert activation.invertible and activation.parameter is not None
    a = activation.parameter
    if activation.name == "leaky_relu":
        return torch.where(y > 0, y, y / a)
    floor = elu_inverse_floor(y.dtype)
    return torch.where(y > 0, y, torch.log1p((y / a).clamp(min=-1.0)).clamp(min=floor))
