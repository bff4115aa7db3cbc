"""``BatchNormalization``: tf.keras.layers.BatchNormalization as a torch.nn.Module."""

from __future__ import annotations

import itertools
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import nn

from batchnorm.functional import BatchNormStatistics
from batchnorm.functional._batch_norm import (
    BatchNormOptions,
    batch_norm_step,
    check_use_global_stats,
)
from batchnorm.functional._direct_step import DirectCalls, infer, train_in_place
from batchnorm.functional._synchronized import check_synchronized, synchronizes
from batchnorm.functional._validation import (
    check_axis_type,
    check_bool,
    check_floating_input,
    check_fraction,
    check_positive,
    check_renorm_clipping,
    check_virtual_batch_size,
    normalize_axes,
)
from batchnorm.layers import _constraints as constraints
from batchnorm.layers import _initializers as initializers
from batchnorm.layers import _regularizers as regularizers
from batchnorm.layers._dtype_policy import resolve_dtype_policy
from batchnorm.layers._fused import fused_unsupported_reason, resolve_fused_at_build
from batchnorm.layers._keras_weights import keras_parameter_shape, weights_from_arrays
from batchnorm.layers._layer_config import layer_config, layer_kwargs_from_config
from batchnorm.layers._presets import Framework, preset_kwargs

_NAME_COUNTER = itertools.count()
STATISTIC_NAMES = BatchNormStatistics._fields
MovingVarianceEstimator = Literal["auto", "biased", "unbiased"]
MovingAverage = Literal["ema", "debiased"]


