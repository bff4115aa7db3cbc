"""What a BatchNormalization checkpoint must agree on before ``load_state_dict`` writes anything.

A state_dict holds the layer's tensors, but not which variance ``moving_variance`` is: the biased
``Var[x]`` or the Bessel-corrected one (``moving_variance_estimator``, or tf-keras' fused path).
The layer records it in the state_dict's metadata, ``state_dict._metadata[prefix]``, beside
torch's own ``version``: ``torch.save`` / ``torch.load`` (also with ``weights_only=True``) and
``load_state_dict`` keep it, and checkpoints without it (older ones, or a dict rebuilt key by
key) load unchecked. Whether the moving average is debiased, renorm and center/scale show in the
keys; the dtype shows in the tensors.

:func:`plan_load` checks everything a load reads (shapes, the recorded estimator, a
torch.nn.BatchNorm state_dict given by mistake) before the layer writes anything, so a load that
raises for them leaves the layer, built or not, as it was. Missing and unexpected keys are only
listed: torch's ``load_state_dict`` raises for them when ``strict``, which a module cannot see,
so a built layer copies what is there, as torch's modules do, and an unbuilt layer loads a
checkpoint holding all its keys (extra ones are listed as unexpected; before session 52 they kept
it unbuilt, loading nothing while only they were reported); with some of its keys missing it stays
unbuilt, and with none of them they are all listed as missing, unless the checkpoint is of an
unbuilt layer (which saves no tensors, since placeholders would not load with ``weights_only``,
and marks its metadata instead; torch.distributed.checkpoint's load into an unbuilt model's own
state_dict keeps that mark, so it still loads nothing there: build the model first).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from batchnorm.functional._validation import check_axis_type
from batchnorm.layers._lazy_weights import TensorOwner, unmaterialize

ESTIMATOR_KEY = "moving_variance_estimator"
# In the metadata of a layer saved unbuilt (no tensors): its keys are not missing, there are none.
UNBUILT_KEY = "batchnorm_unbuilt"
# Keys that torch.nn.BatchNorm* writes and this layer never does.
_TORCH_KEYS = ("running_mean", "running_var", "num_batches_tracked")
SCALAR_NAMES = ("moving_average_weight",)


@dataclasses.dataclass
class LoadPlan:
    """What a load will do: nothing is written when ``errors`` or no ``channel_shape``."""

    errors: list[str]
    missing: list[str]
    unexpected: list[str]
    # The per-channel shape of the weights to write; None: nothing to write.
    channel_shape: tuple[int, ...] | None
    # ``"gamma (torch.float64 -> torch.float32)"`` for every tensor copied into another dtype.
    casts: list[str]
    # "biased" / "unbiased" as recorded by the layer that saved it, or None.
    estimator: str | None


class LoadingLayer(TensorOwner, Protocol):
    """What a load reads and sets on a :class:`~batchnorm.BatchNormalization` layer."""

    name: str
    axis: list[int] | int
    built: bool
    fused: bool | None
    moving_variance_estimator: str
    moving_mean: torch.Tensor
    _non_persistent_buffers_set: set[str]
    _modules: dict[str, Any]
    _input_rank: int | None
    _update_lock: Any

    def _stored_estimator(self, fused: bool | None) -> str | None: ...

    def _create_weights(
        self, channel_shape: tuple[int, ...], keras_shape: tuple[int, ...] | None = None
    ) -> list[str]: ...


def load_layer_state(
    layer: LoadingLayer,
    state_dict: Mapping[str, Any],
    prefix: str,
    local_metadata: Mapping[str, Any],
    strict: bool,
    incompatible: tuple[list[str], list[str], list[str]],
    copy: Callable[[list[str]], None],
) -> None:
    """The layer's ``_load_from_state_dict``: check, then (an unbuilt layer materialised at the
    checkpoint's shape) ``copy`` with torch's own loading, which appends to the error list.

    ``incompatible`` is torch's (missing keys, unexpected keys, error messages). A copy that
    fails after all (a device error, say) turns a layer materialised here back into placeholders.
    """
    missing_keys, unexpected_keys, error_msgs = incompatible
    plan = check_load(layer, state_dict, prefix, local_metadata)
    if strict:  # torch's load_state_dict always passes True, and drops them when not strict
        missing_keys += plan.missing
        unexpected_keys += plan.unexpected
    error_msgs += plan.errors
    if plan.errors or plan.channel_shape is None:
        return
    if plan.casts and not local_metadata.get("assign_to_params_buffers", False):
        warnings.warn(cast_warning(layer.name, plan.casts), UserWarning, stacklevel=4)
    with layer._update_lock:
        errors_before = len(error_msgs)
        materialized = [] if layer.built else layer._create_weights(plan.channel_shape)
        copy(error_msgs)
        if len(error_msgs) > errors_before and materialized:
            unmaterialize(layer, materialized)
            layer.built = False
        elif layer._input_rank is None:
            # An "auto" layer decides its variance at the build, which checks it then.
            vars(layer)["_loaded_estimator"] = plan.estimator


def check_load(
    layer: LoadingLayer,
    state_dict: Mapping[str, Any],
    prefix: str,
    local_metadata: Mapping[str, Any],
) -> LoadPlan:
    """:func:`plan_load` for the layer's persistent tensors (placeholders while unbuilt)."""
    targets = {
        name: tensor
        for store in (layer._parameters, layer._buffers)
        for name, tensor in store.items()
        if tensor is not None and name not in layer._non_persistent_buffers_set
    }
    return plan_load(
        state_dict,
        prefix,
        local_metadata,
        layer_name=layer.name,
        targets=targets,
        channel_shape=tuple(layer.moving_mean.shape) if layer.built else None,
        channel_axes=len(check_axis_type(layer.axis)),
        estimator=layer._stored_estimator(layer.fused),
        estimator_setting=layer.moving_variance_estimator,
        children=tuple(layer._modules),
    )


