"""512-bit companions of ``_simd``'s vectors: one zmm register (16 float32 or 8 float64) as a
Numba value, for register blocks where LLVM's own vectorization of a 64-lane loop is fragile
(a change elsewhere in the loop nest makes it unroll the lane loop first and emit scalar code).

``vzero16(arr)``, ``vload16(arr, i)``, ``vstore16(arr, i, v)``, ``vsplat16(x)``: as ``_simd``'s
``vzero`` / ``vload`` / ``vstore`` / ``vsplat`` with 512-bit vectors (``vfma`` of ``_simd``
takes them as they are). Meant for CPUs with AVX-512 (``_simd.WIDE_VECTORS``); elsewhere LLVM
splits them, correct but slower.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ._simd import Vector, _is_flat_array, _lane_pointer

ZMM_LANES = {types.float32: 16, types.float64: 8}


def _zmm_of(dtype):
    lanes = ZMM_LANES.get(dtype)
    return None if lanes is None else Vector(dtype, lanes)


@intrinsic
def vzero16(typingctx, arr):
    """A zero 512-bit vector of arr's dtype."""
    vt = _zmm_of(getattr(arr, "dtype", None))
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        return ir.Constant(context.get_value_type(vt), None)

    return vt(arr), codegen


@intrinsic
def vload16(typingctx, arr, index):
    """arr[index : index + lanes] as one 512-bit vector (unaligned, unchecked)."""
    if not _is_flat_array(arr) or not isinstance(index, types.Integer):
        return None
    vt = _zmm_of(arr.dtype)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        ptr = _lane_pointer(context, builder, sig.args[0], args[0], args[1],
                            context.get_value_type(vt))
        return builder.load(ptr, align=1)

    return vt(arr, index), codegen


@intrinsic
def vstore16(typingctx, arr, index, value):
    """arr[index : index + lanes] = value (unaligned, unchecked)."""
    if not _is_flat_array(arr) or not isinstance(value, Vector) or value.dtype != arr.dtype \
            or value.lanes != ZMM_LANES.get(arr.dtype):
        return None

    def codegen(context, builder, sig, args):
        ptr = _lane_pointer(context, builder, sig.args[0], args[0], args[1],
                            context.get_value_type(sig.args[2]))
        builder.store(args[2], ptr, align=1)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen


@intrinsic
def vsplat16(typingctx, x):
    """x in every lane of a 512-bit vector."""
    vt = _zmm_of(x)
    if vt is None:
        return None

    def codegen(context, builder, sig, args):
        lty = context.get_value_type(vt)
        one = builder.insert_element(ir.Constant(lty, ir.Undefined), args[0],
                                     ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), vt.lanes), [0] * vt.lanes)
        return builder.shuffle_vector(one, ir.Constant(lty, ir.Undefined), mask)

    return vt(x), codegen
