"""``stack_array(n, dtype)``: a fixed-size 1-D scratch array on the stack, for register blocks.

Why: a register-blocked kernel needs its accumulators in registers. Numba allocates
``np.zeros`` on the heap, and LLVM cannot prove a heap buffer does not alias the input arrays,
so it keeps the accumulators in memory (DESIGN §2: such kernels stall). An ``alloca`` of
compile-time size whose indices are constants after unrolling is split into registers by LLVM's
SROA pass.

The intrinsic also marks the enclosing function with ``"prefer-vector-width"="512"``: LLVM's
tuning for many AVX-512 Intel cores prefers 256-bit vectors, which halves the FMA width of these
kernels. It has no effect on CPUs without AVX-512, and the attribute is skipped if this llvmlite
refuses it (the kernels then stay correct, with 256-bit vectors).
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_PREFER_512 = '"prefer-vector-width"="512"'


@intrinsic
def stack_array(typingctx, size, dtype):
    """A C-contiguous 1-D array of ``size`` (a compile-time constant) uninitialised elements.

    Valid until the enclosing compiled function returns; never return or store it.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None  # Numba retries with the literal value of a constant
    n = size.literal_value
    arrty = types.Array(dtype.dtype, 1, "C")

    def codegen(context, builder, sig, args):
        try:
            set.add(builder.function.attributes, _PREFER_512)
        except Exception:  # pragma: no cover - an llvmlite without plain-set attributes
            pass
        lty = context.get_value_type(dtype.dtype)
        ptr = cgutils.alloca_once(builder, lty, size=n)
        itemsize = context.get_abi_sizeof(lty)
        ary = context.make_array(arrty)(context, builder)
        context.populate_array(
            ary,
            data=ptr,
            shape=[cgutils.intp_t(n)],
            strides=[cgutils.intp_t(itemsize)],
            itemsize=cgutils.intp_t(itemsize),
            meminfo=None,
        )
        return ary._getvalue()

    return arrty(size, dtype), codegen


@intrinsic
def prefer_wide_vectors(typingctx):
    """Mark the enclosing compiled function with ``"prefer-vector-width"="512"`` (see above)."""

    def codegen(context, builder, sig, args):
        try:
            set.add(builder.function.attributes, _PREFER_512)
        except Exception:  # pragma: no cover - an llvmlite without plain-set attributes
            pass
        return context.get_dummy_value()

    return types.none(), codegen
