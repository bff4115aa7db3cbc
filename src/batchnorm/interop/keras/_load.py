"""``load_weights``: a Keras file's batch-norm layers into the batch-norm modules of a torch model."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import zipfile
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from batchnorm.functional._validation import (
    check_bool,
    check_fraction,
    check_positive,
    check_renorm_clipping,
)
from batchnorm.interop.keras._compare import (
    BatchNormModule,
    Difference,
    TorchBatchNorm,
    layer_differences,
    torch_differences,
    value_differences,
)
from batchnorm.interop.keras._config_values import check_config_values
from batchnorm.interop.keras._read import read_batch_norm_layers
from batchnorm.interop.keras._records import GAMMA_OR_BETA, KerasBatchNormLayer
from batchnorm.interop.keras._report import LayerLoad, LoadReport, Status, shown
from batchnorm.layers import BatchNormalization
from batchnorm.layers._keras_weights import weights_from_arrays
from batchnorm.layers._layer_settings import checked_setting
from batchnorm.layers._parametrized import check_writable, write_weight

# A torch batch norm's tensors and the file weights that load into them.
_TORCH_TENSORS = (
    ("weight", "gamma"),
    ("bias", "beta"),
    ("running_mean", "moving_mean"),
    ("running_var", "moving_variance"),
)
# A vars group directly in a layer list: the list, then the group name without its number.
_IN_LAYER_LIST = re.compile(r"^(.*/layers)/([^/]+?)(?:_\d+)?/vars$")


class _Plan(NamedTuple):
    record: KerasBatchNormLayer
    module_name: str
    module: BatchNormModule
    configure: list[Difference]
    remaining: list[Difference]
    notes: list[str]

    @property
    def loadable(self) -> bool:
        return all(d.resolution != "cannot load" for d in self.remaining)


def batch_norm_modules(model: nn.Module) -> list[tuple[str, BatchNormModule]]:
    """(qualified name, module) of every BatchNormalization / torch BatchNorm in ``modules()`` order."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (BatchNormalization, TorchBatchNorm))
    ]


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    mapping: Mapping[str, str] | None = None,
    configure: bool = False,
    strict: bool = True,
) -> LoadReport:
    """Load the BatchNormalization layers of a Keras file into a torch model's batch-norm modules.

    The i-th batch-norm layer of the file (tf-keras ``.h5``, Keras 3 ``.keras``; see
    :func:`read_batch_norm_layers`) goes into the i-th :class:`~batchnorm.BatchNormalization` or
    ``torch.nn.BatchNorm*d`` of ``model.modules()``, or as ``mapping`` says. A ``.weights.h5``
    records no layer order: it pairs by order only when its batch norms are all of one class in
    one layer list, else it raises, listing the layers' paths for ``mapping``. Weights load as
    Keras stored them: ``moving_variance`` is tf-keras' unbiased variance for a layer on its fused
    path, and the biased one otherwise and in Keras 3; the module keeps updating it the same way
    only if it is configured the same way, so each pair is compared on channels, center, scale,
    renorm, axis, momentum, epsilon, trainable, renorm settings and moving-variance estimator.

    A file layer without gamma (``scale=False``) loads gamma = 1 into a module that has one, and
    beta = 0 likewise; a file layer without renorm statistics gives a renorm module
    ``moving_stddev = renorm_stddev = sqrt(moving_variance + epsilon)`` and
    ``renorm_mean = moving_mean``. torch.nn.BatchNorm*d get weight, bias, running_mean and
    running_var (``momentum_torch = 1 - momentum_keras``, ``eps = epsilon``).

    Every layer is checked before any module changes, with ``strict`` True or False: a layer
    whose weights disagree in shape (gamma of 4 values, moving_mean of 5) or are not real
    numbers, a file h5py cannot read (truncated, damaged), an invalid setting taken with
    ``configure``, a config value of another type than Keras writes (``"momentum": true``,
    ``"axis": null``; with or without ``configure``), a module tensor of another size than the
    file's weights, or one parametrized without ``right_inverse`` raises, naming the layer, the
    sizes (or the key and value) and the file, and leaves every module as it was. A
    parametrized weight is written through its ``right_inverse``. Non-finite weights and a
    negative moving variance are mismatches: ``strict=False`` loads them as Keras would.

    Args:
        model: the torch model (or a single batch-norm module).
        path: the Keras file.
        mapping: ``{keras_layer_path: module_qualified_name}``; only those layers load. A key
            that is a layer's ``path`` names that layer; otherwise a name that one layer alone
            has. Default None: by order.
        configure: set each module's momentum, epsilon, trainable, renorm_momentum,
            renorm_clipping and moving_variance_estimator (torch: momentum, eps) from the file;
            a Keras 3 file's layer also sets ``fused=False`` and ``mask_weights=False`` on a
            :class:`~batchnorm.BatchNormalization`, as ``like("keras3")`` does.
            Structure (channels, axis, center, scale, renorm) is never changed. Default False.
        strict: raise ValueError listing every mismatch, before anything is loaded. With False,
            load every pair whose weights fit and report the rest. Default True.

    Returns:
        A :class:`LoadReport`: ``(keras_name, module_name, status, differences)`` per layer.

    Example:
        >>> model = torch.nn.Sequential(BatchNormalization(3, axis=1))  # doctest: +SKIP
        >>> report = load_weights(model, "model.keras", configure=True)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"`model` must be a torch.nn.Module. Received: model of type {type(model).__name__}"
        )
    configure, strict = check_bool(configure, "configure"), check_bool(strict, "strict")
    records = read_batch_norm_layers(path)
    modules = batch_norm_modules(model)
    if mapping is None:
        if not modules:
            raise ValueError(
                "`model` must hold batch-norm modules (batchnorm.BatchNormalization or "
                f"torch.nn.BatchNorm*d) to load the file's {_names(records)} into. "
                f"Received: a {type(model).__name__} with none"
            )
        _check_order_is_known(records, path)
        pairs = _pairs_by_order(records, modules)
    else:
        pairs = _pairs_by_mapping(records, modules, mapping)
    steps: list[LayerLoad | _Plan] = []
    for record, module_name, module in pairs:
        if record is None:
            steps.append(LayerLoad(None, module_name, "not in file", ()))
        elif module is None:
            status: Status = "unused" if mapping is not None else "no module"
            steps.append(LayerLoad(record.path, None, status, ()))
        else:
            steps.append(_plan(record, str(module_name), module, configure, str(path)))
    plans = [step for step in steps if isinstance(step, _Plan)]
    report = LoadReport(str(path), [_entry(step) for step in steps])
    if strict and report.mismatches:
        raise ValueError(
            f"The Keras file does not match the model in {len(report.mismatches)} way(s):\n  "
            + "\n  ".join(report.mismatches)
            + "\nPass "
            + (
                ""
                if configure
                else "configure=True to adopt the file's settings where they are settings, "
            )
            + "strict=False to load what fits and get a report, or `mapping` to pair layers "
            f"by name. Received: path={str(path)!r}"
        )
    for plan in plans:
        if plan.loadable:
            _apply(plan)
    return report


def _entry(step: LayerLoad | _Plan) -> LayerLoad:
    if isinstance(step, LayerLoad):
        return step
    notes = [f"configured {d.setting}: {d.in_module!r} -> {d.in_file!r}" for d in step.configure]
    return LayerLoad(
        step.record.path,
        step.module_name,
        "loaded" if step.loadable else "skipped",
        tuple(step.remaining),
        tuple(notes + step.notes),
    )


def _check_order_is_known(records: list[KerasBatchNormLayer], path: str | os.PathLike[str]) -> None:
    """Refuse to pair by order a weights-only file whose layer order is not known.

    A ``.weights.h5`` (Keras 3's, or tf-keras 2.13+'s in the same layout) records no layer order:
    its groups come in name order, which is the layer order only among layers of one class in
    one model's layer list (``batch_normalization``, ``_1``, ``_2``). A layer of a nested model
    (``layers/sequential/layers/batch_normalization``), inside a wrapper (TimeDistributed), held
    by a custom layer (``block/bn1``), or of another class (a subclass's ``my_bn``) sorts by its
    group's name instead: paired by order, such layers loaded into the wrong modules, each
    reported "loaded". The error lists every layer's path, which is what ``mapping`` takes.
    """
    weights_only = all(r.config is None for r in records)
    if not weights_only or not all(r.file_format == "Keras 3" for r in records):
        return
    lists = {_layer_list_and_class(r.location) for r in records}
    if len(records) <= 1 or (len(lists) == 1 and None not in lists):
        return
    paths = [r.path for r in records]
    if zipfile.is_zipfile(path):
        # A `.keras` archive whose config lists none of its batch norms (a subclassed model,
        # layers held as attributes) has no more order than its weights: the advice to read the
        # `.keras` file instead is the weights-only file's.
        raise ValueError(
            "This Keras 3 `.keras` file records no layer order for its batch norms: its config "
            "lists none of them (a subclassed model, or layers held as attributes of custom "
            "layers), and they are not all in one layer list under one class name "
            f"({paths}). Pairing by order could load them into the wrong modules. Pass "
            "`mapping` ({keras_path: module_name}) with these paths. "
            f"Received: path={str(path)!r}"
        )
    raise ValueError(
        "This Keras 3 weights-only file records no layer order, and its batch norms are not all "
        "in one layer list under one class name: it holds layers inside nested models, wrappers "
        f"or custom layers, or of several classes ({paths}). Pairing by "
        "order could load them into the wrong modules. Pass `mapping` ({keras_path: "
        "module_name}) with these paths, or read the `.keras` file, whose config gives the "
        f"order. Received: path={str(path)!r}"
    )


def _layer_list_and_class(location: str) -> tuple[str, str] | None:
    """``("/layers/sequential/layers", "batch_normalization")`` for a vars group at
    ``/layers/sequential/layers/batch_normalization_2/vars``; None for one that is not directly
    in a layer list (an attribute of a custom layer, the layer a wrapper holds)."""
    match = _IN_LAYER_LIST.match(location)
    return None if match is None else (match.group(1), match.group(2))


def _pairs_by_order(
    records: list[KerasBatchNormLayer], modules: list[tuple[str, BatchNormModule]]
) -> list[tuple[KerasBatchNormLayer | None, str | None, BatchNormModule | None]]:
    count = max(len(records), len(modules))
    return [
        (
            records[i] if i < len(records) else None,
            modules[i][0] if i < len(modules) else None,
            modules[i][1] if i < len(modules) else None,
        )
        for i in range(count)
    ]


def _pairs_by_mapping(
    records: list[KerasBatchNormLayer],
    modules: list[tuple[str, BatchNormModule]],
    mapping: Mapping[str, str],
) -> list[tuple[KerasBatchNormLayer | None, str | None, BatchNormModule | None]]:
    if not isinstance(mapping, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise TypeError(
            "`mapping` must be a dict {keras_layer_name: module_qualified_name} of strings. "
            f"Received: mapping={mapping!r}"
        )
    # A layer is named by its path, or by its name where no path is that name and no other
    # layer has it: the outer model's "bn" is path "bn", enc's "bn" is "enc/bn".
    by_path: dict[str, list[int]] = {}
    by_name: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_path.setdefault(record.path, []).append(index)
        by_name.setdefault(record.name, []).append(index)
    named = {key: by_path.get(key) or by_name.get(key, []) for key in mapping}
    unknown = [key for key, found in named.items() if not found]
    if unknown:
        raise ValueError(
            f"`mapping` names Keras layers {unknown} that the file does not have; it has "
            f"{_names(records)}. Received: mapping={dict(mapping)!r}"
        )
    shared = {
        key: [records[i].path for i in found] for key, found in named.items() if len(found) > 1
    }
    if shared:
        raise ValueError(
            f"`mapping` names Keras layers by a name that several layers of the file share "
            f"({shared}); name each by its path instead. Received: mapping={dict(mapping)!r}"
        )
    available = dict(modules)
    missing = [name for name in mapping.values() if name not in available]
    if missing:
        raise ValueError(
            f"`mapping` names modules {missing} that are not batch-norm modules of `model`; "
            f"its batch-norm modules are {[shown(n) for n in available]}. "
            f"Received: mapping={dict(mapping)!r}"
        )
    targets = list(mapping.values())
    repeated = sorted({name for name in targets if targets.count(name) > 1})
    if repeated:
        raise ValueError(
            f"`mapping` sends several Keras layers into the same modules {repeated}. "
            f"Received: mapping={dict(mapping)!r}"
        )
    chosen = [found[0] for found in named.values()]
    twice = sorted({records[i].path for i in chosen if chosen.count(i) > 1})
    if twice:
        raise ValueError(
            f"`mapping` names Keras layers {twice} twice, by name and by path. "
            f"Received: mapping={dict(mapping)!r}"
        )
    target_of = dict(zip(chosen, mapping.values(), strict=True))
    pairs: list[tuple[KerasBatchNormLayer | None, str | None, BatchNormModule | None]] = []
    for index, record in enumerate(records):
        target = target_of.get(index)
        pairs.append((record, target, None if target is None else available[target]))
    return pairs


def _plan(
    record: KerasBatchNormLayer,
    module_name: str,
    module: BatchNormModule,
    configure: bool,
    path: str,
) -> _Plan:
    check_config_values(record, path)
    record, resolved = _resolve_gamma_or_beta(record, module)
    if isinstance(module, BatchNormalization):
        differences, notes = layer_differences(record, module)
    else:
        differences, notes = torch_differences(record, module)
    differences += value_differences(record)
    notes = resolved + notes
    settable = [d for d in differences if d.resolution == "configure"] if configure else []
    if configure and isinstance(module, BatchNormalization):
        settable += _keras3_conventions(record, module)
    for difference in settable:
        _check_setting(record, module, difference)
    remaining = [d for d in differences if d not in settable]
    plan = _Plan(record, module_name, module, settable, remaining, notes)
    if plan.loadable:
        _check_fits(plan, path)
    return plan


def _keras3_conventions(record: KerasBatchNormLayer, layer: BatchNormalization) -> list[Difference]:
    """What ``like("keras3")`` sets beyond the config, for a Keras 3 file's layer: no fused path
    (Keras 3 has none, so a mask counts on rank-4/5 inputs too, where tf-keras' fused path,
    which ``fused=None`` picks there, ignores it) and bool masks (Keras 3 casts the mask to bool:
    any non-zero value counts fully). Neither is in its config, so neither is a mismatch."""
    if record.file_format != "Keras 3":
        return []
    differences = []
    if layer.fused is not False:
        differences.append(Difference("fused", False, layer.fused, "configure"))
    if layer.mask_weights:
        differences.append(Difference("mask_weights", False, True, "configure"))
    return differences


def _check_fits(plan: _Plan, path: str) -> None:
    """Fails, before any module changes, if a weight does not fit the tensor it is copied into,
    or cannot be written to it.

    The channel comparison reads ``num_features`` or ``moving_mean``; this reads every tensor
    that ``_apply`` writes, so a load never stops half-way on a size error from ``copy_``, nor
    on a parametrization without ``right_inverse`` (the check ``set_weights`` makes).
    """
    module, record = plan.module, plan.record
    names = (
        module._weight_names()
        if isinstance(module, BatchNormalization)
        else [name for name, _ in _TORCH_TENSORS]
    )
    try:
        for name in names:
            check_writable(module, name)
    except ValueError as error:
        raise ValueError(
            f"Keras layer {record.path!r} (path={path!r}) cannot be loaded into module "
            f"{shown(plan.module_name)!r}: {error}"
        ) from None
    if isinstance(module, BatchNormalization):
        if not module.built:
            return  # its weights are created from the file's shape
        targets = {name: getattr(module, name) for name in names}
        try:
            weights_from_arrays(_layer_arrays(plan), names, tuple(module.moving_mean.shape))
        except ValueError as error:
            raise ValueError(
                f"Keras layer {record.path!r} (path={path!r}) cannot be loaded into module "
                f"{shown(plan.module_name)!r}: {error}"
            ) from None
    else:
        targets = {name: tensor for name in names if (tensor := getattr(module, name)) is not None}
    size = math.prod(record.channel_shape)
    wrong = {name: tuple(t.shape) for name, t in targets.items() if t.numel() != size}
    if wrong:
        shapes = ", ".join(f"`{name}` of shape {shape}" for name, shape in wrong.items())
        raise ValueError(
            f"Keras layer {record.path!r} holds {size} values per weight, which module "
            f"{shown(plan.module_name)!r} must take. Received: {shapes} in the module, "
            f"path={path!r}"
        )


def _resolve_gamma_or_beta(
    record: KerasBatchNormLayer, module: BatchNormModule
) -> tuple[KerasBatchNormLayer, list[str]]:
    """Name a weights-only file's unnamed gamma-or-beta after the one weight the module has."""
    if GAMMA_OR_BETA not in record.weights or not isinstance(module, BatchNormalization):
        return record, []
    present = [n for n, on in (("gamma", module.scale), ("beta", module.center)) if on]
    if len(present) != 1:
        return record, []
    weights = {(present[0] if k == GAMMA_OR_BETA else k): v for k, v in record.weights.items()}
    note = (
        f"the file does not say whether its first variable is gamma or beta; loaded as "
        f"{present[0]}, the module's only one"
    )
    return dataclasses.replace(record, weights=weights), [note]


def _check_setting(
    record: KerasBatchNormLayer, module: BatchNormModule, difference: Difference
) -> None:
    """Fails, before any module changes, where ``_set`` would refuse the file's value: our
    layer's settings are checked as its own assignment checks them."""
    value, setting = difference.in_file, difference.setting
    try:
        if isinstance(module, BatchNormalization) and setting != "trainable":
            checked_setting(module, setting, value)
        elif setting in ("momentum", "renorm_momentum", "momentum (PyTorch convention)"):
            check_fraction(value, setting)
        elif setting.startswith("epsilon"):
            check_positive(value, setting)
        elif setting == "trainable":
            check_bool(value, setting)
        elif setting == "renorm_clipping":
            check_renorm_clipping(value)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Keras layer {record.path!r} in the file has an invalid setting: {error}"
        ) from None


