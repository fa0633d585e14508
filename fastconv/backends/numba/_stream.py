"""Non-temporal ("streaming") stores for outputs too large to stay in cache.

A plain store to a line that is not in cache first reads the line from memory (read for
ownership), so writing an output that the caches cannot hold anyway moves its bytes twice. A
non-temporal store writes whole 64-byte lines straight to memory, about halving the time of a
large copy (docs/performance.md). The kernels use them only for outputs of at least
``STREAM_MIN_BYTES``, so a layer's output that the next layer would read from cache stays there
(where reads are faster than from memory).

``stream_copy`` is the one entry point: scalar stores up to the first 64-byte boundary of the
destination, then one 64-byte non-temporal vector store per line, then scalar stores for the
tail. ``store_fence`` (an ``mfence``) orders the streamed lines before the task returns, so
another thread that reads the output after the parallel region sees them.
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._options import PARALLEL, U

STREAM_MIN_BYTES = 16 << 20  # outputs at least this large are streamed
LINE = 64


@intrinsic
def _address(typingctx, arr):
    """The address of ``arr``'s first element, as uint64."""

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.ptrtoint(ary.data, ir.IntType(64))

    return types.uint64(arr), codegen


@intrinsic
def _stream_line(typingctx, dst, doff, src, soff):
    """dst[doff:] = src[soff:], 64 bytes, by one non-temporal store; dst + doff is 64-aligned."""

    def codegen(context, builder, sig, args):
        elt = context.get_value_type(sig.args[0].dtype)
        vty = ir.VectorType(elt, LINE // context.get_abi_sizeof(elt))
        d = context.make_array(sig.args[0])(context, builder, args[0])
        s = context.make_array(sig.args[2])(context, builder, args[2])
        sp = builder.bitcast(builder.gep(s.data, [args[3]]), vty.as_pointer())
        dp = builder.bitcast(builder.gep(d.data, [args[1]]), vty.as_pointer())
        store = builder.store(builder.load(sp, align=1), dp, align=LINE)
        store.set_metadata("nontemporal",
                           builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.none(dst, doff, src, soff), codegen


@intrinsic
def store_fence(typingctx):
    """A sequentially consistent fence (``mfence``): orders the non-temporal stores before it."""

    def codegen(context, builder, sig, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.none(), codegen


@njit(**dict(PARALLEL, parallel=False))
def stream_copy(dst, doff, src, soff, n):
    """dst[doff:doff+n] = src[soff:soff+n] (1-D, same dtype), the whole 64-byte lines of the
    destination by non-temporal stores. Call :func:`store_fence` before the task ends."""
    size = dst.itemsize
    per = LINE // size
    i = 0
    base = _address(dst)
    while i < n and (base + U((doff + i) * size)) % U(LINE) != 0:
        dst[U(doff + i)] = src[U(soff + i)]
        i += 1
    while i + per <= n:
        _stream_line(dst, U(doff + i), src, U(soff + i))
        i += per
    while i < n:
        dst[U(doff + i)] = src[U(soff + i)]
        i += 1
