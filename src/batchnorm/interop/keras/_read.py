"""``read_batch_norm_layers``: find a Keras file's format and read its batch-norm layers."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from batchnorm.interop.keras._h5_format import is_tf_keras_h5, read_tf_keras_h5
from batchnorm.interop.keras._keras3_format import (
    is_keras3_weights_h5,
    read_keras3_weights_h5,
    read_keras_archive,
)
from batchnorm.interop.keras._records import (
    GarbledKerasFileError,
    KerasBatchNormLayer,
    checked_weights,
    import_h5py,
)

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_ZIP_SIGNATURE = b"PK\x03\x04"


def read_batch_norm_layers(path: str | os.PathLike[str]) -> list[KerasBatchNormLayer]:
    """The BatchNormalization layers of a Keras file, in the model's layer order.

    Reads, without TensorFlow or Keras (h5py only, ``pip install 'batchnorm[keras]'``):

    - tf-keras 2.x HDF5 files: ``model.save("m.h5")`` (weights and layer configs) and
      ``model.save_weights("w.h5")`` (weights only: ``config`` is None);
    - Keras 3 ``.keras`` archives (``model.save("m.keras")``) and Keras 3 ``.weights.h5``
      files (weights only).

    Args:
        path: the file.

    Returns:
        One :class:`KerasBatchNormLayer` (name, weights by Keras name, config) per layer.

    Raises:
        FileNotFoundError: no such file. OSError: h5py cannot read it (truncated or damaged,
        also where h5py raises RuntimeError or OverflowError); the message names the file. ValueError: not a Keras file, no batch-norm layer, or a
        layer whose weights disagree in shape (gamma of 4 values, moving_mean of 5) or are not
        real numbers. ImportError: h5py is not installed.

    Example:
        >>> for layer in read_batch_norm_layers("model.h5"):  # doctest: +SKIP
        ...     print(layer.name, layer.channel_shape, layer.config["momentum"])
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"`path` must be a str or os.PathLike. Received: path of type {type(path).__name__}"
        )
    file = Path(path)
    if file.is_dir():
        raise ValueError(
            "`path` must name a Keras file (.h5, .keras); a directory such as a TensorFlow "
            "SavedModel or a Keras `export()` folder holds no weights this reads. "
            f"Received: path={str(path)!r}, a directory"
        )
    if not file.is_file():
        raise FileNotFoundError(
            f"`path` must name an existing Keras file. Received: path={str(path)!r}"
        )
    h5py = import_h5py()
    with file.open("rb") as stream:
        signature = stream.read(len(_HDF5_SIGNATURE))
    try:
        layers = _read_layers(file, signature, str(path), h5py)
    except (OSError, RuntimeError, OverflowError) as error:
        # h5py's messages ("truncated file: eof = ...") do not say which file; a damaged HDF5
        # structure (a bad B-tree or symbol-table signature) raises RuntimeError or OverflowError.
        raise OSError(
            f"`path` could not be read as a Keras file ({error}); it may be truncated or "
            f"damaged. Received: path={str(path)!r}"
        ) from error
    except zipfile.BadZipFile as error:
        raise ValueError(
            f"`path` is a damaged `.keras` zip archive ({error}). Received: path={str(path)!r}"
        ) from error
    except (KeyError, json.JSONDecodeError, GarbledKerasFileError) as error:
        raise ValueError(
            f"`path` lacks or garbles what a Keras file of its format holds ({error}). "
            f"Received: path={str(path)!r}"
        ) from error
    if not layers:
        raise ValueError(
            "Expected a Keras file with at least one BatchNormalization layer. "
            f"Received: path={str(path)!r} with none"
        )
    return [checked_weights(layer, str(path)) for layer in layers]


def _read_layers(file: Path, signature: bytes, path: str, h5py: Any) -> list[KerasBatchNormLayer]:
    if zipfile.is_zipfile(file):
        return read_keras_archive(file, h5py)
    if signature == _HDF5_SIGNATURE:
        with h5py.File(file, "r") as handle:
            if is_tf_keras_h5(handle):
                return read_tf_keras_h5(handle)
            if is_keras3_weights_h5(handle):
                return read_keras3_weights_h5(handle)
            raise ValueError(
                "`path` is an HDF5 file but not one Keras wrote: expected tf-keras' "
                "`layer_names` attribute or Keras 3's `layers` group. "
                f"Received: path={path!r} with top-level keys {sorted(handle.keys())}"
            )
    if signature.startswith(_ZIP_SIGNATURE):
        raise ValueError(
            "`path` starts like a zip archive but has no end-of-archive record: a truncated "
            f"`.keras` file? Received: path={path!r}"
        )
    raise ValueError(
        "`path` must be a Keras file: a Keras 3 `.keras` zip archive or an HDF5 `.h5` file "
        f"written by tf-keras or Keras 3. Received: path={path!r}, which is neither"
    )
