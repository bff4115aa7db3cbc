"""How a built BatchNormalization layer runs the functional core.

A call takes the first of: the direct calls (:class:`~batchnorm.functional._direct_step.DirectCalls`,
a shortcut for repeated plain CPU calls that the layer keeps between calls), the in-place training
step or the direct inference of :mod:`batchnorm.functional._direct_step`, and the stateless
:func:`~batchnorm.functional._batch_norm.batch_norm_step`, whose new statistics are copied into
the buffers. What the layer remembers between calls (the step options, the statistics tuple, the
direct calls) is rebuilt when a setting or a tensor changes.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import torch

from batchnorm.functional import BatchNormStatistics
from batchnorm.functional._activation import Activation
from batchnorm.functional._batch_norm import BatchNormOptions, batch_norm_step, check_mask
from batchnorm.functional._cpu_plan import kernels_can_read, storageless
from batchnorm.functional._direct_step import DirectCalls, infer, train_in_place
from batchnorm.layers._moving_update import write_moving_statistics
from batchnorm.layers._parametrized import affine_tensors, rerouted

STATISTIC_NAMES = BatchNormStatistics._fields


class SteppingLayer(Protocol):
    """What these functions read and set on a :class:`~batchnorm.BatchNormalization` layer."""

    name: str
    momentum: float
    epsilon: float
    renorm: bool
    renorm_clipping: dict[str, float]
    renorm_momentum: float
    virtual_batch_size: int | None
    adjustment: Any
    use_global_stats: bool | None
    synchronized: bool
    process_group: Any
    fused: bool | None
    _activation: Activation | None

    @property
    def memory(self) -> str: ...

    training: bool
    moving_mean: torch.Tensor
    _trainable: bool
    _axes: tuple[int, ...] | None
    _input_rank: int | None
    _parameters: dict[str, Any]
    _buffers: dict[str, Any]

    def _stores_unbiased_variance(self) -> bool: ...


def layer_statistics(layer: SteppingLayer, remember: bool = True) -> BatchNormStatistics:
    """The layer's buffers as a BatchNormStatistics (the same tuple while they are the same).

    ``remember=False`` (a call that ``torch.compile`` or ``torch.export`` traces, whose
    buffers are fake stand-ins) keeps nothing: the layer kept the fakes, and a ``deepcopy``
    of a model after its training-mode export failed on them ("Cannot access data pointer of
    Tensor (e.g. FakeTensor, FunctionalTensor)")."""
    present = tuple(layer._buffers.get(n) for n in STATISTIC_NAMES)
    cached = vars(layer).get("_statistics")
    # Identity, not tensor equality; the cached tensors stay alive, so ids are not reused.
    if cached is not None and all(a is b for a, b in zip(cached, present, strict=True)):
        return cached  # type: ignore[no-any-return]
    statistics = BatchNormStatistics(*present)  # type: ignore[arg-type]
    # Nor functorch's wrappers, which torch.func.functional_call swaps in under vmap or jacrev:
    # deepcopy and torch.save failed on them ever after ("Cannot access storage").
    if remember and not any(t is not None and storageless(t) for t in present):
        vars(layer)["_statistics"] = statistics
    return statistics


def step_options(layer: SteppingLayer) -> BatchNormOptions:
    """The settings of the functional step, rebuilt only when an attribute changed."""
    settings = (
        layer.momentum,
        layer.epsilon,
        layer._stores_unbiased_variance(),
        layer.renorm_clipping,
        layer.renorm_momentum,
        layer.virtual_batch_size,
        layer.adjustment,
        layer.use_global_stats,
        layer.synchronized,
        layer.process_group,
        layer._activation,
        layer.memory == "in_place",
    )
    cached = vars(layer).get("_options")
    if cached is not None and cached[0] == settings:
        return cached[1]  # type: ignore[no-any-return]
    options = BatchNormOptions(*settings)
    if not torch.compiler.is_compiling():  # a traced write to the module's __dict__ is a
        vars(layer)["_options"] = (settings, options)  # side effect dynamo refuses (checkpoint)
    return options


def make_direct_calls(layer: SteppingLayer) -> DirectCalls | None:
    """The shortcut for the layer's repeated plain calls (None where none applies: also with a
    parametrized or pruned tensor, which the shortcut would not see computed on each call)."""
    assert layer._axes is not None and layer._input_rank is not None
    if rerouted(layer):  # type: ignore[arg-type]
        return None
    tensors = (
        layer._parameters.get("gamma"),
        layer._parameters.get("beta"),
        layer._buffers.get("moving_mean"),
        layer._buffers.get("moving_variance"),
    )
    if len(layer._axes) != 1 or not DirectCalls.applicable(layer.moving_mean.dtype, tensors):
        return None
    return DirectCalls(
        layer._parameters,
        layer._buffers,
        layer._axes[0],
        layer._input_rank,
        step_options(layer),
        training=layer.training,
        trainable=layer._trainable,
        renorm=layer.renorm,
        masks=not layer.fused,
    )


def run_step(
    layer: SteppingLayer,
    x: torch.Tensor,
    resolved: bool | torch.Tensor,
    mask: torch.Tensor | None,
    *,
    compiling: bool = False,
) -> torch.Tensor:
    """The call on a built layer, whose checks have passed; in training, the buffers are updated
    in place (the caller holds the layer's lock).

    A shortcut made here serves this call too: the first call then saves for its backward what
    the calls after it save (non-reentrant ``torch.utils.checkpoint`` compares their number
    between a forward and its recomputation, which takes the shortcut)."""
    axes = layer._axes
    assert axes is not None
    remembered = vars(layer)
    direct_calls = remembered.get("_direct_calls")
    if (
        not compiling
        and kernels_can_read(x)  # the shortcut reads the layer's tensors' memory
        and (direct_calls is None or not direct_calls.current())
    ):
        direct_calls = remembered["_direct_calls"] = make_direct_calls(layer)
        if direct_calls is not None and type(resolved) is bool:
            y = direct_calls(x, resolved, mask)
            if y is not None:
                return y
    if mask is not None and layer.fused:
        check_mask(mask, x, axes)  # a malformed mask is an error, as without fusing
        # Not while compiling: dynamo cannot trace warnings.warn (fullgraph=True failed there);
        # the eager calls before and after warn.
        if not compiling:
            warnings.warn(
                "Masking is not supported with `fused=True` (as in tf-keras): `mask` is ignored "
                "for the normalization. Pass fused=False to use it.",
                UserWarning,
                stacklevel=5,
            )
        mask = None
    buffers = statistics = layer_statistics(layer, remember=not compiling)
    if isinstance(resolved, torch.Tensor):
        # Both branches run; the inference one saves the moving statistics for its backward,
        # so it must not see the buffers that the update below overwrites in place.
        statistics = BatchNormStatistics(
            *(None if t is None else t.clone() for t in buffers)  # type: ignore[arg-type]
        )
    options = step_options(layer)
    gamma, beta = affine_tensors(layer)
    direct = None
    if resolved is False and layer.use_global_stats is not False:
        direct = infer(x, buffers, gamma, beta, axes, layer.epsilon, mask, layer._activation)
    elif resolved is True:
        direct = train_in_place(x, buffers, gamma, beta, axes, options, mask)
    if direct is not None:
        return direct
    y, updated = batch_norm_step(x, statistics, gamma, beta, axes, options, resolved, mask)
    if resolved is not False:
        write_moving_statistics(layer.name, buffers, updated)
    return y
