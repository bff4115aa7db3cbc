"""The static part of :func:`batchnorm.diagnose`: checks on saved batch-norm statistics alone."""

from __future__ import annotations

import dataclasses
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from batchnorm.tools._batch_norm_modules import averaging_horizon
from batchnorm.tools._diagnosis_report import DiagnosisReport, LayerDiagnosis, variance_findings

_MEAN_KEYS = ("moving_mean", "running_mean")
_VARIANCE_KEYS = ("moving_variance", "running_var")
_STEP_KEYS = ("steps", "num_batches_tracked")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")
EXPECTED_FILES = (
    "a state_dict saved with torch.save (.pt/.pth), a tf-keras .h5 or a Keras 3 .keras file"
)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURE = b"PK\x03\x04"
_PICKLE_PROTOCOL = b"\x80"  # torch.save's legacy (pre-1.6) format is a bare pickle stream
_TAR_MAGIC_AT_257 = b"ustar"  # and its oldest format a tar archive
# CSI sequences (colours, cursor moves), OSC sequences (titles, links) and two-byte escapes.
_TERMINAL_CODES = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)|[@-Z\\-_])")


@dataclasses.dataclass
class InspectedLayer(LayerDiagnosis):
    """A :class:`~batchnorm.tools.LayerDiagnosis` read from saved statistics, which may also be
    unusable as statistics at all.

    Attributes:
        unusable: one sentence per saved entry that is not what a batch norm stores (complex
            moving statistics, a ``num_batches_tracked`` that is not one count); each is a problem.
    """

    unusable: list[str] = dataclasses.field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """The unusable entries, then the findings of :class:`LayerDiagnosis`."""
        return [*self.unusable, *super().problems]


