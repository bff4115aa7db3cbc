"""Keras 3's formats: the ``.keras`` archive and the ``.weights.h5`` file inside it.

A ``.keras`` file is a zip archive holding ``config.json`` (the model config), ``metadata.json``
(``keras_version``) and ``model.weights.h5``, whose layout (checked with Keras 3.15.1) is::

    /layers/<snake_class_name>[_<n>]/vars       attrs: name = the layer name
    /layers/<snake_class_name>[_<n>]/vars/0..k  the layer's variables in creation order
    /layers/<nested model>/layers/...           nested models

Variables carry no names: for BatchNormalization they are gamma (if scale), beta (if center),
moving_mean, moving_variance, then with renorm moving_stddev, renorm_mean, renorm_stddev. The
group names count per class within each model, in layer order, so a layer's group follows from
its place in ``config.json`` (:class:`~batchnorm.interop.keras._records.BatchNormConfig`); its
``name`` attribute confirms it. Where it does not (a layer class with another snake-cased name),
the layer is found by that attribute, in ``config.json`` order.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from batchnorm.interop.keras._records import (
    BATCH_NORM_WEIGHT_NAMES,
    GAMMA_OR_BETA,
    KerasBatchNormLayer,
    batch_norm_configs,
    decode,
)

_ARCHIVE_MEMBERS = ("config.json", "model.weights.h5")
_SNAKE_GROUP = re.compile(r"^batch_normalization(_\d+)?$")
_WRAPPER_GROUP = re.compile(r"^time_distributed(_\d+)?$")
# A weights-only file does not name the variables; the count does, except which of gamma and
# beta a layer with 3 (6 with renorm) holds.
_AFFINE, _STATISTICS, _RENORM = (
    BATCH_NORM_WEIGHT_NAMES[:2],
    BATCH_NORM_WEIGHT_NAMES[2:4],
    BATCH_NORM_WEIGHT_NAMES[4:],
)
_NAMES_BY_COUNT = {
    2: _STATISTICS,
    3: (GAMMA_OR_BETA, *_STATISTICS),
    4: (*_AFFINE, *_STATISTICS),
    5: (*_STATISTICS, *_RENORM),
    6: (GAMMA_OR_BETA, *_STATISTICS, *_RENORM),
    7: BATCH_NORM_WEIGHT_NAMES,
}


def read_keras_archive(path: Path, h5py: Any) -> list[KerasBatchNormLayer]:
    """Every batch-norm layer of a ``.keras`` archive, in the order of its config.json."""
    with zipfile.ZipFile(path) as archive:
        members = set(archive.namelist())
        missing = [m for m in _ARCHIVE_MEMBERS if m not in members]
        if missing:
            raise ValueError(
                f"`path` is a zip archive but not a Keras 3 `.keras` file: it lacks {missing}. "
                f"Received: path={str(path)!r} holding {sorted(members)}"
            )
        model_config = json.loads(archive.read("config.json"))
        metadata = json.loads(archive.read("metadata.json")) if "metadata.json" in members else {}
        weights_bytes = archive.read("model.weights.h5")
    version = metadata.get("keras_version")
    with h5py.File(io.BytesIO(weights_bytes), "r") as handle:
        groups = _vars_groups(handle)
        layers = []
        for found in batch_norm_configs(model_config):
            name, config, rank = found.name, found.config, found.rank
            candidates = groups.get(name, [])
            location = f"/{found.keras3_group}/vars"
            placed = [entry for entry in candidates if entry[0] == location]
            if placed:  # its own group, whatever the order of the other layers of that name
                candidates.remove(placed[0])
            elif not candidates:
                raise ValueError(
                    f"The `.keras` file's config.json lists BatchNormalization layer {name!r}, "
                    f"but model.weights.h5 holds no variables for it. Received: path={str(path)!r}"
                )
            location, arrays = placed[0] if placed else candidates.pop(0)
            names = _variable_names(config)
            if len(names) != len(arrays):
                raise ValueError(
                    f"Layer {name!r} should hold {len(names)} variables ({', '.join(names)}) for "
                    f"its config, but the file has {len(arrays)} at {location}. "
                    f"Received: path={str(path)!r}"
                )
            layers.append(
                KerasBatchNormLayer(
                    name=name,
                    weights=dict(zip(names, arrays, strict=True)),
                    config=config,
                    file_format="Keras 3",
                    location=location,
                    input_rank=rank,
                    keras_version=version,
                    path=found.path,
                )
            )
    return layers


def is_keras3_weights_h5(handle: Any) -> bool:
    return "layers" in handle or ("vars" in handle and "layer_names" not in handle.attrs)


def read_keras3_weights_h5(handle: Any) -> list[KerasBatchNormLayer]:
    """A Keras 3 ``.weights.h5`` without a config: batch-norm layers known by their group name.

    The order is that of the group names (``batch_normalization``, ``_1``, ... ``_10``), which is
    the layer order within one model; layers of nested models come after or before those of the
    outer model by name, so pair such files with an explicit ``mapping``.
    """
    layers = []
    for name, found in _vars_groups(handle).items():
        for location, arrays in found:
            if not _batch_norm_group(location, name, arrays):
                continue
            names = _NAMES_BY_COUNT.get(len(arrays))
            if names is None:
                raise ValueError(
                    f"Expected 2 to 7 variables for BatchNormalization layer {name!r}. "
                    f"Received: {len(arrays)} at {location}"
                )
            layers.append(
                KerasBatchNormLayer(
                    name=name,
                    weights=dict(zip(names, arrays, strict=True)),
                    config=None,
                    file_format="Keras 3",
                    location=location,
                )
            )
    return sorted(layers, key=lambda layer: _creation_order(layer.location))


def _batch_norm_group(location: str, name: str, arrays: list[np.ndarray]) -> bool:
    """Whether a weights-only file's vars group is a BatchNormalization layer's: its group is
    ``batch_normalization[_<n>]``, or it is the layer a TimeDistributed wraps (group ``layer``)
    with the variables of a batch norm: 3 to 7 vectors of one length (2, as a layer norm's
    gamma and beta, only with a batch-norm name)."""
    parts = location.strip("/").split("/")
    if len(parts) < 2:  # the model's own vars
        return False
    if _SNAKE_GROUP.match(parts[-2]):
        return True
    if parts[-2] != "layer" or len(parts) < 3 or not _WRAPPER_GROUP.match(parts[-3]):
        return False
    shapes = {array.shape for array in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1 or len(arrays) not in _NAMES_BY_COUNT:
        return False
    return len(arrays) >= 3 or bool(_SNAKE_GROUP.match(name))


def _vars_groups(handle: Any) -> dict[str, list[tuple[str, list[np.ndarray]]]]:
    """``{layer name: [(group path, [arrays in variable order]), ...]}`` for every vars group."""
    found: dict[str, list[tuple[str, list[np.ndarray]]]] = {}

    def visit(name: str, item: Any) -> None:
        if name.rsplit("/", 1)[-1] == "vars" and hasattr(item, "keys"):
            keys = sorted(item.keys(), key=lambda k: int(k) if k.isdigit() else -1)
            arrays = [np.asarray(item[k]) for k in keys if k.isdigit()]
            layer_name = decode(item.attrs.get("name", name))
            found.setdefault(layer_name, []).append((item.name, arrays))

    handle.visititems(visit)
    for entries in found.values():
        entries.sort(key=lambda entry: _creation_order(entry[0]))
    return found


def _creation_order(location: str) -> list[tuple[str, int]]:
    """Sort key: "batch_normalization_10" after "batch_normalization_2"."""
    key = []
    for part in location.strip("/").split("/"):
        match = re.match(r"^(.*?)(?:_(\d+))?$", part)
        assert match is not None
        key.append((match.group(1), int(match.group(2) or 0)))
    return key


def _variable_names(config: Mapping[str, Any]) -> list[str]:
    names = [n for n, on in (("gamma", "scale"), ("beta", "center")) if config.get(on, True)]
    names += ["moving_mean", "moving_variance"]
    if config.get("renorm", False):
        names += ["moving_stddev", "renorm_mean", "renorm_stddev"]
    return names
