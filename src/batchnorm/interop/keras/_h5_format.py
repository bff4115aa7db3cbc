"""tf-keras' legacy HDF5 format (``model.save("m.h5")`` and ``model.save_weights("w.h5")``).

Layout, as tf-keras 2.x writes it (checked with tf-keras 2.20.1)::

    /                          attrs: model_config (JSON; full models only), keras_version
    /model_weights             attrs: layer_names  (full models; weights-only files use /)
    /model_weights/<layer>     attrs: weight_names = ["<bn>/gamma:0", "<bn>/beta:0", ...]
    /model_weights/<layer>/<bn>/gamma:0, beta:0, moving_mean:0, moving_variance:0, ...

A nested model is one top-level layer whose ``weight_names`` list the weights of all its inner
layers, each under the inner layer's name; a wrapped layer's (TimeDistributed) are under the
wrapper's name. Weights are found through ``weight_names`` (their names say which is which);
configs come from ``model_config``, matched by the top-level layer and the owner's name (two
nested models may each hold a layer called "bn"; a name may hold "/"). A custom layer's config
does not list the batch norms it holds as attributes; their weights, named
``<custom layer>/<batch norm>/gamma:0`` etc., are read without a config. One built inside the
custom layer's (or an RNN cell's) ``build()`` has its weights in that layer's scope, beside the
layer's others (``block/kernel:0``, ``block/gamma:0``, ``block/moving_mean:0``): a complete set of
batch-norm weights there is read as a batch norm whose path is that scope (``"block"``,
``"bidir/forward_rnn/bn_cell"``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from batchnorm.interop.keras._records import (
    BATCH_NORM_WEIGHT_NAMES,
    BatchNormConfig,
    KerasBatchNormLayer,
    batch_norm_configs,
    decode,
    json_object,
)


def is_tf_keras_h5(handle: Any) -> bool:
    return "layer_names" in handle.attrs or "model_weights" in handle


def read_tf_keras_h5(handle: Any) -> list[KerasBatchNormLayer]:
    """Every batch-norm layer of an open tf-keras HDF5 file, in the model's layer order."""
    root = handle.get("model_weights", handle)
    version = decode(root.attrs.get("keras_version", handle.attrs.get("keras_version", "")))
    configs: dict[tuple[str, str], BatchNormConfig] = {}
    has_config = "model_config" in handle.attrs
    if has_config:
        model_config = json_object(
            json.loads(decode(handle.attrs["model_config"])), "the `model_config` attribute"
        )
        configs = {_weights_key(found): found for found in batch_norm_configs(model_config)}
    layers = []
    for layer_name in (decode(n) for n in root.attrs["layer_names"]):
        group = root[layer_name]
        for prefix, names in _weights_by_owner(group).items():
            if not {"moving_mean", "moving_variance"} <= set(names):
                continue
            # A layer name may hold "/" ("a/b"): the whole prefix is tried before its last part.
            found = configs.get((layer_name, prefix)) or configs.get(
                (layer_name, prefix.rsplit("/", 1)[-1])
            )
            if found is None and not set(names) <= set(BATCH_NORM_WEIGHT_NAMES):
                names = _batch_norm_among(names, group)
                if not names:
                    continue  # another layer type that happens to track moving statistics
            weights = {
                base: np.asarray(group[full_name])
                for base, full_name in sorted(names.items(), key=_keras_order)
            }
            if found is not None:
                name, path = found.name, found.path
            else:
                # No config for it: weights only, or an attribute of a custom layer, whose
                # weights tf-keras names "<custom layer>/<batch norm>/gamma:0".
                inner = prefix[len(layer_name) + 1 :] if prefix.startswith(f"{layer_name}/") else ""
                name = layer_name if prefix == layer_name else (inner or prefix).rsplit("/", 1)[-1]
                if prefix == layer_name or not has_config:
                    path = prefix
                else:
                    path = f"{layer_name}/{inner or prefix}"
            layers.append(
                KerasBatchNormLayer(
                    name=name,
                    weights=weights,
                    config=None if found is None else found.config,
                    file_format="tf-keras HDF5",
                    location=f"{group.name}/{prefix}",
                    input_rank=None if found is None else found.rank,
                    keras_version=version or None,
                    path=path,
                    class_name=None if found is None else found.class_name,
                )
            )
    return layers


def _weights_key(found: BatchNormConfig) -> tuple[str, str]:
    """(top-level layer, owner name in weight_names) under which the layer's weights are saved."""
    top = found.enclosing[0] if found.enclosing else found.name
    owner = found.enclosing[-1] if found.wrapped else found.name
    return top, owner


def _weights_by_owner(group: Any) -> dict[str, dict[str, str]]:
    """``{"inner_bn": {"gamma": "inner_bn/gamma:0", ...}}`` from a layer group's weight_names."""
    owners: dict[str, dict[str, str]] = {}
    for full_name in (decode(n) for n in group.attrs.get("weight_names", [])):
        prefix, _, base = full_name.rpartition("/")
        owners.setdefault(prefix, {})[base.split(":")[0]] = full_name
    return owners


def _batch_norm_among(names: dict[str, str], group: Any) -> dict[str, str]:
    """The batch norm's weights among a prefix's other weights, or ``{}`` where there is none.

    A custom layer (or RNN cell) that builds its sublayers in ``build()`` gets their weights
    named in its own scope: ``block/kernel:0`` beside ``block/gamma:0``, ``block/moving_mean:0``
    (``bidir/forward_rnn/bn_cell/...`` for a cell in a Bidirectional RNN). A complete set of
    batch-norm weights there is read as a batch norm at that prefix: moving_mean and
    moving_variance, gamma and beta where present (scale, center), the three renorm weights
    together or none, all of one shape.
    """
    found = {base: full for base, full in names.items() if base in BATCH_NORM_WEIGHT_NAMES}
    renorm = [name for name in BATCH_NORM_WEIGHT_NAMES[4:] if name in found]
    if len(renorm) not in (0, 3):
        return {}
    if len({tuple(group[full].shape) for full in found.values()}) != 1:
        return {}
    return found


def _keras_order(item: tuple[str, str]) -> int:
    name = item[0]
    return BATCH_NORM_WEIGHT_NAMES.index(name) if name in BATCH_NORM_WEIGHT_NAMES else 99
