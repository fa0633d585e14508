"""IDX reading and MNIST loading: layouts, root resolution, damaged files, the real data."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fastconv import datasets
from fastconv.datasets import DatasetError, load_idx_dataset, load_mnist, read_idx

REPO = Path(__file__).resolve().parents[1]
NAMES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
         np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(arr: np.ndarray, dtype=np.uint8) -> bytes:
    """IDX encoding written from the format description (independent of the reader)."""
    dt = np.dtype(dtype)
    header = bytes([0, 0, CODES[dt], arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.asarray(arr, dt).tobytes()


def write_dataset(root: Path, rng, n_train=7, n_test=3, gz=True, size=(5, 4)):
    root.mkdir(parents=True, exist_ok=True)
    arrays = {
        NAMES[0]: rng.integers(0, 256, (n_train, *size)),
        NAMES[1]: rng.integers(0, 10, n_train),
        NAMES[2]: rng.integers(0, 256, (n_test, *size)),
        NAMES[3]: rng.integers(0, 10, n_test),
    }
    for name, a in arrays.items():
        data = idx_bytes(a)
        if gz:
            (root / name).write_bytes(gzip.compress(data))
        else:
            (root / name[:-3]).write_bytes(data)
    return arrays


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_read_idx_round_trip(dtype, gz, tmp_path, rng):
    a = (rng.standard_normal((3, 4, 2)) * 50).astype(dtype)
    data = idx_bytes(a, dtype)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    back = read_idx(path)
    assert back.shape == a.shape and back.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(back, a)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_same_layout_dataset_loads_from_its_root(gz, tmp_path, rng):
    arrays = write_dataset(tmp_path / "fashion", rng, gz=gz)
    (xtr, ytr), (xte, yte) = load_idx_dataset(tmp_path / "fashion", dict.fromkeys(NAMES))
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64 and xtr.shape == (7, 5, 4)
    np.testing.assert_array_equal(xtr, arrays[NAMES[0]])
    np.testing.assert_array_equal(ytr, arrays[NAMES[1]])
    np.testing.assert_array_equal(xte, arrays[NAMES[2]])
    np.testing.assert_array_equal(yte, arrays[NAMES[3]])
    # load_mnist does not enforce checksums on files already present
    (xtr2, _), _ = load_mnist(tmp_path / "fashion", download=False)
    np.testing.assert_array_equal(xtr2, xtr)


def test_root_comes_from_argument_then_env_then_home(tmp_path, rng, monkeypatch):
    write_dataset(tmp_path / "env", rng, n_train=2)
    write_dataset(tmp_path / "arg", rng, n_train=3)
    write_dataset(tmp_path / "home" / ".cache" / "fastconv" / "mnist", rng, n_train=4)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FASTCONV_DATA_DIR", str(tmp_path / "env"))
    assert len(load_mnist(tmp_path / "arg", download=False)[0][0]) == 3
    assert len(load_mnist(download=False)[0][0]) == 2
    monkeypatch.delenv("FASTCONV_DATA_DIR")
    assert len(load_mnist(download=False)[0][0]) == 4


def test_missing_file_without_download_names_it(tmp_path, rng):
    write_dataset(tmp_path, rng)
    (tmp_path / NAMES[2]).unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, download=False)


def _damage(path: Path, how: str):
    data = bytearray(path.read_bytes())
    if how == "truncated-gz":
        data = data[: len(data) // 2]
    elif how == "corrupt-gz":
        data[len(data) // 2] ^= 0xFF
    elif how == "bad-magic":
        data = bytearray(gzip.compress(b"\x01\x02\x08\x03" + bytes(gzip.decompress(data))[4:]))
    elif how == "truncated-data":
        data = bytearray(gzip.compress(gzip.decompress(bytes(data))[:-7]))
    elif how == "trailing-bytes":
        data = bytearray(gzip.compress(gzip.decompress(bytes(data)) + b"xx"))
    elif how == "header-only":
        data = bytearray(gzip.compress(gzip.decompress(bytes(data))[:6]))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated-gz", "corrupt-gz", "bad-magic", "truncated-data",
                                 "trailing-bytes", "header-only"])
def test_damaged_file_raises_dataset_error_naming_it(how, tmp_path, rng):
    write_dataset(tmp_path, rng, n_train=50, size=(28, 28))
    _damage(tmp_path / NAMES[0], how)
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz") as info:
        load_mnist(tmp_path, download=False)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("problem", ["count-mismatch", "label-range", "labels-as-images"])
def test_inconsistent_files_raise_dataset_error(problem, tmp_path, rng):
    write_dataset(tmp_path, rng)
    labels = tmp_path / NAMES[1]
    if problem == "count-mismatch":
        labels.write_bytes(gzip.compress(idx_bytes(np.zeros(6, np.uint8))))
    elif problem == "label-range":
        labels.write_bytes(gzip.compress(idx_bytes(np.full(7, 10, np.uint8))))
    else:
        (tmp_path / NAMES[0]).write_bytes(gzip.compress(idx_bytes(np.zeros(7, np.uint8))))
    with pytest.raises(DatasetError, match="train-"):
        load_mnist(tmp_path, download=False)


def test_normalize_matches_the_formula(rng):
    x = rng.integers(0, 256, (4, 28, 28)).astype(np.uint8)
    y = datasets.normalize(x)
    assert y.dtype == np.float32 and y.shape == (4, 1, 28, 28)
    np.testing.assert_allclose(y[:, 0], (x / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_shift", [0, 1, 2])
def test_random_shift_translates_each_image_with_zero_fill(max_shift, rng):
    x = rng.integers(1, 256, (6, 5, 7)).astype(np.uint8)
    out = datasets.random_shift(x, np.random.default_rng(4), max_shift)
    draws = np.random.default_rng(4)
    if max_shift:
        dy, dx = (draws.integers(0, 2 * max_shift + 1, 6) - max_shift for _ in range(2))
    else:
        dy = dx = np.zeros(6, int)
    for i in range(6):  # reference: shift by explicit slicing, one image at a time
        ref = np.zeros_like(x[i])
        sy, sx = -dy[i], -dx[i]  # content moves by -d when the crop window moves by +d
        src = x[i][max(0, -sy):5 - max(0, sy), max(0, -sx):7 - max(0, sx)]
        ref[max(0, sy):max(0, sy) + src.shape[0], max(0, sx):max(0, sx) + src.shape[1]] = src
        np.testing.assert_array_equal(out[i], ref, err_msg=f"image {i}")


def real_mnist_dir():
    """``$FASTCONV_DATA_DIR`` (set by CI), else ``../shared/data/mnist`` beside the repo."""
    import os

    env = os.environ.get("FASTCONV_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data" / "mnist"


@pytest.mark.skipif(not (real_mnist_dir() / NAMES[0]).exists(), reason="real MNIST not present")
def test_real_mnist_loads_with_known_label_counts():
    (xtr, ytr), (xte, yte) = load_mnist(real_mnist_dir(), download=False)
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64
    assert np.bincount(ytr).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265,
                                         5851, 5949]
    assert np.bincount(yte).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert ytr[:5].tolist() == [5, 0, 4, 1, 9] and yte[:5].tolist() == [7, 2, 1, 0, 4]
