"""The demo's data loaders: IDX and npz MNIST readers (on files written here and on the real
MNIST test set when ``shared/data/mnist`` exists above the repo), and the digits split."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from batchnorm.demo import DataError, read_idx, read_mnist
from batchnorm.demo._datasets import load_dataset


def _mnist_folder() -> Path | None:
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / "mnist"
        if candidate.is_dir():
            return candidate
    return None


MNIST = _mnist_folder()
needs_mnist = pytest.mark.skipif(MNIST is None, reason="shared/data/mnist not found")


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file written from the format's description: magic, big-endian int32 sizes, data."""
    magic = (0x08 << 8) | array.ndim if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_split(
    folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for kind, array in (("images", images), ("labels", labels)):
        data = idx_bytes(array)
        name = f"{prefix}-{kind}-idx{array.ndim}-ubyte{suffix}"
        (folder / name).write_bytes(gzip.compress(data) if gz else data)


def random_split(count: int, seed: int, size: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size), dtype=np.uint8), rng.integers(0, 10, count)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    images, labels = random_split(7, seed=1)
    write_split(tmp_path, "train", images, labels, gz)
    suffix = ".gz" if gz else ""
    np.testing.assert_array_equal(
        read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", 3), images
    )
    np.testing.assert_array_equal(
        read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", 1), labels
    )


def test_idx_folder_with_both_splits_uses_test_as_validation(tmp_path):
    train, test = random_split(20, seed=2), random_split(5, seed=3)
    write_split(tmp_path, "train", *train, gz=True)
    write_split(tmp_path, "t10k", *test, gz=False)
    splits = read_mnist(tmp_path)
    np.testing.assert_array_equal(splits["train"].images, train[0])
    np.testing.assert_array_equal(splits["test"].labels, test[1])
    data = load_dataset(tmp_path)
    np.testing.assert_allclose(data.train_images.numpy(), train[0] / 255.0, rtol=1e-6)
    np.testing.assert_allclose(data.validation_images.numpy(), test[0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.validation_labels.numpy(), test[1])


def test_one_split_holds_out_a_fixed_fifth(tmp_path):
    images, labels = random_split(50, seed=4)
    write_split(tmp_path, "t10k", images, labels, gz=True)
    first, second = load_dataset(tmp_path), load_dataset(tmp_path)
    assert (len(first.train_labels), len(first.validation_labels)) == (40, 10)
    np.testing.assert_array_equal(first.validation_labels, second.validation_labels)
    # every sample lands in exactly one of the two parts
    together = np.concatenate([first.train_images.numpy(), first.validation_images.numpy()])
    rows = {row.tobytes() for row in np.round(together * 255).astype(np.uint8)}
    assert rows == {row.tobytes() for row in images}


def test_keras_npz(tmp_path):
    train, test = random_split(12, seed=5, size=28), random_split(4, seed=6, size=28)
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=train[0], y_train=train[1], x_test=test[0], y_test=test[1])
    data = load_dataset(path)
    np.testing.assert_array_equal(data.train_labels.numpy(), train[1])
    np.testing.assert_allclose(data.validation_images.numpy() * 255, test[0], atol=1e-4)


@needs_mnist
def test_real_mnist_test_set():
    assert MNIST is not None
    splits = read_mnist(MNIST)
    images, labels = splits["test"]
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    # published facts about the MNIST test set: the first digit is a 7, and the class counts
    assert labels[0] == 7
    counts = np.bincount(labels, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert images.max() == 255 and images.min() == 0
    if "train" not in splits:
        data = load_dataset(MNIST)
        assert (len(data.train_labels), len(data.validation_labels)) == (8000, 2000)
    raw = load_dataset(MNIST, inputs="raw")
    assert raw.pixels == "raw, 0..255" and float(raw.train_images.max()) == 255.0
    assert set(np.unique(raw.validation_images.numpy())) <= set(range(256))


@pytest.mark.parametrize("gz", [False, True])
def test_raw_inputs_keep_the_pixel_values(tmp_path, gz):
    train, test = random_split(9, seed=7), random_split(4, seed=8)
    write_split(tmp_path, "train", *train, gz=gz)
    write_split(tmp_path, "t10k", *test, gz=gz)
    raw = load_dataset(tmp_path, inputs="raw")
    np.testing.assert_array_equal(raw.train_images.numpy(), train[0].astype(np.float32))
    np.testing.assert_array_equal(raw.validation_images.numpy(), test[0].astype(np.float32))
    assert raw.pixels == "raw, 0..255" and raw.limited(3, 2).pixels == "raw, 0..255"
    assert load_dataset(tmp_path).pixels == "scaled to [0, 1]"
    for test_file in tmp_path.glob("t10k-*"):
        test_file.unlink()
    held_out = load_dataset(tmp_path, inputs="raw")  # one split: a fifth held out, still raw
    assert float(held_out.train_images.max()) > 1 and held_out.pixels == "raw, 0..255"


def test_raw_digits_are_the_sixteen_gray_levels():
    from sklearn.datasets import load_digits

    raw, scaled = load_dataset(None, inputs="raw"), load_dataset(None)
    assert raw.pixels == "raw, 0..16" and "pixels raw, 0..16" in raw.describe()
    np.testing.assert_array_equal(raw.train_images.numpy(), scaled.train_images.numpy() * 16)
    np.testing.assert_array_equal(raw.validation_labels, scaled.validation_labels)
    assert set(np.unique(raw.train_images.numpy())) <= set(range(17))
    assert float(raw.train_images.max()) == float(np.max(load_digits().images)) == 16.0


def test_unknown_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"`inputs` must be one of \('scaled', 'raw'\). Received"):
        load_dataset(None, inputs="unscaled")  # type: ignore[arg-type]


