"""Register-blocked direct conv2d kernels for groups=1 and unit column dilation (the fast path).

Layouts (see ``_generic`` for ``xp``): the input as ``xp2`` (N, Hp, Wp*C_in), so the window of
output column ``ow`` in padded row ``ih`` is the contiguous run ``xp2[n, ih, ow*sw*C_in :][:R]``
with ``R = kW*C_in`` (taps kw, then channels). Weights ``wk`` (kH, R, Cp): output channels
innermost, zero-padded to ``Cp``, a multiple of the channel block ``CB``.

The register block is ``OB`` output columns x ``CB`` output channels (4 x 64: sixteen 512-bit
float32 accumulators, see ``_stack``), accumulated over the run ``R`` for every kernel row.
Block sizes are module constants, so they are compile-time constants: one compiled variant per
dtype, whatever the shape. Without AVX-512 that block spills (32 accumulators in 16 ymm
registers); ``conv_forward_direct_vec*`` and ``conv_grad_weight_direct_vec*`` below are the
same kernels with an explicit VOB x (VNV vectors) block of 256-bit vectors (``_simd``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._options import PARALLEL, U
from ._simd import vfma, vload, vsplat, vstore, vzero
from ._stack import stack_array

CB = 64  # output channels per register block (the padding unit of Cp)
OB = 4  # output columns per register block
ACC = OB * CB
RB = 6  # rows of the (kW*C_in) run per float32 grad-weight register block
RB64 = 4  # ... per float64 block
MCHUNK = 256  # output pixels per grad-weight pass (keeps that dy slab, 64 KiB, in L2)


@njit(**PARALLEL)
def conv_forward_direct(xp2, wk, bias, y1, ys, co_, ho, wo, c_in, sh, sw, dh, x0):
    """y = conv(xp2, wk) + bias[:C_out] for C_out <= Cp, written into the flat array ``y1``.

    Output element (n, co, oh, ow) goes to ``y1[ys[0] + n*ys[1] + co*ys[2] + oh*ys[3] +
    ow*ys[4]]``: a plain NCHW array, or one stride phase of a larger one (grad-input). The
    windows start ``x0`` elements into ``xp2`` (a phase's origin inside a shared padded dy).
    """
    # Loop order: one task per output row (n, oh), owning y[n, :, oh, :]. Inside: channel block
    # (its weight slab stays in cache), column block of OB, kernel row, the run r, then the OB x CB
    # block: broadcast one input value per column, FMA with CB contiguous weights. The finished
    # row (W_out x Cp, NHWC) is transposed into the NCHW output once.
    n_, hp_, xw = xp2.shape
    kh_, r_, cp = wk.shape
    y0, ysn, ysc, ysh, ysw = ys[0], ys[1], ys[2], ys[3], ys[4]
    x1 = xp2.ravel()
    w1 = wk.ravel()
    # Column blocks of OB; the last one is shifted left to end at W_out (it recomputes a few
    # columns, with the same result) rather than leaving single columns. Rows narrower than OB
    # go one column at a time.
    nblk = (wo + OB - 1) // OB if wo >= OB else 0
    nsingle = wo if wo < OB else 0
    for t in prange(n_ * ho):
        n = t // ho
        oh = t % ho
        row = np.empty(wo * cp, dtype=y1.dtype)
        acc = stack_array(ACC, y1.dtype)
        for cb in range(0, cp, CB):
            for ob in range(nblk + nsingle):
                if ob < nblk:
                    ow0 = min(ob * OB, wo - OB)
                    for i in range(ACC):
                        acc[i] = 0
                    for kh in range(kh_):
                        xb = x0 + (n * hp_ + oh * sh + kh * dh) * xw + ow0 * sw * c_in
                        wb = kh * r_ * cp + cb
                        for r in range(r_):
                            for c in range(OB):
                                xv = x1[U(xb + c * sw * c_in + r)]
                                for o in range(CB):
                                    acc[U(c * CB + o)] += xv * w1[U(wb + r * cp + o)]
                    for c in range(OB):
                        for o in range(CB):
                            row[U((ow0 + c) * cp + cb + o)] = acc[U(c * CB + o)] + bias[U(cb + o)]
                else:  # a single column of a row narrower than OB
                    ow0 = ob
                    for i in range(CB):
                        acc[i] = 0
                    for kh in range(kh_):
                        xb = x0 + (n * hp_ + oh * sh + kh * dh) * xw + ow0 * sw * c_in
                        wb = kh * r_ * cp + cb
                        for r in range(r_):
                            xv = x1[U(xb + r)]
                            for o in range(CB):
                                acc[U(o)] += xv * w1[U(wb + r * cp + o)]
                    for o in range(CB):
                        row[U(ow0 * cp + cb + o)] = acc[U(o)] + bias[U(cb + o)]
        for co in range(co_):
            dst = y0 + n * ysn + co * ysc + oh * ysh
            for ow in range(wo):
                y1[U(dst + ow * ysw)] = row[U(ow * cp + co)]
    return y1


def _make_grad_weight(rbk):
    """The direct grad-weight kernel with an ``rbk`` run-row x CB channel register block (a
    closure constant: each variant is compiled, and cached, once per dtype)."""
    gacc = rbk * CB

    @njit(**PARALLEL)
    def conv_grad_weight_direct(xp2, dyt, xbase, part, c_in, dh):
        """part[t] (kH, R, Cp) = sum over the output pixels m of chunk t of
        x-run(m, kh)[r] * dyt[m].

        ``dyt`` (M, Cp) is dy in NHWC with channels zero-padded to Cp, M = N*H_out*W_out;
        ``xbase[m]`` is the offset in ``xp2`` of pixel m's run in kernel row 0. Chunk t covers
        pixels [t*M//T, (t+1)*M//T); the caller sums part over t in order, so the result does
        not depend on the thread count.
        """
        # Loop order: one task per (pixel chunk, kernel row, channel block), owning
        # part[t, kh, :, cb:cb+CB]. Inside: sub-chunks of MCHUNK pixels (that dy slab stays in
        # L2 while every run-row block uses it), the rbk-row blocks of the whole run, then the
        # pixels: rbk broadcasts x CB contiguous dy values, FMAs into rbk x CB register
        # accumulators, added to part once per sub-chunk. (Splitting the run across tasks
        # instead made every task stream all of dy and x again: much slower.)
        n_, hp_, xw = xp2.shape
        t_, kh_, r_, cp = part.shape
        m_ = dyt.shape[0]
        x1 = xp2.ravel()
        d1 = dyt.ravel()
        p1 = part.ravel()
        ncb = cp // CB
        nrb = (r_ + rbk - 1) // rbk
        for task in prange(t_ * kh_ * ncb):
            t = task // (kh_ * ncb)
            kh = (task // ncb) % kh_
            cb = task % ncb * CB
            pb = (t * kh_ + kh) * r_ * cp + cb
            acc = stack_array(gacc, part.dtype)
            for r in range(r_):
                for o in range(CB):
                    p1[U(pb + r * cp + o)] = 0
            koff = kh * dh * xw
            for m0 in range(t * m_ // t_, (t + 1) * m_ // t_, MCHUNK):
                m1 = min(m0 + MCHUNK, (t + 1) * m_ // t_)
                for rb in range(nrb):
                    r0 = rb * rbk
                    if r0 + rbk <= r_:
                        for i in range(gacc):
                            acc[i] = 0
                        for m in range(m0, m1):
                            xb = xbase[U(m)] + koff + r0
                            db = m * cp + cb
                            for c in range(rbk):
                                xv = x1[U(xb + c)]
                                for o in range(CB):
                                    acc[U(c * CB + o)] += xv * d1[U(db + o)]
                        for c in range(rbk):
                            wb = pb + (r0 + c) * cp
                            for o in range(CB):
                                p1[U(wb + o)] += acc[U(c * CB + o)]
                    else:  # the last, partial block of run rows: one row at a time
                        for r in range(r0, r_):
                            for i in range(CB):
                                acc[i] = 0
                            for m in range(m0, m1):
                                xv = x1[U(xbase[U(m)] + koff + r)]
                                db = m * cp + cb
                                for o in range(CB):
                                    acc[U(o)] += xv * d1[U(db + o)]
                            wb = pb + r * cp
                            for o in range(CB):
                                p1[U(wb + o)] += acc[U(o)]
        return part

    return conv_grad_weight_direct


# float32: 6 run rows x 64 channels (24 zmm accumulators; 4 rows took 1.3x longer).
conv_grad_weight_direct = _make_grad_weight(RB)
# float64: 4 run rows (32 zmm); 6 rows spill there.
conv_grad_weight_direct64 = _make_grad_weight(RB64)


@njit(**PARALLEL)
def column_sums(a, part):
    """part[t] = sum of rows [t*M//T, (t+1)*M//T) of a (M, C); the caller sums part serially."""
    # Loop order: one task per row chunk, owning part[t]; rows, then contiguous columns.
    m_, c_ = a.shape
    t_ = part.shape[0]
    a1 = a.ravel()
    for t in prange(t_):
        p = part[t]
        for i in range(c_):
            p[i] = 0
        for m in range(t * m_ // t_, (t + 1) * m_ // t_):
            for i in range(c_):
                p[U(i)] += a1[U(m * c_ + i)]
    return part


@njit(**PARALLEL)
def nchw_to_nhwc_padded(a, out, period):
    """out[n, h, w, c] = a[n, c % period, h, w] where c % period < C, else 0: channels
    zero-padded to ``period`` and that group repeated across out.shape[3] (a multiple of it)."""
    # Loop order: one task per (n, h) row; per repeat, c outer, w inner: contiguous reads,
    # strided writes within one output row (in L1).
    n_, c_, h_, w_ = a.shape
    cp = out.shape[3]
    a1 = a.ravel()
    o1 = out.ravel()
    for t in prange(n_ * h_):
        n = t // h_
        h = t % h_
        for c0 in range(0, cp, period):
            for c in range(c_):
                src = (n * c_ + c) * h_ * w_ + h * w_
                for w in range(w_):
                    o1[U((t * w_ + w) * cp + c0 + c)] = a1[U(src + w)]
            for w in range(w_):
                for c in range(c0 + c_, c0 + period):
                    o1[U((t * w_ + w) * cp + c)] = 0
    return out


C16 = 16  # output channels of the few-channel grad-weight kernel (one float32 zmm)
G16 = 4  # groups of 4 run rows per register block: 16 rows x 16 channels in 16 zmm
RUN16 = 4 * G16  # run rows per block
ACC16 = G16 * 64


@njit(**PARALLEL)
def conv_grad_weight_c16(x1, xw, hp_, xbase, dy4, part, dh):
    """part[t] (kH, Rp, 16) = sum over the output pixels m of chunk t of
    x-run(m, kh)[r] * dy[m, o], for C_out <= 16 (float32).

    ``x1`` is x zero-padded NHWC and flattened, rows of length ``xw`` = Wp*C_in, ``hp_`` rows
    per image, with at least RUN16 spare elements at the end; ``xbase[m]`` is the offset of
    pixel m's run in kernel row 0. ``dy4`` (M, 64) is dy in NHWC with its 16 (zero-padded)
    channels repeated 4 times (``nchw_to_nhwc_padded`` with period 16). Rows r >= R of part
    (Rp = R rounded up to RUN16) are unspecified. The caller sums part over t in order
    (deterministic for any thread count).
    """
    # Loop order: one task per (pixel chunk, kernel row), owning part[t, kh]. Inside: blocks of
    # RUN16 run rows, the chunk's pixels, then G16 groups of 64 lanes = 4 run rows x 16
    # channels each: lanes 16j..16j+15 take run row 4g + j, so each group is one 64-lane loop
    # over the repeated dy row with a per-quarter broadcast. (Written as a 16-lane loop, LLVM
    # unrolls it into scalar FMAs.)
    t_, kh_, rp, _ = part.shape
    m_ = dy4.shape[0]
    d1 = dy4.ravel()
    p1 = part.ravel()
    for task in prange(t_ * kh_):
        t = task // kh_
        kh = task % kh_
        pb = task * rp * C16
        acc = stack_array(ACC16, part.dtype)
        koff = kh * dh * xw
        for r0 in range(0, rp, RUN16):
            for i in range(ACC16):
                acc[i] = 0
            for m in range(t * m_ // t_, (t + 1) * m_ // t_):
                xb = xbase[U(m)] + koff + r0
                for g in range(G16):
                    a0 = x1[U(xb + 4 * g)]
                    a1 = x1[U(xb + 4 * g + 1)]
                    a2 = x1[U(xb + 4 * g + 2)]
                    a3 = x1[U(xb + 4 * g + 3)]
                    for lane in range(64):
                        v = a0 if lane < 16 else (a1 if lane < 32 else (a2 if lane < 48 else a3))
                        acc[U(g * 64 + lane)] += v * d1[U(m * 64 + lane)]
            for i in range(ACC16):
                p1[U(pb + r0 * C16 + i)] = acc[U(i)]
    return part


# ----------------------------------------------------------- 256-bit register blocks (AVX2)

VOB = 6  # output columns per block of the explicit-vector forward kernel
VNV = 2  # vectors of output channels per block: 6 x 2 accumulators + 2 weights + 1 broadcast


def _make_forward_vec(lanes):
    """:func:`conv_forward_direct` with an explicit VOB x (VNV*lanes) block of ``lanes``-wide
    vectors (``_simd``), for CPUs without AVX-512; Cp must be a multiple of VNV*lanes."""
    vc = VNV * lanes  # output channels per block
    nacc = VOB * vc

    @njit(**PARALLEL)
    def conv_forward_direct_vec(xp2, wk, bias, y1, ys, co_, ho, wo, c_in, sh, sw, dh, x0):
        """The contract of :func:`conv_forward_direct` (the same result up to rounding)."""
        # Loop order: as conv_forward_direct, with VOB columns x vc channels per block: per run
        # element r, two weight vectors are loaded once and used by all VOB columns, each
        # column broadcasting its one input value (12 FMAs per 2 loads + 6 broadcasts).
        n_, hp_, xw = xp2.shape
        kh_, r_, cp = wk.shape
        y0, ysn, ysc, ysh, ysw = ys[0], ys[1], ys[2], ys[3], ys[4]
        x1 = xp2.ravel()
        w1 = wk.ravel()
        # Blocks of VOB columns, the last shifted left to end at W_out; rows narrower than VOB
        # run as one block of ``wo`` columns, the unused columns reading column 0.
        nblk = (wo + VOB - 1) // VOB if wo >= VOB else 1
        step = sw * c_in
        for t in prange(n_ * ho):
            n = t // ho
            oh = t % ho
            row = np.empty(max(wo, VOB) * cp, dtype=y1.dtype)
            acc = stack_array(nacc, y1.dtype)
            for cb in range(0, cp, vc):
                for ob in range(nblk):
                    ow0 = min(ob * VOB, wo - VOB) if wo >= VOB else 0
                    for i in range(VOB * VNV):
                        vstore(acc, i * lanes, vzero(acc))
                    for kh in range(kh_):
                        xb = x0 + (n * hp_ + oh * sh + kh * dh) * xw + ow0 * step
                        wb = kh * r_ * cp + cb
                        for r in range(r_):
                            wa = vload(w1, U(wb + r * cp))
                            wz = vload(w1, U(wb + r * cp + lanes))
                            for c in range(VOB):
                                cc = c if wo >= VOB or c < wo else 0
                                xv = vsplat(x1[U(xb + cc * step + r)])
                                k = 2 * c * lanes
                                vstore(acc, k, vfma(xv, wa, vload(acc, k)))
                                vstore(acc, k + lanes, vfma(xv, wz, vload(acc, k + lanes)))
                    for c in range(VOB):
                        for o in range(vc):
                            row[U((ow0 + c) * cp + cb + o)] = acc[U(c * vc + o)] + bias[U(cb + o)]
            for co in range(co_):
                dst = y0 + n * ysn + co * ysc + oh * ysh
                for ow in range(wo):
                    y1[U(dst + ow * ysw)] = row[U(ow * cp + co)]
        return y1

    return conv_forward_direct_vec


conv_forward_direct_vec32 = _make_forward_vec(8)
conv_forward_direct_vec64 = _make_forward_vec(4)


def _make_grad_weight_vec(lanes):
    """:func:`conv_grad_weight_direct` with an explicit VOB run-row x (VNV*lanes) channel
    block of ``lanes``-wide vectors, for CPUs without AVX-512; Cp must be a multiple of
    VNV*lanes."""
    vc = VNV * lanes
    nacc = VOB * vc

    @njit(**PARALLEL)
    def conv_grad_weight_direct_vec(xp2, dyb, xbase, part, c_in, dh):
        """The contract of :func:`conv_grad_weight_direct` (same result up to rounding: the same
        sums over the same pixel chunks), but dy comes in channel blocks: ``dyb`` (Cp/vc, M, vc)
        from :func:`nchw_to_channel_blocks`, so that one task's dy is one contiguous stream
        (15 % faster on shape F than rows of Cp)."""
        # Loop order: one task per (pixel chunk, kernel row, channel block), owning
        # part[t, kh, :, cb:cb+vc]; sub-chunks of MCHUNK pixels, then blocks of VOB run rows,
        # then the pixels: two dy vectors loaded once for VOB broadcasts of x (12 FMAs). The
        # last, partial block of run rows recomputes rows of the one before it (same result,
        # written once).
        n_, hp_, xw = xp2.shape
        t_, kh_, r_, cp = part.shape
        m_ = dyb.shape[1]
        x1 = xp2.ravel()
        d1 = dyb.ravel()
        p1 = part.ravel()
        ncb = cp // vc
        nrb = (r_ + VOB - 1) // VOB
        for task in prange(t_ * kh_ * ncb):
            t = task // (kh_ * ncb)
            kh = (task // ncb) % kh_
            cb = task % ncb * vc
            pb = (t * kh_ + kh) * r_ * cp + cb
            acc = stack_array(nacc, part.dtype)
            for r in range(r_):
                for o in range(vc):
                    p1[U(pb + r * cp + o)] = 0
            koff = kh * dh * xw
            for m0 in range(t * m_ // t_, (t + 1) * m_ // t_, MCHUNK):
                m1 = min(m0 + MCHUNK, (t + 1) * m_ // t_)
                for rb in range(nrb):
                    r0 = min(rb * VOB, r_ - VOB) if r_ >= VOB else 0
                    for i in range(VOB * VNV):
                        vstore(acc, i * lanes, vzero(acc))
                    for m in range(m0, m1):
                        xb = xbase[U(m)] + koff + r0
                        da = vload(d1, U(cb * m_ + m * vc))  # block cb // vc, pixel m
                        dz = vload(d1, U(cb * m_ + m * vc + lanes))
                        for c in range(VOB):
                            cc = c if r_ >= VOB or c < r_ else 0
                            xv = vsplat(x1[U(xb + cc)])
                            k = 2 * c * lanes
                            vstore(acc, k, vfma(xv, da, vload(acc, k)))
                            vstore(acc, k + lanes, vfma(xv, dz, vload(acc, k + lanes)))
                    # rows this block shares with the previous one were added there already
                    first = 0 if rb * VOB == r0 else rb * VOB - r0
                    for c in range(first, min(VOB, r_)):
                        wb = pb + (r0 + c) * cp
                        for o in range(vc):
                            p1[U(wb + o)] += acc[U(c * vc + o)]
        return part

    return conv_grad_weight_direct_vec


conv_grad_weight_direct_vec32 = _make_grad_weight_vec(8)
conv_grad_weight_direct_vec64 = _make_grad_weight_vec(4)


@njit(**PARALLEL)
def nchw_to_channel_blocks(a, out):
    """out[b, n, h, w, o] = a[n, b*B + o, h, w] for B = out.shape[4] (0 past C): NHWC in
    blocks of B channels, each block contiguous over all pixels. a (N, C, H, W) NCHW; out
    (ceil(C/B), N, H, W, B)."""
    # Loop order: one task per image row (n, h), owning out[:, n, h]; blocks, columns, then
    # the block's channels: contiguous writes, reads strided across C planes of one row.
    n_, c_, h_, w_ = a.shape
    nb, vb = out.shape[0], out.shape[4]
    a1 = a.ravel()
    o1 = out.ravel()
    for t in prange(n_ * h_):
        n = t // h_
        h = t % h_
        for b in range(nb):
            dst = ((b * n_ + n) * h_ + h) * w_ * vb
            for w in range(w_):
                for o in range(vb):
                    c = b * vb + o
                    o1[U(dst + w * vb + o)] = a1[U(((n * c_ + c) * h_ + h) * w_ + w)] \
                        if c < c_ else 0
    return out