def record_unbuilt(destination: Any, prefix: str) -> None:
    """Mark the state_dict metadata ``state_dict()`` is filling: this layer was not built."""
    _record(destination, prefix, UNBUILT_KEY, True)


def record_estimator(destination: Any, prefix: str, estimator: str | None) -> None:
    """Write the stored variance into the state_dict metadata ``state_dict()`` is filling."""
    if estimator is not None:
        _record(destination, prefix, ESTIMATOR_KEY, estimator)


def _record(destination: Any, prefix: str, key: str, value: Any) -> None:
    """``value`` under ``key`` in the layer's own entry of ``destination``'s metadata."""
    metadata = getattr(destination, "_metadata", None)
    local = metadata.get(prefix[:-1]) if isinstance(metadata, dict) else None
    if isinstance(local, dict):
        local[key] = value


def plan_load(
    state_dict: Mapping[str, Any],
    prefix: str,
    local_metadata: Mapping[str, Any],
    *,
    layer_name: str,
    targets: Mapping[str, torch.Tensor],
    channel_shape: tuple[int, ...] | None,
    channel_axes: int,
    estimator: str | None,
    estimator_setting: str = "auto",
    children: tuple[str, ...] = (),
) -> LoadPlan:
    """Check a load of ``state_dict`` into a layer whose tensors (or placeholders) are ``targets``.

    ``channel_shape`` is the layer's, None while unbuilt (then the checkpoint's ``moving_mean``
    gives it, with ``channel_axes`` dims); ``estimator`` is the variance the layer stores, None
    while undecided, and ``estimator_setting`` its ``moving_variance_estimator``. Keys under
    the layer's ``children`` (``parametrizations`` of torch.nn.utils.parametrize) are theirs
    to load, as torch leaves them to a module's children.
    """
    keys = {
        key[len(prefix) :]: key
        for key in state_dict
        if key.startswith(prefix) and key[len(prefix) :].split(".", 1)[0] not in children
    }
    plan = LoadPlan([], [], [], None, [], None)
    torch_keys = [name for name in _TORCH_KEYS if name in keys]
    if torch_keys and "moving_mean" not in keys:
        plan.errors.append(
            f"Layer {layer_name} was given a torch.nn.BatchNorm state_dict: this layer's tensors "
            "are gamma, beta, moving_mean and moving_variance, and its conventions differ "
            "(torch stores the unbiased variance and weights the new batch with its momentum). "
            "Load the checkpoint into the torch module, then convert it with "
            "`batchnorm.from_torch(module)` (or the whole model with `batchnorm.convert(model)`). "
            f"Received: keys {sorted(keys[n] for n in keys)}"
        )
        return plan
    present = [name for name in targets if name in keys]
    plan.unexpected = [keys[n] for n in keys if n not in targets]
    plan.missing = [prefix + name for name in targets if name not in keys]
    if channel_shape is None and not present:
        # Nothing for an unbuilt layer: a checkpoint of an unbuilt layer (its metadata says so)
        # has nothing to give; any other lacks its keys, listed as missing as torch's Lazy
        # modules list theirs (a strict load of a checkpoint without them reported nothing, and
        # the statistics were lost).
        if local_metadata.get(UNBUILT_KEY) is True:
            plan.missing = []
        return plan
    values = {name: state_dict[keys[name]] for name in present}
    for name, value in values.items():
        if not isinstance(value, torch.Tensor):
            plan.errors.append(
                f'While copying the parameter named "{keys[name]}", expected torch.Tensor or '
                f"Tensor-like object from checkpoint but received {type(value)}"
            )
    if plan.errors:
        return plan
    plan.channel_shape = channel_shape or _checkpoint_channel_shape(
        values, keys, layer_name, channel_axes, plan.errors
    )
    for name, value in values.items():
        expected = () if name in SCALAR_NAMES else plan.channel_shape
        if expected is not None and tuple(value.shape) != expected:
            source = "the shape in current model" if channel_shape else "the layer's channel shape"
            plan.errors.append(
                f"size mismatch for {keys[name]}: copying a param with shape "
                f"{tuple(value.shape)} from checkpoint, {source} is {expected}."
            )
        target_dtype = targets[name].dtype
        if value.dtype != target_dtype and not _widens(value.dtype, target_dtype):
            plan.casts.append(f"{name} ({value.dtype} -> {target_dtype})")
    recorded = local_metadata.get(ESTIMATOR_KEY)
    plan.estimator = recorded if recorded in ("biased", "unbiased") else None
    if plan.estimator is not None and estimator is not None and plan.estimator != estimator:
        plan.errors.append(
            estimator_mismatch(layer_name, estimator_setting, estimator, plan.estimator)
        )
    if channel_shape is None and plan.missing:
        plan.channel_shape = None  # an unbuilt layer is built only from all its tensors
    return plan


