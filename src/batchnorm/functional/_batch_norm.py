"""The stateless batch-norm step: output and new statistics, nothing mutated."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.autograd import forward_ad

from batchnorm.functional._activation import (
    Activation,
    ActivationName,
    activate,
    activation_keyword,
    check_activation,
)
from batchnorm.functional._backend import BatchNormBackend, Moments
from batchnorm.functional._dispatch import backend_for, composed_backend
from batchnorm.functional._in_place import (
    InPlaceNormalizeActivate,
    check_in_place,
    check_in_place_settings,
    grouped_in_place,
)
from batchnorm.functional._moving_average import (
    debiased_average_update,
    debiased_weight_update,
    moving_average_update,
)
from batchnorm.functional._renorm import compose_transforms, renorm_correction
from batchnorm.functional._synchronized import (
    check_synchronized,
    resolve_process_group,
    synchronized_moments,
)
from batchnorm.functional._synchronized_normalize import synchronized_normalize
from batchnorm.functional._torch_ops import TorchOpsBackend
from batchnorm.functional._validation import (
    check_adjustment,
    check_bool,
    check_floating_input,
    check_fraction,
    check_mask_values,
    check_positive,
    check_renorm_clipping,
    check_same_device,
    check_tensor_shape,
    check_virtual_batch_size,
    normalize_axes,
    training_flag,
)

VarianceEstimator = Literal["biased", "unbiased"]
Memory = Literal["default", "in_place"]
Adjustment = Callable[[torch.Size], tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class BatchNormStatistics:
    """The state of a batch-norm layer, per channel (shape = the input's sizes on the channel axes).

    ``moving_stddev``, ``renorm_mean`` and ``renorm_stddev`` are present with Batch
    Renormalization only; their presence switches it on in :func:`batch_norm`.
    ``moving_average_weight`` (a 0-d tensor, Caffe's scale factor ``s``) is present with the
    debiased moving average only, and switches it on: the moving statistics then step as
    ``m <- m + (batch - m) / s'`` with ``s' = momentum * s + 1``. It is a pytree whose leaves
    are the tensors present, so ``torch.func.vmap`` and ``torch.compile`` take it.
    """

    moving_mean: torch.Tensor
    moving_variance: torch.Tensor
    moving_stddev: torch.Tensor | None = None
    renorm_mean: torch.Tensor | None = None
    renorm_stddev: torch.Tensor | None = None
    moving_average_weight: torch.Tensor | None = None

    _fields = (
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
        "moving_average_weight",
    )

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        return iter([getattr(self, name) for name in self._fields])

    @property
    def renorm(self) -> bool:
        return self.renorm_mean is not None

    @property
    def debiased(self) -> bool:
        return self.moving_average_weight is not None


def _flatten_statistics(
    statistics: BatchNormStatistics,
) -> tuple[list[torch.Tensor], tuple[str, ...]]:
    present = tuple(n for n in BatchNormStatistics._fields if getattr(statistics, n) is not None)
    return [getattr(statistics, n) for n in present], present


def _unflatten_statistics(values: Any, present: tuple[str, ...]) -> BatchNormStatistics:
    return BatchNormStatistics(**dict(zip(present, values, strict=True)))


pytree.register_pytree_node(
    BatchNormStatistics,
    _flatten_statistics,
    _unflatten_statistics,
    serialized_type_name="batchnorm.functional.BatchNormStatistics",
)


def check_mask(mask: torch.Tensor, x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """The mask as weights broadcastable against ``x``.

    tf-keras and Keras 3 take a mask with the shape of ``x`` without its LAST axis and broadcast
    it along that axis, whatever the channel axis is; with ``axis=-1`` that is the shape of ``x``
    without its channel axis. For other channel axes a mask of the shape of ``x`` without the
    channel axes (one weight per position, shared by the channels) is accepted too; when both
    readings have the same shape, Keras' is taken. The mask must be on ``x``'s device.
    """
    check_mask_values(mask, x)
    keras_shape = tuple(x.shape[:-1])
    if tuple(mask.shape) == keras_shape:
        return mask.unsqueeze(-1)
    per_position = tuple(size for i, size in enumerate(x.shape) if i not in axes)
    if tuple(mask.shape) != per_position:
        if _broadcasts_to(tuple(mask.shape), keras_shape):
            # tf-keras: "broadcastable to inputs" after its expand_dims(mask, -1), as a
            # per-sequence (N, 1) mask of (N, L, C) data.
            return mask.expand(keras_shape).unsqueeze(-1)
        expected = (
            f"without its channel axis, {per_position}"
            if keras_shape == per_position
            else f"without its last axis, {keras_shape} (as Keras), or without its channel "
            f"axes, {per_position}"
        )
        raise ValueError(
            f"`mask` must have the shape of `x` {expected}, or one that broadcasts to "
            f"{keras_shape}. Received: mask.shape={tuple(mask.shape)} for "
            f"x.shape={tuple(x.shape)}"
        )
    weights = mask
    for a in axes:
        weights = weights.unsqueeze(a)
    return weights


def batch_norm(
    x: torch.Tensor,
    statistics: BatchNormStatistics,
    gamma: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    *,
    axis: Any = -1,
    training: bool | torch.Tensor = False,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    moving_variance_estimator: VarianceEstimator = "biased",
    renorm_clipping: dict[str, float] | None = None,
    renorm_momentum: float = 0.99,
    virtual_batch_size: int | None = None,
    adjustment: Adjustment | None = None,
    mask: torch.Tensor | None = None,
    use_global_stats: bool | None = None,
    synchronized: bool = False,
    process_group: Any = None,
    activation: ActivationName | None = None,
    activation_param: float | None = None,
    memory: Memory = "default",
) -> tuple[torch.Tensor, BatchNormStatistics]:
    """One batch-norm call without side effects: returns ``(y, new_statistics)``.

    Training (per channel, over every axis but ``axis``):

    .. math::
        \\mu_B = E[x], \\quad \\sigma_B^2 = E[(x - \\mu_B)^2], \\quad
        y = \\gamma \\frac{x - \\mu_B}{\\sqrt{\\sigma_B^2 + \\epsilon}} + \\beta

    and the moving statistics step ``m <- momentum * m + (1 - momentum) * batch`` (Keras'
    convention; PyTorch's momentum is ``1 - momentum``). ``moving_variance_estimator="biased"``
    stores ``sigma_B^2`` (tf-keras' non-fused path), ``"unbiased"`` stores
    ``sigma_B^2 * n / (n - 1)`` (its fused path, and PyTorch); normalisation always uses the biased
    one. Inference uses the moving statistics and returns them unchanged. When ``statistics``
    carries ``moving_average_weight`` the moving statistics follow Caffe's debiased average
    instead (see :class:`BatchNormStatistics`).

    ``use_global_stats`` decouples the statistics used from ``training``: None uses batch
    statistics in training and moving ones in inference; True always normalises with the moving
    statistics and never updates them (Caffe's TEST phase; gamma/beta still get gradients);
    False always normalises with batch statistics (the outputs of Keras 1 ``mode=2`` and PyTorch
    ``track_running_stats=False``, neither of which updates moving statistics) and updates the
    moving ones in training only.

    Options, with tf-keras semantics: Batch Renormalization when ``statistics`` carries the renorm
    buffers (``renorm_clipping`` keys rmin/rmax/dmax, ``renorm_momentum``); ``virtual_batch_size``
    (ghost batches ``{j, j + B/v, ...}``, one moving update with the mean of the ghost statistics);
    ``adjustment(x.shape) -> (a, b)`` making the training scale ``a * gamma`` and offset
    ``b * gamma + beta``; ``mask`` (shape of ``x`` without the channel axes) for weighted moments.
    An empty batch updates nothing. ``synchronized=True`` computes the training statistics over
    the global batch of ``process_group`` (default: torch.distributed's WORLD; no communication
    without an initialised group); see :mod:`batchnorm.functional._synchronized`.

    Args:
        x: input, any floating dtype; float16/bfloat16 are computed in float32.
        statistics: per-channel state (:class:`BatchNormStatistics`).
        gamma, beta: per-channel scale and offset, or None.
        training: Python bool, or a 0-d bool tensor: eager calls read one on the CPU as a
            bool; traced calls and other devices compute both branches and select one, so the
            call traces without a graph break.
        use_global_stats: None, True or False, as above.
        activation, activation_param: ``y = f(batch norm)`` with ``f`` one of "identity",
            "relu", "leaky_relu" (param: negative slope, default 0.01), "elu" (param: alpha,
            default 1.0); see :mod:`batchnorm.functional._activation`.
        memory: "default", or "in_place": a training call writes ``y`` over ``x`` and its
            backward recovers what it needs from ``y`` alone (one tensor of x's size kept for
            the backward instead of two; see :mod:`batchnorm.functional._in_place`). Needs a
            Python bool ``training``, an invertible activation (identity, leaky_relu with a
            slope > 0, elu; none means identity), nonzero gamma, an ``x`` that is neither a
            leaf requiring grad nor saved by the operation that produced it, and no
            synchronization. On the CPU the kernels write into x and run the backward from
            the output (:mod:`batchnorm.functional._cpu_in_place`); no double backward.
            Under ``torch.func`` transforms (``grad``, ``vmap``, ...) it computes out of
            place, as "default" does.

    Returns:
        ``y`` in ``x.dtype`` (a float32 x with float64 statistics: float64, as torch promotes)
        and the new statistics (detached).

    Shape:
        ``x``: any rank >= 1; statistics, gamma, beta: ``tuple(x.shape[a] for a in axes)``.

    Example:
        >>> x = torch.randn(16, 4)
        >>> state = BatchNormStatistics(torch.zeros(4), torch.ones(4))
        >>> y, state = batch_norm(x, state, training=True)
    """
    check_floating_input(x)
    if not isinstance(statistics, BatchNormStatistics):
        raise TypeError(
            "`statistics` must be a batchnorm.functional.BatchNormStatistics "
            "(BatchNormStatistics(moving_mean, moving_variance)). "
            f"Received: statistics of type {type(statistics).__name__}"
        )
    renorm_fields = ("moving_stddev", "renorm_mean", "renorm_stddev")
    present = [name for name in renorm_fields if getattr(statistics, name) is not None]
    if 0 < len(present) < len(renorm_fields):
        # renorm_mean alone switches renorm on: a partial set failed an assert, or (without
        # renorm_mean) turned renorm off and dropped moving_stddev from the returned state.
        absent = [name for name in renorm_fields if name not in present]
        raise ValueError(
            "`statistics` must carry all of moving_stddev, renorm_mean and renorm_stddev "
            "(Batch Renormalization) or none of them. Received: statistics with "
            f"{', '.join(present)} but {', '.join(absent)}=None"
        )
    if not isinstance(training, (bool, np.bool_, torch.Tensor)):
        raise TypeError(
            f"`training` must be a bool or a 0-d bool tensor. Received: training={training!r}"
        )
    training = training if isinstance(training, torch.Tensor) else bool(training)
    if moving_variance_estimator not in ("biased", "unbiased"):
        raise ValueError(
            "`moving_variance_estimator` must be 'biased' or 'unbiased'. "
            f"Received: moving_variance_estimator={moving_variance_estimator!r}"
        )
    check_adjustment(adjustment, virtual_batch_size, axis)
    # a group without synchronized=True is refused (the group itself is checked where it is used)
    check_synchronized(synchronized, None if synchronized is True else process_group, None)
    options = BatchNormOptions(
        momentum=check_fraction(momentum, "momentum"),
        epsilon=check_positive(epsilon, "epsilon"),
        unbiased_moving_variance=moving_variance_estimator == "unbiased",
        renorm_clipping=check_renorm_clipping(renorm_clipping),
        renorm_momentum=check_fraction(renorm_momentum, "renorm_momentum"),
        virtual_batch_size=check_virtual_batch_size(virtual_batch_size),
        adjustment=adjustment,
        use_global_stats=check_use_global_stats(use_global_stats),
        synchronized=check_bool(synchronized, "synchronized"),
        process_group=process_group,
        activation=check_activation(activation, activation_param),
        in_place=check_memory(memory) == "in_place",
    )
    return batch_norm_step(
        x, statistics, gamma, beta, normalize_axes(axis, x.ndim), options, training, mask
    )


@dataclasses.dataclass(frozen=True)
class BatchNormOptions:
    """The validated, per-layer settings of :func:`batch_norm_step` (see :func:`batch_norm`)."""

    momentum: float = 0.99
    epsilon: float = 1e-3
    unbiased_moving_variance: bool = False
    renorm_clipping: dict[str, float] = dataclasses.field(default_factory=dict)
    renorm_momentum: float = 0.99
    virtual_batch_size: int | None = None
    adjustment: Adjustment | None = None
    use_global_stats: bool | None = None
    synchronized: bool = False
    process_group: Any = None
    activation: Activation | None = None
    in_place: bool = False


def check_memory(value: Any) -> str:
    if value not in ("default", "in_place"):
        raise ValueError(f"`memory` must be 'default' or 'in_place'. Received: memory={value!r}")
    return str(value)


def check_use_global_stats(value: Any) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            f"`use_global_stats` must be None, True or False. Received: use_global_stats={value!r}"
        )
    return value


# What batch_norm_step checks is on x's device, named as the caller passed them.
_DEVICE_CHECKED = (*(f"statistics.{n}" for n in BatchNormStatistics._fields), "gamma", "beta")


def batch_norm_step(
    x: torch.Tensor,
    statistics: BatchNormStatistics,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    axes: tuple[int, ...],
    options: BatchNormOptions,
    training: bool | torch.Tensor,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, BatchNormStatistics]:
    """:func:`batch_norm` with settings already validated and ``axes`` sorted and non-negative.

    Only what depends on this call is checked here: the shapes of ``x``, the statistics, gamma,
    beta and mask, ``training``, and that ghost batches divide the batch.
    """
    x_given = x
    channel_shape = tuple(x.shape[a] for a in axes)
    for name, tensor in zip(BatchNormStatistics._fields, statistics, strict=True):
        expected = () if name == "moving_average_weight" else channel_shape
        if tensor is None and name in ("moving_mean", "moving_variance"):
            raise TypeError(
                f"`statistics.{name}` must be a floating-point torch.Tensor. Received: None"
            )
        check_tensor_shape(tensor, expected, f"statistics.{name}")
    check_tensor_shape(gamma, channel_shape, "gamma")
    check_tensor_shape(beta, channel_shape, "beta")
    check_same_device(x, _DEVICE_CHECKED, (*statistics, gamma, beta))
    training = training_flag(training)
    weights = None if mask is None else check_mask(mask, x, axes)
    # Which statistics normalise (training) and whether the moving ones step (update).
    update: bool | torch.Tensor = training
    if options.use_global_stats is not None:
        training = not options.use_global_stats
        update = False if options.use_global_stats else update
    virtual_batch_size, epsilon = options.virtual_batch_size, options.epsilon
    if training is not False:
        check_ghost_batches(x, axes, virtual_batch_size)

    compute_dtype = torch.promote_types(
        x.dtype, torch.promote_types(statistics.moving_mean.dtype, torch.float32)
    )

    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else _as_dtype(tensor, compute_dtype)

    if x.dtype in (torch.float32, torch.float64) and x.dtype != compute_dtype:
        # A float32 input to a float64 layer is computed in float64; half precision inputs are
        # upcast inside each backend, which may read them in their own type.
        x = x.to(compute_dtype)
    backend = backend_for(x)
    if weights is not None and weights.requires_grad and torch.is_grad_enabled():
        # A mask that requires grad: the composed ops differentiate the weighted moments, as
        # tf-keras' weighted_moments does (the kernels read the weights as constants).
        backend = composed_backend()
    elif weights is not None and any(weights.shape[a] != 1 for a in axes):
        # Keras' mask on a channel axis that is not last weighs (sample, channel) positions:
        # weights that vary inside a channel only fit the composed-op path.
        backend = composed_backend()
    elif weights is not None:
        # One weight per position (a Keras mask over size-1 channel axes broadcasts too).
        weights = weights.expand([1 if i in axes else size for i, size in enumerate(x.shape)])
    output_dtype = x.dtype
    if x.dtype in (torch.float16, torch.bfloat16) and not backend.reads_half_precision:
        # Converted once here rather than in each of the backend's passes.
        x = x.to(compute_dtype)

    # Each backend applies the activation itself (the CPU kernels in their normalising pass).
    with_activation = activation_keyword(options.activation)

    def inference_output() -> torch.Tensor:
        return backend.normalize(
            x,
            axes,
            # float32 statistics with a float64 x: in float64
            _as_dtype(statistics.moving_mean, compute_dtype),
            _as_dtype(statistics.moving_variance, compute_dtype),
            cast(gamma),
            cast(beta),
            epsilon,
            **with_activation,
        )

    if training is False:
        return _as_dtype(inference_output(), output_dtype), statistics

    scale, offset = cast(gamma), cast(beta)
    # Set where the adjustment varies inside a channel: every per-channel term is then viewed
    # against x, and the composed scale and offset are full-rank (broadcast against x).
    inside_channels: list[int] | None = None
    # The adjustment and renorm's correction belong to training calls: an inference call with
    # use_global_stats=False normalises with the batch statistics alone (r = 1, d = 0).
    if options.adjustment is not None and update is not False:
        adjust_scale, adjust_offset = _adjustment_of(options.adjustment, x)
        adjust_scale = _in_training(update, adjust_scale, 1.0)
        adjust_offset = _in_training(update, adjust_offset, 0.0)
        channel_scale = _per_channel(adjust_scale, x, axes)
        channel_offset = _per_channel(adjust_offset, x, axes)
        if channel_scale is not None and channel_offset is not None:
            adjust_scale, adjust_offset = channel_scale, channel_offset
        else:
            # An adjustment that varies inside a channel only fits the composed-op path, with
            # scale and offset broadcast against x instead of per channel.
            backend = composed_backend()
            inside_channels = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
            scale = None if scale is None else scale.reshape(inside_channels)
            offset = None if offset is None else offset.reshape(inside_channels)
        scale, offset = compose_transforms(
            adjust_scale.to(compute_dtype), adjust_offset.to(compute_dtype), scale, offset
        )
        if inside_channels is not None:
            scale, offset = (_full_rank(t, x.ndim) for t in (scale, offset))

    # Under torch.func transforms and torch.compile the output is computed out of place, as with
    # memory="default": the autograd.Function that overwrites x cannot run under the transforms
    # (they need functions written with setup_context), nor can the checks read a wrapper's
    # memory; and a compiled graph took the write under no_grad for an identity, so every
    # gradient through the layer was wrong (gamma and beta got none). Inside
    # ``forward_ad.dual_level()`` and ``torch.jit.trace`` too: that autograd.Function has no
    # jvp (it raised there), and a trace recorded it as a Python op that the traced module could
    # neither run nor save.
    in_place = (
        options.in_place
        and not torch._C._are_functorch_transforms_active()
        and not torch.compiler.is_compiling()
        and forward_ad._current_level < 0
        and torch._C._get_tracing_state() is None
    )
    if (
        x.dtype in (torch.float16, torch.bfloat16)
        and isinstance(backend, TorchOpsBackend)
        and x.requires_grad
        and torch.is_grad_enabled()
        and not in_place  # its backward rounds dx once; a float32 copy doubled its memory
    ):
        # The composed ops upcast in each pass (moments, normalisation): under autograd each
        # cast rounded its share of dx to half precision before the shares were added (masked
        # bfloat16 dx 4e-2 off, float16 0.11 on a case tf-keras gets to 8e-5). One cast here,
        # whose backward rounds the sum once.
        x = x.to(compute_dtype)
    ghost_batches = 1 if virtual_batch_size is None else x.shape[0] // virtual_batch_size
    # Only a training call synchronizes (with use_global_stats=False, inference normalises with
    # the local batch, as torch.nn.SyncBatchNorm in eval mode): inference never communicates.
    synchronizing = options.synchronized and update is not False
    group = resolve_process_group(options.process_group) if synchronizing else None
    empty = math.prod(x.shape) == 0
    y_train: torch.Tensor | None = None
    train_batch, expresses = (getattr(backend, name, None) for name in ("train_batch", "expresses"))
    if in_place:
        # A converted copy of x (another dtype) is overwritten instead of x itself.
        _check_in_place_call(x_given, axes, scale, options, training)
    if in_place and not empty:
        moments = backend.batch_moments(x.detach(), axes, weights, ghost_batches)
    elif group is not None:
        moments, any_elements = synchronized_moments(
            x, axes, weights, ghost_batches, backend, group
        )
        ghost_batches, empty = moments.mean.shape[0], not any_elements
    elif (
        train_batch is not None
        and expresses is not None
        and weights is None
        and ghost_batches == 1
        and not statistics.renorm
        and expresses(x, axes, (scale, offset), training=True)
    ):
        # One native call gives the output and the batch moments.
        y_train, moments = train_batch(x, axes, scale, offset, epsilon, **with_activation)
    else:
        moments = backend.batch_moments(x, axes, weights, ghost_batches)
    # Ghost batches update the moving statistics once, with the mean of their statistics.
    batch_mean = _as_dtype(_mean_over_ghost_batches(moments.mean.detach()), compute_dtype)
    batch_variance = _as_dtype(_mean_over_ghost_batches(moments.variance.detach()), compute_dtype)
    count = _mean_over_ghost_batches(_as_dtype(moments.total_weight.detach(), compute_dtype))
    new_statistics = _updated_statistics(statistics, batch_mean, batch_variance, count, options)
    if weights is not None:
        new_statistics = _keep_unseen_channels(count > 0, new_statistics, statistics)
    if (
        statistics.renorm_mean is not None
        and statistics.renorm_stddev is not None
        and update is not False
    ):
        correction = renorm_correction(
            batch_mean,
            batch_variance,
            statistics.renorm_mean,
            statistics.renorm_stddev,
            epsilon,
            options.renorm_clipping,
        )
        r, d = _in_training(update, correction.r, 1.0), _in_training(update, correction.d, 0.0)
        if inside_channels is not None:
            r, d = r.reshape(inside_channels), d.reshape(inside_channels)
        scale, offset = compose_transforms(r, d, scale, offset)
    if in_place and not empty:
        y_train = _normalize_in_place(
            backend,
            x,
            axes,
            moments,
            scale,
            offset,
            epsilon,
            weights,
            ghost_batches,
            options.activation,
        )
    elif group is not None:
        y_train = synchronized_normalize(
            x, axes, moments, scale, offset, epsilon, weights, ghost_batches, backend, group
        )
        y_train = activate(y_train, options.activation)
    elif y_train is None:
        y_train = backend.normalize_batch(
            x, axes, moments, scale, offset, epsilon, weights, ghost_batches, **with_activation
        )
    if empty or update is False:
        new_statistics = statistics
    elif update is not True and update is not training:
        new_statistics = _select_statistics(update, new_statistics, statistics)
    if training is True:
        return _as_dtype(y_train, output_dtype), new_statistics
    y, selected = _select_branch(training, y_train, inference_output(), new_statistics, statistics)
    return _as_dtype(y, output_dtype), selected


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``target`` without enlarging it."""
    try:
        return bool(torch.broadcast_shapes(shape, target) == target)  # type: ignore[no-untyped-call]
    except RuntimeError:
        return False


def _in_training(update: bool | torch.Tensor, value: torch.Tensor, neutral: float) -> torch.Tensor:
    """``value`` in a training call, ``neutral`` in an inference one: a tensor ``update`` flag
    (use_global_stats=False under a tensor ``training``) selects without a branch."""
    if not isinstance(update, torch.Tensor):  # True: callers skip the terms when it is False
        return value
    return torch.where(update, value, torch.full_like(value, neutral))


def _adjustment_of(adjustment: Adjustment, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``adjustment(x.shape)`` as two tensors that broadcast against x, or a clear error."""
    result = adjustment(x.shape)
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise ValueError(
            "`adjustment` must return a pair (scale, offset). "
            f"Received: {type(result).__name__} for x.shape={tuple(x.shape)}"
        )
    pair = tuple(torch.as_tensor(t) for t in result)
    for name, tensor in zip(("scale", "offset"), pair, strict=True):
        if not _broadcasts_to(tuple(tensor.shape), tuple(x.shape)):
            raise ValueError(
                f"`adjustment` must return a {name} that broadcasts against x of shape "
                f"{tuple(x.shape)} without enlarging it. Received: {name} of shape "
                f"{tuple(tensor.shape)}"
            )
    return pair  # type: ignore[return-value]


def _check_in_place_call(
    x_given: torch.Tensor,
    axes: tuple[int, ...],
    scale: torch.Tensor | None,
    options: BatchNormOptions,
    training: bool | torch.Tensor,
) -> None:
    """Why this call cannot train in place, as an error (before anything is computed)."""
    if isinstance(training, torch.Tensor):
        raise ValueError(
            "memory='in_place' needs a Python bool `training`, or a CPU tensor in an eager "
            "call (a flag traced or on another device computes both branches, which both read "
            f"x). Received: training as a tensor on {training.device}"
        )
    check_in_place_settings(options.activation, options.synchronized)
    channel_shape = tuple(x_given.shape[a] for a in axes)
    if scale is not None and tuple(scale.shape) != channel_shape:
        # The per-channel path has reshaped per-channel adjustments to the channel shape.
        raise ValueError(
            "memory='in_place' needs an adjustment that is constant within each channel. "
            "Received: an adjustment that varies inside a channel"
        )
    check_in_place(x_given, scale)


def _normalize_in_place(
    backend: BatchNormBackend,
    x: torch.Tensor,
    axes: tuple[int, ...],
    moments: Moments,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    epsilon: float,
    weights: torch.Tensor | None,
    ghost_batches: int,
    activation: Activation | None,
) -> torch.Tensor:
    """The training output written over ``x`` (see :mod:`batchnorm.functional._in_place`): by
    the backend's ``normalize_in_place`` where it has one that takes x (the CPU kernels), else
    by torch ops."""
    own = getattr(backend, "normalize_in_place", None)
    if own is not None:
        y: torch.Tensor | None = own(
            x, axes, moments, scale, offset, epsilon, weights, ghost_batches, activation
        )
        if y is not None:
            return y
    statistics = (moments.mean.detach(), moments.variance.detach())
    grouped, reduce_dims, *viewed = grouped_in_place(
        x, axes, ghost_batches, scale, offset, statistics, weights
    )
    grouped_y = InPlaceNormalizeActivate.apply(  # type: ignore[no-untyped-call]
        grouped, *viewed, epsilon, activation, reduce_dims
    )
    return grouped_y.reshape(x.shape)  # type: ignore[no-any-return]


def check_ghost_batches(
    x: torch.Tensor, axes: tuple[int, ...], virtual_batch_size: int | None
) -> int:
    """The number of ghost batches ``B / virtual_batch_size`` (1 without), checked against ``x``."""
    if virtual_batch_size is None:
        return 1
    if 0 in axes:
        raise ValueError(
            "With `virtual_batch_size` the batch axis 0 cannot be a channel axis. "
            f"Received: axis={list(axes)}"
        )
    if x.shape[0] % virtual_batch_size != 0:
        raise ValueError(
            "`virtual_batch_size` must divide the batch size. "
            f"Received: virtual_batch_size={virtual_batch_size} for a batch of {x.shape[0]}"
        )
    return x.shape[0] // virtual_batch_size


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Tensor.to returns the tensor itself for its own dtype, but through the dispatcher: this
    # runs several times on every step, where microseconds show on small batches.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _mean_over_ghost_batches(per_ghost_batch: torch.Tensor) -> torch.Tensor:
    # A view when there is one ghost batch: this runs on every training step.
    if per_ghost_batch.shape[0] == 1:
        return per_ghost_batch[0]
    return per_ghost_batch.mean(dim=0)


def _full_rank(tensor: torch.Tensor | None, rank: int) -> torch.Tensor | None:
    """``tensor`` with leading size-1 dims up to ``rank`` (the same broadcast against x): the
    backends take a full-rank scale or offset as broadcast against x, a shorter one as per
    channel."""
    if tensor is None or tensor.ndim >= rank:
        return tensor
    return tensor.reshape((1,) * (rank - tensor.ndim) + tuple(tensor.shape))


def _per_channel(
    tensor: torch.Tensor, x: torch.Tensor, axes: tuple[int, ...]
) -> torch.Tensor | None:
    """``tensor`` as a per-channel tensor if it is constant within each channel, else None."""
    tensor = torch.as_tensor(tensor)
    channel_shape = tuple(x.shape[a] for a in axes)
    view = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    try:
        shape = torch.broadcast_shapes(tuple(tensor.shape), tuple(view))  # type: ignore[no-untyped-call]
    except RuntimeError:
        return None
    if list(shape) != view:
        return None
    return tensor.broadcast_to(view).reshape(channel_shape)


def _select_branch(
    training: torch.Tensor,
    y_train: torch.Tensor,
    y_inference: torch.Tensor,
    new_statistics: BatchNormStatistics,
    statistics: BatchNormStatistics,
) -> tuple[torch.Tensor, BatchNormStatistics]:
    """Both branches computed, one selected: a tensor ``training`` traces without a graph break."""
    selected = _select_statistics(training, new_statistics, statistics)
    return torch.where(training, y_train, y_inference), selected


def _select_statistics(
    condition: torch.Tensor, new_statistics: BatchNormStatistics, statistics: BatchNormStatistics
) -> BatchNormStatistics:
    selected = {
        name: torch.where(condition, new, old)
        for name, new, old in zip(
            BatchNormStatistics._fields, new_statistics, statistics, strict=True
        )
        if new is not None and old is not None
    }
    return BatchNormStatistics(**selected)


def _keep_unseen_channels(
    seen: torch.Tensor, new_statistics: BatchNormStatistics, statistics: BatchNormStatistics
) -> BatchNormStatistics:
    """The old statistics of channels whose mask weights sum to 0: they saw no sample and stay
    as after an empty batch (tf-keras would pull them toward 0 / 0 = 0). The debiased average's
    weight steps only when some channel saw a sample."""
    selected = {}
    for name, new, old in zip(BatchNormStatistics._fields, new_statistics, statistics, strict=True):
        if new is None or old is None:
            continue
        selected[name] = torch.where(seen.any() if new.ndim == 0 else seen, new, old)
    return BatchNormStatistics(**selected)


def _updated_statistics(
    statistics: BatchNormStatistics,
    batch_mean: torch.Tensor,
    batch_variance: torch.Tensor,
    count: torch.Tensor,
    options: BatchNormOptions,
) -> BatchNormStatistics:
    """Moving averages after one training step, as tf-keras' mean_update / variance_update."""
    momentum, renorm_momentum, epsilon = options.momentum, options.renorm_momentum, options.epsilon
    stored_variance = batch_variance
    if options.unbiased_moving_variance:
        # tf's fused kernel: factor n / (n - 1), and 1 when a channel has a single element. A
        # weighted count may lie between 1 and 2 (masks, ghost batches): n - 1 must not be
        # clamped to 1 there (the factor came out n), only kept off 0 where it is not taken.
        ones = torch.ones_like(count)
        bessel = torch.where(count > 1, count / torch.where(count > 1, count - 1, ones), ones)
        stored_variance = batch_variance * bessel
    weight = statistics.moving_average_weight
    if weight is not None:
        weight = debiased_weight_update(weight, momentum)

    def step(moving: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if weight is None:
            return moving_average_update(moving, value, momentum)
        return debiased_average_update(moving, value, weight)

    moving_mean = step(statistics.moving_mean, batch_mean)
    if not statistics.renorm:
        moving_variance = step(statistics.moving_variance, stored_variance)
        return BatchNormStatistics(moving_mean, moving_variance, moving_average_weight=weight)
    assert statistics.moving_stddev is not None and statistics.renorm_stddev is not None
    assert statistics.renorm_mean is not None
    stddev = torch.sqrt(stored_variance + epsilon)
    moving_stddev = step(statistics.moving_stddev, stddev)
    # Epsilon lives inside moving_stddev; the variance used at inference takes it back out.
    moving_variance = torch.relu(moving_stddev * moving_stddev - epsilon)
    renorm_mean = moving_average_update(statistics.renorm_mean, batch_mean, renorm_momentum)
    renorm_stddev = moving_average_update(
        statistics.renorm_stddev, torch.sqrt(batch_variance + epsilon), renorm_momentum
    )
    return BatchNormStatistics(
        moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev, weight
    )
