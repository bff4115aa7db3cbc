"""Keras 3's formats: the ``.keras`` archive and the ``.weights.h5`` file inside it.

A ``.keras`` file is a zip archive holding ``config.json`` (the model config), ``metadata.json``
(``keras_version``) and ``model.weights.h5``, whose layout (checked with Keras 3.15.1) is::

    /layers/<snake_class_name>[_<n>]/vars       attrs: name = the layer name
    /layers/<snake_class_name>[_<n>]/vars/0..k  the layer's variables in creation order
    /layers/<nested model>/layers/...           nested models
    /layers/<custom layer>/<attribute>/vars     a layer held as an attribute (``self.bn1``)

Variables carry no names: for BatchNormalization they are gamma (if scale), beta (if center),
moving_mean, moving_variance, then with renorm moving_stddev, renorm_mean, renorm_stddev. The
group names count per class within each model, in layer order, so a layer's group follows from
its place in ``config.json`` (:class:`~batchnorm.interop.keras._records.BatchNormConfig`); its
``name`` attribute confirms it. Where it does not (a layer class with another snake-cased name),
the layer is found by that attribute, in ``config.json`` order. A layer held as an attribute of
a custom layer is in no config: it is known by its variables (3 to 7 vectors of one length).

tf-keras 2.13+ writes the same layout for its own ``.keras`` and ``.weights.h5``, without the
``name`` attributes; its ``.keras`` metadata.json says ``keras_version`` 2.x, and its layers are
labelled ``"tf-keras .keras"`` (tf-keras' moving-variance rule). Its ``.weights.h5`` cannot be
told from a Keras 3 one that has no ``name`` attributes, and is read as Keras 3's.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from batchnorm.interop.keras._records import (
    BATCH_NORM_WEIGHT_NAMES,
    GAMMA_OR_BETA,
    BatchNormConfig,
    KerasBatchNormLayer,
    KerasFormat,
    config_layers,
    decode,
    json_object,
)

_ARCHIVE_MEMBERS = ("config.json", "model.weights.h5")
_SNAKE_GROUP = re.compile(r"^(sync_)?batch_normalization(_\d+)?$")
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
    """Every batch-norm layer of a ``.keras`` archive, in the order of its config.json.

    A batch norm that config.json does not list (an attribute of a custom layer, whose config
    holds only its own arguments) is found by its variables (:func:`_looks_like_batch_norm`)
    and placed after the layer holding it, without a config.
    """
    with zipfile.ZipFile(path) as archive:
        members = set(archive.namelist())
        missing = [m for m in _ARCHIVE_MEMBERS if m not in members]
        if missing:
            raise ValueError(
                f"`path` is a zip archive but not a Keras 3 `.keras` file: it lacks {missing}. "
                f"Received: path={str(path)!r} holding {sorted(members)}"
            )
        model_config = json_object(json.loads(archive.read("config.json")), "config.json")
        metadata = (
            json_object(json.loads(archive.read("metadata.json")), "metadata.json")
            if "metadata.json" in members
            else {}
        )
        weights_bytes = archive.read("model.weights.h5")
    version = metadata.get("keras_version")
    file_format = _archive_format(version)
    entries = config_layers(model_config)
    described = {f"/{entry.keras3_group}/vars" for entry in entries}
    with h5py.File(io.BytesIO(weights_bytes), "r") as handle:
        groups = _vars_groups(handle)
    by_location = {group.location: group for group in groups}
    claimed: set[str] = set()
    # Attribute-held batch norms, by the config layer whose group holds them (root: "").
    held: dict[str, list[_VarsGroup]] = {}
    for group in groups:
        if group.location in described or not _looks_like_batch_norm(group):
            continue
        if group.location.split("/")[1] == "optimizer" or group.location == "/vars":
            continue
        holder = max(
            (e.keras3_group for e in entries if group.location.startswith(f"/{e.keras3_group}/")),
            key=len,
            default="",
        )
        held.setdefault(holder, []).append(group)
    paths = {entry.keras3_group: entry.path for entry in entries}
    names_at = {group.location: group.name for group in groups}
    layers = []
    for entry in entries:
        if entry.batch_norm:
            group = _config_group(entry, by_location, groups, claimed, path)
            claimed.add(group.location)
            names = _variable_names(entry.config)
            if len(names) != len(group.arrays):
                raise ValueError(
                    f"Layer {entry.name!r} should hold {len(names)} variables "
                    f"({', '.join(names)}) for its config, but the file has "
                    f"{len(group.arrays)} at {group.location}. Received: path={str(path)!r}"
                )
            layers.append(
                KerasBatchNormLayer(
                    name=entry.name,
                    weights=dict(zip(names, group.arrays, strict=True)),
                    config=entry.config,
                    file_format=file_format,
                    location=group.location,
                    input_rank=entry.rank,
                    keras_version=version,
                    path=entry.path,
                    class_name=entry.class_name,
                )
            )
        for group in held.pop(entry.keras3_group, []):
            if group.location not in claimed:
                layers.append(
                    _record(group, file_format, version, paths, entry.keras3_group, names_at)
                )
    for group in held.get("", []):
        if group.location not in claimed:
            layers.append(_record(group, file_format, version, paths, "", names_at))
    return layers


def _archive_format(version: Any) -> KerasFormat:
    """tf-keras 2.13+ writes ``.keras`` archives too; its metadata.json says keras_version 2.x."""
    major = str(version or "").split(".")[0]
    return "tf-keras .keras" if major.isdigit() and int(major) < 3 else "Keras 3"


def _config_group(
    entry: BatchNormConfig,
    by_location: dict[str, _VarsGroup],
    groups: list[_VarsGroup],
    claimed: set[str],
    path: Path,
) -> _VarsGroup:
    """The vars group of a batch norm config.json lists: the group its place in the config
    gives, unless the group's ``name`` attribute says another layer's (tf-keras writes none);
    else the first unclaimed group of that name."""
    placed = by_location.get(f"/{entry.keras3_group}/vars")
    if placed is not None and placed.name in (None, entry.name) and placed.location not in claimed:
        return placed
    for group in groups:
        if group.name == entry.name and group.location not in claimed:
            return group
    raise ValueError(
        f"The `.keras` file's config.json lists BatchNormalization layer {entry.name!r}, "
        f"but model.weights.h5 holds no variables for it. Received: path={str(path)!r}"
    )


def _record(
    group: _VarsGroup,
    file_format: KerasFormat,
    version: str | None,
    paths: Mapping[str, str],
    holder: str,
    names_at: Mapping[str, str | None],
) -> KerasBatchNormLayer:
    """A batch norm found by its variables alone: no config, a path from where it sits (the
    holding layer's config path, then the attributes and layers below it; with no ``holder``,
    the whole path from the file's groups).

    The path, from the vars group's location without the final ``vars``: the enclosing nested
    models, wrappers and holding layers, then the layer itself, joined by "/". Keras 3 writes
    each layer's name on its vars group, the nested models' and wrappers' too, so a layer gets
    the path the ``.keras`` reader gives it from config.json:
    ``layers/sequential/layers/sequential/layers/batch_normalization`` with names enc, s2, bn ->
    ``"enc/s2/bn"``; ``layers/time_distributed/layer`` (td, td_bn) -> ``"td/td_bn"``; an
    attribute of a custom layer keeps the attribute (``layers/block/bn1`` -> ``"block/bn1"``).
    tf-keras' ``.weights.h5`` names no group: its groups stand in
    (``"sequential/batch_normalization"``, ``"time_distributed/layer"``).
    """
    names = _NAMES_BY_COUNT[len(group.arrays)]
    parts = group.location.strip("/").split("/")[:-1]
    outer = len(holder.split("/")) if holder else 0
    prefix = [paths[holder]] if holder else []
    below = [_path_part(parts, i, names_at) for i in range(outer, len(parts))]
    return KerasBatchNormLayer(
        name=group.name or parts[-1],
        weights=dict(zip(names, group.arrays, strict=True)),
        config=None,
        file_format=file_format,
        location=group.location,
        keras_version=version,
        path="/".join([*prefix, *(part for part in below if part is not None)]),
    )


def is_keras3_weights_h5(handle: Any) -> bool:
    return "layers" in handle or ("vars" in handle and "layer_names" not in handle.attrs)


def read_keras3_weights_h5(handle: Any) -> list[KerasBatchNormLayer]:
    """A Keras 3 ``.weights.h5`` without a config: batch-norm layers known by their variables.

    The order is that of the group names (``batch_normalization``, ``_1``, ... ``_10``), which is
    the layer order within one model's layer list; layers of nested models, wrappers and custom
    layers come after or before those of the outer model by name, so ``load_weights`` pairs such
    files only by an explicit ``mapping``. Each layer's ``path`` says where it sits
    (:func:`_record`): ``"enc/s2/bn"`` for a layer of a nested model, ``"td/td_bn"``
    inside a wrapper, ``"block/bn1"`` for an attribute of a custom layer.
    """
    groups = _vars_groups(handle)
    names_at = {group.location: group.name for group in groups}
    layers = []
    for group in groups:
        if group.location == "/vars":
            continue
        if not (_named_batch_norm_group(group) or _looks_like_batch_norm(group)):
            continue
        if len(group.arrays) not in _NAMES_BY_COUNT:
            name = group.name or group.location.strip("/").split("/")[-2]
            raise ValueError(
                f"Expected 2 to 7 variables for BatchNormalization layer {name!r}. "
                f"Received: {len(group.arrays)} at {group.location}"
            )
        layers.append(_record(group, "Keras 3", None, {}, "", names_at))
    return layers  # in the groups' creation order, as _vars_groups returns them


def _path_part(parts: list[str], i: int, names_at: Mapping[str, str | None]) -> str | None:
    """What ``parts[i]`` adds to a layer's path: None for the ``layers`` list of a nested model
    and a wrapper's ``layer`` slot (unless it is the layer itself), the written name of a layer
    in a ``layers`` list or a wrapper (else its group name), the attribute name otherwise."""
    part = parts[i]
    last = i == len(parts) - 1
    if part in ("layers", "layer") and not last:
        return None
    if part == "layer" or (i > 0 and parts[i - 1] == "layers"):
        return names_at.get("/" + "/".join([*parts[: i + 1], "vars"])) or part
    return part


def _looks_like_batch_norm(group: _VarsGroup) -> bool:
    """Whether a vars group no config describes is a batch norm's: 3 to 7 vectors of one length
    (gamma and beta, the moving statistics, the renorm ones), or 2 under a batch-norm name
    (Keras 3's ``batch_normalization[_<n>]``, tf-keras' ``sync_batch_normalization``); a
    layer norm's two vectors or a preprocessing layer's scalar count are not."""
    arrays = group.arrays
    shapes = {array.shape for array in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1 or len(arrays) not in _NAMES_BY_COUNT:
        return False
    parts = group.location.strip("/").split("/")
    named = len(parts) >= 2 and (
        bool(_SNAKE_GROUP.match(parts[-2])) or bool(_SNAKE_GROUP.match(group.name or ""))
    )
    return len(arrays) >= 3 or named


def _named_batch_norm_group(group: _VarsGroup) -> bool:
    """A group Keras 3 names for a BatchNormalization (``layers/batch_normalization_2``): its
    variables are checked, not guessed from."""
    parts = group.location.strip("/").split("/")
    return len(parts) >= 2 and bool(_SNAKE_GROUP.match(parts[-2]))


class _VarsGroup(NamedTuple):
    location: str
    name: str | None  # Keras 3 writes the layer name as an attribute; tf-keras does not
    arrays: list[np.ndarray]


def _vars_groups(handle: Any) -> list[_VarsGroup]:
    """Every vars group: its path, its ``name`` attribute and its arrays in variable order, in
    creation order."""
    found: list[_VarsGroup] = []

    def visit(name: str, item: Any) -> None:
        if name.rsplit("/", 1)[-1] == "vars" and hasattr(item, "keys"):
            keys = sorted(item.keys(), key=lambda k: int(k) if k.isdigit() else -1)
            arrays = [np.asarray(item[k]) for k in keys if k.isdigit()]
            layer_name = decode(item.attrs["name"]) if "name" in item.attrs else None
            found.append(_VarsGroup(item.name, layer_name, arrays))

    handle.visititems(visit)
    return sorted(found, key=lambda group: _creation_order(group.location))


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
