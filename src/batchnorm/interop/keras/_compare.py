"""How a Keras file's batch-norm layer differs from the torch module it is loaded into.

Each difference says what the file holds, what the module holds, and how it is resolved:
``"configure"`` (``load_weights(configure=True)`` sets the module's value from the file),
``"adapt"`` (the weights still load, e.g. gamma = 1 for a file layer without scale) or
``"cannot load"`` (the weights do not fit the module).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import numpy as np
from torch import nn

from batchnorm.interop.keras._records import GAMMA_OR_BETA, KerasBatchNormLayer
from batchnorm.layers import BatchNormalization

Resolution = Literal["configure", "adapt", "cannot load"]
TorchBatchNorm = nn.modules.batchnorm._BatchNorm
BatchNormModule = BatchNormalization | TorchBatchNorm


class Difference(NamedTuple):
    """One setting on which the file's layer and the module disagree."""

    setting: str
    in_file: Any
    in_module: Any
    resolution: Resolution

    def __str__(self) -> str:
        hint = {
            "configure": "configure=True adopts the file's value",
            "adapt": "the weights still load",
            "cannot load": "the weights cannot be loaded",
        }[self.resolution]
        return f"{self.setting}: file {self.in_file!r}, module {self.in_module!r} ({hint})"


def file_variance_estimator(record: KerasBatchNormLayer, rank: int | None) -> str | None:
    """Which variance the file's layer stores in moving_variance: "biased", "unbiased" or None.

    Keras 3 always stores the biased variance. tf-keras' configs never hold ``fused``, so a
    loaded layer resolves it again: fused (unbiased) for rank 4 with axis 1 or 3 and rank 5 with
    axis 1 or 4, without renorm, ghost batches or float64; None when the rank is not known.
    """
    if record.file_format == "Keras 3":
        return "biased"
    config = record.config
    if config is None:
        return None
    if _synchronized(record):
        return "biased"
    if record.renorm or config.get("virtual_batch_size") or _dtype_name(config) == "float64":
        return "biased"
    if rank is None:
        return None
    axes = [a % rank for a in _axis_list(config.get("axis", -1))]
    return "unbiased" if rank in (4, 5) and axes in ([1], [rank - 1]) else "biased"


def _synchronized(record: KerasBatchNormLayer) -> bool:
    """tf-keras' SyncBatchNormalization (and synchronized=True) never takes the fused path."""
    config = record.config or {}
    return record.class_name == "SyncBatchNormalization" or bool(config.get("synchronized"))


def _no_config(record: KerasBatchNormLayer) -> str:
    if "/" in record.path and record.path != record.name:
        return (
            "the file holds weights only, or the layer is held by a custom layer whose "
            "config does not list it"
        )
    return "the file holds weights only"


def module_variance_estimator(layer: BatchNormalization) -> str | None:
    if layer.moving_variance_estimator != "auto":
        return str(layer.moving_variance_estimator)
    if layer.built and layer._input_rank is not None:
        return "unbiased" if layer.fused else "biased"
    return "biased" if layer.fused is False else None


def layer_differences(
    record: KerasBatchNormLayer, layer: BatchNormalization
) -> tuple[list[Difference], list[str]]:
    """Differences between a file layer and one of our BatchNormalization layers, and notes."""
    differences = _structure_differences(record, layer)
    notes: list[str] = []
    config = record.config
    if config is None:
        notes.append(
            f"{_no_config(record)}: momentum, epsilon, axis and the moving-variance "
            "convention were not checked (tf-keras defaults assumed)"
        )
    else:
        differences += _setting_differences(config, layer)
        differences += _axis_differences(record, layer, notes)
    rank = layer._input_rank if layer.built else None
    in_file = file_variance_estimator(record, rank or record.input_rank)
    in_module = module_variance_estimator(layer)
    # An unbuilt "auto" layer follows tf-keras' rule itself, which a Keras 3 file does not, nor a
    # synchronized tf-keras layer.
    undecided = in_module is None and (record.file_format == "Keras 3" or _synchronized(record))
    if in_file is not None and (undecided or in_module not in (None, in_file)):
        in_module_text = in_module or "auto (tf-keras rule, decided at build)"
        differences.append(
            Difference("moving_variance_estimator", in_file, in_module_text, "configure")
        )
    return differences, notes


