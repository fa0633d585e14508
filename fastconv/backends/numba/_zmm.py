"""512-bit companions of ``_simd``'s vectors: one zmm register (16 float32 or 8 float64) as a
Numba value, for register blocks where LLVM's own vectorization of a 64-lane loop is fragile
(a change elsewhere in the loop nest makes it unroll the lane loop first and emit scalar code).

``vzero16(arr)``, ``vload16(arr, i)``, ``vstore16(arr, i, v)``, ``vsplat16(x)``: as ``_simd``'s
``vzero`` / ``vload`` / ``vstore`` / ``vsplat`` with 512-bit vectors (``vfma`` of ``_simd``
takes them as they are). Meant for CPUs with AVX-512 (``_simd.WIDE_VECTORS``); elsewhere LLVM
splits them, correct but slower.
"""

from __future__ import annotations

from numba import types

from ._simd import Vector, vector_ops

ZMM_LANES = {types.float32: 16, types.float64: 8}


def _zmm_of(dtype):
    lanes = ZMM_LANES.get(dtype)
    return None if lanes is None else Vector(dtype, lanes)


vzero16, vload16, vstore16, vsplat16 = vector_ops(_zmm_of)