def test_digits_default():
    from sklearn.datasets import load_digits

    digits = load_digits()
    data = load_dataset(None)
    assert (len(data.train_labels), len(data.validation_labels)) == (1438, 359)
    assert data.train_images.shape[1:] == (8, 8)
    assert float(data.train_images.min()) >= 0.0 and float(data.train_images.max()) == 1.0
    labels = np.concatenate([data.train_labels.numpy(), data.validation_labels.numpy()])
    assert np.bincount(labels).tolist() == np.bincount(digits.target).tolist()


# ---- malformed files ----------------------------------------------------------------------------


def test_wrong_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 3)), magic=0x00000801))
    with pytest.raises(
        DataError,
        match=r"train-images-idx3-ubyte: not an IDX file of MNIST images: magic number 0x00000801, expected 0x00000803",
    ):
        read_idx(path, 3)


def test_truncated_and_trailing_data(tmp_path):
    path = tmp_path / "labels"
    full = idx_bytes(np.arange(10))
    path.write_bytes(full[:-3])
    with pytest.raises(DataError, match=r"labels: IDX data truncated: header says shape \(10,\)"):
        read_idx(path, 1)
    path.write_bytes(full + b"\x00")
    with pytest.raises(DataError, match="IDX data has trailing bytes"):
        read_idx(path, 1)
    path.write_bytes(full[:6])
    with pytest.raises(DataError, match="truncated IDX header: 6 bytes, expected 8"):
        read_idx(path, 1)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DataError, match="not an IDX file: 2 bytes, expected a 4-byte magic"):
        read_idx(path, 1)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.arange(100) % 10))[:30])
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz: corrupt or truncated gzip"):
        read_idx(path, 1)


def test_mismatched_counts_and_bad_labels(tmp_path):
    images, labels = random_split(5, seed=7)
    write_split(tmp_path / "a", "train", images, labels[:4], gz=False)
    with pytest.raises(DataError, match="5 images but 4 labels; the counts must match"):
        read_mnist(tmp_path / "a")
    write_split(tmp_path / "b", "train", images, labels + 10, gz=False)
    with pytest.raises(DataError, match=r"labels must be digits 0\.\.9"):
        read_mnist(tmp_path / "b")


def test_folder_problems(tmp_path):
    with pytest.raises(DataError, match="no MNIST IDX files; expected train-images-idx3-ubyte"):
        read_mnist(tmp_path)
    images, _ = random_split(3, seed=8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images))
    with pytest.raises(DataError, match="found t10k-images-idx3-ubyte but no t10k-labels-idx"):
        read_mnist(tmp_path)
    with pytest.raises(DataError, match="missing: no such file or folder"):
        read_mnist(tmp_path / "missing")
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(
        DataError, match=r"expected a folder of MNIST IDX files or a Keras mnist\.npz"
    ):
        read_mnist(other)


def test_split_image_sizes_must_match(tmp_path):
    write_split(tmp_path, "train", *random_split(4, seed=9, size=6), gz=False)
    write_split(tmp_path, "t10k", *random_split(4, seed=9, size=5), gz=False)
    with pytest.raises(DataError, match=r"train images are \(6, 6\) but test images are \(5, 5\)"):
        load_dataset(tmp_path)


