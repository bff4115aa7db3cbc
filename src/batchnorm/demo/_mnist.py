"""MNIST readers: IDX files (gzipped or not) and the Keras ``mnist.npz``.

IDX layout (LeCun's MNIST page): a big-endian header ``0x00 0x00 <type> <ndim>`` followed by ``ndim``
big-endian int32 sizes and the data. Images are type 0x08 (uint8) with 3 dims, magic ``0x00000803``;
labels are uint8 with 1 dim, magic ``0x00000801``.

Example:
    >>> images = read_idx("t10k-images-idx3-ubyte.gz", ndim=3)   # doctest: +SKIP
    >>> images.shape                                                 # doctest: +SKIP
    (10000, 28, 28)
"""

from __future__ import annotations

import gzip
import math
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

_UINT8 = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_KIND = {3: "images", 1: "labels"}


class DataError(ValueError):
    """A data path that is missing or malformed; the message names the file and the expectation."""


class ImageSplit(NamedTuple):
    """Images ``(N, H, W)`` uint8 and their labels ``(N,)`` int64 in 0..9."""

    images: np.ndarray
    labels: np.ndarray


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: corrupt or truncated gzip data ({error})") from error


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read one IDX file of uint8 data with ``ndim`` dimensions (3 for images, 1 for labels).

    Args:
        path: the file; gzip-compressed files (``.gz``) are recognised by their content.
        ndim: the expected number of dimensions.

    Raises:
        DataError: wrong magic number, truncated header or data, or trailing bytes.
    """
    path = Path(path)
    data = _read_bytes(path)
    expected_magic = (_UINT8 << 8) | ndim
    kind = _KIND.get(ndim, f"{ndim}-d data")
    if len(data) < 4:
        raise DataError(
            f"{path}: not an IDX file: {len(data)} bytes, expected a 4-byte magic number "
            f"0x{expected_magic:08x} ({kind})"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"{path}: not an IDX file of MNIST {kind}: magic number 0x{magic:08x}, "
            f"expected 0x{expected_magic:08x}"
        )
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataError(f"{path}: truncated IDX header: {len(data)} bytes, expected {header_size}")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    # exact: np.prod in int64 overflowed for a header of (4000000000, 60000, 60000)
    expected_size = header_size + math.prod(shape)
    if len(data) != expected_size:
        problem = "truncated" if len(data) < expected_size else "has trailing bytes"
        raise DataError(
            f"{path}: IDX data {problem}: header says shape {shape} "
            f"({expected_size} bytes in all), file has {len(data)} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def _describe_values(array: np.ndarray) -> str:
    return f"{array.dtype} values in [{array.min():g}, {array.max():g}]"


def _checked_images(images: np.ndarray, source: str) -> np.ndarray:
    """The images as uint8, refused where the cast would change a value (a float in [0, 1]
    became 0, an int16 300 became 44)."""
    if images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(
            f"{source}: images must have at least 1x1 pixels. Received: shape {images.shape}"
        )
    if images.dtype == np.uint8:
        return np.ascontiguousarray(images)
    if images.dtype.kind not in "iuf":
        raise DataError(
            f"{source}: images must be numbers, pixel values 0..255. Received: dtype {images.dtype}"
        )
    if images.dtype.kind == "f" and not np.isfinite(images).all():
        raise DataError(
            f"{source}: images must be pixel values 0..255. Received: {images.dtype} values "
            "with NaN or Inf"
        )
    if images.min() < 0 or images.max() > 255:
        raise DataError(
            f"{source}: images must be pixel values 0..255, as MNIST's uint8 pixels. "
            f"Received: {_describe_values(images)}"
        )
    if images.dtype.kind == "f" and not np.array_equal(images, np.round(images)):
        raise DataError(
            f"{source}: images must be whole pixel values 0..255, as MNIST's uint8 pixels "
            "(as uint8, images scaled to [0, 1] would all be 0: multiply them by 255 and round "
            f"first). Received: {_describe_values(images)}, not all whole numbers"
        )
    return np.ascontiguousarray(images, dtype=np.uint8)


def _checked_labels(labels: np.ndarray, source: str) -> np.ndarray:
    """The labels as int64, refused where they are not the digits 0..9 exactly."""
    if labels.dtype.kind not in "iuf":
        raise DataError(
            f"{source}: labels must be digits 0..9 (integers). Received: dtype {labels.dtype}"
        )
    if labels.dtype.kind == "f":
        not_whole = labels[~(np.isfinite(labels) & (labels == np.round(labels)))]
        if len(not_whole):
            raise DataError(
                f"{source}: labels must be digits 0..9 (whole numbers). "
                f"Received: {labels.dtype} values that are not all whole, e.g. {not_whole[0]}"
            )
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(
            f"{source}: labels must be digits 0..9. Received: min {labels.min()}, max {labels.max()}"
        )
    return labels.astype(np.int64)


def _checked_split(images: np.ndarray, labels: np.ndarray, source: str) -> ImageSplit:
    """The split as uint8 images and int64 labels. Only values these types hold exactly are
    accepted: pixel values 0..255 and labels 0..9 of any integer or float dtype, as long as
    they are whole numbers."""
    if images.ndim != 3:
        raise DataError(f"{source}: images must have shape (N, H, W). Received: {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{source}: labels must have shape (N,). Received: {labels.shape}")
    if len(images) != len(labels):
        raise DataError(
            f"{source}: {len(images)} images but {len(labels)} labels; the counts must match"
        )
    if len(images) == 0:
        raise DataError(f"{source}: the split holds no images")
    return ImageSplit(_checked_images(images, source), _checked_labels(labels, source))


def _find(folder: Path, prefix: str, ndim: int) -> Path | None:
    stem = f"{prefix}-{_KIND[ndim]}-idx{ndim}-ubyte"
    candidates = [folder / stem, folder / f"{stem}.gz"]
    candidates += sorted(folder.glob(f"{prefix}-{_KIND[ndim]}*"))
    return next((path for path in candidates if path.is_file()), None)


def read_idx_folder(folder: str | Path) -> dict[str, ImageSplit]:
    """Read the MNIST splits in a folder of IDX files: ``train-*`` and/or ``t10k-*``.

    Returns:
        ``{"train": ..., "test": ...}`` with the splits present (at least one).

    Raises:
        DataError: no IDX files, an image file without its label file (or the reverse), or a
            malformed file.
    """
    folder = Path(folder)
    splits: dict[str, ImageSplit] = {}
    for prefix, name in (("train", "train"), ("t10k", "test")):
        images_path, labels_path = _find(folder, prefix, 3), _find(folder, prefix, 1)
        if images_path is None and labels_path is None:
            continue
        if images_path is None or labels_path is None:
            present = images_path or labels_path
            missing = "images" if images_path is None else "labels"
            raise DataError(
                f"{folder}: found {present.name if present else prefix} but no "
                f"{prefix}-{missing}-idx*-ubyte[.gz] beside it"
            )
        splits[name] = _checked_split(
            read_idx(images_path, 3), read_idx(labels_path, 1), f"{images_path} + {labels_path}"
        )
    if not splits:
        raise DataError(
            f"{folder}: no MNIST IDX files; expected train-images-idx3-ubyte[.gz] and "
            "train-labels-idx1-ubyte[.gz] and/or t10k-images-idx3-ubyte[.gz] and "
            "t10k-labels-idx1-ubyte[.gz]"
        )
    return splits


def read_mnist_npz(path: str | Path) -> dict[str, ImageSplit]:
    """Read a Keras ``mnist.npz`` (keys ``x_train``, ``y_train``, ``x_test``, ``y_test``).

    Images may be of any integer or float dtype whose values are whole pixel values 0..255 (they
    are returned as uint8), labels of any integer or float dtype holding the digits 0..9; other
    values are refused rather than cast (images scaled to [0, 1] would all become 0).

    Raises:
        DataError: not a readable npz archive, a missing key, arrays of the wrong shape, or
            values that uint8 pixels or digit labels cannot hold exactly.
    """
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable .npz archive ({error})") from error
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: expected a .npz archive of named arrays, found a single array")
    with archive:
        keys = set(archive.files)
        missing = sorted({"x_train", "y_train", "x_test", "y_test"} - keys)
        if missing:
            raise DataError(
                f"{path}: missing keys {missing}; a Keras mnist.npz holds x_train, y_train, "
                f"x_test, y_test. Found: {sorted(keys)}"
            )
        try:
            arrays = {key: archive[key] for key in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise DataError(f"{path}: corrupt array in the archive ({error})") from error
    return {
        "train": _checked_split(arrays["x_train"], arrays["y_train"], f"{path} (x_train, y_train)"),
        "test": _checked_split(arrays["x_test"], arrays["y_test"], f"{path} (x_test, y_test)"),
    }


def read_mnist(path: str | Path) -> dict[str, ImageSplit]:
    """Read MNIST from a folder of IDX files or a Keras ``.npz`` file (see the two readers)."""
    path = Path(path)
    if path.is_dir():
        return read_idx_folder(path)
    if path.is_file():
        if path.suffix == ".npz":
            return read_mnist_npz(path)
        raise DataError(f"{path}: expected a folder of MNIST IDX files or a Keras mnist.npz file")
    raise DataError(f"{path}: no such file or folder")