def inspect_statistics(layers: Mapping[str, Mapping[str, Any]]) -> DiagnosisReport:
    """Check each layer's saved statistics: NaN / Inf / negative / zero variance, non-finite
    mean, and momentum horizon versus steps where both are known.

    Statistics that are not real numbers (complex tensors) and a step count that is not one
    non-negative whole number are reported as problems of their layer, not raised.

    Args:
        layers: ``{layer_name: {"moving_mean": array, "moving_variance": array, ...}}``; torch's
            ``running_mean`` / ``running_var`` / ``num_batches_tracked`` are accepted too, and
            optional ``"momentum"`` (Keras convention), ``"steps"`` and ``"kind"`` entries.

    Returns:
        A :class:`~batchnorm.DiagnosisReport` without the data-dependent columns.

    Raises:
        ValueError: a layer lacks its mean or variance, they differ in shape, or one is not an
            array of numbers.

    Example:
        >>> report = inspect_statistics({"bn": {"moving_mean": [0.0], "moving_variance": [-1.0]}})
        >>> report.problems
        {'bn': ['negative variance in 1 channel(s) [0]']}
    """
    rows: list[LayerDiagnosis] = []
    for name, entries in layers.items():
        unusable: list[str] = []
        mean = _statistic(entries, _MEAN_KEYS, name, unusable)
        variance = _statistic(entries, _VARIANCE_KEYS, name, unusable)
        if mean.shape != variance.shape:
            raise ValueError(
                f"Layer {name}: the mean and variance must have the same shape. "
                f"Received: {tuple(mean.shape)} and {tuple(variance.shape)}"
            )
        kind = entries.get("kind") or (
            "BatchNorm (torch)" if "running_mean" in entries else "BatchNormalization"
        )
        row = InspectedLayer(
            name=name,
            kind=str(kind),
            channels=int(mean.numel()),
            steps=_step_count(entries, unusable),
            momentum=_momentum(entries, unusable),
            unusable=unusable,
        )
        if row.momentum is not None:
            row.horizon = averaging_horizon(row.momentum)
        # Complex statistics have no meaningful sign or NaN checks: they are flagged alone.
        if not (mean.is_complex() or variance.is_complex()):
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
    """:func:`inspect_statistics` on the batch norms of a saved checkpoint.

    A torch state_dict (``torch.save``d, read with ``weights_only=True``; a dict holding it under
    ``"state_dict"``, ``"model"``... is searched too), or a tf-keras ``.h5`` / Keras 3 ``.keras``
    file (read with :func:`batchnorm.interop.keras.read_batch_norm_layers`, which needs h5py).
    The format is recognised from the file's first bytes, so a renamed file reads too.

    Raises:
        FileNotFoundError: nothing at ``path``. IsADirectoryError: ``path`` is a folder.
        OSError: the file cannot be opened, or a Keras file is truncated or damaged.
        ValueError: it is not a torch checkpoint or Keras file (a NumPy ``.npz`` is a zip archive
            but not torch's), it is truncated or damaged, torch cannot load it with
            ``weights_only=True``, it holds no batch norm, or a layer's statistics are malformed
            (mean and variance of different shapes, one missing); the message names the file.
        ImportError: a Keras file and h5py is not installed.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"No checkpoint file at {str(path)!r}. Expected {EXPECTED_FILES}. "
            "Received: a path where nothing exists"
        )
    if path.is_dir():
        raise IsADirectoryError(
            f"{str(path)!r} is a directory, not a checkpoint file. Expected {EXPECTED_FILES}. "
            f"Received: the directory {str(path)!r}"
        )
    with path.open("rb") as stream:
        head = stream.read(512)
    # The content decides; a Keras name decides only for a file torch did not write (a torch
    # state_dict saved as "model.h5" was refused as a damaged Keras archive).
    keras_named = path.suffix.lower() in KERAS_SUFFIXES
    if _is_keras_file(path, head) or (keras_named and not _is_torch_file(path, head)):
        return _inspected(_keras_statistics(path), path)
    if not _may_be_torch_file(head):
        received = "an empty file" if not head else f"a file starting with {head[:24]!r}"
        raise ValueError(
            f"Could not read {str(path)!r}: it is not a PyTorch checkpoint or a Keras file. "
            f"Expected {EXPECTED_FILES}. Received: {received}"
        )
    if head.startswith(_ZIP_SIGNATURE):
        _check_torch_archive(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        message = without_terminal_codes(str(error)).strip()
        if "Weights only load failed" in message:
            raise ValueError(
                f"Could not read {str(path)!r} as a torch state_dict with weights_only=True "
                f"({type(error).__name__}: {message}). Save `model.state_dict()` rather than "
                "the model."
            ) from error
        # EOFError, struct.error, IndexError, RuntimeError("unexpected EOF"...): the advice
        # above was wrong for a truncated or damaged file, and for a pickle torch did not write.
        raise ValueError(
            f"Could not read {str(path)!r}: it is not a readable PyTorch checkpoint (truncated, "
            f"damaged, or not written by torch.save). Expected {EXPECTED_FILES}. Received: "
            f"{type(error).__name__}: {message or 'the data ended early'}"
        ) from error
    state_dict = _find_state_dict(loaded)
    layers = batch_norm_layers_from_state_dict(state_dict) if state_dict is not None else {}
    if not layers:
        raise ValueError(
            f"No batch-norm statistics (keys ending in running_mean or moving_mean) in {str(path)!r}"
        )
    for prefix, entries in layers.items():
        for leaf, tensor in entries.items():
            if tensor.is_meta or tensor.layout != torch.strided:
                kind = "meta tensor (no values)" if tensor.is_meta else f"{tensor.layout} tensor"
                raise ValueError(
                    f"Could not read the statistics in {str(path)!r}: `{prefix}.{leaf}` is a "
                    f"{kind}. Expected dense tensors with values (a model saved before its "
                    "meta-device parameters were materialised holds none)"
                )
    return _inspected(layers, path)


def _inspected(layers: Mapping[str, Mapping[str, Any]], path: Path) -> DiagnosisReport:
    """:func:`inspect_statistics`, its errors naming the file (they name only the layer)."""
    try:
        return inspect_statistics(layers)
    except ValueError as error:
        raise ValueError(f"Could not read the statistics in {str(path)!r}: {error}") from error


def _check_torch_archive(path: Path) -> None:
    """Refuse a zip archive torch.save did not write (a NumPy .npz) or one cut short: torch.load
    said only "file in archive is not in a subdirectory" or "failed finding central directory",
    and the message then advised saving a state_dict."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(
            f"Could not read {str(path)!r}: it starts like a zip archive (torch.save's format) "
            f"but is truncated or damaged. Expected {EXPECTED_FILES}. Received: {error}"
        ) from error
    if any(name.endswith("/data.pkl") for name in names):
        return
    numpy = bool(names) and all(name.endswith(".npy") for name in names)
    kind = "a NumPy .npz archive" if numpy else "a zip archive"
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise ValueError(
        f"Could not read {str(path)!r}: it is a zip archive but not a PyTorch checkpoint "
        f"(torch.save's archives hold <name>/data.pkl). Expected {EXPECTED_FILES}. "
        f"Received: {kind} holding {len(names)} file(s): {shown or 'none'}"
    )


