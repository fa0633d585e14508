"""Numba max-pool kernels (NCHW), forward with PyTorch's exact indices, and backward.

The forward kernels trust their arguments (``fastconv._validate`` checked the geometry); the
backward range-checks every index itself as it scatters (``bad``), which saves the caller a
separate single-threaded pass over idx.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ._options import PARALLEL, U
from ._stack import prefer_wide_vectors
from ._stream import STREAM_MIN_BYTES, store_fence, stream_copy  # noqa: F401


@njit(**PARALLEL)
def max_pool_forward(x, y, idx, h0, hn, w0, wn, dil_h, dil_w):
    """y, idx (N, C, H_out, W_out) = max and flat argmax (h*W + w) of each window.

    Window ``(oh, ow)`` covers rows ``h0[oh] + i*dil_h`` for ``i < hn[oh]`` and columns
    ``w0[ow] + j*dil_w`` for ``j < wn[ow]``: the taps inside the input, as PyTorch clips them
    (padding is -inf, so padded taps never win). PyTorch's CPU rule, exactly: the argmax starts
    at the first in-bounds tap, and a tap replaces the running maximum when it is greater or NaN.
    So ties keep the first maximum, and a NaN in a window makes the output NaN with idx at the
    window's last NaN, as ``torch.nn.functional.max_pool2d`` does.
    """
    # Loop order: one task per (n, c) plane, owning its output plane; rows, columns, then the
    # window in row-major order (the order that decides ties). The tap tables hold the clipping,
    # so no division or branch on the border is left in the window loops.
    n_, c_, h_, w_ = x.shape
    ho, wo = y.shape[2], y.shape[3]
    x1 = x.ravel()
    y1 = y.ravel()
    i1 = idx.ravel()
    for t in prange(n_ * c_):
        src = t * h_ * w_
        dst = t * ho * wo
        for oh in range(ho):
            hs = h0[oh]
            nh = hn[oh]
            for ow in range(wo):
                ws = w0[ow]
                nw = wn[ow]
                best = -np.inf
                arg = hs * w_ + ws
                for i in range(nh):
                    rowi = (hs + i * dil_h) * w_ + ws
                    for j in range(nw):
                        v = x1[U(src + rowi + j * dil_w)]
                        if v > best or np.isnan(v):
                            best = v
                            arg = rowi + j * dil_w
                y1[U(dst + oh * wo + ow)] = best
                i1[U(dst + oh * wo + ow)] = arg
    return y, idx


VB = 16  # the parity kernel computes output columns in multiples of this (one zmm of float32)
TASKS = 256  # tasks of the plane loops that hold scratch: allocated once per task, not per plane


@njit(**PARALLEL)
def max_pool_forward_s2(x, y, idx, h0, hn, w0, kw_, pw, dil_h, dil_w, hp):
    """:func:`max_pool_forward` for column stride 2 (same results), vectorized over ow.

    Window ``(oh, ow)`` covers rows ``h0[oh] + i*dil_h`` for ``i < hn[oh]`` and the columns
    ``ow*2 - pw + j*dil_w`` (j < kW); columns outside the input are -inf, which is never taken.
    These are the taps PyTorch visits, in the same row-major order, and PyTorch's CPU rule,
    exactly: the argmax starts at the first in-bounds tap ``(h0[oh], w0[ow])``, and a tap
    replaces the running maximum when it is greater or NaN. ``hp`` (at least
    ``ceil(W_out/VB)*VB + dil_w*(kW-1)//2 + 1`` and ``(W + pw)//2 + 2``) is the length of each
    parity half of the row buffer. Indices are computed in int32: the caller checks that
    ``H*W`` leaves room.
    """
    # Loop order: one task per chunk of (n, c) planes (its row buffers allocated once), owning
    # their output planes. For each output row and window row: the input row is split by column
    # parity into a -inf padded buffer (so tap j of output ow is the contiguous element
    # ``pb_j + ow``: no stride-2 access, which LLVM compiles to gathers), then for each tap j one
    # branch-free compare-and-select over every output column (a multiple of VB, so no scalar
    # remainder), the running max and int32 argmax living in two row buffers. Each window still
    # sees its taps in row-major order.
    n_, c_, h_, w_ = x.shape
    ho, wo = y.shape[2], y.shape[3]
    wv = (wo + VB - 1) // VB * VB
    pe = (pw % 2) * hp + pw // 2  # where x[.., 2u] goes: parity and half-index of 2u + pw
    po = ((pw + 1) % 2) * hp + (pw + 1) // 2  # where x[.., 2u + 1] goes
    x1 = x.ravel()
    y1 = y.ravel()
    i1 = idx.ravel()
    planes = n_ * c_
    tasks = min(planes, TASKS)
    for task in prange(tasks):
        prefer_wide_vectors()
        par = np.empty(2 * hp, x.dtype)
        for u in range(2 * hp):
            par[u] = -np.inf  # the padding; only in-input columns are overwritten below
        # the running max and argmax, ping-ponged between two buffers per tap: an update in
        # place (``best[ow] = v if take else best[ow]``) is compiled to masked stores, which
        # AVX2 CPUs run slowly (docs/performance.md)
        best = np.empty(wv, x.dtype)
        arg = np.empty(wv, np.int32)
        best2 = np.empty(wv, x.dtype)
        arg2 = np.empty(wv, np.int32)
        two = np.empty(wv, np.int32)
        for ow in range(wv):
            two[ow] = 2 * ow
            arg[ow] = 0
            arg2[ow] = 0  # lanes past W_out are computed, never written out
        for t in range(task * planes // tasks, (task + 1) * planes // tasks):
            src = t * h_ * w_
            for oh in range(ho):
                dst = (t * ho + oh) * wo
                first = h0[oh] * w_
                for ow in range(wv):
                    best[ow] = -np.inf
                for ow in range(wo):
                    arg[ow] = np.int32(first + w0[ow])
                for i in range(hn[oh]):
                    row = (h0[oh] + i * dil_h) * w_
                    for u in range(w_ // 2):
                        par[U(pe + u)] = x1[U(src + row + 2 * u)]
                        par[U(po + u)] = x1[U(src + row + 2 * u + 1)]
                    if w_ % 2:
                        cc = w_ - 1 + pw
                        par[U((cc % 2) * hp + cc // 2)] = x1[U(src + row + w_ - 1)]
                    for j in range(kw_):
                        pb = (j * dil_w % 2) * hp + j * dil_w // 2
                        at0 = np.int32(row + j * dil_w - pw)
                        for ow in range(wv):
                            v = par[U(pb + ow)]
                            b = best[U(ow)]
                            at = at0 + two[U(ow)]  # both sides loaded before the select:
                            a = arg[U(ow)]  # loaded inside it, they become masked loads
                            take = (v > b) | (v != v)  # bitwise: no branch, so it vectorizes
                            best2[U(ow)] = v if take else b
                            arg2[U(ow)] = at if take else a
                        best, best2 = best2, best
                        arg, arg2 = arg2, arg
                for ow in range(wo):
                    y1[U(dst + ow)] = best[U(ow)]
                    i1[U(dst + ow)] = arg[U(ow)]
    return y, idx


KB = 8  # outputs per block of the 2x2 stride-2 kernels (8 = P1's and P2's rows take 2 blocks)


def _flat_pointer(context, builder, arrty, arr, index, lty):
    ary = context.make_array(arrty)(context, builder, arr)
    return builder.bitcast(builder.gep(ary.data, [index]), ir.PointerType(lty))


def _takes(builder, new, old):
    """PyTorch's rule as a lane mask: the later tap ``new`` replaces ``old`` if greater or NaN."""
    return builder.or_(builder.fcmp_ordered(">", new, old), builder.fcmp_unordered("uno", new, new))


def _splat(ty, lanes, value):
    return ir.Constant(ir.VectorType(ty, lanes), [value] * lanes)


def _broadcast(builder, value, lanes):
    """A runtime scalar in every lane."""
    vt = ir.VectorType(value.type, lanes)
    one = builder.insert_element(ir.Constant(vt, ir.Undefined), value,
                                 ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, ir.Constant(vt, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))


@intrinsic
def k2s2_block(typingctx, x1, a, w, y1, i1, o, base):
    """KB outputs of 2x2/2 windows: y1[o + l], i1[o + l] for l < KB, of the windows whose top
    left elements are x1[a + 2l] (rows ``w`` apart), with flat index ``base + 2l`` in the plane.

    Two loads of 2*KB elements per window row, split into even and odd columns by shuffles,
    then the row-major taps as a tree of selects: (top left, top right), (bottom left, bottom
    right), then the bottom winner against the top one -- the same result as the sequential
    rule (the first maximum; the last NaN, since a NaN pair winner replaces an earlier one).
    Unchecked: the caller guarantees the ranges."""
    ok = (isinstance(x1, types.Array) and x1.ndim == 1 and x1.layout == "C"
          and isinstance(y1, types.Array) and y1.dtype == x1.dtype and y1.layout == "C"
          and isinstance(i1, types.Array) and i1.dtype == types.int64 and i1.layout == "C"
          and x1.dtype in (types.float32, types.float64))
    if not ok:
        return None

    def codegen(context, builder, sig, args):
        xa, ya, ia = args[0], args[3], args[4]
        i64 = ir.IntType(64)
        a_, w_, o_, base_ = (context.cast(builder, args[k], sig.args[k], types.int64)
                             for k in (1, 2, 5, 6))
        ft = context.get_value_type(sig.args[0].dtype)
        row_t = ir.VectorType(ft, 2 * KB)
        even = ir.Constant(ir.VectorType(ir.IntType(32), KB), list(range(0, 2 * KB, 2)))
        odd = ir.Constant(ir.VectorType(ir.IntType(32), KB), list(range(1, 2 * KB, 2)))
        undef = ir.Constant(row_t, ir.Undefined)
        iv_t = ir.VectorType(i64, KB)

        def pair(at, off):  # (winner, its offset in the window) of one window row
            row = builder.load(_flat_pointer(context, builder, sig.args[0], xa, at, row_t),
                               align=1)
            left = builder.shuffle_vector(row, undef, even)
            right = builder.shuffle_vector(row, undef, odd)
            take = _takes(builder, right, left)
            offl = _broadcast(builder, off, KB)
            offr = builder.add(offl, _splat(i64, KB, 1))
            return builder.select(take, right, left), builder.select(take, offr, offl)

        tv, ti = pair(a_, ir.Constant(i64, 0))
        bv, bi = pair(builder.add(a_, w_), w_)
        take = _takes(builder, bv, tv)
        yv = builder.select(take, bv, tv)
        iv = builder.select(take, bi, ti)
        lane = ir.Constant(iv_t, list(range(0, 2 * KB, 2)))
        iv = builder.add(iv, builder.add(_broadcast(builder, base_, KB), lane))
        builder.store(yv, _flat_pointer(context, builder, sig.args[3], ya, o_,
                                        ir.VectorType(ft, KB)), align=1)
        builder.store(iv, _flat_pointer(context, builder, sig.args[4], ia, o_, iv_t), align=1)
        return context.get_dummy_value()

    return types.none(x1, a, w, y1, i1, o, base), codegen


@njit(**PARALLEL)
def max_pool_forward_k2s2(x, y, idx):
    """The 2x2, stride 2, no padding/dilation case of :func:`max_pool_forward` (same rule)."""
    # Loop order: one task per (n, c) plane; output rows; blocks of KB output columns
    # (k2s2_block), the last block shifted left to end at W_out (it recomputes a few outputs,
    # with the same values), so no row has a scalar remainder. Rows narrower than KB: the same
    # selects one output at a time.
    n_, c_, h_, w_ = x.shape
    ho, wo = y.shape[2], y.shape[3]
    x1 = x.ravel()
    y1 = y.ravel()
    i1 = idx.ravel()
    for t in prange(n_ * c_):
        src = t * h_ * w_
        dst = t * ho * wo
        for oh in range(ho):
            r0 = src + 2 * oh * w_
            if wo >= KB:
                for ob in range(0, wo, KB):
                    s = min(ob, wo - KB)
                    k2s2_block(x1, r0 + 2 * s, w_, y1, i1, dst + oh * wo + s, 2 * oh * w_ + 2 * s)
                continue
            for ow in range(wo):
                a = r0 + 2 * ow
                best = x1[U(a)]
                arg = 0
                v = x1[U(a + 1)]
                take = (v > best) | (v != v)
                best = v if take else best
                arg = 1 if take else arg
                v = x1[U(a + w_)]
                take = (v > best) | (v != v)
                best = v if take else best
                arg = w_ if take else arg
                v = x1[U(a + w_ + 1)]
                take = (v > best) | (v != v)
                best = v if take else best
                arg = w_ + 1 if take else arg
                y1[U(dst + oh * wo + ow)] = best
                i1[U(dst + oh * wo + ow)] = 2 * oh * w_ + 2 * ow + arg
    return y, idx


@njit(**PARALLEL)
def max_pool_backward(dy, idx, dx, stream, bad):
    """dx (N, C, H, W) = 0, then dx.plane[idx] += dy for every output element.

    An index outside [0, H*W) is not written and sets ``bad[n*C + c]`` (the caller raises).
    With ``stream``, each dx plane is assembled in a buffer and written by non-temporal stores
    (see ``_stream``)."""
    # Loop order: one task per chunk of (n, c) planes (its stream buffer allocated once),
    # owning their dx planes (windows overlap, so each scatter-add stays inside one task): per
    # plane, zero it (cache-hot for the scatter, and no separate single-threaded memset), then
    # the output elements in order.
    n_, c_, h_, w_ = dx.shape
    ho, wo = dy.shape[2], dy.shape[3]
    d1 = dy.ravel()
    i1 = idx.ravel()
    x1 = dx.ravel()
    planes = n_ * c_
    tasks = min(planes, TASKS)
    for task in prange(tasks):
        buf = np.empty(h_ * w_ if stream else 0, dx.dtype)  # the plane assembled for streaming
        for t in range(task * planes // tasks, (task + 1) * planes // tasks):
            src = t * ho * wo
            out, dst = x1, t * h_ * w_
            if stream:
                out, dst = buf, 0
            for j in range(h_ * w_):
                out[U(dst + j)] = 0
            for j in range(ho * wo):
                at = i1[U(src + j)]
                if U(at) >= U(h_ * w_):  # as unsigned, a negative index is huge too
                    bad[t] = 1
                else:
                    out[U(dst + at)] += d1[U(src + j)]
            if stream:
                stream_copy(x1, t * h_ * w_, buf, 0, h_ * w_)
        if stream:
            store_fence()
    return dx
