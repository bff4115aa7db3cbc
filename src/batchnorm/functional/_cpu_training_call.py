"""A one-call training step on the CPU kernels, with everything that one layer's settings and
one input signature fix bound once.

The training forward is one kernel call (:data:`batchnorm.kernels.train_forward`: the batch
moments, the output ``f((x - mean) / sqrt(variance + epsilon) * gamma + beta)`` and the moving
statistics stepped in place, ``M <- momentum * M + (1 - momentum) * mean`` in the Keras
convention), its backward one more (:data:`batchnorm.kernels.train_backward`, or
:data:`batchnorm.kernels.train_backward_activated` with the activation ``f`` folded in).

A :class:`TrainingCall` holds the plan of the input's signature, NumPy views of gamma, beta and
the buffers, and those kernels' arguments that do not change between calls, so a call passes x
and its output and little else. The layer's shortcut (:class:`batchnorm.functional._direct_step.
DirectCalls`) keeps one per input signature; the backend's ``train_in_place`` makes one per call.
On small inputs the Python between the layer and the kernels is most of a step: at (32, 64) a
forward+backward in a loop went from 64 to 52 us on the Intel VM (torch's 51 us).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numba
import numpy as np
import torch

from batchnorm.functional._activation import Activation
from batchnorm.functional._canonical_layout import CanonicalLayout
from batchnorm.functional._cpu_operations import (
    activation_code,
    canonical_gradient,
    reads_output,
    to_canonical,
)
from batchnorm.functional._cpu_plan import (
    NO_WEIGHTS,
    CpuPlan,
    compiled_build,
    compute_dtype,
    mask_rows,
    shared_array,
)
from batchnorm.kernels import normalize_block
from batchnorm.kernels._ahead import Request, first_call
from batchnorm.kernels._jit import Kernel


class StepArrays(NamedTuple):
    """The per-channel tensors of a one-call training step as the kernels read them (views)."""

    scale: np.ndarray
    offset: np.ndarray
    moving_mean: np.ndarray
    moving_variance: np.ndarray
    average_weight: np.ndarray  # [1] float64 (Caffe's scale factor), a dummy without one
    debiased: bool
    # Batch Renormalization: (moving_stddev, renorm_mean, renorm_stddev) views; None without.
    renorm: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    # The tensors the views show, kept alive with them: the views do not hold their tensors
    # (:func:`~batchnorm.functional._cpu_plan.shared_array`), and a backward reads gamma's view
    # after the forward (under torch.utils.checkpoint a computed gamma was freed by then, and
    # the backward read whatever took its memory: gradients 100% off or 1e34).
    held: tuple[torch.Tensor | None, ...] = ()


class RenormStep(NamedTuple):
    """Batch Renormalization's part of a one-call training step (tf-keras semantics, see
    :func:`batchnorm.functional._renorm.renorm_correction`): its buffers, contiguous tensors of
    x's dtype over one channel axis, stepped in place, and its settings."""

    moving_stddev: torch.Tensor
    renorm_mean: torch.Tensor
    renorm_stddev: torch.Tensor
    momentum: float  # renorm_momentum
    clipping: Mapping[str, float]  # rmin, rmax, dmax, each optional

    def limits(self) -> np.ndarray:
        """``(rmin, rmax, dmax)`` float64, infinite where not given (an array the kernels only
        read, made once per distinct value)."""
        clipping = self.clipping
        return _clipping_limits(
            clipping.get("rmin", -math.inf),
            clipping.get("rmax", math.inf),
            clipping.get("dmax", math.inf),
        )


@functools.lru_cache(maxsize=64)
def _clipping_limits(rmin: float, rmax: float, dmax: float) -> np.ndarray:
    return np.array([rmin, rmax, dmax], np.float64)


def step_arrays(
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    moving: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    layout: CanonicalLayout,
    renorm: RenormStep | None = None,
) -> StepArrays:
    """Views of gamma, beta and the moving statistics (one channel axis, contiguous)."""
    moving_mean, moving_variance, average_weight = moving
    held = (scale, offset, *moving, *(() if renorm is None else renorm[:3]))
    return StepArrays(
        to_canonical(scale, layout, 1.0),
        to_canonical(offset, layout, 0.0),
        shared_array(moving_mean),
        shared_array(moving_variance),
        _NO_AVERAGE_WEIGHT if average_weight is None else shared_array(average_weight).reshape(1),
        average_weight is not None,
        None
        if renorm is None
        else (
            shared_array(renorm.moving_stddev),
            shared_array(renorm.renorm_mean),
            shared_array(renorm.renorm_stddev),
        ),
        held,
    )


