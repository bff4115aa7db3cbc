"""The layer's direct calls: a training step in one native call with the moving statistics
updated in place, and inference straight to the backend.

:func:`batchnorm.functional._batch_norm.batch_norm_step` is stateless: it returns new statistics,
which the layer copies into its buffers, and it runs the moments, the moving-average arithmetic
and the normalisation as separate operations. On small inputs that Python and dispatch work cost
several times the kernel itself. Where a backend provides ``train_in_place`` (the Numba CPU one)
and the call is a plain training step, this runs it instead: the same statistics and output
(:mod:`batchnorm.kernels._training`), the buffers stepped in place as ``F.batch_norm`` steps
``running_mean`` and ``running_var``.

A plain step: a Python ``training=True``, one channel axis, x, the buffers and gamma/beta of one
dtype (float32, float64, float16 or bfloat16; half precision is read as its bits), or a half x
with float32 buffers and gamma/beta, a non-empty batch, exponential or debiased moving averages
(with or without Batch Renormalization, whose buffers step in the same call), no adjustment, no
synchronization, ``use_global_stats`` None or False (batch statistics, moving ones updated: a
plain step), a mask with one weight per position, and not inside ``torch.compile`` (which traces
the stateless step's custom operators).

Inference (:func:`infer`) has nothing to update; it skips only the stateless step's general
checks and casts for the same dtypes.

:class:`DirectCalls` goes further for the calls that a layer repeats (no mask, a bool
``training``, a CPU input of a signature seen before): everything those calls decide from the
layer's settings and the input's signature is decided once, so a call is the kernel and little
more.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from batchnorm.functional._activation import Activation, activation_keyword
from batchnorm.functional._batch_norm import (
    BatchNormOptions,
    BatchNormStatistics,
    check_ghost_batches,
    check_mask,
)
from batchnorm.functional._cpu_backend import NUMBA_CPU, InferenceWithGradients, TrainInPlace
from batchnorm.functional._cpu_operations import InferenceCall, activation_code
from batchnorm.functional._cpu_plan import (
    HALF_BITS,
    VIEWED_DTYPES,
    kernels_can_read,
    plan_of,
)
from batchnorm.functional._cpu_training_call import (
    RenormStep,
    StepArrays,
    TrainingCall,
    step_arrays,
)
from batchnorm.functional._dispatch import backend_for, registered_backend


def _reads(x_dtype: torch.dtype, dtype: torch.dtype) -> bool:
    """Whether the kernels take x of ``x_dtype`` with parameters and buffers of ``dtype`` as
    they are: the same dtype, or half-precision x with float32 ones (Keras' mixed policies)."""
    return x_dtype == dtype or (x_dtype in HALF_BITS and dtype == torch.float32)


def _one_kernel_dtype(
    x: torch.Tensor,
    statistics: BatchNormStatistics,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
) -> bool:
    """The moving statistics and gamma/beta all of one dtype that the kernels read with x's
    (:func:`_reads`): nothing to cast."""
    dtype = statistics.moving_mean.dtype
    return (
        dtype in VIEWED_DTYPES
        and _reads(x.dtype, dtype)
        and statistics.moving_variance.dtype == dtype
        and all(p is None or p.dtype == dtype for p in (gamma, beta))
    )


def renorm_step(statistics: BatchNormStatistics, options: BatchNormOptions) -> RenormStep | None:
    """Batch Renormalization's buffers and settings for a one-call step, None without renorm."""
    moving_stddev, renorm_mean, renorm_stddev = (
        statistics.moving_stddev,
        statistics.renorm_mean,
        statistics.renorm_stddev,
    )
    if moving_stddev is None or renorm_mean is None or renorm_stddev is None:
        return None
    return RenormStep(
        moving_stddev, renorm_mean, renorm_stddev, options.renorm_momentum, options.renorm_clipping
    )


def _renorm_steppable(renorm: RenormStep | None, dtype: torch.dtype) -> bool:
    """No renorm, or renorm buffers that the kernels can step in place (else the stateless
    step runs)."""
    return renorm is None or all(_steppable(t, dtype) for t in renorm[:3])


def _steppable(tensor: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """A buffer the kernels can step in place through a NumPy view."""
    return (
        tensor is not None
        and tensor.dtype == dtype
        and tensor.is_contiguous()
        and not tensor.requires_grad
    )


def per_channel_shapes_agree(
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    statistics: BatchNormStatistics,
    channel_shape: tuple[int, ...],
) -> bool:
    """Whether gamma, beta and the statistics have the shapes the kernels take them in:
    ``channel_shape`` each, the debiased average's weight 0-d.

    The kernels read and write a per-channel tensor through a view of ``channel_shape``'s size:
    a buffer assigned, ``resize_``-d or substituted with fewer values was read and written past
    its end (neighbouring memory overwritten) before session 53. The stateless step refuses it
    with a clear error."""
    weight = statistics.moving_average_weight
    per_channel = (
        gamma,
        beta,
        statistics.moving_mean,
        statistics.moving_variance,
        statistics.moving_stddev,
        statistics.renorm_mean,
        statistics.renorm_stddev,
    )
    return (weight is None or weight.ndim == 0) and all(
        t is None or tuple(t.shape) == channel_shape for t in per_channel
    )


def train_in_place(
    x: torch.Tensor,
    statistics: BatchNormStatistics,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    axes: tuple[int, ...],
    options: BatchNormOptions,
    mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """The training output, with ``statistics``' tensors stepped in place; None (nothing done)
    when the call is not a plain step (see the module docstring) and the caller must take the
    stateless step.

    Same checks and errors as the stateless step for what a plain step reads (the mask, ghost
    batches); tensors of other shapes than x's channels are left to the stateless step's errors.
    """
    if (
        len(axes) != 1
        or not per_channel_shapes_agree(gamma, beta, statistics, (x.shape[axes[0]],))
        or options.in_place
        or options.adjustment is not None
        or options.synchronized
        or options.use_global_stats  # True: the moving statistics normalise, nothing steps
        or not _one_kernel_dtype(x, statistics, gamma, beta)
        or x.numel() == 0
        or torch.compiler.is_compiling()
    ):
        return None
    backend = backend_for(x)
    fused = getattr(backend, "train_in_place", None)
    if fused is None:
        return None
    weights = None
    if mask is not None:
        weights = position_weights(mask, x, axes[0])
        if weights is None:
            return None  # weights that vary inside a channel: the composed path
        if weights.requires_grad and torch.is_grad_enabled():
            return None  # the stateless step differentiates the mask's weights
    ghost_batches = check_ghost_batches(x, axes, options.virtual_batch_size)
    moving = (
        statistics.moving_mean,
        statistics.moving_variance,
        statistics.moving_average_weight,
    )
    if any(t is not None and (not t.is_contiguous() or t.requires_grad) for t in moving):
        return None
    renorm = renorm_step(statistics, options)
    if not _renorm_steppable(renorm, statistics.moving_mean.dtype):
        return None
    # Only with renorm: a backend registered with the older signature still serves plain steps.
    extra = {} if renorm is None else {"renorm": renorm}
    y: torch.Tensor = fused(
        x,
        axes[0],
        moving,
        gamma,
        beta,
        weights,
        ghost_batches,
        options.momentum,
        options.epsilon,
        options.unbiased_moving_variance,
        **activation_keyword(options.activation),
        **extra,
    )
    return y


def position_weights(mask: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor | None:
    """The mask (checked as the stateless step checks it) as weights of x's shape with size 1 on
    the channel ``axis``; None for weights that vary inside a channel (a Keras mask with the
    channel axis not last), which only the composed path takes."""
    weights = check_mask(mask, x, (axis,))
    if weights.shape[axis] != 1:
        return None
    return weights.expand([1 if i == axis else size for i, size in enumerate(x.shape)])


def infer(
    x: torch.Tensor,
    statistics: BatchNormStatistics,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    axes: tuple[int, ...],
    epsilon: float,
    mask: torch.Tensor | None,
    activation: Activation | None = None,
) -> torch.Tensor | None:
    """The inference output ``f((x - M) / sqrt(V + epsilon) * gamma + beta)`` with the moving
    statistics (``f`` the activation, if any); None when dtypes differ (the caller takes the
    stateless step, which casts).

    The mask is checked (its shape) and, as in tf-keras' inference, does not change the output.
    """
    channel_shape = tuple(x.shape[a] for a in axes)
    if not (
        _one_kernel_dtype(x, statistics, gamma, beta)
        and per_channel_shapes_agree(gamma, beta, statistics, channel_shape)
    ):
        return None
    if mask is not None:
        check_mask(mask, x, axes)
    return backend_for(x).normalize(
        x,
        axes,
        statistics.moving_mean,
        statistics.moving_variance,
        gamma,
        beta,
        epsilon,
        **activation_keyword(activation),
    )


_Signature = tuple[torch.Size, tuple[int, ...], torch.dtype]
# A signature's training and inference calls (None where the layer takes the general path).
_Entry = tuple[TrainingCall | None, InferenceCall | None]
_UNSEEN: Any = object()


def _applied(function: type[torch.autograd.Function]) -> Callable[..., torch.Tensor]:
    """``function.apply`` without its Python wrapper: torch's C++ ``_FunctionBase.apply`` bound
    to ``function``, as the wrapper ends by calling it.

    What the wrapper does first is moot for :class:`DirectCalls`: it binds default arguments
    for a ``setup_context`` (these functions define none), unwraps dead functorch wrappers
    (x is tested not to be one, gamma and beta are the layer's own parameters) and sends calls
    under functorch transforms elsewhere (which DirectCalls leaves to the general path). That
    was 2-4 us of Python a call, more with the interpreter's data out of the caches after a
    large kernel.
    """
    apply: Callable[..., torch.Tensor] = vars(torch._C._FunctionBase)["apply"].__get__(
        None, function
    )
    return apply


_train_in_place = _applied(TrainInPlace)
_infer_with_gradients = _applied(InferenceWithGradients)
_DATA_PTR = torch.Tensor.data_ptr
_STRIDE = torch.Tensor.stride


class DirectCalls:
    """A layer's repeated plain calls on CPU, with everything fixed by its settings decided once.

    Built by the layer for its current settings (it drops the object when an attribute is set);
    holds the layer's parameter and buffer dicts and checks on every call that they still hold
    the same tensors over the same memory and strides (``.to()``, ``load_state_dict`` with
    ``assign=True``, ``.data =`` all change that). Per input signature ``(shape, strides,
    dtype)`` it keeps a :class:`TrainingCall` and an :class:`InferenceCall`: the kernel plan, the views of gamma,
    beta and the buffers, and the kernels' fixed arguments. A call it does not cover returns
    None, and the layer takes its general path: a mask on a ``fused=True`` layer (ignored there, with a warning) or
    one that varies inside a channel, a non-bool ``training``, another dtype or device,
    ``torch.compile`` tracing, vmap/grad transforms, another backend registered for CPU.

    The results are those of :func:`train_in_place` and :func:`infer`, which run the same
    kernels.
    """

    def __init__(
        self,
        parameters: Mapping[str, torch.Tensor | None],
        buffers: Mapping[str, torch.Tensor | None],
        axis: int,
        rank: int,
        options: BatchNormOptions,
        *,
        training: bool,
        trainable: bool,
        renorm: bool,
        masks: bool = True,
    ) -> None:
        self._parameters, self._buffers = parameters, buffers
        self.tensors = tuple(
            where.get(name)
            for where, name in (
                (parameters, "gamma"),
                (parameters, "beta"),
                (buffers, "moving_mean"),
                (buffers, "moving_variance"),
                (buffers, "moving_average_weight"),
                (buffers, "moving_stddev"),
                (buffers, "renorm_mean"),
                (buffers, "renorm_stddev"),
            )
        )
        self.held = [t for t in self.tensors if t is not None]
        self.pointers = list(map(_DATA_PTR, self.held))
        self.strides = list(map(_STRIDE, self.held))
        self.shapes = [t.shape for t in self.held]
        self.axis, self.rank, self.options = axis, rank, options
        self.training, self.trainable = training and trainable, trainable
        self.masks = masks  # False: a mask is ignored, with a warning (the general path's)
        moving_mean = self.tensors[2]
        assert moving_mean is not None
        self.dtype = moving_mean.dtype
        moving_variance, average_weight = self.tensors[3], self.tensors[4]
        assert moving_variance is not None
        self.moving = (moving_mean, moving_variance, average_weight)
        moving_stddev, renorm_mean, renorm_stddev = self.tensors[5:]
        statistics = BatchNormStatistics(
            moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev, average_weight
        )
        # Tensors of other sizes (assigned, substituted): the general path's errors.
        agree = moving_mean.ndim == 1 and per_channel_shapes_agree(
            self.tensors[0], self.tensors[1], statistics, tuple(moving_mean.shape)
        )
        self.channels = moving_mean.shape[0] if agree else -1
        self.can_infer = agree and options.use_global_stats is not False
        self.renorm = renorm_step(statistics, options)
        self.can_train = (
            agree
            and (self.renorm is not None or not renorm)
            and _renorm_steppable(self.renorm, self.dtype)
            and not options.in_place
            and options.adjustment is None
            and not options.synchronized
            and not options.use_global_stats
            and all(t.is_contiguous() and not t.requires_grad for t in self.moving if t is not None)
        )
        self.signatures: dict[_Signature, _Entry | None] = {}
        self.arrays: StepArrays | None = None

    @classmethod
    def applicable(cls, dtype: torch.dtype, tensors: tuple[torch.Tensor | None, ...]) -> bool:
        """One kernel dtype for everything, all on the CPU, the Numba backend registered."""
        return (
            dtype in VIEWED_DTYPES
            and all(t is None or (t.dtype == dtype and t.is_cpu) for t in tensors[:4])
            and registered_backend("cpu") is NUMBA_CPU
        )

    def current(self) -> bool:
        """Whether the layer still holds the tensors (and memory) this was built over."""
        parameters, buffers = self._parameters, self._buffers
        gamma, beta, moving_mean, moving_variance, average_weight, *renorm = self.tensors
        if (
            parameters.get("gamma") is not gamma
            or parameters.get("beta") is not beta
            or buffers.get("moving_mean") is not moving_mean
            or buffers.get("moving_variance") is not moving_variance
            or buffers.get("moving_average_weight") is not average_weight
        ):
            return False
        if self.renorm is not None and (
            buffers.get("moving_stddev") is not renorm[0]
            or buffers.get("renorm_mean") is not renorm[1]
            or buffers.get("renorm_stddev") is not renorm[2]
        ):
            return False
        # The addresses, strides and shapes the kept NumPy views were made over (``.data =
        # flat[::2]`` after ``flat[:4]`` keeps the address, not the strides; ``resize_(2)`` keeps
        # both): 0.3 us a call each for the strides and the shapes.
        held = self.held
        return (
            self.pointers == list(map(_DATA_PTR, held))
            and self.strides == list(map(_STRIDE, held))
            and self.shapes == [t.shape for t in held]  # resize_ keeps the address
        )

    def __call__(
        self, x: torch.Tensor, training: bool | None, mask: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The layer's output for ``layer(x, training, mask)``, or None (not covered).

        Called outside ``torch.compile`` tracing only: the layer reads
        ``torch.compiler.is_compiling()`` once and does not call this while tracing."""
        training = self.training if training is None else training and self.trainable
        if not (self.can_train if training else self.can_infer):
            return None
        if mask is not None and not self.masks:
            return None
        if (
            type(x) is not torch.Tensor  # subclasses may override what the kernels bypass
            or (x.dtype is not self.dtype and not _reads(x.dtype, self.dtype))
            or not x.is_cpu
            or not kernels_can_read(x)  # also _applied's condition
            or registered_backend("cpu") is not NUMBA_CPU
            or not self.current()
        ):
            return None
        signature = (x.shape, x.stride(), x.dtype)  # a half x and a float32 x: two plans
        entry = self.signatures.get(signature, _UNSEEN)
        if entry is _UNSEEN:
            entry = self._plan(x, signature)
        if entry is None:
            return None
        training_call: TrainingCall | None
        inference_call: InferenceCall | None
        training_call, inference_call = entry  # type: ignore[misc]
        weights = None
        if mask is not None:
            weights = position_weights(mask, x, self.axis)  # checked in inference too
            if weights is None:
                return None
        gamma, beta = self.tensors[0], self.tensors[1]
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad
            or (gamma is not None and gamma.requires_grad)
            or (beta is not None and beta.requires_grad)
        )
        if not training:
            assert inference_call is not None
            if not needs_grad:
                return inference_call.output(x)
            if (
                inference_call.moving_mean.requires_grad
                or inference_call.moving_variance.requires_grad
            ):
                options = self.options
                return NUMBA_CPU.normalize(
                    x,
                    (self.axis,),
                    inference_call.moving_mean,
                    inference_call.moving_variance,
                    gamma,
                    beta,
                    options.epsilon,
                    options.activation,
                )
            return _infer_with_gradients(x, gamma, beta, inference_call)
        assert training_call is not None
        if weights is not None and weights.requires_grad and torch.is_grad_enabled():
            return None  # the general path differentiates the mask's weights
        if needs_grad:
            y: torch.Tensor = _train_in_place(x, gamma, beta, training_call, x, weights)
            return y
        return training_call.forward(x, weights)[0]

    def _plan(self, x: torch.Tensor, signature: _Signature) -> _Entry | None:
        """The training call and inference call (None where this layer does not train, or
        infer, here) of a new signature; None (remembered) for an input the general path
        must see: another rank or channel count, an empty batch, ghost batches that do not
        divide the batch, a layout that needs a copy."""
        axis, entry = self.axis, None
        options = self.options
        virtual_batch_size = options.virtual_batch_size
        if (
            x.ndim == self.rank
            and x.shape[axis] == self.channels
            and x.numel() > 0
            and (virtual_batch_size is None or (axis != 0 and x.shape[0] % virtual_batch_size == 0))
        ):
            ghost_batches = 1 if virtual_batch_size is None else x.shape[0] // virtual_batch_size
            plan = plan_of(x, [axis], ghost_batches > 1)
            if plan is not None:
                if self.arrays is None:
                    gamma, beta = self.tensors[0], self.tensors[1]
                    self.arrays = step_arrays(gamma, beta, self.moving, plan.layout, self.renorm)
                training_call = None
                if self.can_train:
                    training_call = TrainingCall(
                        plan,
                        self.arrays,
                        axis,
                        self.moving,
                        epsilon=options.epsilon,
                        momentum=options.momentum,
                        unbiased=options.unbiased_moving_variance,
                        ghost_batches=ghost_batches,
                        activation=options.activation,
                        renorm=self.renorm,
                    )
                inference_call = None
                if self.can_infer:
                    activation = options.activation
                    inference_call = InferenceCall(
                        plan,
                        self.arrays.moving_mean.reshape(1, -1),
                        self.arrays.moving_variance.reshape(1, -1),
                        self.arrays.scale,
                        self.arrays.offset,
                        options.epsilon,
                        [axis],
                        self.moving[0],
                        self.moving[1],
                        None if activation is None or activation.name == "identity" else activation,
                        activation_code(activation),
                    )
                entry = (training_call, inference_call)
        if len(self.signatures) >= 64:
            self.signatures.clear()
        self.signatures[signature] = entry
        return entry