def estimator_mismatch(layer_name: str, setting: str, stored: str, in_checkpoint: str) -> str:
    path = " (tf-keras' rule for this input)" if setting == "auto" else ""
    path_of = {"unbiased": "fused", "biased": "non-fused"}
    return (
        f"Layer {layer_name} with moving_variance_estimator='{setting}' stores the {stored} "
        f"moving variance{path}, but the checkpoint's "
        f"moving_variance is the {in_checkpoint} one (its layer had "
        f"moving_variance_estimator='{in_checkpoint}', or tf-keras' {path_of[in_checkpoint]} "
        "path): loaded, it would "
        f"be read as another variance. Create the layer with "
        f"moving_variance_estimator='{in_checkpoint}'. Received: a state_dict recording "
        f"moving_variance_estimator='{in_checkpoint}'"
    )


def _widens(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every ``source`` value is exactly a ``target`` value (float32 into float64,
    half precision into float32): nothing to warn about."""
    if not (source.is_floating_point and target.is_floating_point):
        return False
    small, large = torch.finfo(source), torch.finfo(target)
    return large.bits > small.bits and large.max >= small.max and large.eps <= small.eps


def cast_warning(layer_name: str, casts: list[str]) -> str:
    return (
        f"Layer {layer_name}: the checkpoint's {', '.join(casts)} are cast to the layer's dtype "
        "on loading (as torch does), which loses precision when it narrows. Create the layer "
        "with the checkpoint's `dtype` (e.g. dtype='float64') or call `.to(dtype)` first to keep "
        "them as saved."
    )


def _checkpoint_channel_shape(
    values: Mapping[str, torch.Tensor],
    keys: Mapping[str, str],
    layer_name: str,
    channel_axes: int,
    errors: list[str],
) -> tuple[int, ...] | None:
    """The channel shape an unbuilt layer takes: its ``moving_mean``'s, else another per-channel
    tensor's."""
    names = [n for n in ("moving_mean", *values) if n in values and n not in SCALAR_NAMES]
    if not names:
        return None
    shape = tuple(values[names[0]].shape)
    if len(shape) != channel_axes or 0 in shape:
        errors.append(
            f"Layer {layer_name} has {channel_axes} channel axes, so `{keys[names[0]]}` must "
            f"have {channel_axes} non-empty dims. Received: shape {shape}"
        )
        return None
    return shape
