"""Explicit SIMD vectors for Numba kernels: one vector register as a Numba value.

Why: the register-blocked kernels elsewhere rely on LLVM to vectorize a 64-lane loop and keep
its accumulators in registers. That is tuned for AVX-512 (32 registers of 16 float32): on a CPU
with AVX2 only (16 registers of 8 float32) the same 4 x 64 block needs 32 registers, so LLVM
spills half the accumulators on every multiply-add, and smaller blocks (3 x 32, 6 x 16) make it
fully unroll the short lane loops first and then emit scalar code (measured on a Zen 1: 6-12x
slower). With a vector type the block is written exactly as it should be compiled: 12
accumulators, 2 weight vectors and one broadcast fit AVX2's 16 registers with nothing spilled
(its speed against NumPy's SGEMM: docs/performance.md).

A :class:`Vector` holds ``LANES[dtype]`` elements (256 bits: 8 float32 or 4 float64); on other
targets LLVM splits or widens it, so the kernels stay correct everywhere. Intrinsics:
``vzero(arr)`` (a zero vector of arr's dtype), ``vload(arr, i)`` / ``vstore(arr, i, v)`` (lanes
``arr[i : i + LANES]`` of a C-contiguous 1-D array, unaligned, unchecked: the caller guarantees
the range), ``vsplat(x)`` (x in every lane), ``vfma(a, b, c)`` (a*b + c, fused, lane by lane).

``WIDE_VECTORS`` says whether Numba compiles for AVX-512 (the LLVM-vectorized kernels tuned
for it are used there) or not (the kernels built on these vectors). ``FASTCONV_NUMBA_VECTORS``
= ``512`` or ``256`` overrides the detection; both kinds of kernel are correct on any CPU.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = {np.dtype(np.float32): 8, np.dtype(np.float64): 4}  # elements per 256-bit vector


class Vector(types.Type):
    """One SIMD register of ``lanes`` elements of ``dtype`` (a Numba float type)."""

    def __init__(self, dtype, lanes):
        self.dtype = dtype
        self.lanes = lanes
        super().__init__(name=f"Vector({dtype}x{lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        element = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, ir.VectorType(element, fe_type.lanes))


def _vector_of(dtype):
    if dtype not in (types.float32, types.float64):
        return None
    return Vector(dtype, 8 if dtype == types.float32 else 4)


def _lane_pointer(context, builder, arrty, arr, index, vty):
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.bitcast(builder.gep(ary.data, [index]), ir.PointerType(vty))


def _is_flat_array(arr):
    return isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"


def vector_ops(vector_of):
    """(vzero, vload, vstore, vsplat) intrinsics for the vectors ``vector_of(dtype)`` gives
    (a :class:`Vector` for a float type, else None): this module's 256-bit ones, and
    ``_zmm``'s 512-bit ones. ``vstore`` takes any :class:`Vector` of the array's dtype."""

    @intrinsic
    def vzero(typingctx, arr):
        vt = vector_of(getattr(arr, "dtype", None))
        if vt is None:
            return None

        def codegen(context, builder, sig, args):
            return ir.Constant(context.get_value_type(vt), None)

        return vt(arr), codegen

    @intrinsic
    def vload(typingctx, arr, index):
        if not _is_flat_array(arr) or not isinstance(index, types.Integer):
            return None
        vt = vector_of(arr.dtype)
        if vt is None:
            return None

        def codegen(context, builder, sig, args):
            ptr = _lane_pointer(context, builder, sig.args[0], args[0], args[1],
                                context.get_value_type(vt))
            return builder.load(ptr, align=1)

        return vt(arr, index), codegen

    @intrinsic
    def vstore(typingctx, arr, index, value):
        if not _is_flat_array(arr) or not isinstance(value, Vector) or value.dtype != arr.dtype:
            return None

        def codegen(context, builder, sig, args):
            ptr = _lane_pointer(context, builder, sig.args[0], args[0], args[1],
                                context.get_value_type(sig.args[2]))
            builder.store(args[2], ptr, align=1)
            return context.get_dummy_value()

        return types.none(arr, index, value), codegen

    @intrinsic
    def vsplat(typingctx, x):
        vt = vector_of(x)
        if vt is None:
            return None

        def codegen(context, builder, sig, args):
            lty = context.get_value_type(vt)
            one = builder.insert_element(ir.Constant(lty, ir.Undefined), args[0],
                                         ir.Constant(ir.IntType(32), 0))
            mask = ir.Constant(ir.VectorType(ir.IntType(32), vt.lanes), [0] * vt.lanes)
            return builder.shuffle_vector(one, ir.Constant(lty, ir.Undefined), mask)

        return vt(x), codegen

    return vzero, vload, vstore, vsplat


vzero, vload, vstore, vsplat = vector_ops(_vector_of)


@intrinsic
def vfma(typingctx, a, b, c):
    if not (isinstance(a, Vector) and a == b == c):
        return None
    bits = 32 if a.dtype == types.float32 else 64

    def codegen(context, builder, sig, args):
        lty = context.get_value_type(sig.args[0])
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(lty, [lty, lty, lty]), f"llvm.fma.v{a.lanes}f{bits}")
        return builder.call(fn, args)

    return a(a, b, c), codegen


def _compiles_for_avx512() -> bool:
    from numba.core.registry import cpu_target

    features = cpu_target.target_context.codegen().magic_tuple()[2]  # what Numba compiles for
    return "+avx512f" in features.split(",")


def _wide_vectors() -> bool:
    choice = os.environ.get("FASTCONV_NUMBA_VECTORS", "").strip()
    if choice in ("256", "512"):
        return choice == "512"
    if choice:
        raise ValueError(f"FASTCONV_NUMBA_VECTORS={choice!r}: expected '256', '512' or unset")
    try:
        return _compiles_for_avx512()
    except Exception:  # pragma: no cover - a Numba without this attribute: assume no AVX-512
        return False


WIDE_VECTORS = _wide_vectors()
