"""Datasets for the examples: MNIST and anything in its IDX layout (``fastconv.datasets``)."""

from ._download import DownloadError, download
from ._idx import DatasetError, parse_idx, read_idx
from .mnist import (
    MNIST_FILES,
    MNIST_MIRRORS,
    default_root,
    load_fashion_mnist,
    load_idx_dataset,
    load_mnist,
    normalize,
    random_shift,
)

__all__ = [
    "load_mnist", "load_fashion_mnist", "load_idx_dataset", "normalize", "random_shift",
    "read_idx", "parse_idx", "download", "default_root", "DatasetError", "DownloadError",
    "MNIST_FILES", "MNIST_MIRRORS",
]
