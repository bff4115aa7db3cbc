"""``SampleNormalization``: Keras 1's BatchNormalization(mode=1), sample-wise normalisation."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from batchnorm.functional._validation import check_bool, check_floating_input, check_positive
from batchnorm.layers._layer_tracing import refuse_scripting
from batchnorm.layers._load_pre_hooks import run_load_pre_hooks_first


class SampleNormalization(nn.Module):
    """Keras 1's ``BatchNormalization(mode=1)``: each sample normalised over its feature axis.

    .. math::
        y = \\gamma \\frac{x - \\mu}{\\sigma + \\epsilon} + \\beta, \\qquad
        \\mu = E_{axis}[x], \\quad \\sigma = \\sqrt{E_{axis}[(x - \\mu)^2]}

    with the population standard deviation and epsilon added to the standard deviation, not the
    variance, exactly as Keras 1.0 wrote it. Keras 1.1 and 1.2 computed
    ``sigma = sqrt(Var + epsilon)`` and still added epsilon again; ``epsilon_in_sqrt=True`` gives
    that form. There is no state: training and inference are the same. gamma and beta have the
    size of the feature axis.

    Args:
        axis: the feature axis (default -1).
        epsilon: added to the standard deviation (default 1e-3).
        center, scale: learn beta / gamma (default True).
        num_features: the feature count; without it the weights are created on the first call,
            on its input's device (or by ``load_state_dict``, in the checkpoint's size and dtype).
        epsilon_in_sqrt: Keras 1.1/1.2's ``(x - mean) / (sqrt(var + eps) + eps)`` (default False).

    Shape:
        Input: any rank >= 1 (Keras 1 used 2-D ``(batch, features)``); output: the same.

    Example:
        >>> layer = SampleNormalization(num_features=10)
        >>> y = layer(torch.randn(4, 10))
    """

    gamma: nn.Parameter
    beta: nn.Parameter
    axis: int
    epsilon: float
    center: bool
    scale: bool
    epsilon_in_sqrt: bool

    def __init__(
        self,
        axis: int = -1,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        *,
        num_features: int | None = None,
        epsilon_in_sqrt: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(axis, numbers.Integral) or isinstance(axis, bool):
            raise TypeError(f"`axis` must be an int. Received: axis={axis!r}")
        self.axis = int(axis)
        self.epsilon = check_positive(epsilon, "epsilon")
        self.center = check_bool(center, "center")
        self.scale = check_bool(scale, "scale")
        self.epsilon_in_sqrt = check_bool(epsilon_in_sqrt, "epsilon_in_sqrt")
        self.num_features: int | None = None
        if num_features is not None:
            if (
                isinstance(num_features, bool)  # True == 1 built one feature
                or not isinstance(num_features, numbers.Integral)
                or num_features <= 0
            ):
                raise ValueError(
                    "`num_features` must be a positive int. "
                    f"Received: num_features={num_features!r}"
                )
            self._create_weights(int(num_features), torch.float32)

    def _affine_names(self) -> list[str]:
        return [name for name, present in (("gamma", self.scale), ("beta", self.center)) if present]

    def _create_weights(
        self, features: int, dtype: torch.dtype, device: torch.device | None = None
    ) -> None:
        # Normal tensors even when built under torch.inference_mode, so that training works later.
        with torch.inference_mode(False):
            if self.scale:
                self.gamma = nn.Parameter(torch.ones(features, dtype=dtype, device=device))
            if self.center:
                self.beta = nn.Parameter(torch.zeros(features, dtype=dtype, device=device))
        self.num_features = features

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """gamma to ones and beta to zeros in place, as built (``nn.LayerNorm``'s method: the
        meta-device recipe, ``to_empty`` then ``reset_parameters``, left them uninitialised
        memory); nothing before the build."""
        gamma, beta = self._parameters.get("gamma"), self._parameters.get("beta")
        if gamma is not None:
            gamma.fill_(1.0)
        if beta is not None:
            beta.fill_(0.0)

    def _remove_weights(self) -> None:
        """Back to unbuilt: undoes a build made by a call that then failed."""
        for name in self._affine_names():
            self._parameters.pop(name, None)
        self.num_features = None

    def _checkpoint_problem(self, state_dict: Mapping[str, Any], prefix: str) -> str | None:
        """Why the checkpoint's gamma / beta cannot be loaded, or None: each must be a 1-D
        floating-point tensor of the layer's feature count (an unbuilt layer takes it from the
        checkpoint, so gamma and beta must agree)."""
        features, source = self.num_features, "SampleNormalization has"
        for name in self._affine_names():
            key = f"{prefix}{name}"
            if key not in state_dict:
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                return (
                    f"`{key}` must be a floating-point torch.Tensor. "
                    f"Received: {key} of type {type(value).__name__}"
                )
            if not value.is_floating_point():
                return (
                    f"`{key}` must be a floating-point torch.Tensor. "
                    f"Received: {key}.dtype={value.dtype}"
                )
            if value.ndim != 1:
                return (
                    f"`{key}` must be 1-D, one value per feature. "
                    f"Received: {key}.shape={tuple(value.shape)}"
                )
            if features is not None and value.shape[0] != features:
                return (
                    f"size mismatch for {key}: {source} {features} features. "
                    f"Received: {key}.shape={tuple(value.shape)}"
                )
            features, source = int(value.shape[0]), f"the checkpoint's `{key}` has"
        return None

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The load pre-hooks first, as torch runs them (they may rename or reshape the
        # checkpoint's tensors; an unbuilt layer runs them once built, as torch's lazy modules,
        # see run_load_pre_hooks_first); then everything is checked before anything is built or copied:
        # a load that fails leaves the layer as it was (an unbuilt one was left built with the
        # checkpoint's first size).
        incompatible = (missing_keys, unexpected_keys, error_msgs)
        copying = run_load_pre_hooks_first(
            self,
            self.num_features is not None,
            state_dict,
            prefix,
            local_metadata,
            strict,
            incompatible,
        )
        problem = self._checkpoint_problem(state_dict, prefix)
        if problem is not None:
            error_msgs.append(problem)
            return
        names = self._affine_names()
        absent = [name for name in names if f"{prefix}{name}" not in state_dict]
        if self.num_features is None and absent and len(absent) < len(names):
            # An unbuilt layer is built only from all its tensors (as BatchNormalization):
            # from beta alone it stayed built after a strict load raised for gamma.
            missing_keys.extend(f"{prefix}{name}" for name in absent)
            return
        errors_before = len(error_msgs)
        built_here = False
        # An unbuilt layer takes its feature count and dtype from the checkpoint.
        for name in self._affine_names():
            if self.num_features is None and f"{prefix}{name}" in state_dict:
                value = state_dict[f"{prefix}{name}"]
                self._create_weights(int(value.shape[0]), value.dtype)
                built_here = True
        try:
            with copying:
                super()._load_from_state_dict(
                    state_dict,
                    prefix,
                    local_metadata,
                    strict,
                    missing_keys,
                    unexpected_keys,
                    error_msgs,
                )
        except BaseException:
            if built_here:
                self._remove_weights()
            raise
        if built_here and len(error_msgs) > errors_before:
            self._remove_weights()

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this on each module first: a clear refusal
        (:func:`~batchnorm.layers._layer_tracing.refuse_scripting`)."""
        refuse_scripting(self, convertible=False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_floating_input(x, "x")
        if not -x.ndim <= self.axis < x.ndim:
            raise ValueError(
                f"`axis` {self.axis} is out of range for an input of rank {x.ndim}. "
                f"Received: x.shape={tuple(x.shape)}"
            )
        features = x.shape[self.axis]
        if self.num_features is not None:
            if features != self.num_features:
                raise ValueError(
                    f"SampleNormalization was built for {self.num_features} features on axis "
                    f"{self.axis}. Received: x.shape={tuple(x.shape)}"
                )
            return self._normalize(x)
        if x.is_meta and self._affine_names():
            raise RuntimeError(
                "An unbuilt SampleNormalization builds gamma and beta on its first input's "
                "device, and a meta tensor holds no values for them: pass `num_features` (under "
                "`torch.device('meta')` for meta weights) or make the first call on a real "
                f"device. Received: x.device={x.device}"
            )
        # Built on the input's device (an unbuilt layer holds no tensor for `.to()` to move),
        # and unbuilt again if the call fails.
        self._create_weights(features, torch.promote_types(x.dtype, torch.float32), x.device)
        try:
            return self._normalize(x)
        except BaseException:
            self._remove_weights()
            raise

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        features = x.shape[self.axis]
        compute = x.to(torch.promote_types(x.dtype, torch.float32))
        mean = compute.mean(dim=self.axis, keepdim=True)
        variance = (compute - mean).square().mean(dim=self.axis, keepdim=True)
        if self.epsilon_in_sqrt:
            variance = variance + self.epsilon
        y = (compute - mean) / (variance.sqrt() + self.epsilon)
        view = [1] * x.ndim
        view[self.axis] = features
        if self.scale:
            y = y * self.gamma.reshape(view)
        if self.center:
            y = y + self.beta.reshape(view)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_features={self.num_features}, axis={self.axis}, epsilon={self.epsilon}, "
            f"center={self.center}, scale={self.scale}, epsilon_in_sqrt={self.epsilon_in_sqrt}"
        )
