"""Limit the threads of the OpenBLAS that NumPy loaded (``Dense`` uses NumPy's matmul).

Measured on the shared 2-core machine this was developed on, while other processes competed for
the cores: 2-thread OpenBLAS took 74-995 ms for the MNIST net's (64 x 9216) @ (9216 x 128)
product and 16 ms for a (64 x 120) @ (120 x 84) one, against 1.8-15 ms and 0.016 ms on one
thread (idle machine: 1.0 ms with 2 threads, 1.7 ms with 1). Training ran 2-12x slower. The
compiled conv backends already use every core, so ``fastconv train`` runs BLAS on one thread
(``--blas-threads``).

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
