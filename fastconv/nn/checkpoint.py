"""Checkpoint files: atomic writes, verified reads, no pickle.

A checkpoint stores a *state*: a nested dict whose leaves are NumPy arrays or JSON values
(numbers, strings, booleans, None, lists). The file is::

    b"FASTCONV-CKPT\\n"                     magic line
    {"format": 1, "sha256": ..., "size": ...}\\n   one JSON header line
    payload                                  an .npz archive (np.savez, no object arrays)

The payload holds every array under its path in the state (``"model/0.weight"``) plus one
``"__meta__"`` entry: the JSON of the state with each array replaced by ``{"__array__": path}``.
``load_checkpoint`` checks the magic, the format, the payload size (truncation) and its SHA-256
(corruption) before NumPy parses anything, and loads with ``allow_pickle=False``.

``save_checkpoint`` writes a temporary file in the target's directory, flushes and fsyncs it,
``os.replace``-s it over the target and fsyncs the directory: a crash at any moment leaves
either the previous checkpoint or the new one, never a mix. On failure the temporary file is
removed and the previous checkpoint is untouched.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

MAGIC = b"FASTCONV-CKPT\n"
FORMAT_VERSION = 1
_META_KEY = "__meta__"
_MAX_HEADER = 4096


class CheckpointError(ValueError):
    """A checkpoint file is truncated, corrupt, of another format, or could not be written."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, permissions, ...); the previous file is intact."""


def _flatten(state, prefix, arrays):
    """Replace arrays in ``state`` by references, collecting them in ``arrays``."""
    if isinstance(state, np.ndarray):
        if state.dtype.hasobject:
            raise TypeError(f"checkpoint entry {prefix!r} is an object array; not storable")
        arrays[prefix] = state
        return {"__array__": prefix}
    if isinstance(state, dict):
        out = {}
        for k, v in state.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint keys must be strings, got {k!r} in {prefix!r}")
            out[k] = _flatten(v, f"{prefix}/{k}" if prefix else k, arrays)
        return out
    if isinstance(state, (list, tuple)):
        return [_flatten(v, f"{prefix}/{i}", arrays) for i, v in enumerate(state)]
    if isinstance(state, np.generic):
        return state.item()
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(
        f"checkpoint entry {prefix!r} has type {type(state).__name__}; "
        "expected arrays, dicts, lists, numbers, strings or None"
    )


def _unflatten(meta, arrays):
    if isinstance(meta, dict):
        if set(meta) == {"__array__"}:
            return arrays[meta["__array__"]]
        return {k: _unflatten(v, arrays) for k, v in meta.items()}
    if isinstance(meta, list):
        return [_unflatten(v, arrays) for v in meta]
    return meta


def _payload(state: dict) -> bytes:
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    arrays: dict = {}
    meta = _flatten(state, "", arrays)
    if _META_KEY in arrays:
        raise ValueError(f"{_META_KEY!r} is reserved in checkpoints")
    meta_bytes = json.dumps(meta, allow_nan=True).encode()
    buf = io.BytesIO()
    np.savez(buf, **arrays, **{_META_KEY: np.frombuffer(meta_bytes, np.uint8)})
    return buf.getvalue()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened; os.replace is enough there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


STALE_TEMPORARY_S = 3600


def _remove_stale_temporaries(directory: Path, name: str) -> None:
    """Delete temporaries of ``name`` left by writers that were killed (SIGKILL, power loss).

    Only files older than ``STALE_TEMPORARY_S`` go, so a concurrent writer's file is never
    touched; best effort, errors are ignored.
    """
    cutoff = time.time() - STALE_TEMPORARY_S
    for leftover in directory.glob(f".{glob.escape(name)}.*.tmp"):
        try:
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
        except OSError:
            pass


def save_checkpoint(path, state: dict) -> Path:
    """Write ``state`` (nested dict of arrays and JSON values) to ``path`` atomically.

    Returns the path. Raises ``TypeError`` for unstorable entries and
    :class:`CheckpointWriteError` (an ``OSError`` too) when the write fails; the previous file
    at ``path`` is then unchanged and no temporary file remains.
    """
    path = Path(path)
    payload = _payload(state)
    header = json.dumps({
        "format": FORMAT_VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
    }).encode() + b"\n"
    directory = path.parent if str(path.parent) else Path(".")
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC)
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(directory)
        _remove_stale_temporaries(directory, path.name)
    except OSError as e:
        raise CheckpointWriteError(
            f"could not write checkpoint {path}: {e}; the previous checkpoint (if any) is unchanged"
        ) from e
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return path


def load_checkpoint(path) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`; returns the state dict.

    Raises ``FileNotFoundError`` if ``path`` does not exist and :class:`CheckpointError`
    (naming the file) if it is not a fastconv checkpoint, of an unknown format version,
    truncated or corrupt.
    """
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()

    def fail(why):
        return CheckpointError(f"checkpoint {path} is unreadable: {why}")

    if not data.startswith(MAGIC):
        raise fail("not a fastconv checkpoint (bad magic bytes)"
                   if len(data) >= len(MAGIC) else f"truncated ({len(data)} bytes)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    if end < 0:
        raise fail("truncated or corrupt header")
    try:
        header = json.loads(data[len(MAGIC):end])
        version, digest, size = header["format"], header["sha256"], int(header["size"])
    except (ValueError, KeyError, TypeError):
        raise fail("corrupt header") from None
    if version != FORMAT_VERSION:
        raise fail(f"format version {version!r}, this fastconv reads version {FORMAT_VERSION}")
    payload = data[end + 1:]
    if len(payload) < size:
        raise fail(f"truncated: payload has {len(payload)} of {size} bytes")
    if len(payload) > size:
        raise fail(f"corrupt: {len(payload) - size} unexpected bytes after the payload")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise fail("corrupt: SHA-256 of the payload does not match the header")
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop(_META_KEY).tobytes())
        return _unflatten(meta, arrays)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as e:
        raise fail(f"corrupt payload ({e})") from None