def _structure_differences(
    record: KerasBatchNormLayer, layer: BatchNormalization
) -> list[Difference]:
    differences = []
    file_shape = record.channel_shape
    if layer.built:
        module_shape = tuple(layer.moving_mean.shape)
        if not _same_channels(file_shape, module_shape):
            differences.append(Difference("channels", file_shape, module_shape, "cannot load"))
    elif len(file_shape) != 1 or (not isinstance(layer.axis, int) and len(layer.axis) != 1):
        differences.append(
            Difference("channels", file_shape, "not built: build the layer first", "cannot load")
        )
    if GAMMA_OR_BETA in record.weights:
        differences.append(_unresolved_gamma_or_beta(f"scale={layer.scale}, center={layer.center}"))
    for weight, setting in (("gamma", "scale"), ("beta", "center")):
        in_file, in_module = weight in record.weights, bool(getattr(layer, setting))
        if in_file != in_module and GAMMA_OR_BETA not in record.weights:
            resolution: Resolution = "adapt" if in_module else "cannot load"
            differences.append(Difference(setting, in_file, in_module, resolution))
    if record.renorm != layer.renorm:
        differences.append(Difference("renorm", record.renorm, layer.renorm, "adapt"))
    return differences


def _setting_differences(config: Mapping[str, Any], layer: BatchNormalization) -> list[Difference]:
    differences = []
    settings: list[tuple[str, Any]] = [
        ("momentum", layer.momentum),
        ("epsilon", layer.epsilon),
        ("trainable", layer.trainable),
    ]
    if record_renorm(config) and layer.renorm:
        settings += [
            ("renorm_momentum", layer.renorm_momentum),
            ("renorm_clipping", layer.renorm_clipping),
        ]
    for setting, in_module in settings:
        in_file = config.get(setting, _KERAS_DEFAULTS.get(setting))
        if setting == "renorm_clipping":
            in_file = dict(in_file or {})
            in_module = dict(in_module or {})
        if not _equal(in_file, in_module):
            differences.append(Difference(setting, in_file, in_module, "configure"))
    in_file_vbs = config.get("virtual_batch_size")
    if in_file_vbs != layer.virtual_batch_size:
        differences.append(
            Difference("virtual_batch_size", in_file_vbs, layer.virtual_batch_size, "adapt")
        )
    return differences


def _axis_differences(
    record: KerasBatchNormLayer, layer: BatchNormalization, notes: list[str]
) -> list[Difference]:
    assert record.config is not None
    in_file = _axis_list(record.config.get("axis", -1))
    if record.config.get("virtual_batch_size") and all(a > 0 for a in in_file):
        in_file = [a - 1 for a in in_file]  # tf-keras shifts the axes of a built ghost-batch layer
    in_module = _axis_list(layer.axis)
    rank = layer._input_rank if layer.built else record.input_rank
    if rank is not None:
        same = sorted(a % rank for a in in_file) == sorted(a % rank for a in in_module)
    elif all((a < 0) == (b < 0) for a, b in zip(in_file, in_module, strict=False)):
        same = in_file == in_module
    else:
        notes.append(
            f"axis {in_file} in the file and {in_module} in the module could not be compared: "
            "the input rank is not known yet"
        )
        return []
    if same:
        return []
    if len(in_file) == len(in_module) == 1:
        # A channels-last Keras layer ported to a channels-first torch model is the usual case.
        notes.append(
            f"the file's layer normalises axis {in_file[0]}, the module axis {in_module[0]}: "
            "right when the module's inputs are laid out accordingly (e.g. NHWC -> NCHW)"
        )
        return []
    return [Difference("axis", in_file, in_module, "adapt")]


