"""Backend registry and selection.

A backend is one module in ``fastconv.backends`` with the same five functions::

    conv2d(x, w, b, p: ConvParams) -> y
    conv2d_backward(dy, x, w, p: ConvParams, needs: frozenset) -> (dx | None, dw | None, db | None)
    max_pool2d(x, p: PoolParams) -> (y, idx)
    max_pool2d_backward(dy, idx, input_shape) -> dx
    unavailable_reason() -> str | None      # None when the backend can run here

and the ops ``fastconv.nn`` needs (``relu``, ``relu_backward``, ``dropout``,
``dropout_backward``, ``dense``, ``dense_backward``, ``sgd_update``, ``adam_update``; NumPy
versions in ``backends._host_ops``), which the layers reach through :func:`resolve`.

Arguments arrive validated (``fastconv._validate``): C-contiguous, one float dtype, consistent
shapes. Modules are imported only when first used, so ``import fastconv`` never imports numba.
A module whose import fails is unavailable, with the import error as the reason.

Selection order: the ``backend=`` argument, else the innermost ``use_backend`` block, else
``set_backend``, else ``FASTCONV_BACKEND``, else auto: ``cuda`` for device arrays, else the first
available of ``numba``, ``cython``, ``numpy`` (numba once its kernels are in Numba's cache: until
then ``fastconv._coldstart`` compiles them in the background; a numba that fails to import is
passed over with one warning).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import os
import threading
import warnings

import numpy as np

from . import _coldstart
from ._validate import is_device_array

BACKEND_MODULES = {
    "naive": "fastconv.backends.naive",
    "numpy": "fastconv.backends.numpy_ref",
    "numba": "fastconv.backends.numba.executor",
    "cython": "fastconv.backends.cython.executor",
    "cuda": "fastconv.backends.cuda.executor",
}
AUTO_ORDER = ("numba", "cython", "numpy")

_lock = threading.Lock()
_modules: dict = {}
_reasons: dict = {}
_global_backend: str | None = None
_local = threading.local()


class BackendUnavailableError(RuntimeError):
    """A known backend that cannot run here (missing dependency, no GPU, no compiler)."""


def _load(name: str):
    """Import backend ``name`` once; return ``(module, None)`` or ``(None, reason)``."""
    with _lock:
        if name in _modules:
            return _modules[name], None
        if name in _reasons:
            return None, _reasons[name]
        try:
            module = importlib.import_module(BACKEND_MODULES[name])
            reason = module.unavailable_reason()
        except Exception as e:  # not only ImportError: a broken dependency raises anything
            module, reason = None, f"import failed: {e}"
        if reason is None:
            _modules[name] = module
            return module, None
        _reasons[name] = reason
        return None, reason


def _check_name(name) -> str:
    if not isinstance(name, str) or name not in BACKEND_MODULES:
        close = difflib.get_close_matches(str(name), list(BACKEND_MODULES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown backend {name!r}{hint} (available here: {', '.join(available_backends())};"
            f" known: {', '.join(BACKEND_MODULES)})"
        )
    return name


def backend_status() -> dict:
    """Map every known backend to ``None`` (available) or the reason it is not."""
    return {name: _load(name)[1] for name in BACKEND_MODULES}


def available_backends() -> list:
    """Names of the backends that can run here, in registry order."""
    return [name for name, reason in backend_status().items() if reason is None]


def get_backend(name: str):
    """The backend module ``name``; a clear error if it is unknown or unavailable."""
    module, reason = _load(_check_name(name))
    if module is None:
        raise BackendUnavailableError(
            f"backend {name!r} is not available: {reason}. "
            f"Available: {', '.join(available_backends())}"
        )
    return module


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores automatic selection)."""
    global _global_backend
    if name is not None:
        get_backend(name)
    _global_backend = name


