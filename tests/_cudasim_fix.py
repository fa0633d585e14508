"""Work around a race in numba-cuda's CUDA simulator (test environment only).

``numba.cuda.simulator.kernelapi.FakeCUDAShared.array`` hands out a block's static shared array
with an unlocked check-then-set on ``self._allocations``. The simulator runs each CUDA thread
as a Python thread, so two threads of one block preempted between the check and the set get
two different arrays, and a block reduction then sums memory the other threads never wrote.
Seen here as an intermittent grad-weight mismatch (about one simulator run in ten, made likelier
by the short switch interval the simulator run uses). This replaces the method by the same
logic under a lock, keyed like the original by the caller's (file, line).
"""

from __future__ import annotations

import sys
import threading

import numpy as np


def lock_shared_array_allocation() -> None:
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support
    from numba.core import types

    original = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:  # errors and dynamic shared memory: unchanged
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            res = self._allocations.get(key)
            if res is None:
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    kernelapi.FakeCUDAShared.array = array
