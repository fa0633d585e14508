"""Limit the threads of the OpenBLAS that NumPy loaded (``Dense`` uses NumPy's matmul for small
products and away from the numba backend; beside it, large float32 products run on numba's own
threads, ``backends.numba._gemm``).

OpenBLAS's idle worker threads busy-wait for up to 2**28 cycles (~0.1 s) after every call before
they sleep. Beside the compiled conv backends, which already use every core, that spin starves
their threads: on the 2-core machine this was developed on, 2-thread OpenBLAS made training
2-12x slower (74-995 ms for the MNIST net's (64 x 9216) @ (9216 x 128) product while numba
kernels ran, against 1.8 ms on one thread). ``OPENBLAS_THREAD_TIMEOUT=4`` (read when OpenBLAS
loads) makes idle workers sleep at once; alone, 2 threads then do that net's dense products
1.6-1.75x faster than one, but inside a training step the backward ones got slower (dense
backward 3.2 -> 4.6-5.2 ms, forward 2.0 -> 1.4 ms) and the whole step no faster (34.6 against
35.8 ms per batch). So ``fastconv train`` runs BLAS on one thread (``--blas-threads``).

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

