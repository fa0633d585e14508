"""Verified, atomic downloads from a list of mirrors.

A file is streamed to a temporary file in the destination directory, its MD5 checked, and only
then ``os.replace``-d into place: a partial, truncated or corrupt download never sits in the
cache under the real name. Each mirror is tried in turn; the error lists every failure.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path

from ._idx import DatasetError

CHUNK = 1 << 16


class DownloadError(DatasetError, OSError):
    """No mirror delivered a file with the expected checksum."""


def _progress(total, desc, enabled):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; a stripped install still downloads
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                leave=False, disable=not enabled)


def _fetch(url, tmp_file, timeout, progress, desc):
    """Stream ``url`` into the open ``tmp_file``; returns its MD5 hex digest."""
    md5 = hashlib.md5()
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = _progress(total, desc, progress)
        received = 0
        try:
            while True:
                chunk = resp.read(CHUNK)
                if not chunk:
                    break
                md5.update(chunk)
                tmp_file.write(chunk)
                received += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    if total is not None and received != total:
        raise DownloadError(f"{url}: truncated download ({received} of {total} bytes)")
    return md5.hexdigest()


def download(filename, dest_dir, mirrors, md5=None, timeout=30.0, progress=True) -> Path:
    """Download ``filename`` from the first mirror that serves it intact into ``dest_dir``.

    Parameters
    ----------
    filename : the file's name on the mirrors and in ``dest_dir``
    mirrors : base URLs, tried in order (``base + filename``)
    md5 : expected MD5 hex digest, or ``None`` to skip the check (not recommended)

    Returns the path of the verified file. Raises :class:`DownloadError` listing every mirror's
    failure when none succeeds; ``dest_dir`` then holds no file of that name from this call.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / filename
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + filename
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=dest_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                digest = _fetch(url, f, timeout, progress, filename)
                f.flush()
                os.fsync(f.fileno())
            if md5 is not None and digest != md5:
                raise DownloadError(f"{url}: MD5 {digest} does not match the expected {md5}")
            os.replace(tmp, target)
            tmp = None
            return target
        except DownloadError as e:
            failures.append(str(e))
        except Exception as e:  # noqa: BLE001 - network, HTTP or protocol error: next mirror
            failures.append(f"{url}: {type(e).__name__}: {e}")
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    raise DownloadError(
        f"could not download {filename} into {dest_dir}; tried {len(failures)} mirror(s):\n  "
        + "\n  ".join(failures)
    )
