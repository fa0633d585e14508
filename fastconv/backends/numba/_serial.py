"""Serial (``parallel=False``) builds of the parallel kernels that small work uses.

A kernel launched in a parallel region costs microseconds even on one thread (numba's
dispatcher and the region itself); a serial build of the same Python function runs the same
loops inline on the caller. Small conv forwards (``_plan.SMALL_CONV_MACS``) run the plane
kernels through these builds (``executor._OneThread``), so a tiny call is not dominated by the
launch.

Numba's cache files are named after a function's module and qualified name, and its cache
index does not key on ``parallel``: a serial build of the very function object would share the
parallel build's entries. So each serial build compiles a copy of the function (same code,
globals and closure) whose qualified name ends in ``__serial``: a cache file of its own, loaded,
not recompiled, by later processes. Builds are made on first use, one per kernel in
:data:`KERNELS`, so the number of specializations grows only with the kernels small work runs.
"""

from __future__ import annotations

import threading
import types

from numba import njit

from . import _plane
from ._options import SERIAL_CACHED

#: The kernels that have a serial build (the plane forwards, and the plane padding).
KERNELS = frozenset([
    _plane.conv_forward_plane, _plane.conv_forward_plane6, _plane.conv_forward_plane_few,
    _plane.conv_forward_plane64, _plane.conv_forward_plane_vec32,
    _plane.conv_forward_plane_vec32_6, _plane.conv_forward_plane_vec32_few,
    _plane.conv_forward_plane_vec64, _plane.pad_plane,
])

_builds: dict = {}
_lock = threading.Lock()


def _renamed(f):
    """A copy of function ``f`` under the qualified name ``f.__qualname__ + '__serial'``."""
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__qualname__ = f.__qualname__ + "__serial"
    g.__module__, g.__doc__, g.__kwdefaults__ = f.__module__, f.__doc__, f.__kwdefaults__
    return g


def build(kernel):
    """The serial build of ``kernel`` (a dispatcher in :data:`KERNELS`), or None for others."""
    b = _builds.get(kernel)
    if b is None and kernel in KERNELS:
        with _lock:
            b = _builds.get(kernel)
            if b is None:
                b = _builds[kernel] = njit(**SERIAL_CACHED)(_renamed(kernel.py_func))
    return b
