"""Limit the threads of the OpenBLAS that NumPy loaded (``Dense`` uses NumPy's matmul for small
products and away from the numba backend; beside it, large float32 products run on numba's own
threads, ``backends.numba._gemm``).

OpenBLAS's idle worker threads busy-wait for up to 2**28 cycles (~0.1 s) after every call before
they sleep. Beside the compiled conv backends, which already use every core, that spin starves
their threads: on the 2-core machine this was developed on, 2-thread OpenBLAS made training
several times slower. ``OPENBLAS_THREAD_TIMEOUT=4`` (read when OpenBLAS loads) makes idle
workers sleep at once; 2 threads then do the net's dense products faster alone, but inside a
training step the backward ones got slower and the whole step no faster (figures:
docs/performance.md). So ``fastconv train`` runs BLAS on one thread (``--blas-threads``).

This changes a process-wide setting, so the library layers never call it on their own.
Found like threadpoolctl does: the OpenBLAS libraries mapped into this process, through their
``*set_num_threads*`` entry points. Other BLAS builds (MKL, Accelerate) are left alone.
"""

from __future__ import annotations

import ctypes

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