def _apply(plan: _Plan) -> None:
    module = plan.module
    for difference in plan.configure:
        _set(module, difference)
    if isinstance(module, BatchNormalization):
        if not module.built:
            module._create_weights(plan.record.channel_shape, keras_shape=None)
        module.set_weights(_layer_arrays(plan))
        return
    # A parametrized weight (torch.nn.utils.parametrize) is computed on each access: it is
    # written through its right_inverse into the parameter behind it, a pruned one into its
    # original; copy_ into the computed tensor wrote a temporary and the module kept its values.
    with torch.no_grad():
        for name, weight in _TORCH_TENSORS:
            target = getattr(module, name)
            if target is None:
                continue
            if weight in plan.record.weights:
                value = torch.as_tensor(plan.record.weights[weight].reshape(-1))
            else:
                value = torch.full_like(target, 1.0 if weight == "gamma" else 0.0)
            write_weight(module, name, value.to(dtype=target.dtype, device=target.device))


def _set(module: BatchNormModule, difference: Difference) -> None:
    value = difference.in_file
    if isinstance(module, BatchNormalization):
        if difference.setting == "renorm_clipping":
            value = check_renorm_clipping(value)
        setattr(module, difference.setting, value)
    elif difference.setting.startswith("epsilon"):
        module.eps = float(value)
    else:
        module.momentum = float(value)


def _layer_arrays(plan: _Plan) -> list[np.ndarray]:
    """The module's weights in its order, from the file, filled where the file has none."""
    assert isinstance(plan.module, BatchNormalization)
    weights = plan.record.weights
    mean = weights["moving_mean"].astype(np.float64)
    variance = weights["moving_variance"].astype(np.float64)
    configured = {d.setting: d.in_file for d in plan.configure}
    epsilon = float(configured.get("epsilon", plan.module.epsilon))
    with np.errstate(invalid="ignore"):  # a negative variance is reported; NaN is its root
        stddev = np.sqrt(variance + epsilon)
    fill = {
        "gamma": np.ones_like(mean),
        "beta": np.zeros_like(mean),
        "moving_stddev": stddev,
        "renorm_mean": mean,
        "renorm_stddev": stddev,
    }
    return [
        weights[name] if name in weights else fill[name] for name in plan.module._weight_names()
    ]


def _names(records: list[KerasBatchNormLayer]) -> str:
    return f"{len(records)} batch-norm layers {[r.path for r in records]}"