def test_malformed_npz(tmp_path):
    path = tmp_path / "mnist.npz"
    images, labels = random_split(4, seed=10)
    np.savez(path, x_train=images, y_train=labels, x_test=images)
    with pytest.raises(DataError, match=r"missing keys \['y_test'\]"):
        read_mnist(path)
    np.savez(path, x_train=images.reshape(4, -1), y_train=labels, x_test=images, y_test=labels)
    with pytest.raises(DataError, match=r"images must have shape \(N, H, W\). Received: \(4, 36\)"):
        read_mnist(path)
    path.write_bytes(b"this is not a zip archive")
    with pytest.raises(DataError, match=r"mnist\.npz: not a readable \.npz archive"):
        read_mnist(path)
    with path.open("wb") as handle:
        np.save(handle, images)
    with pytest.raises(DataError, match=r"expected a \.npz archive of named arrays"):
        read_mnist(path)


# ---- values a cast to uint8 / int64 would change ------------------------------------------------


def _npz(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    np.savez(path, x_train=images, y_train=labels, x_test=images[:2], y_test=labels[:2])
    return path


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        # the cast made every pixel of images scaled to [0, 1] a 0
        (
            np.full((4, 3, 3), 0.5, np.float32),
            np.arange(4),
            r"images must be whole pixel values 0\.\.255, as MNIST's uint8 pixels .*multiply "
            r"them by 255 and round first\)\. Received: float32 values in \[0\.5, 0\.5\], not all",
        ),
        # 300 wrapped to 44
        (
            np.full((4, 3, 3), 300, np.int16),
            np.arange(4),
            r"images must be pixel values 0\.\.255, as MNIST's uint8 pixels\. Received: int16 "
            r"values in \[300, 300\]",
        ),
        (
            np.full((4, 3, 3), -1, np.int64),
            np.arange(4),
            r"images must be pixel values 0\.\.255, as MNIST's uint8 pixels\. Received: int64 "
            r"values in \[-1, -1\]",
        ),
        (
            np.full((4, 3, 3), np.nan, np.float64),
            np.arange(4),
            r"images must be pixel values 0\.\.255\. Received: float64 values with NaN or Inf",
        ),
        (
            np.ones((4, 3, 3), bool),
            np.arange(4),
            r"images must be numbers, pixel values 0\.\.255\. Received: dtype bool",
        ),
        # 3.7 became 3
        (
            np.zeros((4, 3, 3), np.uint8),
            np.array([0.0, 1.0, 3.7, 2.0]),
            r"labels must be digits 0\.\.9 \(whole numbers\)\. Received: float64 values that "
            r"are not all whole, e\.g\. 3\.7",
        ),
        (
            np.zeros((4, 3, 3), np.uint8),
            np.array([0.0, np.inf, 1.0, 2.0]),
            r"labels must be digits 0\.\.9 \(whole numbers\)\. Received: float64 values that "
            r"are not all whole, e\.g\. inf",
        ),
        # labels.min() raised numpy's _UFuncNoLoopError (a traceback)
        (
            np.zeros((4, 3, 3), np.uint8),
            np.array(["1", "2", "3", "4"]),
            r"labels must be digits 0\.\.9 \(integers\)\. Received: dtype <U1",
        ),
        (
            np.zeros((4, 0, 0), np.uint8),
            np.arange(4),
            r"images must have at least 1x1 pixels\. Received: shape \(4, 0, 0\)",
        ),
    ],
)
def test_npz_values_a_cast_would_change_are_refused(tmp_path, images, labels, message):
    path = _npz(tmp_path / "mnist.npz", images, labels)
    with pytest.raises(DataError, match=r"mnist\.npz \(x_train, y_train\): " + message):
        read_mnist(path)


@pytest.mark.parametrize("dtype", [np.int16, np.int64, np.float32, np.float64])
def test_npz_whole_pixel_values_of_any_dtype_are_read_exactly(tmp_path, dtype):
    images, labels = random_split(6, seed=11)
    path = _npz(tmp_path / "mnist.npz", images.astype(dtype), labels.astype(dtype))
    split = read_mnist(path)["train"]
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int64
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)


def test_a_header_larger_than_int64_is_truncated_with_its_exact_size(tmp_path):
    """np.prod in int64 overflowed: "has trailing bytes ... (-4046744073709551600 bytes)"."""
    path = tmp_path / "train-images-idx3-ubyte"
    shape = (4_000_000_000, 60_000, 60_000)
    path.write_bytes((0x0803).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape))
    with pytest.raises(
        DataError,
        match=r"IDX data truncated: header says shape \(4000000000, 60000, 60000\) "
        r"\(14400000000000000016 bytes in all\), file has 16 bytes",
    ):
        read_idx(path, 3)