@contextlib.contextmanager
def use_backend(name: str):
    """Use backend ``name`` inside a ``with`` block (per thread; blocks nest)."""
    get_backend(name)
    stack = _local.__dict__.setdefault("stack", [])
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def current_backend_name(*arrays) -> str:
    """The name the selection order picks for a call on ``arrays`` (without loading it)."""
    return _select(_on_device(arrays))


def _on_device(arrays) -> bool:
    """Whether any of ``arrays`` (None entries skipped) is a CUDA device array."""
    for a in arrays:
        if a is not None and type(a) is not np.ndarray and is_device_array(a):
            return True
    return False


# ``os.environ.get`` costs more than the rest of a small call's dispatch (it encodes the key
# and raises KeyError inside when unset): on POSIX, read its bytes dict directly.
_ENVIRON_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def _env_backend() -> str | None:
    """``FASTCONV_BACKEND`` as set now (``os.environ``), or None."""
    if _ENVIRON_BYTES is not None and type(_ENVIRON_BYTES) is dict:
        value = _ENVIRON_BYTES.get(b"FASTCONV_BACKEND")
        return None if value is None else os.fsdecode(value)
    return os.environ.get("FASTCONV_BACKEND")


def _select(on_device: bool) -> str:
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _global_backend is not None:
        return _global_backend
    env = _env_backend()
    if env:
        return _check_name(env)
    if on_device:
        return "cuda"
    for name in AUTO_ORDER:
        module = _modules.get(name)  # loaded already: no lock (a dict read is atomic)
        reason = None
        if module is None:
            module, reason = _load(name)
        if name == "numba" and module is None:
            _warn_broken_numba(reason)
        elif module is not None and (name != "numba" or _coldstart.numba_ready()):
            return name  # numba: only once its kernels are compiled (see _coldstart)
    return "numpy"


#: The start of the numba backend's reason when Numba is installed but raises at import (a
#: NumPy it was not built for, a broken llvmlite): automatic selection then warns once.
NUMBA_BROKEN_IMPORT = "numba is installed but failed to import"
_broken_warned = False


def _warn_broken_numba(reason: str) -> None:
    """Automatic selection passes over an installed numba that fails to import: say so once."""
    global _broken_warned
    if not _broken_warned and reason.startswith(NUMBA_BROKEN_IMPORT):
        _broken_warned = True
        warnings.warn(f"fastconv: {reason}; automatic backend selection falls back to the next "
                      f"of {', '.join(AUTO_ORDER[1:])}", RuntimeWarning, stacklevel=4)


def resolve(backend, *arrays):
    """The backend module for a call: explicit ``backend=`` first, then the selection order."""
    if backend is None and not _local.__dict__.get("stack") and _global_backend is None:
        # The common case, in few attribute reads: host arrays, numba loaded and ready.
        module = _modules.get("numba")
        if (module is not None and AUTO_ORDER[0] == "numba" and _coldstart._state in ("warm", "off")
                and not _env_backend() and not _on_device(arrays)):
            return module
    on_device = _on_device(arrays)
    name = _check_name(backend) if backend is not None else _select(on_device)
    module = _modules.get(name) or get_backend(name)  # loaded already: no lock
    if on_device and name != "cuda":
        raise TypeError(
            f"backend {name!r} runs on the host but got CUDA device arrays; "
            "use backend='cuda' or copy them to the host"
        )
    return module


# ------------------------------------------------------------------ which algorithm ran


def record_algorithm(op: str, algorithm: str) -> None:
    """Backends call this to record the algorithm they chose (read by benchmarks)."""
    _local.__dict__.setdefault("algorithms", {})[op] = algorithm


def last_algorithm(op: str = "conv2d") -> str | None:
    """The algorithm the last ``op`` call in this thread ran, e.g. ``"numba:direct-nhwc"``.

    ``op`` is one of ``conv2d``, ``conv2d_backward``, ``max_pool2d``, ``max_pool2d_backward``.
    """
    return getattr(_local, "algorithms", {}).get(op)
