"""An unwritable Numba cache directory or a read-only install must not break the numba backend:
it falls back (another cache location, or no cache) with exactly one warning. Each case runs in
a fresh interpreter, since Numba reads its cache settings once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import fastconv as fc

pytestmark = pytest.mark.skipif(
    fc.backend_status()["numba"] is not None, reason="numba is not installed here"
)

_SCRIPT = r"""
import json, warnings, numpy as np
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastconv as fc
    x = np.arange(2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6) % 7
    y, idx = fc.max_pool2d(x, 2, backend="numba")
    y, idx = fc.max_pool2d(x, 2, backend="numba")
from fastconv.backends.numba import _options as _numba_options
expected = x.reshape(2, 3, 3, 2, 3, 2).max(axis=(3, 5))
print(json.dumps([bool(np.array_equal(y, expected)), _numba_options.CACHE,
                  [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]]))
"""


def _run(**env):
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, **env))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_unwritable_cache_dir_falls_back_with_one_warning():
    # A path below a regular file cannot be created, even by root.
    ok, cache, messages = _run(NUMBA_CACHE_DIR=os.devnull + "/numba-cache")
    assert ok
    assert len(messages) == 1 and "NUMBA_CACHE_DIR" in messages[0], messages
    assert cache is True  # cached beside the sources instead


def test_read_only_install_without_any_cache_location_runs_uncached():
    # Only the user-provided locator, pointing nowhere writable: what a read-only install with
    # no writable cache directory looks like to Numba.
    ok, cache, messages = _run(NUMBA_CACHE_DIR=os.devnull + "/numba-cache",
                               NUMBA_CACHE_LOCATOR_CLASSES="UserProvidedCacheLocator")
    assert ok
    assert cache is False
    assert len(messages) == 1 and "without a cache" in messages[0], messages


def test_writable_cache_dir_is_used_without_warning(tmp_path):
    ok, cache, messages = _run(NUMBA_CACHE_DIR=str(tmp_path))
    assert ok and cache is True and messages == []
    assert any(p.suffix == ".nbi" for p in tmp_path.rglob("*")), "nothing was cached"


def test_damaged_cache_files_recompile_with_one_warning(tmp_path):
    assert _run(NUMBA_CACHE_DIR=str(tmp_path))[0]
    files = sorted(p for p in tmp_path.rglob("*") if p.suffix in (".nbi", ".nbc"))
    assert files
    for i, p in enumerate(files):  # truncate some, overwrite the others with garbage
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2] if i % 2 else b"\0garbage")
    ok, cache, messages = _run(NUMBA_CACHE_DIR=str(tmp_path))
    assert ok and cache is True
    assert len(messages) == 1 and "damaged" in messages[0], messages
