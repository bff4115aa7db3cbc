"""Lossless conversion between torch.nn.BatchNorm* and :class:`BatchNormalization`.

PyTorch's conventions mapped to this layer's:

- ``momentum_here = 1 - momentum_torch`` (PyTorch weights the new value, Keras the old one);
  ``momentum=None`` (cumulative average) is ``moving_average="debiased", momentum=1.0`` with
  ``num_batches_tracked`` as ``moving_average_weight``;
- ``running_var`` is the unbiased variance: ``moving_variance_estimator="unbiased"``;
- channels at dim 1: ``axis=1``; ``eps`` is ``epsilon``; ``affine`` is ``center`` and ``scale``;
- ``track_running_stats=False`` (batch statistics always) is ``use_global_stats=False``; set
  to False on a module that keeps its running statistics (batch statistics in training, never
  updated; the running ones in eval) it is the ordinary layer with ``momentum=1.0``.

timm's and inplace_abn's batch norms with an activation convert the same way, their activation
becoming the layer's (:mod:`batchnorm.interop._activation_conversion`); a layer's activation
becomes a torch module after torch's batch norm.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from batchnorm.functional._validation import check_fraction, check_module
from batchnorm.interop._activation_conversion import (
    ActivatedBatchNorm,
    describe,
    holds_unknown_activation,
    is_activated_batch_norm,
    torch_activation,
)
from batchnorm.interop._frozen_batch_norm import (
    carry_freeze,
    is_frozen,
    is_frozen_torch_batch_norm,
    plain_class,
    unfrozen_use_global_stats,
)
from batchnorm.interop._module_places import module_places
from batchnorm.interop._rerouting_conversion import (
    carry_hooks,
    carry_rerouting,
    refuse_hooked_weights,
)
from batchnorm.layers import BatchNormalization

_TORCH_CLASSES: dict[int, tuple[type[_BatchNorm], type[_BatchNorm]]] = {
    1: (nn.BatchNorm1d, nn.LazyBatchNorm1d),
    2: (nn.BatchNorm2d, nn.LazyBatchNorm2d),
    3: (nn.BatchNorm3d, nn.LazyBatchNorm3d),
}
# torch's own forwards (the Lazy classes inherit _BatchNorm's): a subclass overriding forward
# computes something else.
_TORCH_FORWARDS = (_BatchNorm.forward, nn.SyncBatchNorm.forward)
_SPATIAL_DIMS_OF_RANK = {2: 1, 3: 1, 4: 2, 5: 3}
# A layer converted from torch remembers its class's dims, for to_torch before any call.
_TORCH_DIMS = "_torch_dims"


def _complement(momentum: float) -> float:
    """``1 - momentum``, rounded so that converting twice gives the value back (0.1 -> 0.9 -> 0.1)."""
    return round(1.0 - momentum, 15)


def from_torch(module: nn.Module) -> BatchNormalization:
    """A :class:`BatchNormalization` whose outputs and running-statistic trajectory equal ``module``'s.

    Takes torch.nn.BatchNorm1d/2d/3d, their Lazy versions (an uninitialised one gives a layer
    built on its first input) and SyncBatchNorm (a ``synchronized=True`` layer over the same
    process group, which also runs on CPU), affine or not, with or without running
    statistics, any momentum including None. Parameters and buffers are copied (same device;
    float64 stays float64, other dtypes become float32 parameters), ``requires_grad`` and the
    train/eval mode are kept. Torch's ``eps`` must be > 0 (ValueError otherwise). A subclass
    that overrides ``forward`` raises ValueError: what it computes is unknown. With
    ``momentum=None``, torch counts an empty training batch in ``num_batches_tracked`` (the
    next batch weighs less); the layer's debiased average steps only on batches with samples.

    Also takes batch norms fused with an activation, recognised by class name and attributes:

    - timm's ``BatchNormAct2d`` / ``SyncBatchNormAct``, ``act(drop(batch_norm(x)))``, when
      ``drop`` is Identity and ``act`` is exactly torch.nn.ReLU, LeakyReLU, ELU (alpha > 0) or
      Identity: ``activation="relu"``, ``"leaky_relu"`` (``activation_param=negative_slope``),
      ``"elu"`` (``activation_param=alpha``) or none. Any other ``act`` (SiLU, GELU, a subclass)
      or ``drop`` raises ValueError: one layer cannot compute it, :func:`convert` keeps it as a
      module after the layer.
    - inplace_abn's ``ABN`` (``activation`` and ``activation_param`` as given),
      ``InPlaceABN`` (also ``memory="in_place"``) and ``InPlaceABNSync`` (``synchronized=True``
      over its ``group``, ``memory="default"``: the layer does not train in place when
      synchronized; same numbers). InPlaceABN and InPlaceABNSync scale by ``|weight| + eps``:
      gamma is that value (outputs, input gradients and statistics equal; gamma's gradient is
      ``sign(weight)`` times weight's). Raises ValueError for an InPlaceABN with "relu" (its
      own forward raises) or leaky_relu with a slope <= 0 (not invertible).

    A torch batch-norm subclass with an ``act`` module of another class raises ValueError (its
    forward is unknown; converting it as a plain batch norm would drop the activation).

    Example:
        >>> layer = from_torch(torch.nn.BatchNorm2d(16))
        >>> (layer.axis, layer.momentum, layer.epsilon)
        (1, 0.9, 1e-05)
    """
    activated = _activated(module)
    if activated is not None and activated.following:
        kept = ", ".join(type(m).__name__ for m in activated.following)
        raise ValueError(
            f"from_torch returns one layer, which cannot compute the {kept} of this "
            f"{activated.source}: `batchnorm.convert(module)` keeps them as modules after the "
            f"layer (nn.Sequential). Received: {module!r}"
        )
    return _layer_from(module, activated)


def _activated(module: nn.Module) -> ActivatedBatchNorm | None:
    """How ``module``'s activation converts; None for torch's own batch norms."""
    if is_activated_batch_norm(module):
        return describe(module)
    if holds_unknown_activation(module):
        raise ValueError(
            f"{type(module).__name__} is a torch batch norm with an `act` module but not a "
            "known batch norm with an activation (timm's BatchNormAct2d, SyncBatchNormAct): "
            "its forward is unknown, and converting it as a plain batch norm would drop `act`. "
            f"Received: {module!r}"
        )
    if not isinstance(module, _BatchNorm):
        raise TypeError(
            "`module` must be a torch.nn.BatchNorm1d/2d/3d, LazyBatchNorm, SyncBatchNorm, "
            "timm BatchNormAct2d / SyncBatchNormAct or inplace_abn ABN / InPlaceABN / "
            f"InPlaceABNSync. Received: {type(module).__name__}"
        )
    if type(module).forward not in _TORCH_FORWARDS and not is_frozen_torch_batch_norm(module):
        raise ValueError(
            f"{type(module).__name__} is a torch batch norm subclass that overrides forward: what "
            "it computes is unknown, and converting it as a plain batch norm would change its "
            "outputs (a forward that always reads the running statistics, for one). Replace it "
            "by hand, e.g. with a BatchNormalization(use_global_stats=True) holding its state. "
            f"Received: {module!r}"
        )
    return None


def _layer_from(module: Any, activated: ActivatedBatchNorm | None) -> BatchNormalization:
    """The layer for a torch batch norm or an inplace_abn one (the same attributes)."""
    refuse_hooked_weights(module)
    # Torch turns a Lazy module into its eager class when it materialises: one still of a Lazy
    # class has no channel count yet (affine=False, track_running_stats=False: not even an
    # uninitialised tensor to show it).
    lazy = isinstance(module, LazyModuleMixin)
    present = [t for t in (module.weight, module.running_mean) if t is not None]
    # An uninitialised tensor carries the dtype and device it will materialise with.
    reference = present[0] if present else None
    if reference is None:  # no tensor: the layer's default dtype
        dtype = None
    else:
        dtype = "float64" if reference.dtype == torch.float64 else "float32"
    device = reference.device if reference is not None else None
    if not float(module.eps) > 0.0:
        raise ValueError(
            f"The torch module's `eps` must be > 0 to convert: the layer's epsilon keeps a "
            f"channel of constant values finite (torch's eps=0 gives NaN there). Received: "
            f"eps={module.eps!r} in {module!r}"
        )
    # track_running_stats=False with running statistics kept (switched off after training):
    # torch trains on batch statistics without updating them and normalises with them in eval,
    # which is the ordinary layer with momentum 1 (the moving statistics never move).
    kept = not module.track_running_stats and module.running_mean is not None
    cumulative = module.momentum is None and not kept
    if module.momentum is not None:  # named as torch's, not as the complement
        check_fraction(module.momentum, "momentum")
    momentum = 1.0 if cumulative or kept else _complement(float(module.momentum))
    options: dict[str, Any] = {
        "synchronized": isinstance(module, nn.SyncBatchNorm),
        "process_group": getattr(module, "process_group", None),
    }
    options.update(activated.layer_options if activated is not None else {})
    layer = BatchNormalization(
        None if lazy else module.num_features,
        axis=1,
        momentum=momentum,
        epsilon=float(module.eps),
        center=module.affine,
        scale=module.affine,
        moving_variance_estimator="unbiased",
        moving_average="debiased" if cumulative else "ema",
        use_global_stats=None if module.track_running_stats or kept else False,
        dtype=dtype,
        device=device,
        **options,
    )
    for dims, classes in _TORCH_CLASSES.items():
        if isinstance(module, classes):
            vars(layer)[_TORCH_DIMS] = dims
    if not lazy:
        _copy_state(module, layer, to_layer=True)
        carry_rerouting(module, layer, _NAME_PAIRS[:2])
        if activated is not None:
            activated.finish(module, layer)
    carry_freeze(module, layer)
    layer.train(module.training)
    return layer


_NAME_PAIRS = (
    ("weight", "gamma"),
    ("bias", "beta"),
    ("running_mean", "moving_mean"),
    ("running_var", "moving_variance"),
)


def _copy_state(module: nn.Module, layer: BatchNormalization, *, to_layer: bool) -> None:
    """Copy parameters, buffers and ``requires_grad`` between the two, in either direction."""
    names = list(_NAME_PAIRS)
    if layer.moving_average == "debiased":
        names.append(("num_batches_tracked", "moving_average_weight"))
    with torch.no_grad():
        for torch_name, layer_name in names:
            torch_tensor = getattr(module, torch_name, None)
            layer_tensor = getattr(layer, layer_name, None)
            if torch_tensor is None or layer_tensor is None:
                continue
            source, target = (
                (torch_tensor, layer_tensor) if to_layer else (layer_tensor, torch_tensor)
            )
            target.copy_(source.detach().to(dtype=target.dtype))
            if isinstance(source, nn.Parameter):
                target.requires_grad_(source.requires_grad)


def _share_parameters(
    source: nn.Module, target: nn.Module, pairs: Sequence[tuple[str, str]]
) -> None:
    """Give ``target`` the Parameter objects of ``source`` that it holds copies of (same values,
    dtype, device and shape), as torch's ``convert_sync_batchnorm`` keeps them: an optimizer
    built before :func:`convert` trains the converted model's gamma and beta (it held the old
    objects, and they never moved, silently). Not where the values differ (InPlaceABN's
    ``|weight| + eps``), the dtype changes (half becomes float32) or a parametrization computes
    the tensor."""
    for source_name, target_name in pairs:
        shared = source._parameters.get(source_name)
        copy = target._parameters.get(target_name)
        if (
            shared is None
            or copy is None
            or nn.parameter.is_lazy(shared)
            or (shared.dtype, shared.device, shared.shape) != (copy.dtype, copy.device, copy.shape)
            or (shared.device.type != "meta" and not torch.equal(shared.detach(), copy.detach()))
        ):
            continue
        setattr(target, target_name, shared)


def torch_incompatibilities(layer: BatchNormalization) -> list[str]:
    """Why torch.nn.BatchNorm cannot reproduce ``layer`` exactly (empty when it can)."""
    reasons = []
    if layer.renorm:
        reasons.append("renorm=True (Batch Renormalization)")
    if layer.virtual_batch_size is not None:
        reasons.append(f"virtual_batch_size={layer.virtual_batch_size} (ghost batches)")
    if layer.adjustment is not None:
        reasons.append("adjustment is set")
    for name in ("gamma_regularizer", "beta_regularizer", "gamma_constraint", "beta_constraint"):
        if getattr(layer, name) is not None:
            reasons.append(f"{name} is set")
    if layer.center != layer.scale:
        reasons.append(f"center={layer.center} with scale={layer.scale} (torch's affine is both)")
    if not layer.trainable:
        reasons.append("trainable=False (torch's train() would re-enable batch statistics)")
    if unfrozen_use_global_stats(layer) is True:
        reasons.append("use_global_stats=True (torch has no moving statistics in training)")
    # use_global_stats=False becomes track_running_stats=False, which keeps no statistics:
    # how the layer would average them does not matter.
    averaging = unfrozen_use_global_stats(layer) is not False
    if averaging and layer.moving_average == "debiased" and layer.momentum != 1.0:
        reasons.append(
            f"moving_average='debiased' with momentum={layer.momentum} (torch's momentum=None "
            "is the debiased average with momentum=1.0 only)"
        )
    if averaging and not layer._stores_unbiased_variance():
        reasons.append(
            "the moving variance is stored biased (torch stores the unbiased one); pass "
            "moving_variance_estimator='unbiased'"
        )
    axes = layer._axes
    if axes is None:
        axes_list = layer.axis if isinstance(layer.axis, list) else [layer.axis]
        if axes_list != [1]:
            reasons.append(
                f"axis={layer.axis} cannot be placed before the layer is built; call it once or "
                "build(input_shape) first"
            )
    elif axes != (1,):
        reasons.append(f"channel axes {list(axes)} (torch normalises dim 1 only)")
    return reasons


def to_torch(layer: BatchNormalization, *, dims: int | None = None) -> _BatchNorm:
    """The torch.nn.BatchNorm1d/2d/3d equal to ``layer``, step for step.

    The class follows the input rank the layer was built for (rank 2 or 3: 1d, 4: 2d, 5: 3d), or
    ``dims`` (1, 2 or 3) when given, or, for a layer converted from torch and not called since,
    the class it came from; an unbuilt layer gives the Lazy class, a synchronized one
    torch.nn.SyncBatchNorm (which torch runs on GPUs only). Raises ValueError
    listing every setting torch cannot express (renorm, ghost batches, adjustment, regularizers or
    constraints, biased moving variance, debiased averaging with momentum != 1,
    use_global_stats=True, trainable=False, channel axes other than dim 1).
    ``use_global_stats=False`` becomes ``track_running_stats=False``: the outputs are the same,
    the moving statistics (unused by the outputs) are dropped; a layer frozen by
    :func:`batchnorm.freeze` normalises with them, so its frozen module keeps them
    (``track_running_stats=False`` with running statistics, which, unfrozen, trains on batch
    statistics without updating them and normalises with them in eval). A layer with an activation other
    than "identity" raises too: :func:`convert` gives the batch norm followed by the activation
    module. ``memory="in_place"`` gives torch's ordinary batch norm (same numbers, the input is
    not overwritten).
    """
    if not isinstance(layer, BatchNormalization):
        raise TypeError(
            f"`layer` must be a batchnorm.BatchNormalization. Received: {type(layer).__name__}"
        )
    reasons = torch_incompatibilities(layer)
    activation = torch_activation(layer)
    if activation is not None:
        reasons.append(
            f"activation={layer.activation!r} (to_torch gives the batch norm alone; "
            f"`batchnorm.convert(layer, to='torch')` gives it followed by {activation})"
        )
    return _torch_batch_norm(layer, dims, reasons)


def _torch_batch_norm(
    layer: BatchNormalization, dims: int | None, reasons: list[str]
) -> _BatchNorm:
    """The torch batch norm of ``layer`` (without its activation); ValueError for ``reasons``."""
    refuse_hooked_weights(layer)
    if reasons:
        raise ValueError(
            f"torch.nn.BatchNorm cannot express layer {layer.name}: " + "; ".join(reasons) + "."
        )
    if dims is None:
        rank = layer._input_rank
        if rank is not None:
            dims = _SPATIAL_DIMS_OF_RANK.get(rank)
        else:  # the class it was converted from; SyncBatchNorm serves every rank
            dims = vars(layer).get(_TORCH_DIMS, 1 if layer.synchronized else None)
            if dims is None:
                raise ValueError(
                    f"Layer {layer.name} has not seen an input, so the torch class is unknown: "
                    "pass `dims` (1 for BatchNorm1d, 2 for BatchNorm2d, 3 for BatchNorm3d). "
                    "Received: dims=None"
                )
    # True == 1 and 2.0 == 2 found a class too.
    if (
        isinstance(dims, bool)
        or not isinstance(dims, numbers.Integral)
        or dims not in _TORCH_CLASSES
    ):
        raise ValueError(f"`dims` must be 1, 2 or 3. Received: dims={dims!r}")
    dims = int(dims)
    eager_class, lazy_class = _TORCH_CLASSES[dims]
    if layer.synchronized:
        if not layer.built:
            raise ValueError(
                f"Layer {layer.name} is synchronized and not built: torch has no lazy "
                "SyncBatchNorm. Build it (num_features or build(input_shape)) first."
            )
        eager_class = nn.SyncBatchNorm
    # A frozen layer normalises with its moving statistics, also where it had
    # use_global_stats=False: the module keeps them (torch's track_running_stats=False with
    # statistics kept, the frozen class normalising with them; unfrozen, batch statistics in
    # training, never updated, and the kept ones in eval).
    batch_statistics = unfrozen_use_global_stats(layer) is False
    keep_statistics = batch_statistics and is_frozen(layer)
    options: dict[str, Any] = {
        "eps": layer.epsilon,
        "momentum": None if layer.moving_average == "debiased" else _complement(layer.momentum),
        "affine": layer.center,
        "track_running_stats": not batch_statistics or keep_statistics,
    }
    if not layer.built:
        module: _BatchNorm = lazy_class(**options)
    else:
        reference = layer.moving_mean
        if layer.synchronized:
            options["process_group"] = layer.process_group
        module = eager_class(
            int(reference.shape[0]), device=reference.device, dtype=reference.dtype, **options
        )
        module.track_running_stats = not batch_statistics
        _copy_state(module, layer, to_layer=False)
        carry_rerouting(layer, module, [(ours, theirs) for theirs, ours in _NAME_PAIRS[:2]])
    carry_freeze(layer, module, plain_class(module))
    module.train(layer.training)
    return module


def convert(model: nn.Module, to: Literal["batchnorm", "torch"] = "batchnorm") -> nn.Module:
    """Swap every batch norm in ``model`` in place and return ``model``; outputs are unchanged.
    The new modules hold the old ones' Parameter objects where the values carry over unchanged
    (weight/bias as gamma/beta and back), so an optimizer built before still trains them.

    ``to="batchnorm"`` replaces torch.nn.BatchNorm* modules, timm's BatchNormAct2d /
    SyncBatchNormAct and inplace_abn's ABN / InPlaceABN / InPlaceABNSync with
    :class:`BatchNormalization` (:func:`from_torch`, which sets the activation). A timm module
    whose ``act`` the layer cannot compute (SiLU, GELU, ...) or whose ``drop`` is not Identity
    becomes ``nn.Sequential(layer, drop, act)`` (Identity left out; the same ``drop`` and ``act``
    modules, so outputs and random draws are unchanged). ``to="torch"`` does the reverse
    (:func:`to_torch`); a layer with an activation becomes ``nn.Sequential(batch_norm,
    activation)`` (torch.nn.ReLU, LeakyReLU or ELU). Modules are not turned back into timm's
    or inplace_abn's classes. Anything that cannot be converted raises (see :func:`from_torch`
    and :func:`to_torch`) before anything is replaced. A batch norm passed as ``model`` itself
    is returned converted (a module cannot replace itself in place).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> model = convert(model)  # model[1] is a BatchNormalization
    """
    check_module(model)
    if to not in ("batchnorm", "torch"):
        raise ValueError(f"`to` must be 'batchnorm' or 'torch'. Received: to={to!r}")

    def is_source(module: nn.Module) -> bool:
        if to == "batchnorm":
            return isinstance(module, _BatchNorm) or is_activated_batch_norm(module)
        return isinstance(module, BatchNormalization)

    def converted(module: nn.Module) -> nn.Module:
        if to == "batchnorm":
            activated = _activated(module)
            layer = _layer_from(module, activated)
            _share_parameters(module, layer, _NAME_PAIRS[:2])
            carry_hooks(module, layer)
            if activated is None or not activated.following:
                return layer
            chain = nn.Sequential(layer, *activated.following)
            chain.training = module.training  # the kept modules keep their own modes
            return chain
        assert isinstance(module, BatchNormalization)
        batch_norm = _torch_batch_norm(module, None, torch_incompatibilities(module))
        _share_parameters(module, batch_norm, [(ours, theirs) for theirs, ours in _NAME_PAIRS[:2]])
        carry_hooks(module, batch_norm)
        activation = torch_activation(module)
        if activation is None:
            return batch_norm
        return nn.Sequential(batch_norm, activation).train(module.training)

    if is_source(model):
        return converted(model)
    # Every place a batch norm sits, shared ones included; each is converted once, and every
    # place gets that one conversion (two conversions no longer shared their weights).
    places = module_places(model, is_source)
    conversions: dict[int, nn.Module] = {}
    for _, _, child in places:
        if id(child) not in conversions:
            conversions[id(child)] = converted(child)
    for parent, name, child in places:
        setattr(parent, name, conversions[id(child)])
    return model
