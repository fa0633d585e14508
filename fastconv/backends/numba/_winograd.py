"""Winograd F(2x2, 3x3) kernels: float32 3x3 stride-1 convolutions with many channels.

A 2x2 output tile is ``A^T [ (G g G^T) * (B^T d B) ] A`` for its 4x4 input tile ``d`` and each
3x3 filter ``g`` (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016):
16 multiplications per tile and channel pair instead of 36, so 2.25x fewer FLOPs than the direct
kernels. Per tile-position ``xi`` (16 of them) the channel sums are small matrix products,
``M[xi] = V[xi] (tiles x C_in) @ U[xi] (C_in x Cp)``, register-blocked like the direct kernel
(4 tiles x 64 output channels: sixteen 512-bit float32 accumulators).

Layouts: the input is zero-padded NHWC with the columns split by parity (:func:`pad_split`),
(N, 2*TH + 2, 2, TW + 1, C) for TH x TW tiles, so that every transform step is one contiguous
run over (tile, channel). Transformed weights ``u`` (16, C, Cp) come from
``_winograd_transforms``: output channels innermost, zero-padded to Cp, a multiple of 64.
Transforms are written as one loop per tile position with a single output stream, which LLVM
vectorizes (a loop writing all 16 positions stayed scalar).

Non-finite values: a tile mixes its 16 inputs, so one inf or NaN would reach outputs that the
direct sum keeps finite. The kernels therefore report whether anything non-finite appeared
(``check``: 0 when all finite, NaN otherwise) and the caller recomputes with an exact kernel.
That test is exact: a non-finite transformed value always yields a non-finite output or sum.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._options import PARALLEL, U
from ._simd import LANES, vfma, vload, vsplat, vstore, vzero
from ._stack import prefer_wide_vectors, stack_array
from .._winograd_transforms import (  # noqa: F401  (the backend calls them through here)
    HALF, transform_weight, transform_weight_paired, weight_from_transformed)

INNER = dict(PARALLEL, parallel=False)  # helpers called inside the parallel loops

CB = 64  # output channels per register block (the padding unit of Cp)
TB = 4  # tiles per register block
ACC = TB * CB
TASK_CHUNKS = 64  # forward: tile rows are split into this many chunks, one scratch each
GROUP = 64  # tiles transformed together by the grad-weight kernel (their V and M fit in L2)
RB = 4  # input channels per grad-weight register block (4 x 64: 16 accumulators; 6 rows left
# the accumulators in memory)
GACC = RB * CB
# The explicit 256-bit blocks (``_simd``, CPUs without AVX-512): 6 tiles (forward) or 6
# input channels (grad-weight) x 16 output channels, 12 accumulators.
VL = LANES[np.dtype(np.float32)]  # float32 lanes of a 256-bit vector
VTB = 6
VCB = 2 * VL
VACC = VTB * VCB

# F(2x2, 3x3) transform matrices. Row k of B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0],
# [0, 1, 0, -1]] is e[_BT_A[k]] + _BT_SIGN[k] * e[_BT_B[k]].
_BT_A = (0, 1, 2, 1)
_BT_B = (2, 2, 1, 3)
_BT_SIGN = (-1, 1, -1, -1)
# A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] (the output transform, written out in the kernel); its
# transpose A, for the gradient tiles:
_A = ((1, 0), (1, 1), (1, -1), (0, -1))


@njit(**PARALLEL)
def pad_split(x, xq, pt, pl, sums):
    """xq[n, pt + h, (pl + w) % 2, (pl + w) // 2, c] = x[n, c, h, w]; the rest of xq = 0.

    Unless ``sums`` has no rows, also sums[n*Hp + pt + h, c] = sum over w of x[n, c, h, w]
    (0 for padding rows): db on the way, when x is dy (summed over axis 0 by the caller).

    x (N, C, H, W) NCHW; xq (N, Hp, 2, Wq, Cq), Cq >= C: zero-padded NHWC with the columns
    split by parity, so that column 2*t + k of the padded input, for k in 0..3, lies at parity
    k % 2 and index t + k // 2: for a fixed k that is linear in (t, c), one contiguous run per
    tile row.
    """
    # Loop order: one task per padded row (n, hp); w outer, c inner: contiguous writes, reads
    # strided across the C planes of one input row (their lines stay in L1 for the next w).
    # 20-25 % faster than c outer with strided writes.
    n_, c_, h_, w_ = x.shape
    hp_, wq, cq = xq.shape[1], xq.shape[3], xq.shape[4]
    x1 = x.ravel()
    q1 = xq.ravel()
    plane = wq * cq
    want_sums = sums.shape[0] > 0
    for t in prange(n_ * hp_):
        n = t // hp_
        h = t % hp_ - pt
        row = t * 2 * plane
        for i in range(2 * plane):
            q1[U(row + i)] = 0
        if h < 0 or h >= h_:
            if want_sums:
                for c in range(c_):
                    sums[t, c] = 0
            continue
        src = (n * c_ * h_ + h) * w_
        for w in range(min(w_, 2 * wq - pl)):
            wp = w + pl
            dst = row + (wp % 2) * plane + (wp // 2) * cq
            for c in range(c_):
                q1[U(dst + c)] = x1[U(src + c * h_ * w_ + w)]
        if want_sums:  # the row's C runs are still in cache
            for c in range(c_):
                acc = x1[U(src + c * h_ * w_)]
                for w in range(1, w_):
                    acc += x1[U(src + c * h_ * w_ + w)]
                sums[t, c] = acc
    return xq


@njit(**INNER)
def _input_tiles(x1, xb, xw, plane, c_, ntile, v1, vbase, vstride):
    """v1[vbase + xi*vstride + t*C + c] = (B^T d B)[xi] for tile t < ntile and channel c of the tile
    row whose padded rows start at x1[xb] (row length xw, column parity planes ``plane`` apart;
    see :func:`pad_split`)."""
    # Loop order: tile positions xi, then (tile, channel) as one contiguous run: 16 long loops,
    # each with a single output stream, which LLVM vectorizes behind one overlap check.
    prefer_wide_vectors()
    run = ntile * c_
    for xi in range(16):
        i = xi // 4
        j = xi % 4
        ca = (_BT_A[j] % 2) * plane + (_BT_A[j] // 2) * c_
        cb = (_BT_B[j] % 2) * plane + (_BT_B[j] // 2) * c_
        p00 = xb + _BT_A[i] * xw + ca
        p01 = xb + _BT_A[i] * xw + cb
        p10 = xb + _BT_B[i] * xw + ca
        p11 = xb + _BT_B[i] * xw + cb
        f = v1.dtype.type(_BT_SIGN[i])
        g = v1.dtype.type(_BT_SIGN[j])
        o = vbase + xi * vstride
        for k in range(run):
            top = x1[U(p00 + k)] + g * x1[U(p01 + k)]
            bot = x1[U(p10 + k)] + g * x1[U(p11 + k)]
            v1[U(o + k)] = top + f * bot


@njit(**INNER)
def _products_vec(v1, vb, c_, u1, ub, cp, m1, mb, cm, nt):
    """m1[mb + t*cm + o] = sum over ci of v1[vb + t*c_ + ci] * u1[ub + ci*cp + o] for the tiles
    t < nt (at most VTB; a block of fewer computes the missing ones from tile 0 and drops them)
    and the VCB channels o of one block, in 256-bit vectors."""
    # Loop order: input channels, then the block: two vectors of u loaded once for VTB
    # broadcasts of V (12 FMAs). The accumulators are this function's own stack array, so
    # that LLVM keeps them in registers whether or not it inlines the call.
    acc = stack_array(VACC, m1.dtype)
    for i in range(2 * VTB):
        vstore(acc, i * VL, vzero(acc))
    for ci in range(c_):
        ua = vload(u1, U(ub + ci * cp))
        uz = vload(u1, U(ub + ci * cp + VL))
        for t in range(VTB):
            vv = vsplat(v1[U(vb + (t if t < nt else 0) * c_ + ci)])
            vstore(acc, 2 * t * VL, vfma(vv, ua, vload(acc, 2 * t * VL)))
            vstore(acc, (2 * t + 1) * VL, vfma(vv, uz, vload(acc, (2 * t + 1) * VL)))
    for t in range(nt):
        for o in range(VCB):
            m1[U(mb + t * cm + o)] = acc[U(t * VCB + o)]


@njit(**PARALLEL)
def conv_forward_winograd(xq, u, bias, y, check, paired, vec):
    """y (N, C_out, Ho, Wo) = conv(x, g) + bias[:C_out] from the transformed weights ``u`` and
    the input as :func:`pad_split` lays it out, ``xq`` (N, 2*TH + 2, 2, TW + 1, C).

    ``u`` is (16, C, 64 * k) from :func:`transform_weight`; or, if ``paired`` (C_out <= 32 and
    at least 2*TB tiles per row), (16, C, 64) from :func:`transform_weight_paired`: then lanes
    0-31 of the register block serve one tile and lanes 32-63 the next, so no multiply is spent
    on padding channels.
    ``check[task]`` is set to 0 when every output of that task's tile row is finite before the
    bias is added (the bias is added element by element and needs no check), else NaN.
    ``vec`` (never with ``paired``; ``u``'s Cp then a multiple of VCB): the products run as
    explicit VTB-tile x VCB-channel blocks of 256-bit vectors (``_simd``), for CPUs
    without AVX-512, where the TB x CB block spills.
    """
    # Loop order: one task per (image, tile row), owning y[n, :, 2*th : 2*th + 2, :], in
    # TASK_CHUNKS contiguous chunks (one scratch each). Inside: the input transform of the
    # whole tile row into V (16, TW, C); then per tile position xi (its weight slab u[xi] stays
    # in L1), channel block and block of TB tiles (paired: TB pairs), the TB x CB accumulators
    # over the input channels, into M (16, TW, Cm); then the output transform into a
    # (2, 2, TW, Cm) buffer (output row, column parity, tile, channel), transposed into y once.
    n_, hp_, _, wq, c_ = xq.shape
    cp = u.shape[2]
    co_, ho, wo = y.shape[1], y.shape[2], y.shape[3]
    cm = HALF if paired else cp  # channels per tile in M
    tpb = VTB if vec else (2 * TB if paired else TB)  # tiles per register block
    cbw = VCB if vec else CB  # channels per register block
    tstride = CB if paired else cm  # from one row of the register block to the next, in M
    th_ = (hp_ - 2) // 2
    tw_ = wq - 1
    plane = wq * c_
    xw = 2 * plane
    x1 = xq.ravel()
    u1 = u.ravel()
    y1 = y.ravel()
    nblk = (tw_ + tpb - 1) // tpb
    ms = tw_ * cm
    ntask = n_ * th_
    nchunk = min(ntask, TASK_CHUNKS)
    for chunk in prange(nchunk):
        # scratch allocated once per chunk of tasks: per task, a free of a few hundred KiB
        # would let malloc trim the heap, and every task would page-fault it back
        v1 = np.empty(16 * tw_ * c_, dtype=y.dtype)
        m1 = np.empty(16 * ms, dtype=y.dtype)
        rows = np.empty(4 * ms, dtype=y.dtype)
        acc = stack_array(ACC, y.dtype)
        for task in range(chunk * ntask // nchunk, (chunk + 1) * ntask // nchunk):
            n = task // th_
            th = task % th_
            _input_tiles(x1, (n * hp_ + 2 * th) * xw, xw, plane, c_, tw_, v1, 0, tw_ * c_)
            for xi in range(16):
                for c0 in range(0, cm, cbw):
                    ub = xi * c_ * cp + c0
                    for blk in range(nblk):
                        t0 = max(min(blk * tpb, tw_ - tpb), 0)  # the last block shifted left
                        vb = (xi * tw_ + t0) * c_
                        mb = xi * ms + t0 * cm + c0
                        if vec:  # rows narrower than VTB tiles: one block of tw_ tiles
                            _products_vec(v1, vb, c_, u1, ub, cp, m1, mb, cm, min(VTB, tw_))
                            continue
                        for i in range(ACC):
                            acc[i] = 0
                        if paired:
                            for ci in range(c_):
                                for t in range(TB):
                                    va = v1[U(vb + 2 * t * c_ + ci)]
                                    vz = v1[U(vb + (2 * t + 1) * c_ + ci)]
                                    for o in range(CB):
                                        vv = va if o < HALF else vz
                                        acc[U(t * CB + o)] += vv * u1[U(ub + ci * cp + o)]
                        else:
                            for ci in range(c_):
                                for t in range(TB):
                                    vv = v1[U(vb + t * c_ + ci)]
                                    for o in range(CB):
                                        acc[U(t * CB + o)] += vv * u1[U(ub + ci * cp + o)]
                        for t in range(TB):  # paired: tiles t0 + 2t, t0 + 2t + 1 side by side
                            for o in range(CB):
                                m1[U(mb + t * tstride + o)] = acc[U(t * CB + o)]
            # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: row i of A^T is (1, s_i, s_i) on positions
            # i, i + 1, i + 2 with s_0 = 1, s_1 = -1. One contiguous loop per output (i, j).
            chk = y.dtype.type(0)
            for i in range(2):
                for j in range(2):
                    si = y.dtype.type(1 - 2 * i)
                    sj = y.dtype.type(1 - 2 * j)
                    q0 = (4 * i + j) * ms
                    dst = (2 * i + j) * ms
                    for k in range(ms):
                        q = U(q0 + k)
                        r0 = m1[q] + sj * (m1[q + U(ms)] + m1[q + U(2 * ms)])
                        r1 = m1[q + U(4 * ms)] + sj * (m1[q + U(5 * ms)] + m1[q + U(6 * ms)])
                        r2 = m1[q + U(8 * ms)] + sj * (m1[q + U(9 * ms)] + m1[q + U(10 * ms)])
                        val = r0 + si * (r1 + r2)
                        chk += val * 0
                        rows[U(dst + k)] = val
            check[task] = chk
            for i in range(min(2, ho - 2 * th)):
                for co in range(co_):
                    dst = ((n * co_ + co) * ho + 2 * th + i) * wo
                    b = bias[co]
                    even = 2 * i * ms + co
                    odd = even + ms
                    for t in range(wo // 2):  # the two columns of a tile: adjacent stores
                        y1[U(dst + 2 * t)] = rows[U(even + t * cm)] + b
                        y1[U(dst + 2 * t + 1)] = rows[U(odd + t * cm)] + b
                    if wo % 2:
                        y1[U(dst + wo - 1)] = rows[U(even + (wo // 2) * cm)] + b
    return y


@njit(**INNER)
def _grad_tiles(d1, top, pitch, off0, off1, cp, ntile, m1, mbase, mstride):
    """m1[mbase + xi*mstride + t*Cp + o] = (A dY A^T)[xi] for tile t < ntile and channel o of
    the 2x2 gradient tiles whose rows start at d1[top] and d1[top + pitch], with a tile's
    columns 0 and 1 at offsets off0 and off1 (in :func:`pad_split`'s parity planes)."""
    # Loop order as in _input_tiles. A = [[1, 0], [1, 1], [1, -1], [0, -1]].
    prefer_wide_vectors()
    run = ntile * cp
    for xi in range(16):
        a = xi // 4
        b = xi % 4
        f00 = m1.dtype.type(_A[a][0] * _A[b][0])
        f01 = m1.dtype.type(_A[a][0] * _A[b][1])
        f10 = m1.dtype.type(_A[a][1] * _A[b][0])
        f11 = m1.dtype.type(_A[a][1] * _A[b][1])
        o = mbase + xi * mstride
        for k in range(run):
            m1[U(o + k)] = (f00 * d1[U(top + off0 + k)] + f01 * d1[U(top + off1 + k)]
                            + f10 * d1[U(top + pitch + off0 + k)]
                            + f11 * d1[U(top + pitch + off1 + k)])


@njit(**INNER)
def _grad_products_vec(v1, vx, c_, m1, mx, cp, ntile, p1, pb):
    """p1[pb + c*cp + o] += sum over the tiles t < ntile of v1[vx + t*c_ + c] * m1[mx + t*cp + o]
    for every input channel c < C (>= VTB) and output channel o < cp (a multiple of VCB), in
    VTB x VCB blocks of 256-bit vectors."""
    # Loop order: channel blocks, blocks of VTB input channels (the last shifted to end at C;
    # it adds only the channels the one before it did not), then the tiles: two vectors of M
    # loaded once for VTB broadcasts of V. The accumulators: as in _products_vec.
    acc = stack_array(VACC, p1.dtype)
    for cb in range(0, cp, VCB):
        for rb in range((c_ + VTB - 1) // VTB):
            c0 = min(rb * VTB, c_ - VTB)
            for i in range(2 * VTB):
                vstore(acc, i * VL, vzero(acc))
            for t in range(ntile):
                ma = vload(m1, U(mx + t * cp + cb))
                mz = vload(m1, U(mx + t * cp + cb + VL))
                vb = vx + t * c_ + c0
                for c in range(VTB):
                    vv = vsplat(v1[U(vb + c)])
                    vstore(acc, 2 * c * VL, vfma(vv, ma, vload(acc, 2 * c * VL)))
                    vstore(acc, (2 * c + 1) * VL, vfma(vv, mz, vload(acc, (2 * c + 1) * VL)))
            for c in range(rb * VTB - c0, VTB):
                wb = pb + (c0 + c) * cp + cb
                for o in range(VCB):
                    p1[U(wb + o)] += acc[U(c * VCB + o)]


@njit(**PARALLEL)
def conv_grad_weight_winograd(xq, dq, dr, ds, part, vec):
    """part[t] (16, C, Cp) = sum over the tiles of chunk t of V[xi, tile, c] * M[xi, tile, o]:
    the gradient of the transformed weights (see :func:`weight_from_transformed`).

    ``xq`` is x as :func:`pad_split` lays it out for the forward pass, (N, 2*TH + 2, 2, TW + 1,
    C); ``dq`` is dy laid out the same way, (N, Hd, 2, Wd, Cp), with dy[n, :, 0, 0] at padded
    row dr, column ds, and zeros past H_out, W_out and C_out (so dy padded for the grad-input
    pass serves). Chunk t covers the tile rows [t*R//T, (t+1)*R//T) of the R = N*TH; the caller
    sums part over t in order, so the result does not depend on the thread count. ``vec``:
    the products run as explicit VTB-channel x VCB-channel blocks of 256-bit vectors.
    """
    # Loop order: one task per chunk, owning part[t]. Inside: groups of tile rows (their V and
    # M, about GROUP tiles, stay in L2), the input and gradient transforms of the group, then
    # per position xi, channel block and RB-row block of input channels, the RB x CB register
    # accumulators over the group's tiles: RB broadcasts of V, CB contiguous M values.
    n_, hp_, _, wq, c_ = xq.shape
    t_, _, _, cp = part.shape
    th_ = (hp_ - 2) // 2
    tw_ = wq - 1
    rows_ = n_ * th_
    xplane = wq * c_
    hd = dq.shape[1]
    dplane = dq.shape[3] * cp
    off0 = (ds % 2) * dplane + (ds // 2) * cp  # tile column 0 (padded column ds + 2t)
    off1 = ((ds + 1) % 2) * dplane + ((ds + 1) // 2) * cp
    x1 = xq.ravel()
    d1 = dq.ravel()
    p1 = part.ravel()
    g_rows = max(1, GROUP // tw_)
    nrb = c_ // RB
    for task in prange(t_):
        pb = task * 16 * c_ * cp
        for i in range(16 * c_ * cp):
            p1[U(pb + i)] = 0
        v1 = np.empty(16 * g_rows * tw_ * c_, dtype=part.dtype)
        m1 = np.empty(16 * g_rows * tw_ * cp, dtype=part.dtype)
        acc = stack_array(GACC, part.dtype)
        r_end = (task + 1) * rows_ // t_
        for r0 in range(task * rows_ // t_, r_end, g_rows):
            nr = min(g_rows, r_end - r0)
            ntile = nr * tw_
            for k in range(nr):
                n = (r0 + k) // th_
                th = (r0 + k) % th_
                _input_tiles(x1, (n * hp_ + 2 * th) * 2 * xplane, 2 * xplane, xplane, c_, tw_,
                             v1, k * tw_ * c_, ntile * c_)
                _grad_tiles(d1, (n * hd + dr + 2 * th) * 2 * dplane, 2 * dplane, off0, off1,
                            cp, tw_, m1, k * tw_ * cp, ntile * cp)
            for xi in range(16):
                vx = xi * ntile * c_
                mx = xi * ntile * cp
                if vec:
                    _grad_products_vec(v1, vx, c_, m1, mx, cp, ntile, p1, pb + xi * c_ * cp)
                    continue
                for cb in range(0, cp, CB):
                    for rb in range(nrb + c_ % RB):
                        if rb < nrb:
                            c0 = rb * RB
                            for i in range(GACC):
                                acc[i] = 0
                            for t in range(ntile):
                                vb = vx + t * c_ + c0
                                mb = mx + t * cp + cb
                                for c in range(RB):
                                    vv = v1[U(vb + c)]
                                    for o in range(CB):
                                        acc[U(c * CB + o)] += vv * m1[U(mb + o)]
                            for c in range(RB):
                                wb = pb + (xi * c_ + c0 + c) * cp + cb
                                for o in range(CB):
                                    p1[U(wb + o)] += acc[U(c * CB + o)]
                        else:  # the channels past the last full block, one at a time
                            c0 = nrb * RB + rb - nrb
                            for i in range(CB):
                                acc[i] = 0
                            for t in range(ntile):
                                vv = v1[U(vx + t * c_ + c0)]
                                mb = mx + t * cp + cb
                                for o in range(CB):
                                    acc[U(o)] += vv * m1[U(mb + o)]
                            wb = pb + (xi * c_ + c0) * cp + cb
                            for o in range(CB):
                                p1[U(wb + o)] += acc[U(o)]
    return part
