"""MNIST (and any dataset in its IDX layout, e.g. Fashion-MNIST).

``load_mnist(root=None, download=True)`` returns ``(x_train, y_train), (x_test, y_test)``:
images uint8 ``(N, 28, 28)``, labels int64 ``(N,)``. The root directory is the argument, else
``$FASTCONV_DATA_DIR``, else ``~/.cache/fastconv/mnist``. Each of the four files is read as
``<name>.gz`` or, failing that, the raw ``<name>``. Missing files are downloaded (when
``download``) from the mirrors, verified against the canonical MD5s of the ``.gz`` files.
Checksums apply to downloads only: files already in the root are checked structurally (IDX
magic, dimensions, sizes, label range), so a recompressed copy or Fashion-MNIST loads too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ._download import download as _download
from ._idx import DatasetError, read_idx

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# gz file name -> MD5 of the file as the mirrors serve it
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MNIST_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
FASHION_MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
# MNIST training-set pixel statistics (of x / 255), as in PyTorch's examples/mnist
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
NUM_CLASSES = 10


def default_root(name="mnist") -> Path:
    """``$FASTCONV_DATA_DIR`` if set (for MNIST), else ``~/.cache/fastconv/<name>``."""
    env = os.environ.get("FASTCONV_DATA_DIR")
    if env and name == "mnist":
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fastconv" / name


def _locate(root: Path, gz_name: str, md5, download: bool, mirrors, progress) -> Path:
    raw_name = gz_name[:-3] if gz_name.endswith(".gz") else gz_name
    for candidate in (root / gz_name, root / raw_name):
        if candidate.is_file():
            return candidate
    if not download:
        raise FileNotFoundError(
            f"{gz_name} (or {raw_name}) is not in {root}; pass download=True, or put the IDX "
            "files there and point root= or FASTCONV_DATA_DIR at that directory"
        )
    return _download(gz_name, root, mirrors, md5=md5, progress=progress)


def _split(images_path, labels_path, num_classes):
    x = read_idx(images_path)
    y = read_idx(labels_path)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DatasetError(f"{images_path}: expected uint8 images (N, H, W), got "
                           f"{x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype != np.uint8:
        raise DatasetError(f"{labels_path}: expected uint8 labels (N,), got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{images_path} has {len(x)} images but {labels_path} has "
                           f"{len(y)} labels")
    if len(y) and int(y.max()) >= num_classes:
        raise DatasetError(f"{labels_path}: label {int(y.max())} outside [0, {num_classes})")
    return x, y.astype(np.int64)


def load_idx_dataset(root, files: dict, mirrors=(), download=False, num_classes=NUM_CLASSES,
                     progress=True):
    """Load a dataset of four IDX files laid out like MNIST.

    ``files`` maps the four ``.gz`` names (train images, train labels, test images, test
    labels, in that order) to their MD5 (checked on download; ``None`` skips the check).
    """
    root = Path(root).expanduser()
    names = list(files)
    if len(names) != 4:
        raise ValueError(f"files must name 4 IDX files, got {names}")
    paths = [_locate(root, n, files[n], download, mirrors, progress) for n in names]
    return _split(paths[0], paths[1], num_classes), _split(paths[2], paths[3], num_classes)


def load_mnist(root=None, download=True, mirrors=MNIST_MIRRORS, files=None, progress=True):
    """MNIST as ``(x_train, y_train), (x_test, y_test)``.

    Parameters
    ----------
    root : directory of the IDX files; default ``$FASTCONV_DATA_DIR`` or
        ``~/.cache/fastconv/mnist``
    download : fetch missing files from ``mirrors`` (verified by MD5, written atomically)
    mirrors : base URLs tried in order
    files : ``{gz name: md5 or None}`` overriding :data:`MNIST_FILES` (same IDX layout)

    Returns
    -------
    x_train : uint8 (60000, 28, 28); y_train : int64 (60000,)
    x_test : uint8 (10000, 28, 28); y_test : int64 (10000,)

    Raises :class:`DatasetError` (a ``ValueError``) naming the file when one is truncated,
    corrupt or of the wrong layout, ``FileNotFoundError`` when one is missing and ``download``
    is false, and ``DownloadError`` when no mirror delivers it intact.
    """
    root = default_root("mnist") if root is None else root
    return load_idx_dataset(root, files or MNIST_FILES, mirrors, download, progress=progress)


def load_fashion_mnist(root=None, download=True, mirrors=FASHION_MNIST_MIRRORS, progress=True):
    """Fashion-MNIST (same layout and shapes as MNIST); root default
    ``~/.cache/fastconv/fashion-mnist``."""
    root = default_root("fashion-mnist") if root is None else root
    return load_idx_dataset(root, FASHION_MNIST_FILES, mirrors, download, progress=progress)


def normalize(images, mean=MNIST_MEAN, std=MNIST_STD) -> np.ndarray:
    """uint8 images ``(N, H, W)`` -> float32 ``(N, 1, H, W)`` of ``(x / 255 - mean) / std``."""
    x = np.asarray(images, dtype=np.float32)
    x = x.reshape(x.shape[0], 1, *x.shape[1:])
    x *= np.float32(1.0 / (255.0 * std))
    x -= np.float32(mean / std)
    return x


def random_shift(images, rng: np.random.Generator, max_shift=2) -> np.ndarray:
    """Translate each image ``(N, H, W)`` by a random whole number of pixels in
    ``[-max_shift, max_shift]`` along each axis, filling with zeros (data augmentation).

    Draws ``2 * N`` integers from ``rng``; ``max_shift=0`` returns the images unchanged.
    """
    images = np.asarray(images)
    if max_shift <= 0:
        return images
    n, h, w = images.shape
    m = int(max_shift)
    padded = np.zeros((n, h + 2 * m, w + 2 * m), images.dtype)
    padded[:, m:m + h, m:m + w] = images
    dy = rng.integers(0, 2 * m + 1, n)
    dx = rng.integers(0, 2 * m + 1, n)
    rows = (dy[:, None] + np.arange(h))[:, :, None]
    cols = (dx[:, None] + np.arange(w))[:, None, :]
    return padded[np.arange(n)[:, None, None], rows, cols]