def without_terminal_codes(text: str) -> str:
    """``text`` without ANSI escape sequences (torch colours parts of its load errors)."""
    return _TERMINAL_CODES.sub("", text)


def _is_keras_file(path: Path, head: bytes) -> bool:
    if head.startswith(_HDF5_SIGNATURE):
        return True
    if not head.startswith(_ZIP_SIGNATURE):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            # Keras 3 keeps the weights of a .keras archive there; torch under <name>/data/.
            return "model.weights.h5" in archive.namelist()
    except zipfile.BadZipFile:
        return False


def _is_torch_file(path: Path, head: bytes) -> bool:
    """torch.save's formats: a zip archive holding ``<name>/data.pkl``, or the legacy ones."""
    if not head.startswith(_ZIP_SIGNATURE):
        return _may_be_torch_file(head)
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _may_be_torch_file(head: bytes) -> bool:
    return head.startswith((_ZIP_SIGNATURE, _PICKLE_PROTOCOL)) or head[257:262] == _TAR_MAGIC_AT_257


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


def _statistic(
    entries: Mapping[str, Any], keys: tuple[str, ...], name: str, unusable: list[str]
) -> torch.Tensor:
    """The first of ``keys`` as float64, or as saved (noted in ``unusable``) when complex."""
    for key in keys:
        if key in entries:
            try:
                value = torch.as_tensor(entries[key]).detach()
            except (TypeError, ValueError, RuntimeError) as error:
                raise ValueError(
                    f"Layer {name}: `{key}` must be an array of real numbers. "
                    f"Received: {entries[key]!r} ({error})"
                ) from error
            if value.is_complex():
                unusable.append(
                    f"{key} holds complex numbers ({str(value.dtype).removeprefix('torch.')}): "
                    "batch-norm statistics must be real"
                )
                return value
            if not value.is_floating_point():  # bool or integer: not what a batch norm keeps
                unusable.append(
                    f"{key} holds {str(value.dtype).removeprefix('torch.')} values: batch-norm "
                    "statistics are floating-point numbers"
                )
            return value.to(torch.float64)
    raise ValueError(
        f"Layer {name} needs one of {' / '.join(keys)}. Received keys: {sorted(entries)}"
    )


def _step_count(entries: Mapping[str, Any], unusable: list[str]) -> int | None:
    """The saved step count, or None (noted in ``unusable``) when it is not one whole number."""
    key = next((key for key in _STEP_KEYS if key in entries), None)
    if key is None or entries[key] is None:
        return None
    value: Any = entries[key]
    try:
        count = torch.as_tensor(value).detach()
    except (TypeError, ValueError, RuntimeError):
        count = None
    if count is not None and count.numel() != 1:
        value = f"a tensor of shape {tuple(count.shape)}"
    elif count is not None:
        value = count.reshape(()).item()
        real = isinstance(value, (int, float)) and not isinstance(value, bool)
        if real and value >= 0 and float(value).is_integer():
            return int(value)
    unusable.append(f"{key} must be one non-negative whole number. Received: {value}")
    return None


def _momentum(entries: Mapping[str, Any], unusable: list[str]) -> float | None:
    """The saved momentum as a float, or None: where there is none (or None), and where it is
    not a number (noted in ``unusable``): a hand-edited or damaged Keras config may hold
    ``"momentum": "0.5"`` or ``true``, which are no momentum."""
    value = entries.get("momentum")
    if value is None:
        return None
    if not isinstance(value, (str, bytes, bool, np.bool_)) and not (
        isinstance(value, torch.Tensor) and value.dtype == torch.bool
    ):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    unusable.append(f"momentum must be a number (Keras convention). Received: {value!r}")
    return None


def _keras_statistics(path: Path) -> dict[str, dict[str, Any]]:
    """The batch-norm layers of a tf-keras ``.h5`` or Keras 3 ``.keras`` file, for inspection."""
    from batchnorm.interop.keras import read_batch_norm_layers

    layers = {}
    for layer in read_batch_norm_layers(path):
        entries: dict[str, Any] = dict(layer.weights)
        entries["kind"] = f"BatchNormalization ({layer.file_format})"
        if layer.config is not None and "momentum" in layer.config:
            entries["momentum"] = layer.config["momentum"]  # checked by inspect_statistics
        # by path ("encoder/bn"): layers of two nested models may share a name; a weights-only
        # file has no paths, so a repeated name gets its location in the file
        key = layer.path if layer.path not in layers else f"{layer.path} at {layer.location}"
        layers[key] = entries
    return layers
