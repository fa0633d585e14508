"""Reader for the IDX format of MNIST-style datasets (gzipped or raw).

Layout: two zero bytes, a type code, the number of dimensions ``ndim``; then ``ndim``
big-endian uint32 sizes; then the data, big-endian, C order. Every check names the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

# IDX type code -> big-endian dtype
IDX_DTYPES = {
    0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"


class DatasetError(ValueError):
    """A dataset file is missing pieces, corrupt, or not what it should be."""


def read_bytes(path) -> bytes:
    """The file's bytes, decompressed when it is gzip (detected by its magic, not its name)."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] != GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DatasetError(f"{path}: corrupt or truncated gzip data ({e})") from None


def parse_idx(data: bytes, name="<bytes>") -> np.ndarray:
    """Parse IDX bytes into an array of native byte order; ``name`` is used in errors."""
    if len(data) < 4:
        raise DatasetError(f"{name}: truncated: {len(data)} bytes, not even an IDX header")
    zero, code, ndim = data[:2], data[2], data[3]
    if zero != b"\0\0" or code not in IDX_DTYPES or ndim == 0:
        raise DatasetError(
            f"{name}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000TTDD with a known "
            f"type TT in {', '.join(f'{c:02x}' for c in IDX_DTYPES)} and DD >= 1 dimensions)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{name}: truncated IDX header ({len(data)} of {header} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) < expected:
        raise DatasetError(
            f"{name}: truncated: {len(data)} bytes, but the header {shape} of {dtype.name} "
            f"needs {expected}"
        )
    if len(data) > expected:
        raise DatasetError(
            f"{name}: corrupt: {len(data) - expected} bytes after the data of shape {shape}"
        )
    arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def read_idx(path) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) into a NumPy array; :class:`DatasetError` names it."""
    return parse_idx(read_bytes(path), str(path))
