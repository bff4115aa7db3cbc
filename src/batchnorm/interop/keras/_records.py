"""What a Keras file says about one batch-normalization layer, whatever the file format."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import numpy as np

KerasFormat = Literal["tf-keras HDF5", "Keras 3", "tf-keras .keras"]
# A Keras 3 weights-only file stores 3 (or 6 with renorm) unnamed variables for a layer with only
# one of gamma and beta; which one is decided by the module it is loaded into.
GAMMA_OR_BETA = "gamma_or_beta"
BATCH_NORM_WEIGHT_NAMES = (
    "gamma",
    "beta",
    "moving_mean",
    "moving_variance",
    "moving_stddev",
    "renorm_mean",
    "renorm_stddev",
)


@dataclass(frozen=True)
class KerasBatchNormLayer:
    """One BatchNormalization layer read from a Keras file.

    Attributes:
        name: the Keras layer name (``"bn_conv"``, ``"batch_normalization_3"``).
        weights: arrays by Keras weight name, in Keras order: gamma, beta, moving_mean,
            moving_variance[, moving_stddev, renorm_mean, renorm_stddev]; gamma/beta absent
            when the layer was built with ``scale=False`` / ``center=False``. A Keras 3
            weights-only file cannot say which of the two a layer with one of them holds: that
            weight is named ``"gamma_or_beta"``.
        config: the layer config as Keras wrote it, or None when the file holds weights only or
            the layer is an attribute of a custom layer, whose config does not list it.
        file_format: ``"tf-keras HDF5"`` (tf.keras 2.x ``.h5``), ``"Keras 3"`` (``.keras``,
            ``.weights.h5``) or ``"tf-keras .keras"`` (tf-keras 2.13+'s own ``.keras``).
        location: where the weights are inside the file (an HDF5 group path).
        input_rank: the input rank the layer was built for, when the file records it.
        path: the names of the nested models and wrappers around the layer and its own, joined
            by "/" (``"encoder/bn"``; ``name`` for a layer of the model itself): unique where
            names repeat across nested models. A Keras 3 ``.weights.h5`` gives the same path
            from the names written on its groups; tf-keras' ``.weights.h5``, which writes none,
            gives the group names (``"sequential/batch_normalization"``). A layer held as an
            attribute of a custom layer is named there by its attribute in Keras 3 files
            (``"block/bn1"``) and by its layer name in tf-keras ``.h5`` files
            (``"block/batch_normalization"``); one built in a custom layer's ``build()`` by the
            holder's scope in tf-keras ``.h5`` files (``"block"``).
        class_name: the config's class name (``"SyncBatchNormalization"``, a subclass's name),
            None where the file has no config for the layer.
    """

    name: str
    weights: Mapping[str, np.ndarray]
    config: Mapping[str, Any] | None
    file_format: KerasFormat
    location: str
    input_rank: int | None = None
    keras_version: str | None = field(default=None, compare=False)
    path: str = ""
    class_name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.path:
            object.__setattr__(self, "path", self.name)

    @property
    def channel_shape(self) -> tuple[int, ...]:
        """The shape of ``moving_mean`` as stored (``(C,)`` for one channel axis)."""
        return tuple(int(d) for d in self.weights["moving_mean"].shape)

    @property
    def renorm(self) -> bool:
        return "moving_stddev" in self.weights


class GarbledKerasFileError(ValueError):
    """A JSON part of a Keras file (config.json, metadata.json, ``model_config``) of another
    structure than Keras writes: :func:`~batchnorm.interop.keras.read_batch_norm_layers` names
    the file. The message says what was expected and what the file holds."""


def json_object(value: Any, what: str) -> Mapping[str, Any]:
    """``value`` where it is a JSON object (a dict); else :class:`GarbledKerasFileError`."""
    if not isinstance(value, Mapping):
        raise GarbledKerasFileError(
            f"{what} must be a JSON object, as Keras writes it, but holds {_json_text(value)}"
        )
    return value


def _json_text(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def checked_weights(layer: KerasBatchNormLayer, path: str) -> KerasBatchNormLayer:
    """``layer`` with its arrays in native byte order, after checking they can be a batch norm's.

    Every weight must hold real numbers, at least one per channel, and all must have the same
    shape: a file whose gamma has 4 values and moving_mean 5 is refused here, before any module
    is touched, rather than half-way through a load. (h5py returns big-endian arrays as stored;
    torch refuses them.)
    """
    where = f"at {layer.location} in path={path!r}"
    weights = {}
    for name, value in layer.weights.items():
        array = np.asarray(value)
        if array.dtype.kind not in "fiu":
            raise ValueError(
                f"Weight `{name}` of Keras layer {layer.name!r} must hold real numbers. "
                f"Received: dtype {array.dtype} {where}"
            )
        if array.ndim == 0 or array.size == 0:
            raise ValueError(
                f"Weight `{name}` of Keras layer {layer.name!r} must hold one value per channel. "
                f"Received: shape {array.shape} {where}"
            )
        weights[name] = array.astype(array.dtype.newbyteorder("="), copy=False)
    if len({array.shape for array in weights.values()}) > 1:
        shapes = ", ".join(f"{name} {array.shape}" for name, array in weights.items())
        raise ValueError(
            f"Every weight of Keras layer {layer.name!r} must have the same shape, one value per "
            f"channel. Received: {shapes} {where}"
        )
    return replace(layer, weights=weights)


def import_h5py() -> Any:
    """h5py, imported on first use: it is an optional dependency (``batchnorm[keras]``)."""
    try:
        import h5py
    except ImportError as error:
        raise ImportError(
            "Reading Keras files needs h5py, an optional dependency of batchnorm. "
            "Install it with `pip install 'batchnorm[keras]'` (or `pip install h5py`)."
        ) from error
    return h5py


# The config keys of BatchNormalization that no other built-in layer has together: a registered
# subclass (``class MyBN(BatchNormalization)``) keeps them under its own class name.
_BATCH_NORM_CONFIG_KEYS = frozenset(
    {
        "momentum",
        "epsilon",
        "center",
        "scale",
        "moving_mean_initializer",
        "moving_variance_initializer",
    }
)


def is_batch_norm_entry(entry: Mapping[str, Any]) -> bool:
    """tf-keras writes BatchNormalization (V1/V2 in old files), SyncBatchNormalization too; a
    subclass is known by its config keys."""
    class_name = str(entry.get("class_name", ""))
    inner = entry.get("config")
    return "BatchNormalization" in class_name or (
        isinstance(inner, Mapping) and set(inner) >= _BATCH_NORM_CONFIG_KEYS
    )


class BatchNormConfig(NamedTuple):
    """A layer's entry in a model config (a batch norm's unless ``batch_norm`` is False), with
    where it sits.

    ``enclosing`` holds the names of the nested models and wrappers around it, outermost first
    (the saved model itself not included); ``wrapped`` whether the innermost of them is a
    wrapper (TimeDistributed: ``config["layer"]``). ``keras3_group`` is the HDF5 group of its
    variables in a Keras 3 ``model.weights.h5``: per container, the snake-cased class name
    numbered in layer order (``layers/sequential/layers/batch_normalization_1``), a wrapped
    layer under its wrapper's ``layer``."""

    name: str
    config: Mapping[str, Any]
    rank: int | None
    enclosing: tuple[str, ...]
    wrapped: bool
    keras3_group: str
    class_name: str = "BatchNormalization"
    batch_norm: bool = True

    @property
    def path(self) -> str:
        return "/".join((*self.enclosing, self.name))