def torch_differences(
    record: KerasBatchNormLayer, module: TorchBatchNorm
) -> tuple[list[Difference], list[str]]:
    """Differences between a file layer and a torch.nn.BatchNorm*d module, and notes."""
    differences = []
    notes = []
    size = math.prod(record.channel_shape)
    if size != module.num_features or sum(d != 1 for d in record.channel_shape) > 1:
        differences.append(
            Difference("channels", record.channel_shape, (module.num_features,), "cannot load")
        )
    if not module.track_running_stats:
        differences.append(Difference("track_running_stats", True, False, "cannot load"))
    if GAMMA_OR_BETA in record.weights:
        differences.append(_unresolved_gamma_or_beta(f"affine={module.affine}"))
    for weight, setting in (("gamma", "scale"), ("beta", "center")):
        in_file = weight in record.weights
        if in_file != module.affine and GAMMA_OR_BETA not in record.weights:
            resolution: Resolution = "adapt" if module.affine else "cannot load"
            differences.append(
                Difference(f"{setting} (affine)", in_file, module.affine, resolution)
            )
    if record.renorm:
        differences.append(Difference("renorm", True, "not in PyTorch", "adapt"))
    config = record.config
    if config is None:
        notes.append(f"{_no_config(record)}: momentum and epsilon were not checked")
    else:
        epsilon = float(config.get("epsilon", 1e-3))
        if not _equal(epsilon, module.eps):
            differences.append(Difference("epsilon (eps)", epsilon, module.eps, "configure"))
        torch_momentum = round(1.0 - float(config.get("momentum", 0.99)), 12)
        if module.momentum is None or not _equal(torch_momentum, module.momentum):
            differences.append(
                Difference(
                    "momentum (PyTorch convention)", torch_momentum, module.momentum, "configure"
                )
            )
        # What torch's batch norm cannot do: the weights load, its training steps differ.
        if config.get("trainable", True) is False:
            differences.append(
                Difference(
                    "trainable", False, "not in PyTorch (train() uses batch statistics)", "adapt"
                )
            )
        if config.get("virtual_batch_size"):
            differences.append(
                Difference(
                    "virtual_batch_size",
                    config["virtual_batch_size"],
                    "not in PyTorch (one batch)",
                    "adapt",
                )
            )
    estimator = file_variance_estimator(record, None)
    if estimator != "unbiased":
        notes.append(
            "PyTorch updates running_var with the unbiased batch variance; the file's layer "
            f"stores the {estimator or 'biased or unbiased'} one (loaded as it is)"
        )
    return differences, notes


def value_differences(record: KerasBatchNormLayer) -> list[Difference]:
    """Weights that would turn the module's output into NaN or inf: non-finite values, and a
    negative moving variance. A diverged training run saves such files; they still load
    (``strict=False``), as Keras would load them."""
    differences = []
    for name, array in record.weights.items():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            found = f"{bad} of {array.size} not finite"
            differences.append(Difference(f"{name} values", found, "finite expected", "adapt"))
    negative = int(np.count_nonzero(record.weights["moving_variance"] < 0))
    if negative:
        found = f"{negative} of {record.weights['moving_variance'].size} negative"
        differences.append(Difference("moving_variance values", found, ">= 0 expected", "adapt"))
    return differences


def _unresolved_gamma_or_beta(in_module: str) -> Difference:
    return Difference(
        "scale/center",
        "gamma or beta (a weights-only file does not say which)",
        in_module,
        "cannot load",
    )


def record_renorm(config: Mapping[str, Any]) -> bool:
    return bool(config.get("renorm", False))


_KERAS_DEFAULTS: dict[str, Any] = {
    "momentum": 0.99,
    "epsilon": 1e-3,
    "trainable": True,
    "renorm_momentum": 0.99,
    "renorm_clipping": None,
}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
    return bool(a == b)


def _same_channels(file_shape: tuple[int, ...], module_shape: tuple[int, ...]) -> bool:
    return math.prod(file_shape) == math.prod(module_shape) and sorted(
        d for d in file_shape if d != 1
    ) == sorted(d for d in module_shape if d != 1)


def _axis_list(axis: Any) -> list[int]:
    return [int(axis)] if isinstance(axis, int) else [int(a) for a in axis]


def _dtype_name(config: Mapping[str, Any]) -> str | None:
    dtype = config.get("dtype")
    if isinstance(dtype, Mapping):
        dtype = (dtype.get("config") or {}).get("name")
    return None if dtype is None else str(dtype)
