"""splitmix64 of a counter (Steele, Lea & Flood, 2014): the random stream of ``nn.Dropout``.

Element ``i`` of a call's mask is a pure function of (seed, i), so the compiled kernel
(``backends.numba._elementwise.dropout_forward``) draws it in parallel, in any order, and
:func:`hi32` below, the NumPy version, gives the same bits.
"""

from __future__ import annotations

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def hi32(seed, n: int, block: int = 1 << 15):
    """The high 32 bits of splitmix64(seed + (i + 1) * GOLDEN) for i < n, as uint64 (uint64
    arithmetic wraps). Computed in place, in blocks that stay in cache."""
    out = np.empty(n, np.uint64)
    t = np.empty(min(n, block), np.uint64)
    for start in range(0, n, block):
        z = out[start:start + block]
        tz = t[:z.size]
        z[:] = np.arange(start + 1, start + 1 + z.size, dtype=np.uint64)
        z *= GOLDEN
        z += seed
        for shift, mix in ((30, MIX1), (27, MIX2)):
            np.right_shift(z, np.uint64(shift), out=tz)
            z ^= tz
            z *= mix
        np.right_shift(z, np.uint64(31), out=tz)
        z ^= tz
        z >>= np.uint64(32)
    return out
