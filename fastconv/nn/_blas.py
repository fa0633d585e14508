"""How many threads the OpenBLAS that NumPy loaded may use beside fastconv's kernels (``Dense``
uses NumPy's matmul), and setting that count.

OpenBLAS's idle worker threads busy-wait for up to 2**28 cycles (~0.1 s) after every call before
they sleep. Beside the compiled conv backends, which already use every core, that spin starves
their threads: on the 2-core machine this was developed on, 2-thread OpenBLAS made training
2-12x slower (74-995 ms for the MNIST net's (64 x 9216) @ (9216 x 128) product while numba kernels
ran, against 1.8 ms on one thread). With ``OPENBLAS_THREAD_TIMEOUT=4`` (2**4 cycles: sleep at
once) the workers yield the cores, and 2 threads do the dense layers of that net 1.6-1.75x faster
than one (1.10 / 0.81 / 0.79 ms against 1.79 / 1.41 / 1.38 ms for forward, dW and dx).

OpenBLAS reads that variable once, when it loads (with NumPy), so it cannot be changed later:
``fastconv train`` re-executes itself with it set (see ``fastconv.cli``), and
``examples/train_mnist.py`` sets it before importing NumPy. :func:`default_threads` then allows
as many BLAS threads as the kernels use, and one otherwise.

Setting the count changes a process-wide setting, so the library layers never call it on their
own. Found like threadpoolctl does: the OpenBLAS libraries mapped into this process, through
their ``*set_num_threads*`` entry points. Other BLAS builds (MKL, Accelerate) are left alone.
"""

from __future__ import annotations

import ctypes
import os

#: OpenBLAS spin time (log2 cycles) at or below which idle workers do not starve the kernels.
SHORT_TIMEOUT = 8

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")


def _loaded_openblas() -> list:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:  # not Linux: fall back to the copy that NumPy wheels ship
        import glob
        import os

        import numpy as np

        libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
        paths = set(glob.glob(os.path.join(libs, "*openblas*")))
    return sorted(p for p in paths if p.startswith("/") or ":" in p)


def limit_blas_threads(n: int = 1) -> list:
    """Set the thread count of every loaded OpenBLAS to ``n``; returns the libraries changed."""
    import numpy  # noqa: F401  (loads NumPy's OpenBLAS if it is not loaded yet)

    changed = []
    for path in _loaded_openblas():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter.argtypes = [ctypes.c_int]
                setter(int(n))
                changed.append(path)
                break
    return changed


def spin_is_short(environ=None) -> bool:
    """Whether ``OPENBLAS_THREAD_TIMEOUT`` asks OpenBLAS's idle workers to sleep at once (the
    environment at start-up is the one OpenBLAS read; later changes have no effect)."""
    value = (os.environ if environ is None else environ).get("OPENBLAS_THREAD_TIMEOUT", "")
    try:
        return int(value) <= SHORT_TIMEOUT
    except ValueError:
        return False


def default_threads(kernel_threads: int, environ=None) -> int:
    """BLAS threads for training beside kernels on ``kernel_threads`` threads: as many when the
    workers do not spin (:func:`spin_is_short`), else 1."""
    return max(1, int(kernel_threads)) if spin_is_short(environ) else 1
