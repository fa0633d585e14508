"""Keep freed large blocks in the C heap (glibc) for a process that allocates the same big
arrays every step, as training does.

glibc serves blocks above ``M_MMAP_THRESHOLD`` with a fresh ``mmap`` and returns them, and the
heap's free top above ``M_TRIM_THRESHOLD``, to the kernel when freed. The next step's arrays
then page-fault in again, zero-filled by the kernel: measured on the MNIST net, ~760 minor page
faults per training batch against ~24 with the thresholds raised (the glibc dynamic threshold
helps only below 32 MiB and after the first free). PyTorch keeps its own caching allocator, so
without this fastconv pays a cost in every step that its peer does not. The environment
variables ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do the same but are read only
at start-up; ``mallopt`` works at any time. Process-wide, so only ``fastconv train`` calls it.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # 1 GiB: every activation of these nets stays in the heap
TRIM_THRESHOLD = 1 << 32  # 4 GiB: freed memory is kept for the next step


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False where there is no glibc ``mallopt``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt takes an int: 4 GiB does not fit, so the trim threshold is the largest int.
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(M_TRIM_THRESHOLD, min(TRIM_THRESHOLD, 2**31 - 1)) == 1 and ok
    return ok
