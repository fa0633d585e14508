"""Numba compile options for the CPU kernels, defined once, with the reasons.

Imported only by the numba backend modules (``import fastconv`` never imports numba).

* ``FASTMATH``: an explicit flag set *without* ``nnan`` and ``ninf``. Max-pool pads with -inf and
  NaN must propagate through conv and pool exactly as in PyTorch; ``reassoc``/``contract`` let LLVM
  vectorize reductions and fuse multiply-adds.
* ``parallel=True``: kernels split their outermost ``prange`` over output-owning work items.
* ``cache``: ``True`` when Numba can write its cache next to this file or in ``NUMBA_CACHE_DIR``;
  otherwise ``False`` with exactly one warning (a read-only install with no writable cache
  directory must not break import or use, see :func:`cache_decision`). A damaged cache file
  (truncated, overwritten) makes that kernel compile without its cache, with one warning
  (:func:`drop_damaged_cache`).
* ``error_model="numpy"``: integer division by zero cannot happen (validated geometry), and the
  Python error model would add a branch to every ``//`` and ``%``.
* ``nogil=True``: calls from several Python threads run concurrently (see ``_threading``).
* ``boundscheck=False``: the validation layer (``fastconv._validate``) guarantees every index.
"""

from __future__ import annotations

import os
import threading
import traceback
import warnings

import numpy as np
from numba.core import caching, config

FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})

# Array indices are cast to unsigned so Numba emits no negative-index wraparound select: with it,
# LLVM turns contiguous loads into gathers.
U = np.uint64


def _probe():  # a function defined in this directory, to ask Numba where it would cache
    return 0


def cache_decision() -> tuple[bool, str | None]:
    """(cache?, warning or None): whether Numba can cache kernels defined in this directory.

    Numba tries ``NUMBA_CACHE_DIR``, then ``__pycache__`` beside the source, then the user-wide
    cache; with none writable, ``cache=True`` would raise at decoration time.
    """
    try:
        impl = caching.CompileResultCacheImpl(_probe)
    except RuntimeError as e:
        return False, f"Numba cannot cache the fastconv kernels ({e}); compiling without a cache"
    where = impl.locator.get_cache_path()
    if config.CACHE_DIR and not where.startswith(os.path.abspath(config.CACHE_DIR)):
        return True, (
            f"NUMBA_CACHE_DIR={config.CACHE_DIR!r} is not writable; Numba caches the fastconv "
            f"kernels in {where!r} instead"
        )
    return True, None


CACHE, _CACHE_WARNING = cache_decision()
if _CACHE_WARNING:
    warnings.warn(_CACHE_WARNING, RuntimeWarning, stacklevel=2)

PARALLEL = dict(
    parallel=True, fastmath=set(FASTMATH), cache=CACHE, error_model="numpy", nogil=True,
    boundscheck=False,
)
# The same kernels compiled without threads: used in a child process after ``fork`` when the
# parent already started GNU OpenMP threads (see ``_threading``). Never cached: these are
# rare, and the cache index does not tell parallel and serial builds of one function apart.
SERIAL = dict(PARALLEL, parallel=False, cache=False)
# Serial builds for small work (``_serial``, ``_elementwise``): cached, each under a qualified
# name of its own (Numba's cache index would mix them up with the parallel builds otherwise).
SERIAL_CACHED = dict(PARALLEL, parallel=False)


_damaged_lock = threading.Lock()
_damaged_warned = False


def _raised_by_numba_cache(exc: BaseException) -> bool:
    frames = traceback.extract_tb(exc.__traceback__)
    return any(f.filename.endswith(os.path.join("numba", "core", "caching.py")) for f in frames)


def drop_damaged_cache(kernel, exc: BaseException) -> bool:
    """If ``exc`` came from reading ``kernel``'s cache files, stop using that cache for it (one
    warning per process) and return True: the caller retries, which compiles afresh."""
    global _damaged_warned
    if not _raised_by_numba_cache(exc) or isinstance(kernel._cache, caching.NullCache):
        return False
    with _damaged_lock:
        kernel._cache = caching.NullCache()
        if not _damaged_warned:
            _damaged_warned = True
            warnings.warn(
                f"fastconv: Numba's cache of the fastconv kernels is damaged ({exc!r}); "
                "compiling those kernels without it",
                RuntimeWarning,
                stacklevel=4,
            )
    return True
