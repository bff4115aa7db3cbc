"""The static part of :func:`batchnorm.diagnose`: checks on saved batch-norm statistics alone."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from batchnorm.tools._batch_norm_modules import averaging_horizon
from batchnorm.tools._diagnosis_report import DiagnosisReport, LayerDiagnosis, variance_findings

_MEAN_KEYS = ("moving_mean", "running_mean")
_VARIANCE_KEYS = ("moving_variance", "running_var")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")


def inspect_statistics(layers: Mapping[str, Mapping[str, Any]]) -> DiagnosisReport:
    """Check each layer's saved statistics: NaN / Inf / negative / zero variance, non-finite
    mean, and momentum horizon versus steps where both are known.

    Args:
        layers: ``{layer_name: {"moving_mean": array, "moving_variance": array, ...}}``; torch's
            ``running_mean`` / ``running_var`` / ``num_batches_tracked`` are accepted too, and
            optional ``"momentum"`` (Keras convention), ``"steps"`` and ``"kind"`` entries.

    Returns:
        A :class:`~batchnorm.DiagnosisReport` without the data-dependent columns.

    Example:
        >>> report = inspect_statistics({"bn": {"moving_mean": [0.0], "moving_variance": [-1.0]}})
    """
    rows = []
    for name, entries in layers.items():
        mean = _first(entries, _MEAN_KEYS, name)
        variance = _first(entries, _VARIANCE_KEYS, name)
        if mean.shape != variance.shape:
            raise ValueError(
                f"Layer {name}: the mean and variance must have the same shape. "
                f"Received: {tuple(mean.shape)} and {tuple(variance.shape)}"
            )
        steps = entries.get("steps", entries.get("num_batches_tracked"))
        momentum = entries.get("momentum")
        kind = entries.get("kind") or (
            "BatchNorm (torch)" if "running_mean" in entries else "BatchNormalization"
        )
        row = LayerDiagnosis(
            name=name,
            kind=str(kind),
            channels=int(mean.numel()),
            steps=None if steps is None else int(torch.as_tensor(steps).item()),
            momentum=None if momentum is None else float(momentum),
        )
        if row.momentum is not None:
            row.horizon = averaging_horizon(row.momentum)
        for key, value in variance_findings(mean, variance).items():
            setattr(row, key, value)
        rows.append(row)
    return DiagnosisReport(rows)


def batch_norm_layers_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{prefix: {buffer: tensor}}`` for every batch norm in a state_dict (ours: ``moving_*``,
    torch's: ``running_*`` and ``num_batches_tracked``)."""
    layers: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        prefix, _, leaf = str(key).rpartition(".")
        if leaf in _MEAN_KEYS and isinstance(value, torch.Tensor):
            layers[prefix] = {}
    for prefix, entries in layers.items():
        for key, value in state_dict.items():
            head, _, leaf = str(key).rpartition(".")
            if head == prefix and isinstance(value, torch.Tensor):
                entries[leaf] = value
    return layers


def inspect_checkpoint(path: str | Path) -> DiagnosisReport:
    """:func:`inspect_statistics` on the batch norms of a saved state_dict (``torch.save``d,
    read with ``weights_only=True``; a dict holding it under ``"state_dict"``, ``"model"``... is
    searched too)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {str(path)!r}")
    if path.suffix.lower() in KERAS_SUFFIXES:
        return inspect_statistics(_keras_statistics(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"Could not read {str(path)!r} as a torch state_dict with weights_only=True "
            f"({type(error).__name__}: {error}). Save `model.state_dict()` rather than the model."
        ) from error
    state_dict = _find_state_dict(loaded)
    layers = batch_norm_layers_from_state_dict(state_dict) if state_dict is not None else {}
    if not layers:
        raise ValueError(
            f"No batch-norm statistics (keys ending in running_mean or moving_mean) in {str(path)!r}"
        )
    return inspect_statistics(layers)


def _find_state_dict(loaded: Any) -> Mapping[str, Any] | None:
    if not isinstance(loaded, Mapping):
        return None
    if batch_norm_layers_from_state_dict(loaded):
        return loaded
    for key in _CONTAINER_KEYS:
        found = _find_state_dict(loaded.get(key))
        if found is not None:
            return found
    return None


def _first(entries: Mapping[str, Any], keys: tuple[str, ...], name: str) -> torch.Tensor:
    for key in keys:
        if key in entries:
            return torch.as_tensor(entries[key]).detach().to(torch.float64)
    raise ValueError(
        f"Layer {name} needs one of {' / '.join(keys)}. Received keys: {sorted(entries)}"
    )


def _keras_statistics(path: Path) -> dict[str, dict[str, Any]]:
    """The batch-norm layers of a tf-keras ``.h5`` or Keras 3 ``.keras`` file, for inspection."""
    from batchnorm.interop.keras import read_batch_norm_layers

    layers = {}
    for layer in read_batch_norm_layers(path):
        entries: dict[str, Any] = dict(layer.weights)
        entries["kind"] = f"BatchNormalization ({layer.file_format})"
        if layer.config is not None and "momentum" in layer.config:
            entries["momentum"] = float(layer.config["momentum"])
        layers[layer.name] = entries
    return layers
