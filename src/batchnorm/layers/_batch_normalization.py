"""``BatchNormalization``: tf.keras.layers.BatchNormalization as a torch.nn.Module."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from batchnorm.functional import BatchNormStatistics
from batchnorm.functional._activation import Activation, ActivationName, check_activation
from batchnorm.functional._batch_norm import Memory, check_memory, check_use_global_stats
from batchnorm.functional._direct_step import DirectCalls
from batchnorm.functional._in_place import check_in_place_settings
from batchnorm.functional._synchronized import check_synchronized
from batchnorm.functional._validation import (
    check_adjustment,
    check_bool,
    check_fraction,
    check_mask_values,
    check_positive,
    check_renorm_clipping,
    check_virtual_batch_size,
    training_flag,
)
from batchnorm.layers import _constraints as constraints
from batchnorm.layers import _initializers as initializers
from batchnorm.layers import _regularizers as regularizers
from batchnorm.layers._dtype_policy import resolve_dtype_policy
from batchnorm.layers._fused import unfused_if_synchronized
from batchnorm.layers._keras_weights import (
    apply_layer_constraints,
    get_layer_weights,
    regularization_losses,
    set_layer_weights,
    weight_names,
)
from batchnorm.layers._layer_arguments import (
    MovingAverage,
    MovingVarianceEstimator,
    channel_shape_argument,
    check_axis_argument,
    check_choice,
    check_fused,
    check_name,
)
from batchnorm.layers._layer_build import (
    buffer_dtypes,
    build_input_shape,
    build_layer,
    first_call,
    initial_weights,
    output_shape,
    reset_weights,
)
from batchnorm.layers._layer_config import layer_config, layer_kwargs_from_config
from batchnorm.layers._layer_inputs import check_input, resolve_training
from batchnorm.layers._layer_repr import layer_repr
from batchnorm.layers._layer_settings import checked_setting
from batchnorm.layers._layer_state import load_layer_state, record_estimator, record_unbuilt
from batchnorm.layers._layer_step import layer_statistics, run_step
from batchnorm.layers._layer_tracing import (
    fx_leaf_call,
    refuse_scripting,
    without_tracer_warnings,
)
from batchnorm.layers._lazy_weights import (
    LazyBuffer,
    materialize,
    register_placeholders,
)
from batchnorm.layers._load_pre_hooks import run_load_pre_hooks_first
from batchnorm.layers._parametrized import affine_parameters_behind
from batchnorm.layers._presets import Framework, preset_kwargs
from batchnorm.layers._recomputation import guards_step, step_once
from batchnorm.layers._update_lock import UpdateLock

_NO_INPUT: Any = None  # forward's x when the input comes as ``input=``


class BatchNormalization(LazyModuleMixin, nn.Module):
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

    ``state_dict()`` records which variance ``moving_variance`` holds (in the state_dict's
    metadata). ``load_state_dict`` writes nothing and raises for a checkpoint of the other
    variance, for a torch.nn.BatchNorm state_dict (convert with ``batchnorm.from_torch`` /
    ``batchnorm.convert`` instead) and for shapes that do not fit; it casts tensors of another
    dtype to the layer's, as torch does, but with a UserWarning. An unbuilt layer takes its
    shape from the checkpoint, and loads only one with exactly its keys (else it stays unbuilt).
    Training calls of one layer from several threads take turns, so no moving-average update is
    lost; inference calls run concurrently.

    Args:
        num_features: channel count (int), or a tuple for several axes (in ascending axis
            order, the order of ``moving_mean.shape``); creates the weights
            now. Without it gamma/beta and the buffers are placeholders (torch's
            ``UninitializedParameter`` / ``UninitializedBuffer``, as ``nn.LazyBatchNorm2d`` has)
            until the first input, ``build(input_shape)``, ``set_weights`` or ``load_state_dict``
            gives their shape; they are filled in place, so an optimizer created before the
            first call trains them. The attribute ``num_features`` is the channel count once
            known (a tuple for several axes), None before.
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
            the outputs of Keras 1 ``mode=2`` and PyTorch ``track_running_stats=False``, which
            keep no moving statistics up to date; Caffe's
            ``use_global_stats: false`` also updates in its TEST phase, here updates follow
            ``training``).
        mask_weights: True (tf-keras): a mask's values weigh the positions in the batch
            statistics (``tf.nn.weighted_moments``); False: a non-zero mask value counts fully,
            as Keras 3 casts the mask to bool (``like("keras3")`` sets it). Default True.
        virtual_batch_size: ghost-batch size; must divide the training batch.
        adjustment: ``f(input_shape) -> (a, b)`` applied in training: scale ``a * gamma``,
            offset ``b * gamma + beta``.
        dtype: parameter/compute policy (None = torch's default dtype when the layer is made,
            float32 unless changed; "float64", "mixed_float16", ...).
        device: where to create the weights.
        name: layer name (default ``batch_normalization_<n>``).
        synchronized: training statistics over the global batch of a torch.distributed process
            group (tf-keras' argument; implies ``fused=False``). Without an initialised group,
            or with a group of one, the layer computes exactly as unsynchronized.
        process_group: the group to synchronize over; None is the default group (WORLD).
        activation: None, "identity", "relu", "leaky_relu" or "elu", applied to the normalised
            output ``y = f(gamma * x_hat + beta)`` in the same pass (on CPU, one pass over the
            data fewer than batch norm then the activation). Not a tf-keras argument: it
            appears in ``get_config`` only when set.
        activation_param: leaky_relu's negative slope (default 0.01, as torch) or elu's alpha
            (default 1.0).
        memory: "default", or "in_place": training writes the output over the input and keeps
            only the output for the backward, which recovers the normalised input by inverting
            the activation (InPlace-ABN). Needs an invertible activation (None, "identity",
            "leaky_relu" with a slope > 0, "elu"), nonzero gamma, an input nothing else needs
            (a leaf requiring grad is refused; a backward that needed it raises), and no
            ``synchronized``; no double backward; float16/bfloat16 outputs are written over
            x too (the backward rebuilds x from the rounded output). Inference with the moving
            statistics is not affected (with ``use_global_stats=False`` every call normalises
            with the batch's statistics and so writes in place, as InPlaceABN in eval mode).

    Shape:
        Input: any rank; output: same shape and dtype (a float32 input to a float64 layer gives
        float64, as torch promotes). float16/bfloat16 inputs are computed with
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
    _update_lock: UpdateLock
    _activation: Activation | None  # checked from activation / activation_param
    # A lazy module to torch (and torch.compile, which builds one before tracing it), that stays
    # this class when built: torch's LazyBatchNorm becomes BatchNorm.
    cls_to_become = None

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
        mask_weights: bool = True,
        dtype: Any = None,
        device: Any = None,
        name: str | None = None,
        synchronized: bool = False,
        process_group: Any = None,
        activation: ActivationName | None = None,
        activation_param: float | None = None,
        memory: Memory = "default",
    ) -> None:
        super().__init__()
        # The mixin's hooks would build before forward and materialise before the checks of
        # load_state_dict; this layer does both itself (a failed first call or load is undone).
        # Their handles stay until the build: torch.compile looks for `_initialize_hook`.
        self._initialize_hook.remove()
        self._load_hook.remove()
        self.__dict__["_update_lock"] = UpdateLock()
        self.synchronized, self.process_group = check_synchronized(
            synchronized, process_group, fused
        )
        given_fused, fused = fused, unfused_if_synchronized(fused, self.synchronized)
        self.axis: list[int] | int = check_axis_argument(axis)
        self._axis_argument = self.axis  # what the repr shows; build makes `axis` a list
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
        check_adjustment(adjustment, self.virtual_batch_size, axis)
        self.adjustment = adjustment
        self.moving_variance_estimator = check_choice(
            moving_variance_estimator, "moving_variance_estimator", MovingVarianceEstimator
        )
        self.moving_average = check_choice(moving_average, "moving_average", MovingAverage)
        self.use_global_stats = check_use_global_stats(use_global_stats)
        self.mask_weights = mask_weights
        self.dtype_policy = resolve_dtype_policy(dtype)
        self.fused: bool | None = check_fused(
            fused,
            axis=axis,
            renorm=self.renorm,
            virtual_batch_size=self.virtual_batch_size,
            adjustment_given=adjustment is not None,
            compute_dtype=self.dtype_policy.compute_dtype,
        )
        # The argument as given (a synchronized layer's implied False is not one: tf-keras writes
        # no `fused`, and switched back off the layer takes the automatic path again).
        self._fused_argument = None if given_fused is None else bool(given_fused)
        self.name = check_name(name)
        self._set_activation(activation, activation_param, memory)
        self._device = device
        self._trainable = check_bool(trainable, "trainable")
        self._axes: tuple[int, ...] | None = None
        self._input_rank: int | None = None
        self.built = False
        if num_features is not None:
            # Made at once, without placeholders: torch's lazy placeholders cannot be made under
            # FakeTensorMode (nor can nn.LazyBatchNorm2d), where nn.BatchNorm2d(4) can.
            self._create_weights(channel_shape_argument(num_features, axis), keras_shape=None)
        else:
            register_placeholders(
                self,
                [n for n, on in (("gamma", self.scale), ("beta", self.center)) if on],
                buffer_dtypes(self),
                dtype=self.dtype_policy.parameter_dtype,
                device=device,
                requires_grad=self._trainable,
            )

    # ------------------------------------------------------------------ building
    @property
    def num_features(self) -> int | tuple[int, ...] | None:
        """The channel count (a tuple for several channel axes); None until the layer is built."""
        if not self.built:
            return None
        shape = tuple(self.moving_mean.shape)
        return shape[0] if len(shape) == 1 else shape

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Create the weights for inputs of ``input_shape`` (Keras' ``build``, None where a size
        is not known, as the batch size; the channel sizes must be); idempotent.

        Fixes the input rank, the channel axes and (for ``fused=None``) tf-keras' path; the
        placeholders of a lazy layer are materialised in place.
        """
        with self._update_lock:
            self._build(build_input_shape(input_shape, self.axis))

    def _build(self, input_shape: tuple[int, ...]) -> list[str]:
        return build_layer(self, input_shape)

    def initialize_parameters(
        self,
        x: torch.Tensor | None = None,
        *args: Any,
        input: torch.Tensor | None = None,  # forward's name for x, as torch's
        **kwargs: Any,
    ) -> None:
        """torch's lazy-module hook: :meth:`build` for the shape of the input, given as ``x`` or
        as ``input=`` (torch.compile calls it with forward's arguments: ``input=`` raised a
        TypeError there before a first eager call); without one, :meth:`forward` raises."""
        source = x if x is not None else input
        if isinstance(source, torch.Tensor):
            self.build(source.shape)

    def _infer_parameters(self, module: nn.Module, args: Any, kwargs: Any = None) -> None:
        # What torch.compile calls on a lazy module before tracing it (torch's version also
        # removes the hooks, which a build of this layer does).
        self.initialize_parameters(*args, **(kwargs or {}))

    def _create_weights(
        self, channel_shape: tuple[int, ...], keras_shape: tuple[int, ...] | None = None
    ) -> list[str]:
        """Give the layer its weights of ``channel_shape`` (initializers see ``keras_shape``).

        Every initial value is computed before anything is written; placeholders are filled in
        place (their dtype and device follow ``.to()``). Returns the names materialised.
        """
        # Weights made under torch.inference_mode (a first call there, to build a lazy model)
        # would be inference tensors, which no later training call could save for backward.
        with torch.inference_mode(False):
            values = initial_weights(self, channel_shape, keras_shape)
            materialized = materialize(
                self, values, parameters=("gamma", "beta"), requires_grad=self._trainable
            )
        self.built = True
        return materialized

    def reset_running_stats(self) -> None:
        """The moving statistics back to their initial values, in place, as
        ``nn.BatchNorm2d.reset_running_stats``: ``moving_mean_initializer``'s and
        ``moving_variance_initializer``'s, renorm's from them (``moving_stddev`` and
        ``renorm_stddev`` their square root), the debiased average's weight 0. Nothing before
        the build."""
        reset_weights(self, affine=False)

    def reset_parameters(self) -> None:
        """gamma and beta from their initializers and the moving statistics from theirs
        (:meth:`reset_running_stats`), in place, as ``nn.BatchNorm2d.reset_parameters``: what
        a model made on the meta device (``torch.device("meta")``, then ``to_empty``) calls on
        each module to get its initial values. A gamma or beta rerouted by parametrize or prune
        has the parameters behind it reset, as registering the parametrization sets them from
        the initial value. Nothing before the build."""
        reset_weights(self, affine=True)

    # ------------------------------------------------------------------ checkpoints
    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> BatchNormalization:
        """torch's conversions, with Caffe's scale factor kept in float64 (it counts batches,
        exactly to 2**53, as torch's ``num_batches_tracked`` stays int64): ``.half()`` and
        ``.to(torch.bfloat16)`` converted it, and the kernels read and wrote it as the bits of
        a float16 (4.0 stored as 2.4e-7), lost at the next conversion. A lazy layer's placeholder
        stays float64 too (it was built in the converted dtype)."""
        counter = self._buffers.get("moving_average_weight")
        kept = None
        if counter is not None and not nn.parameter.is_lazy(counter):
            kept = counter.detach().clone()
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        after = self._buffers.get("moving_average_weight")
        if after is not None and after.dtype != torch.float64:
            self._buffers["moving_average_weight"] = (
                # The package's placeholder, which deep-copies and pickles with its dtype
                # (torch's refused deepcopy, and came back float32 from a pickle).
                LazyBuffer(device=after.device, dtype=torch.float64)  # type: ignore[call-arg]
                if kept is None
                else kept.to(after.device)
            )
        return self

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        # An unbuilt layer saves no tensors (placeholders would not load with weights_only),
        # only a mark in the metadata that it has none.
        if not self.built:
            record_unbuilt(destination, prefix)
            return
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # Undecided ("auto" before the build), the buffers may hold a loaded checkpoint's.
        stored = self._stored_estimator(self.fused) or self.__dict__.get("_loaded_estimator")
        record_estimator(destination, prefix, stored)

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Run the load pre-hooks (as torch does, first; an unbuilt layer runs them once built,
        see :func:`run_load_pre_hooks_first`), then check everything
        (:mod:`batchnorm.layers._layer_state`) and write only if it fits.

        An unbuilt layer takes its channel shape from a checkpoint with exactly its keys. Tensors
        of another dtype are cast to the layer's with a UserWarning (torch casts silently); a
        checkpoint that records the other moving-variance estimator is refused.
        """
        incompatible = (missing_keys, unexpected_keys, error_msgs)
        copying = run_load_pre_hooks_first(
            self, self.built, state_dict, prefix, local_metadata, strict, incompatible
        )

        def copy(errors: list[str]) -> None:
            with copying:
                super(BatchNormalization, self)._load_from_state_dict(
                    state_dict, prefix, local_metadata, False, [], [], errors
                )

        load_layer_state(self, state_dict, prefix, local_metadata, strict, incompatible, copy)

    # ------------------------------------------------------------------ activation
    def _set_activation(self, name: Any, parameter: Any, memory: Any) -> None:
        """Check the three settings together, then set them (nothing changes on an error)."""
        activation = check_activation(name, parameter)
        memory = check_memory(memory)
        if memory == "in_place":
            check_in_place_settings(activation, self.synchronized)
        self.__dict__.update(
            _activation=activation,
            _activation_name=name,
            _activation_param=None if parameter is None else float(parameter),  # JSON-ready
            _memory=memory,
        )  # assigning a property went through __setattr__, which dropped the direct calls

    @property
    def activation(self) -> str | None:
        """The activation applied after normalising (None: none); setting it is checked."""
        return self.__dict__["_activation_name"]  # type: ignore[no-any-return]

    @activation.setter
    def activation(self, name: ActivationName | None) -> None:
        self._set_activation(name, self.activation_param, self.memory)

    @property
    def activation_param(self) -> float | None:
        """leaky_relu's slope or elu's alpha as given (None: the default)."""
        return self.__dict__["_activation_param"]  # type: ignore[no-any-return]

    @activation_param.setter
    def activation_param(self, parameter: float | None) -> None:
        self._set_activation(self.activation, parameter, self.memory)

    @property
    def memory(self) -> str:
        """ "default" or "in_place" (training writes over its input); setting it is checked."""
        return self.__dict__["_memory"]  # type: ignore[no-any-return]

    @memory.setter
    def memory(self, memory: str) -> None:
        self._set_activation(self.activation, self.activation_param, memory)

    # ------------------------------------------------------------------ calling
    @property
    def mask_weights(self) -> bool:
        """True: a mask's values weigh the positions (tf-keras); False: any non-zero value
        counts fully (Keras 3). Setting it is checked."""
        return self.__dict__["_mask_weights"]  # type: ignore[no-any-return]

    @mask_weights.setter
    def mask_weights(self, value: bool) -> None:
        self.__dict__["_mask_weights"] = check_bool(value, "mask_weights")

    @property
    def trainable(self) -> bool:
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = check_bool(value, "trainable")
        for _, parameter in affine_parameters_behind(self):
            parameter.requires_grad_(self._trainable)

    def statistics(self) -> BatchNormStatistics:
        """The current buffers as a :class:`~batchnorm.functional.BatchNormStatistics`."""
        self._require_built("statistics")
        return layer_statistics(self)

    def forward(
        self,
        x: torch.Tensor = _NO_INPUT,
        training: bool | torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normalise ``x``; in training, also update the moving statistics.

        Args:
            x: input tensor (``input=`` as torch's batch norms name it is taken too: a model
                converted from torch that calls ``self.bn(input=h)`` keeps working).
            training: None follows ``module.training``; a bool or 0-d bool tensor overrides it.
            mask: optional weights with the shape of ``x`` without its last axis, broadcast
                along it (tf-keras / Keras 3), or without its channel axes; masked positions do
                not count in the batch statistics. With ``mask_weights=False`` any non-zero
                value counts fully (Keras 3).
        """
        if input is not None:
            if x is None:
                x = input
            elif not isinstance(input, torch.fx.Proxy):  # fx traces every parameter
                raise TypeError("Pass the input once, as `x` or as `input`. Received: both")
        if mask is not None and not self.mask_weights and isinstance(x, torch.Tensor):
            # Keras 3 casts the mask to bool (`ops.cast(mask, "bool")` in `_moments`). Checked
            # first, so a mask refused with weights is refused here too; a bool mask is not read
            # again, and every path after this (kernels, composed ops, compile) sees 0/1.
            mask = check_mask_values(mask, x) != 0
        compiling = torch.compiler.is_compiling()  # traced: no shortcut, nothing remembered
        if isinstance(training, torch.Tensor) and not compiling:
            training = training_flag(training)  # a bool where reading it is free
        direct_calls: DirectCalls | None = None if compiling else self.__dict__.get("_direct_calls")
        if direct_calls is not None and (training is None or type(training) is bool):
            if self._trainable and (self.training if training is None else training):
                with self._update_lock:
                    if guards_step(self.renorm):
                        y = step_once(self, lambda: direct_calls(x, training, mask))
                    else:
                        y = direct_calls(x, training, mask)
            else:
                y = direct_calls(x, training, mask)
            if y is not None:
                return y
        if isinstance(x, torch.fx.Proxy):
            return fx_leaf_call(self, x, training, mask)
        if torch._C._get_tracing_state() is None:
            return self._checked_call(x, training, mask, compiling, remember=not compiling)
        # torch.jit.trace: its sizes are 0-d tensors, which the layer must not remember (later
        # eager calls compared them with their own sizes)
        with without_tracer_warnings():
            return self._checked_call(x, training, mask, compiling, remember=False)

    def _checked_call(
        self,
        x: torch.Tensor,
        training: bool | torch.Tensor | None,
        mask: torch.Tensor | None,
        compiling: bool,
        remember: bool,
    ) -> torch.Tensor:
        check_input(self, x, remember=remember)
        resolved = resolve_training(training, self._trainable, self.training)
        if compiling:  # a traced graph updates the buffers by itself, without the lock
            if self._input_rank is None:
                self._build(tuple(x.shape))  # torch.compile builds lazy modules before
            return self._step(x, resolved, mask, compiling=True)
        if self._input_rank is None:
            with self._update_lock:
                return self._first_call(x, resolved, mask)
        if resolved is False:
            return self._step(x, resolved, mask)
        # Reading the moving statistics and writing their update is one step per layer at a
        # time: two threads interleaving them would lose updates.
        with self._update_lock:
            return self._step(x, resolved, mask)

    def _first_call(
        self, x: torch.Tensor, resolved: bool | torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        if self._input_rank is not None:  # another thread built it while this one waited
            return self._step(x, resolved, mask)
        return first_call(self, tuple(x.shape), lambda: self._step(x, resolved, mask))

    def _step(
        self,
        x: torch.Tensor,
        resolved: bool | torch.Tensor,
        mask: torch.Tensor | None,
        *,
        compiling: bool = False,
    ) -> torch.Tensor:
        if compiling or resolved is False or not guards_step(self.renorm):
            return run_step(self, x, resolved, mask, compiling=compiling)
        y = step_once(self, lambda: run_step(self, x, resolved, mask))
        assert y is not None
        return y

    def __setattr__(self, name: str, value: Any) -> None:
        if "built" in self.__dict__:  # constructed: a setting is checked as the constructor does
            given, value = value, checked_setting(self, name, value)
            if name == "fused":  # get_config writes the argument, not the path it resolved to
                self.__dict__["_fused_argument"] = None if given is None else bool(given)
        # Any setting may change what a call does: the shortcut is rebuilt on the next call.
        self.__dict__.pop("_direct_calls", None)
        super().__setattr__(name, value)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this on each module first: a clear refusal
        (:func:`~batchnorm.layers._layer_tracing.refuse_scripting`)."""
        refuse_scripting(self)
        return self

    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call]
        state.pop("_direct_calls", None)  # NumPy views of this layer's memory: rebuilt on use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        self.__dict__.setdefault("_update_lock", UpdateLock())  # pickled without one before
        self.__dict__.setdefault("_mask_weights", True)  # pickled before the setting existed

    def _replicate_for_data_parallel(self) -> BatchNormalization:
        if not self.built:
            raise RuntimeError(
                f"Layer {self.name} has uninitialized parameters, which `DataParallel` cannot "
                "replicate. Run a dummy forward pass (or pass `num_features`) first."
            )
        replica: BatchNormalization = nn.Module._replicate_for_data_parallel(self)  # type: ignore[no-untyped-call]
        replica.__dict__["_update_lock"] = UpdateLock()  # replicas run side by side
        return replica

    def _stores_unbiased_variance(self) -> bool:
        if self.moving_variance_estimator == "auto":
            return bool(self.fused)
        return bool(self.moving_variance_estimator == "unbiased")

    def _stored_estimator(self, fused: bool | None) -> str | None:
        """Which variance the layer stores on path ``fused``, "biased" or "unbiased"; None
        while tf-keras' automatic choice is undecided."""
        if self.moving_variance_estimator != "auto":
            return str(self.moving_variance_estimator)
        return None if fused is None else ("unbiased" if fused else "biased")

    # ------------------------------------------------------------------ Keras API
    @property
    def losses(self) -> list[torch.Tensor]:
        """Current regularization penalties (differentiable), gamma's first, as tf-keras lists them."""
        return regularization_losses(self)

    def apply_constraints(self, updated: AbstractSet[int] | None = None) -> None:
        """Project gamma/beta with their constraints (run after each optimizer step); with
        ``updated``, the ids of the parameters that step changed, only those weights (Keras
        constrains only the variables its optimizer updates: a frozen layer's stay as they are)."""
        apply_layer_constraints(self, updated)

    def _weight_names(self) -> list[str]:
        return weight_names(self)

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        """Keras' ``compute_output_shape``: the input's shape (None where a size is unknown,
        the channel sizes too, as in tf-keras and Keras 3); an axis out of its range raises."""
        return output_shape(input_shape, self.axis)

    def get_weights(self) -> list[np.ndarray]:
        """NumPy copies in tf-keras order and shapes: gamma, beta, moving_mean, moving_variance[, renorm]."""
        self._require_built("get_weights")
        return get_layer_weights(self)

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Load arrays in tf-keras order; each may have the Keras shape, the per-channel shape or be flat.

        An unbuilt layer first takes its channel shape from the arrays (``moving_mean``'s), as
        ``num_features`` would give it; every array is checked before anything is written.
        """
        set_layer_weights(self, weights)

    def _require_built(self, method: str) -> None:
        if not self.built:
            raise ValueError(
                f"Layer {self.name} has no weights yet: pass `num_features`, call `build(input_shape)` "
                f"or call the layer on an input before `{method}`."
            )

    def get_config(self) -> dict[str, Any]:
        """A JSON-serialisable dict with tf-keras' keys (plus num_features / fused when set).

        ``adjustment`` cannot be serialised: it is left out, with tf-keras' warning.
        """
        if self.adjustment is not None:
            warnings.warn(
                "The `adjustment` function of this `BatchNormalization` layer cannot be "
                "serialized and has been omitted from the layer config. It will not be included "
                "when re-creating the layer from the saved config.",
                UserWarning,
                stacklevel=2,
            )
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
        return layer_repr(self)

    def _activation_options(self) -> dict[str, Any]:
        """``activation`` / ``activation_param`` / ``memory`` where they are not the defaults
        (the config and the repr show only these)."""
        options: dict[str, Any] = {}
        if self.activation is not None:
            options["activation"] = self.activation
        if self.activation_param is not None:
            options["activation_param"] = self.activation_param
        if self.memory != "default":
            options["memory"] = self.memory
        return options

    def _convention_options(self) -> dict[str, Any]:
        """The framework-convention options that differ from tf-keras' defaults."""
        options = {
            "moving_variance_estimator": self.moving_variance_estimator,
            "moving_average": self.moving_average,
            "use_global_stats": self.use_global_stats,
            "mask_weights": self.mask_weights,
        }
        defaults = {
            "moving_variance_estimator": "auto",
            "moving_average": "ema",
            "mask_weights": True,
        }
        return {k: v for k, v in options.items() if v != defaults.get(k)}