_NO_AVERAGE_WEIGHT = np.zeros(1, np.float64)


class TrainingPass(NamedTuple):
    """What one training forward leaves for its backward besides the tensors autograd saves:
    the batch statistics and the kernels' settings, so the backward prepares little again.

    Nothing here refers to x, its copy, the output or the mask: those reach the backward
    through ``save_for_backward`` only, so saved-tensor hooks see them. A NumPy view of x kept
    here held x's memory past ``torch.utils.checkpoint``: each checkpointed batch norm's input
    stayed in memory until the backward (67 MB more for a 64x64x64x64 input); the mask's rows
    kept here held the mask (a view of a float32 mask, a copy of any other)."""

    call: TrainingCall
    masked: bool | None  # True with a mask, None without (the kernels' type for "no mask")
    parallel: bool  # the threaded builds: the backward runs as the forward ran
    mean: np.ndarray  # [groups, C] float64
    variance: np.ndarray
    total_weight: np.ndarray
    # Batch Renormalization's (r, d) [2, C] float64, constants to autograd: they turn the
    # gradients of scale and offset into gamma's, r * dscale + d * doffset; and the scale and
    # offset the pass normalised with, ``r * gamma`` and ``d * gamma + beta`` [2, C]. None
    # without renorm.
    correction: np.ndarray | None
    composed: np.ndarray | None

    def moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch ``(mean, variance, total_weight)`` as tensors ``(groups, C)`` float64."""
        return (
            torch.from_numpy(self.mean),
            torch.from_numpy(self.variance),
            torch.from_numpy(self.total_weight),
        )


class TrainingCall:
    """One layer's one-call training step on inputs of one signature (the plan's).

    ``y = f((x - mean) / sqrt(variance + epsilon) * gamma + beta)`` with the batch's (or each
    ghost batch's) weighted moments, the moving statistics stepped in place (exponential or
    debiased averages, unbiased or biased moving variance; Batch Renormalization's buffers and
    its ``r``, ``d`` correction with ``renorm``); ``f`` the activation, fused into the kernels.

    ``moving`` is ``(moving_mean, moving_variance, moving_average_weight or None)``: contiguous
    tensors of x's dtype over one channel axis, written through the NumPy views in ``arrays``.
    Their version counters are bumped on each step, so autograd sees that they changed.
    """

    __slots__ = (
        "activation",
        "arrays",
        "axes",
        "code",
        "epsilon",
        "ghost_batches",
        "gradient_dtype",
        "leading",
        "no_weights",
        "plan",
        "reads_output",
        "renorm",
        "scale_offset",
        "stepped",
        "trailing",
        "weights_dtype",
    )

    def __init__(
        self,
        plan: CpuPlan,
        arrays: StepArrays,
        axis: int,
        moving: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        *,
        epsilon: float,
        momentum: float,
        unbiased: bool,
        ghost_batches: int,
        activation: Activation | None = None,
        renorm: RenormStep | None = None,
    ) -> None:
        assert (renorm is None) == (arrays.renorm is None), "step arrays without the renorm views"
        self.plan, self.arrays, self.axes = plan, arrays, [axis]
        self.epsilon, self.ghost_batches = epsilon, ghost_batches
        self.activation, self.code = activation, activation_code(activation)
        self.reads_output = reads_output(activation)
        self.renorm = renorm
        self.weights_dtype = compute_dtype(plan.torch_dtype)
        self.scale_offset = (arrays.scale, arrays.offset)
        # gamma's and beta's dtype (the moving statistics'), where it is not the kernels'
        # compute dtype (half-precision parameters); None where it is.
        parameter_dtype = moving[0].dtype
        self.gradient_dtype = (
            None if parameter_dtype == compute_dtype(parameter_dtype) else (parameter_dtype)
        )
        self.no_weights = NO_WEIGHTS[self.weights_dtype]
        # The forward kernel's arguments between x's (weights, mask flag) and the output, and
        # after the output up to renorm's.
        self.leading = (
            ghost_batches,
            plan.layout.period,
            plan.blocks,
            arrays.scale,
            arrays.offset,
            epsilon,
        )
        self.trailing = (
            arrays.moving_mean,
            arrays.moving_variance,
            arrays.average_weight,
            arrays.debiased,
            momentum,
            unbiased,
        )
        stepped = [t for t in moving if t is not None]
        if renorm is not None:
            stepped.extend(renorm[:3])
        self.stepped = stepped

    def forward(
        self,
        source: torch.Tensor,
        weights: torch.Tensor | None = None,
        backward_follows: bool = False,
    ) -> tuple[torch.Tensor, TrainingPass]:
        """The output for ``source`` (x of the plan's signature, or its one copy) with the
        mask's ``weights`` (one per position, as :func:`batchnorm.functional._cpu_plan.prepare`
        takes them) or none, the buffers stepped; and what :meth:`backward` needs.

        A plan's first step that compiles the kernel first starts a helper compiling the
        kernels its next calls take (:meth:`_requests_after`,
        :mod:`batchnorm.kernels._ahead`): the backward where ``backward_follows``, and the
        layer's inference.
        """
        plan = self.plan
        x3 = plan.kernel_view(source)
        rows, masked = self._mask_rows(weights), None if weights is None else True
        parallel = plan.parallel()
        out, out3 = plan.fresh(source)
        correction = composed = renorm = None
        if self.renorm is not None:
            renorm, correction, composed = self._renorm_arguments()
        arguments = (x3, rows, masked, *self.leading, out3, *self.trailing, renorm, *self.code)
        kernel = plan.train_forward
        if plan.ahead_asked:
            mean, variance, total = compiled_build(kernel, parallel)(*arguments)
        else:
            plan.ahead_asked = True
            used = self.scale_offset if composed is None else (composed[0], composed[1])
            mean, variance, total = first_call(
                kernel,
                parallel,
                arguments,
                lambda builds: self._requests_after(
                    arguments, used, out3, backward_follows, builds
                ),
            )
        torch.autograd.graph.increment_version(self.stepped)  # type: ignore[arg-type]
        return out, TrainingPass(
            self, masked, parallel, mean, variance, total, correction, composed
        )

    def _mask_rows(self, weights: torch.Tensor | None) -> np.ndarray:
        """The mask's ``weights`` as the kernels read them, ``(rows, inner)``; a dummy without a
        mask. The forward and the backward derive them alike (nothing keeps them between)."""
        if weights is None:
            return self.no_weights
        return mask_rows(weights, self.plan, self.axes, self.weights_dtype)

    def _renorm_arguments(self) -> tuple[tuple[Any, ...], np.ndarray, np.ndarray]:
        """The forward kernel's renorm argument, with the ``correction`` and ``composed``
        arrays it fills. The clipping is read on every call: a schedule may relax it in place,
        as in tf-keras."""
        renorm, views = self.renorm, self.arrays.renorm
        assert renorm is not None and views is not None
        channels = self.plan.layout.channels
        correction = np.empty((2, channels))
        composed = np.empty((2, channels), self.plan.compute_dtype)
        arguments = (*views, renorm.limits(), renorm.momentum, correction, composed)
        return arguments, correction, composed

    def backward(
        self,
        grad: torch.Tensor,
        training_pass: TrainingPass,
        source: torch.Tensor,
        weights: torch.Tensor | None = None,
        output: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dx, dgamma, dbeta)`` of :meth:`forward`'s output in one kernel call, in the dtypes
        of x and of the moving statistics (gamma's and beta's); ``source`` is what the forward
        read (x or its one copy), ``weights`` the mask's weights it took (None without a mask)
        and ``output`` its output where the activation's derivative reads it (elu), all as
        autograd saved them."""
        plan, passed = self.plan, training_pass
        x3 = plan.kernel_view(source)
        rows = self._mask_rows(weights)
        dy3 = canonical_gradient(grad, plan, source)
        dx, dx3 = plan.fresh(source)
        statistics = (passed.mean, passed.variance, passed.total_weight)
        composed = passed.composed
        scale, offset = self.scale_offset if composed is None else (composed[0], composed[1])
        code, parameter = self.code
        layout = (self.ghost_batches, plan.layout.period, plan.blocks, dx3)
        if code is None:
            backward = compiled_build(plan.train_backward, passed.parallel)
            dscale, doffset = backward(
                dy3,
                x3,
                rows,
                passed.masked,
                *statistics,
                scale,
                self.epsilon,
                *layout,
            )
        else:
            backward = compiled_build(plan.train_backward_activated, passed.parallel)
            dscale, doffset = backward(
                dy3,
                x3,
                x3 if output is None else plan.kernel_view(output),
                rows,
                passed.masked,
                *statistics,
                scale,
                offset,
                self.epsilon,
                code,
                parameter,
                *layout,
            )
        if passed.correction is not None:  # gamma's gradient from scale' = r * gamma and
            r, d = passed.correction  # offset' = d * gamma + beta
            dscale = r * dscale + d * doffset
        compute = plan.compute_dtype
        dgamma = torch.from_numpy(dscale.astype(compute, copy=False))
        dbeta = torch.from_numpy(doffset.astype(compute, copy=False))
        if self.gradient_dtype is not None:
            dgamma, dbeta = dgamma.to(self.gradient_dtype), dbeta.to(self.gradient_dtype)
        return dx, dgamma, dbeta

    def _requests_after(
        self,
        arguments: tuple[Any, ...],
        used: tuple[np.ndarray, np.ndarray],
        out3: np.ndarray,
        backward_follows: bool,
        builds: tuple[str, ...],
    ) -> list[Request]:
        """The kernel calls that the first training step called with the forward kernel's
        ``arguments`` leads to, with the Numba signatures they will have, in each of ``builds``
        (the serial ones first): :meth:`backward`'s (an upstream gradient laid out like x; the
        activation's backward with a fused activation; ``used``, the scale and offset the step
        normalised with) where ``backward_follows``, and the affine kernel's of the layer's
        inference on an input of the same signature, without gradients and with them
        (:class:`~batchnorm.functional._cpu_operations.InferenceCall`), the statistics as
        ``DirectCalls`` keeps them (``[1, C]`` views of the buffers); with the threaded builds,
        the forward's own (the first step ran the serial one: :func:`first_call`); on rows,
        first, the forward's normalising block helper (a
        :class:`~batchnorm.kernels._jit.BlockBuild`). tests/test_compile_ahead.py checks them
        against the calls' own."""
        plan, arrays = self.plan, self.arrays
        typeof: Any = numba.typeof  # untyped for mypy
        tuple_type: Any = numba.types.UniTuple
        x3, weights, masked = arguments[:3]
        x, out = typeof(x3), typeof(out3)
        index, real = numba.types.int64, numba.types.float64
        code = self.code
        statistics = numba.types.Array(real, 2, "C")
        mask = (typeof(weights), typeof(masked))
        moments = (statistics, statistics, statistics)
        backward: tuple[Kernel, tuple[Any, ...]]
        if code[0] is None:
            plain = (x, x, *mask, *moments, typeof(used[0]), real, index, index, index, out)
            backward = (plan.train_backward, plain)
        else:  # with the output where the derivative reads it (elu), else x
            output = out if self.reads_output else x
            activated = (
                *(x, x, output, *mask, *moments, typeof(used[0]), typeof(used[1])),
                *(real, typeof(code[0]), real, index, index, index, out),
            )
            backward = (plan.train_backward_activated, activated)
        rows = typeof(arrays.moving_mean.reshape(1, -1))
        inference = (
            *(x, rows, rows, typeof(arrays.scale), typeof(arrays.offset)),
            *(real, index, index, index, out, typeof(code[0]), real),
        )
        inference_builds = {
            plan.normalize_build(plan.inference_blocks(backward_follows_inference))
            for backward_follows_inference in (False, True)  # without gradients, with them
        }
        # Serial builds serve while threaded ones are being compiled. The forward compiles
        # longer than the backward, so the helper first compiles the forward's normalising
        # block helper, which this process, still compiling the forward, then loads from the
        # helper's cache entry rather than compiling it (0.3-0.4 s): on channel planes through
        # the serial inference kernel, whose block helper it is too (the whole kernel costs
        # little more there); on rows alone, where the helper's backward has less to spare
        # (the inference kernel ahead of it made 64x1000's step wait 0.3 s longer).
        layout = plan.train_forward.layout
        requests: list[Request] = []
        if layout == "rows" and "serial" in builds:
            compute = numba.from_dtype(np.dtype(plan.compute_dtype))
            coefficients = numba.types.Array(compute, 2, "C")
            constants = tuple_type(compute, 2)  # the activation's (0, parameter)
            block = (
                *(x, coefficients, coefficients, coefficients, index, index, index, index),
                *(out, typeof(code[0]), constants),
            )
            requests.append((normalize_block.for_layout(layout), "serial", block))
        for build in builds:
            inference_first = build == "serial" and layout in ("planes", "half_planes")
            if build == "parallel":
                forward = tuple(typeof(argument) for argument in arguments)
                requests.append((plan.train_forward, build, forward))
            if inference_first:
                requests.append((plan.affine_normalize, build, inference))
            if backward_follows:
                requests.append((backward[0], build, backward[1]))
            if (build == "serial" or build in inference_builds) and not inference_first:
                requests.append((plan.affine_normalize, build, inference))
        if "parallel" in inference_builds and "parallel" not in builds:
            requests.append((plan.affine_normalize, "parallel", inference))
        return requests