def batch_norm_configs(model_config: Any) -> list[BatchNormConfig]:
    """Every batch-norm layer in a model config, depth first (the order Keras saves them in)."""
    return [found for found in config_layers(model_config) if found.batch_norm]


def config_layers(model_config: Any) -> list[BatchNormConfig]:
    """Every layer in a model config, depth first, each marked whether it is a batch norm."""
    found: list[BatchNormConfig] = []

    def visit(entry: Any, enclosing: tuple[str, ...], wrapped: bool, group: str) -> None:
        if not (isinstance(entry, Mapping) and isinstance(entry.get("config"), Mapping)):
            return
        inner = entry["config"]
        # Keras 3 writes a custom layer's name beside its config, not in it.
        name = str(inner.get("name", entry.get("name")))
        build_config = entry.get("build_config")
        if build_config is not None:
            json_object(build_config, f"the `build_config` of layer {name!r} in the model config")
        shape = (build_config or {}).get("input_shape")
        rank = len(shape) if isinstance(shape, list) else None
        class_name = str(entry.get("class_name", ""))
        batch_norm = is_batch_norm_entry(entry)
        found.append(
            BatchNormConfig(name, inner, rank, enclosing, wrapped, group, class_name, batch_norm)
        )
        children = inner.get("layers")
        if isinstance(children, list):
            visit_container(children, (*enclosing, name), f"{group}/layers")
        if isinstance(inner.get("layer"), Mapping):
            visit(inner["layer"], (*enclosing, name), True, f"{group}/layer")

    def visit_container(entries: list[Any], enclosing: tuple[str, ...], prefix: str) -> None:
        used: dict[str, int] = {}
        for entry in entries:
            snake = (
                _snake_case(str(entry.get("class_name", ""))) if isinstance(entry, Mapping) else ""
            )
            count = used.get(snake)
            used[snake] = 0 if count is None else count + 1
            group = snake if count is None else f"{snake}_{count + 1}"
            visit(entry, enclosing, False, f"{prefix}/{group}")

    if isinstance(model_config, Mapping) and is_batch_norm_entry(model_config):
        visit(model_config, (), False, "")
    elif isinstance(model_config, Mapping) and isinstance(model_config.get("config"), Mapping):
        children = model_config["config"].get("layers")
        if isinstance(children, list):
            visit_container(children, (), "layers")
    return found


def _snake_case(class_name: str) -> str:
    """Keras 3's ``naming.to_snake_case``: "BatchNormalization" -> "batch_normalization"."""
    name = re.sub(r"\W+", "", class_name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def decode(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)