class BatchNormalization(nn.Module):
    """Batch normalization with the full tf-keras argument set and numerics.

    In training (``training=True``, or ``training=None`` under ``module.train()``) each channel is
    normalised with the statistics of the current batch,

    .. math::
        y = \\gamma \\frac{x - E[x]}{\\sqrt{Var[x] + \\epsilon}} + \\beta,

    and the moving statistics are updated: ``moving = momentum * moving + (1 - momentum) * batch``
    (Keras' convention: momentum 0.99 here is PyTorch's momentum 0.01). In inference
    (``training=False`` or ``module.eval()``) the moving statistics are used and left unchanged.
    ``trainable=False`` freezes gamma/beta AND forces inference, as in tf-keras 2.

    Which variance is stored follows tf-keras by default (``moving_variance_estimator="auto"``):
    its fused path (rank 4/5 input, channel axis first or last, float32/16 compute, no renorm,
    ghost batches or adjustment; ``fused=None`` picks it when possible) stores the
    Bessel-corrected ``Var[x] * n / (n - 1)``, the non-fused path the biased ``Var[x]``.
    ``"biased"`` / ``"unbiased"`` choose one whatever the path (Keras 3 and Flax store the biased
    one, PyTorch and Caffe the unbiased one).

    ``moving_average="debiased"`` replaces the exponential average by Caffe's bias-corrected one,
    ``m <- m + (batch - m) / s`` with ``s <- momentum * s + 1`` kept in the buffer
    ``moving_average_weight`` (the first batch replaces the initial value; ``momentum=1.0`` is
    the plain average of all batches, PyTorch's ``momentum=None``).

    Args:
        num_features: channel count (int), or a tuple for several axes; builds the weights now.
            Without it the layer builds on its first input or on ``build(input_shape)``.
        axis: channel axis or axes (int or list, negative allowed). Default -1 (channels last);
            use ``axis=1`` for PyTorch's NCHW.
        momentum: moving-average momentum, Keras convention. Default 0.99.
        epsilon: added to the variance. Default 1e-3.
        center, scale: learn beta / gamma. Default True.
        beta_initializer, gamma_initializer, moving_mean_initializer, moving_variance_initializer:
            Keras names, Keras dicts or callables ``(shape, dtype=, device=) -> Tensor``.
        beta_regularizer, gamma_regularizer: penalties reported in :attr:`losses`.
        beta_constraint, gamma_constraint: applied by :meth:`apply_constraints`.
        renorm: Batch Renormalization; ``renorm_clipping`` (keys rmin, rmax, dmax) and
            ``renorm_momentum`` (default 0.99) configure it.
        fused: None (tf-keras' automatic choice), True (must be fusable) or False.
        trainable: False freezes gamma/beta and runs in inference mode.
        moving_variance_estimator: "auto" (tf-keras: unbiased on the fused path, biased
            otherwise), "biased" or "unbiased": the variance the moving average stores.
        moving_average: "ema" (Keras/PyTorch exponential average) or "debiased" (Caffe).
        use_global_stats: None (batch statistics in training, moving ones in inference), True
            (moving statistics always, never updated; gamma/beta still train: Caffe's TEST
            phase) or False (batch statistics always; moving ones still update in training:
            Keras 1 ``mode=2``, PyTorch ``track_running_stats=False``; Caffe's
            ``use_global_stats: false`` also updates in its TEST phase, here updates follow
            ``training``).
        virtual_batch_size: ghost-batch size; must divide the training batch.
        adjustment: ``f(input_shape) -> (a, b)`` applied in training: scale ``a * gamma``,
            offset ``b * gamma + beta``.
        dtype: parameter/compute policy (None = float32, "float64", "mixed_float16", ...).
        device: where to create the weights.
        name: layer name (default ``batch_normalization_<n>``).
        synchronized: training statistics over the global batch of a torch.distributed process
            group (tf-keras' argument; implies ``fused=False``). Without an initialised group,
            or with a group of one, the layer computes exactly as unsynchronized.
        process_group: the group to synchronize over; None is the default group (WORLD).

    Shape:
        Input: any rank; output: same shape and dtype. float16/bfloat16 inputs are computed with
        float32 statistics and parameters.

    Example:
        >>> layer = BatchNormalization(3, axis=1)  # NCHW, like torch.nn.BatchNorm2d(3)
        >>> y = layer(torch.randn(8, 3, 5, 5), training=True)
    """

    gamma: nn.Parameter
    beta: nn.Parameter
    moving_mean: torch.Tensor
    moving_variance: torch.Tensor
    moving_stddev: torch.Tensor
    renorm_mean: torch.Tensor
    renorm_stddev: torch.Tensor
    moving_average_weight: torch.Tensor

    def __init__(
        self,
        num_features: int | Sequence[int] | None = None,
        *,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.99,
        fused: bool | None = None,
        trainable: bool = True,
        virtual_batch_size: int | None = None,
        adjustment: Callable[[torch.Size], tuple[torch.Tensor, torch.Tensor]] | None = None,
        moving_variance_estimator: MovingVarianceEstimator = "auto",
        moving_average: MovingAverage = "ema",
        use_global_stats: bool | None = None,
        dtype: Any = None,
        device: Any = None,
        name: str | None = None,
        synchronized: bool = False,
        process_group: Any = None,
    ) -> None:
        super().__init__()
        self.synchronized, self.process_group = check_synchronized(
            synchronized, process_group, fused
        )
        self._layout_agreed = False  # set once the ranks agreed on the channel shape
        fused = False if self.synchronized else fused
        self.axis: list[int] | int = check_axis_type(axis) if not isinstance(axis, int) else axis
        self.momentum = check_fraction(momentum, "momentum")
        self.epsilon = check_positive(epsilon, "epsilon")
        self.center = check_bool(center, "center")
        self.scale = check_bool(scale, "scale")
        self.beta_initializer = initializers.get(beta_initializer, argument="beta_initializer")
        self.gamma_initializer = initializers.get(gamma_initializer, argument="gamma_initializer")
        self.moving_mean_initializer = initializers.get(
            moving_mean_initializer, argument="moving_mean_initializer"
        )
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer, argument="moving_variance_initializer"
        )
        self.beta_regularizer = regularizers.get(beta_regularizer, argument="beta_regularizer")
        self.gamma_regularizer = regularizers.get(gamma_regularizer, argument="gamma_regularizer")
        self.beta_constraint = constraints.get(beta_constraint, argument="beta_constraint")
        self.gamma_constraint = constraints.get(gamma_constraint, argument="gamma_constraint")
        self.renorm = check_bool(renorm, "renorm")
        self.renorm_clipping = check_renorm_clipping(renorm_clipping)
        self.renorm_momentum = check_fraction(renorm_momentum, "renorm_momentum")
        self.virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
        if adjustment is not None and not callable(adjustment):
            raise TypeError(
                "`adjustment` must be a callable (input_shape) -> (scale, offset) or None. "
                f"Received: adjustment={adjustment!r}"
            )
        if adjustment is not None and self.virtual_batch_size is not None:
            raise ValueError(
                "When using `virtual_batch_size`, `adjustment` cannot be specified. "
                f"Received: virtual_batch_size={self.virtual_batch_size}, adjustment={adjustment!r}"
            )
        if self.virtual_batch_size is not None and 0 in check_axis_type(axis):
            raise ValueError(
                "When using `virtual_batch_size`, the batch dimension must be 0 and thus axis "
                f"cannot include 0. Received: axis={axis!r}"
            )
        self.adjustment = adjustment
        self.moving_variance_estimator = _check_choice(
            moving_variance_estimator, "moving_variance_estimator", MovingVarianceEstimator
        )
        self.moving_average = _check_choice(moving_average, "moving_average", MovingAverage)
        self.use_global_stats = check_use_global_stats(use_global_stats)
        self.dtype_policy = resolve_dtype_policy(dtype)
        if fused not in (None, True, False):
            raise TypeError(f"`fused` must be None, True or False. Received: fused={fused!r}")
        reason = fused_unsupported_reason(
            axis=check_axis_type(axis),
            renorm=self.renorm,
            virtual_batch_size=self.virtual_batch_size,
            adjustment_given=adjustment is not None,
            compute_dtype=self.dtype_policy.compute_dtype,
        )
        if fused and reason is not None:
            raise ValueError(reason)
        self.fused: bool | None = False if (fused is None and reason is not None) else fused
        self._fused_argument = fused
        if name is not None and not isinstance(name, str):
            raise TypeError(f"`name` must be a string or None. Received: name={name!r}")
        self.name = name if name is not None else _default_name()
        self._device = device
        self._trainable = check_bool(trainable, "trainable")
        self._axes: tuple[int, ...] | None = None
        self._input_rank: int | None = None
        self.built = False
        if num_features is not None:
            channel_shape = _channel_shape_argument(num_features)
            if len(channel_shape) != len(check_axis_type(axis)):
                raise ValueError(
                    "`num_features` needs one size per channel axis. "
                    f"Received: num_features={num_features!r} for axis={axis!r}"
                )
            self._create_weights(channel_shape, keras_shape=None)

    # ------------------------------------------------------------------ building
    def build(self, input_shape: Sequence[int]) -> None:
        """Create the weights for inputs of ``input_shape`` (Keras' ``build``); idempotent."""
        input_shape = tuple(int(s) for s in input_shape)
        rank = len(input_shape)
        if self._input_rank is not None:
            return
        axes = normalize_axes(self.axis, rank)
        fused = resolve_fused_at_build(self.fused, axes, rank)
        channel_shape = tuple(input_shape[a] for a in axes)
        keras_shape = keras_parameter_shape(channel_shape, axes, rank, self.virtual_batch_size)
        if self.built:
            built_shape = tuple(self.moving_mean.shape)
            if built_shape != channel_shape:
                raise ValueError(
                    f"Input has {channel_shape} channels on axis {list(axes)}, but the layer was "
                    f"built for {built_shape}. Received: input_shape={input_shape}"
                )
        else:
            self._create_weights(channel_shape, keras_shape)
        self.fused, self._axes, self._input_rank = fused, axes, rank
        # Keras keeps the order the user gave, with negative axes made positive.
        self.axis = [a % rank for a in check_axis_type(self.axis)]

    def _create_weights(
        self, channel_shape: tuple[int, ...], keras_shape: tuple[int, ...] | None
    ) -> None:
        init_shape = keras_shape or channel_shape
        dtype, device = self.dtype_policy.parameter_dtype, self._device

        def initial(initializer: Callable[..., torch.Tensor]) -> torch.Tensor:
            value = torch.as_tensor(initializer(init_shape, dtype=dtype, device=device))
            return value.to(dtype=dtype, device=device).reshape(channel_shape).clone()

        if self.scale:
            self.gamma = nn.Parameter(
                initial(self.gamma_initializer), requires_grad=self._trainable
            )
        if self.center:
            self.beta = nn.Parameter(initial(self.beta_initializer), requires_grad=self._trainable)
        moving_variance = initial(self.moving_variance_initializer)
        self.register_buffer("moving_mean", initial(self.moving_mean_initializer))
        self.register_buffer("moving_variance", moving_variance)
        if self.renorm:
            self.register_buffer("moving_stddev", moving_variance.sqrt())
            self.register_buffer("renorm_mean", initial(self.moving_mean_initializer))
            self.register_buffer("renorm_stddev", moving_variance.sqrt())
        if self.moving_average == "debiased":
            # float64: with momentum=1 it counts batches, exactly up to 2**53.
            weight = torch.zeros((), dtype=torch.float64, device=device)
            self.register_buffer("moving_average_weight", weight)
        self.built = True

    def _load_from_state_dict(
        self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # A layer that has not seen an input yet takes its channel shape from the checkpoint.
        key = f"{prefix}moving_mean"
        if not self.built and key in state_dict:
            self._create_weights(tuple(state_dict[key].shape), keras_shape=None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ calling
    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = check_bool(value, "trainable")
        for parameter in self._affine_parameters():
            parameter.requires_grad_(self._trainable)

    def _affine_parameters(self) -> list[nn.Parameter]:
        return [
            getattr(self, n)
            for n in ("gamma", "beta")
            if isinstance(getattr(self, n, None), nn.Parameter)
        ]

    def _resolve_training(self, training: Any) -> bool | torch.Tensor:
        if not self._trainable:
            return False
        if training is None:
            return bool(self.training)
        if isinstance(training, torch.Tensor):
            if training.ndim != 0 or training.dtype != torch.bool:
                raise ValueError(
                    "`training` must be a Python bool or a 0-d bool tensor. "
                    f"Received: training with shape {tuple(training.shape)} and dtype "
                    f"{training.dtype}"
                )
            return training
        if isinstance(training, (bool, np.bool_)):
            return bool(training)
        raise TypeError(
            f"`training` must be None, a bool or a 0-d bool tensor. Received: training={training!r}"
        )

    def statistics(self) -> BatchNormStatistics:
        """The current buffers as a :class:`~batchnorm.functional.BatchNormStatistics`."""
        buffers = self._buffers
        present = tuple(buffers.get(n) for n in STATISTIC_NAMES)
        cached = self.__dict__.get("_statistics")
        # Identity, not tensor equality; the cached tensors stay alive, so ids are not reused.
        if cached is not None and all(a is b for a, b in zip(cached, present, strict=True)):
            return cached  # type: ignore[no-any-return]
        statistics = BatchNormStatistics(*present)  # type: ignore[arg-type]
        self.__dict__["_statistics"] = statistics
        return statistics

    def _check_input(self, x: torch.Tensor) -> None:
        # The checks below depend only on x's shape and dtype and on what build fixed: a built
        # layer remembers the last signature it accepted (they cost microseconds per call).
        accepted = self.__dict__.get("_accepted_input")
        moving_mean = self._buffers.get("moving_mean")
        if (
            accepted is not None
            and accepted[0] is moving_mean
            and accepted[1] == x.shape
            and accepted[2] == x.dtype
        ):
            return
        self._check_new_input(x)
        if self._input_rank is not None:
            self.__dict__["_accepted_input"] = (moving_mean, x.shape, x.dtype)

    def _check_new_input(self, x: torch.Tensor) -> None:
        check_floating_input(x, "x")
        if self._input_rank is not None and x.ndim != self._input_rank:
            raise ValueError(
                f"Layer {self.name} expects inputs of rank {self._input_rank}. "
                f"Received: x.shape={tuple(x.shape)}"
            )
        axes = self._axes if self._input_rank is not None else normalize_axes(self.axis, x.ndim)
        assert axes is not None
        channel_shape = tuple(x.shape[a] for a in axes)
        if self.built and channel_shape != tuple(self.moving_mean.shape):
            raise ValueError(
                f"Layer {self.name} was built for {tuple(self.moving_mean.shape)} channels on "
                f"axis {self.axis}, but the input has {channel_shape}. "
                f"Received: x.shape={tuple(x.shape)}"
            )

    def forward(
        self,
        x: torch.Tensor,
        training: bool | torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalise ``x``; in training, also update the moving statistics.

        Args:
            x: input tensor.
            training: None follows ``module.training``; a bool or 0-d bool tensor overrides it.
            mask: optional weights with the shape of ``x`` without its last axis, broadcast
                along it (tf-keras / Keras 3), or without its channel axes; masked positions do
                not count in the batch statistics.
        """
        compiling = torch.compiler.is_compiling()  # traced: no shortcut, nothing remembered
        direct_calls: DirectCalls | None = None if compiling else self.__dict__.get("_direct_calls")
        if (
            direct_calls is not None
            and mask is None
            and (training is None or type(training) is bool)
        ):
            y = direct_calls(x, training)
            if y is not None:
                return y
        self._check_input(x)
        if self._input_rank is None:
            self.build(x.shape)
        if not compiling and (direct_calls is None or not direct_calls.current()):
            self.__dict__["_direct_calls"] = self._make_direct_calls()
        resolved = self._resolve_training(training)
        if mask is not None and self.fused:
            warnings.warn(
                "Masking is not supported with `fused=True` (as in tf-keras): `mask` is ignored "
                "for the normalization. Pass fused=False to use it.",
                UserWarning,
                stacklevel=2,
            )
            mask = None
        buffers = statistics = self.statistics()
        if isinstance(resolved, torch.Tensor):
            # Both branches run; the inference one saves the moving statistics for its backward,
            # so it must not see the buffers that the update below overwrites in place.
            statistics = BatchNormStatistics(
                *(None if t is None else t.clone() for t in buffers)  # type: ignore[arg-type]
            )
        options = self._step_options()
        assert self._axes is not None
        gamma, beta = getattr(self, "gamma", None), getattr(self, "beta", None)
        direct = None
        if resolved is False and self.use_global_stats is not False:
            direct = infer(x, buffers, gamma, beta, self._axes, self.epsilon, mask)
        elif resolved is True:
            direct = train_in_place(x, buffers, gamma, beta, self._axes, options, mask)
        if direct is not None:
            return direct
        y, updated = batch_norm_step(
            x,
            statistics,
            gamma,
            beta,
            self._axes,
            options,
            resolved,
            mask,
        )
        if self.synchronized and not self._layout_agreed and self.use_global_stats is not True:
            self._layout_agreed = resolved is not False and synchronizes(self.process_group)
        if resolved is not False:
            with torch.no_grad():
                for old, new in zip(buffers, updated, strict=True):
                    if old is not None and new is not None and new is not old:
                        old.copy_(new)
        return y

    def _make_direct_calls(self) -> DirectCalls | None:
        """The shortcut for this layer's repeated plain calls (None where none applies)."""
        assert self._axes is not None and self._input_rank is not None
        tensors = (
            self._parameters.get("gamma"),
            self._parameters.get("beta"),
            self._buffers.get("moving_mean"),
            self._buffers.get("moving_variance"),
        )
        if len(self._axes) != 1 or not DirectCalls.applicable(self.moving_mean.dtype, tensors):
            return None
        return DirectCalls(
            self._parameters,
            self._buffers,
            self._axes[0],
            self._input_rank,
            self._step_options(),
            training=self.training,
            trainable=self._trainable,
            renorm=self.renorm,
        )

    def __setattr__(self, name: str, value: Any) -> None:
        # Any setting may change what a call does: the shortcut is rebuilt on the next call.
        self.__dict__.pop("_direct_calls", None)
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call]
        state.pop("_direct_calls", None)  # NumPy views of this layer's memory: rebuilt on use
        return state

    def _step_options(self) -> BatchNormOptions:
        """The settings of the functional step, rebuilt only when an attribute changed."""
        settings = (
            self.momentum,
            self.epsilon,
            self._stores_unbiased_variance(),
            self.renorm_clipping,
            self.renorm_momentum,
            self.virtual_batch_size,
            self.adjustment,
            self.use_global_stats,
            self.synchronized,
            self.process_group,
            self._layout_agreed and self.virtual_batch_size is None,
        )
        cached = self.__dict__.get("_options")
        if cached is not None and cached[0] == settings:
            return cached[1]  # type: ignore[no-any-return]
        options = BatchNormOptions(*settings)
        self.__dict__["_options"] = (settings, options)
        return options

    def _stores_unbiased_variance(self) -> bool:
        if self.moving_variance_estimator == "auto":
            return bool(self.fused)
        return bool(self.moving_variance_estimator == "unbiased")

    # ------------------------------------------------------------------ Keras API
    @property
    def losses(self) -> list[torch.Tensor]:
        """Current regularization penalties (differentiable), gamma's first, as tf-keras lists them."""
        penalties = []
        for name in ("gamma", "beta"):
            regularizer = getattr(self, f"{name}_regularizer")
            weight = getattr(self, name, None)
            if regularizer is not None and weight is not None:
                penalties.append(regularizer(weight.reshape(self._keras_shape())))
        return penalties

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Project gamma/beta with their constraints (run after each optimizer step)."""
        for name in ("gamma", "beta"):
            constraint = getattr(self, f"{name}_constraint")
            weight = getattr(self, name, None)
            if constraint is not None and weight is not None:
                constrained = constraint(weight.reshape(self._keras_shape()))
                weight.copy_(constrained.reshape(weight.shape))

    def _keras_shape(self) -> tuple[int, ...]:
        channel_shape = tuple(self.moving_mean.shape)
        if self._axes is None or self._input_rank is None:
            return channel_shape
        return keras_parameter_shape(
            channel_shape, self._axes, self._input_rank, self.virtual_batch_size
        )

    def _weight_names(self) -> list[str]:
        names = [n for n in ("gamma", "beta") if getattr(self, n, None) is not None]
        names += ["moving_mean", "moving_variance"]
        if self.renorm:
            names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
        return names

    def get_weights(self) -> list[np.ndarray]:
        """NumPy copies in tf-keras order and shapes: gamma, beta, moving_mean, moving_variance[, renorm]."""
        self._require_built("get_weights")
        shape = self._keras_shape()
        return [
            getattr(self, n).detach().cpu().numpy().reshape(shape).copy()
            for n in self._weight_names()
        ]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Load arrays in tf-keras order; each may have the Keras shape, the per-channel shape or be flat."""
        self._require_built("set_weights")
        names = self._weight_names()
        tensors = weights_from_arrays(weights, names, tuple(self.moving_mean.shape))
        with torch.no_grad():
            for name, value in zip(names, tensors, strict=True):
                target = getattr(self, name)
                target.copy_(value.to(dtype=target.dtype, device=target.device))

    def _require_built(self, method: str) -> None:
        if not self.built:
            raise ValueError(
                f"Layer {self.name} has no weights yet: pass `num_features`, call `build(input_shape)` "
                f"or call the layer on an input before `{method}`."
            )

    def get_config(self) -> dict[str, Any]:
        """A JSON-serialisable dict with tf-keras' keys (plus num_features / fused when set)."""
        return layer_config(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BatchNormalization:
        """Rebuild a layer from :meth:`get_config` or from a tf-keras / Keras 3 layer config."""
        return cls(**layer_kwargs_from_config(config))

    @classmethod
    def like(
        cls,
        framework: Framework,
        num_features: int | Sequence[int] | None = None,
        **overrides: Any,
    ) -> BatchNormalization:
        """A layer that reproduces ``framework``'s batch norm: "keras" (tf-keras 2), "keras3",
        "torch", "caffe" or "flax".

        The preset sets axis, momentum (converted to this layer's Keras convention: PyTorch's 0.1
        is 0.9 here), epsilon, the moving-variance estimator, the moving-average kind, gamma/beta
        and global-stats behaviour; ``overrides`` are this layer's own arguments and win.

        Example:
            >>> bn = BatchNormalization.like("torch", 64)  # as torch.nn.BatchNorm2d(64)
        """
        return cls(num_features, **preset_kwargs(framework, overrides))

    def extra_repr(self) -> str:
        shape = tuple(self.moving_mean.shape) if self.built else None
        return (
            f"num_features={shape}, axis={self.axis}, momentum={self.momentum}, "
            f"epsilon={self.epsilon}, center={self.center}, scale={self.scale}, "
            f"renorm={self.renorm}, fused={self.fused}, trainable={self._trainable}"
            + "".join(f", {k}={v!r}" for k, v in self._convention_options().items())
        )

    def _convention_options(self) -> dict[str, Any]:
        """The framework-convention options that differ from tf-keras' defaults."""
        options = {
            "moving_variance_estimator": self.moving_variance_estimator,
            "moving_average": self.moving_average,
            "use_global_stats": self.use_global_stats,
        }
        defaults = {"moving_variance_estimator": "auto", "moving_average": "ema"}
        return {k: v for k, v in options.items() if v != defaults.get(k)}


def _default_name() -> str:
    index = next(_NAME_COUNTER)
    return "batch_normalization" if index == 0 else f"batch_normalization_{index}"


def _channel_shape_argument(num_features: Any) -> tuple[int, ...]:
    values = [num_features] if isinstance(num_features, numbers.Integral) else num_features
    valid = (
        not isinstance(num_features, bool)
        and isinstance(values, Sequence)
        and len(values) > 0
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)
    )
    if not valid or min(int(v) for v in values) <= 0:
        raise ValueError(
            "`num_features` must be a positive int or a tuple of positive ints. "
            f"Received: num_features={num_features!r}"
        )
    return tuple(int(v) for v in values)


def _check_choice(value: Any, argument: str, choices: Any) -> Any:
    allowed = get_args(choices)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(
            f"`{argument}` must be one of {', '.join(repr(c) for c in allowed)}. "
            f"Received: {argument}={value!r}"
        )
    return value
