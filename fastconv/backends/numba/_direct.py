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

The ``*_nchw`` kernels at the end are what the executor runs: the same register blocks, but
reading the unpadded NCHW input (and dy) as they are. Each task lays out the few input rows it
reads (zero-padded NHWC) in a buffer of its own, in cache, so no separate NCHW -> padded NHWC
pass streams the whole input through memory first (the forward, and dw in sub-chunks of about
MCHUNK pixels). The stride phases of dx keep one padded NHWC copy of dy: gathering dy's 128
channel rows per task and phase was slower than that one tiled pass.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._options import PARALLEL, U
from ._simd import vfma, vload, vsplat, vstore, vzero
from ._stack import stack_array
from ._zmm import vload16, vsplat16, vstore16

CB = 64  # output channels per register block (the padding unit of Cp)
OB = 4  # output columns per register block
ACC = OB * CB
RB = 6  # rows of the (kW*C_in) run per float32 grad-weight register block
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


# ----------------------------------------------------- forward straight from NCHW (no pad pass)


@njit(inline="always")
def _gather_rows(x, n, ih0, dh, pw, xl, wl, rows):
    """xl[i, j, c] = x[n, c, ih0 + i*dh, j - pw] for i < rows, j < wl, 0 outside x: input rows
    zero-padded and laid out NHWC (xl flat, at least rows*wl*C long)."""
    # Loop order: rows, channels, then columns: contiguous reads of one input row, writes
    # strided by C within the task's buffer (in L1/L2).
    _, c_, h_, w_ = x.shape
    lo = max(0, min(pw, wl))  # (negative padding: the rows start inside x)
    hi = max(lo, min(wl, pw + w_))
    for i in range(rows):
        ih = ih0 + i * dh
        base = i * wl * c_
        if ih < 0 or ih >= h_:
            for j in range(wl * c_):
                xl[U(base + j)] = 0
            continue
        for j in range(lo):
            for c in range(c_):
                xl[U(base + j * c_ + c)] = 0
        for j in range(hi, wl):
            for c in range(c_):
                xl[U(base + j * c_ + c)] = 0
        for c in range(c_):
            for j in range(lo, hi):
                xl[U(base + j * c_ + c)] = x[n, c, ih, j - pw]


@njit(**PARALLEL)
def conv_forward_direct_nchw(x, wk, bias, y1, ys, co_, ho, wo, sh, sw, dh, ph, pw):
    """y = conv(x, wk) + bias[:C_out] (C_out = ``co_``, output ho x wo), x NCHW (N, C_in, H, W)
    unpadded, padding (ph, pw) at the top and left (zeros past the bottom and right), unit
    column dilation; ``wk`` (kH, kW*C_in, Cp) as for :func:`conv_forward_direct`, whose
    register block, output addressing (``y1``, ``ys``: NCHW, or one stride phase of dx) and
    result this is. Each task lays out the kH input rows its output row reads (zero-padded
    NHWC, in cache) itself, so there is no separate pass over x."""
    # Loop order: one task per output row (n, oh): gather its input rows, then as
    # conv_forward_direct (channel block, column block of OB, kernel row, run, OB x CB block).
    n_, c_in = x.shape[:2]
    kh_, r_, cp = wk.shape
    y0, ysn, ysc, ysh, ysw = ys[0], ys[1], ys[2], ys[3], ys[4]
    wl = (wo - 1) * sw + r_ // c_in  # columns the windows of one output row read
    xw = wl * c_in
    w1 = wk.ravel()
    nblk = (wo + OB - 1) // OB if wo >= OB else 0
    nsingle = wo if wo < OB else 0
    for t in prange(n_ * ho):
        n = t // ho
        oh = t % ho
        xl = np.empty(kh_ * xw, dtype=y1.dtype)
        _gather_rows(x, n, oh * sh - ph, dh, pw, xl, wl, kh_)
        row = np.empty(wo * cp, dtype=y1.dtype)
        acc = stack_array(ACC, y1.dtype)
        for cb in range(0, cp, CB):
            for ob in range(nblk + nsingle):
                if ob < nblk:
                    ow0 = min(ob * OB, wo - OB)
                    for i in range(ACC):
                        acc[i] = 0
                    for kh in range(kh_):
                        xb = kh * xw + ow0 * sw * c_in
                        wb = kh * r_ * cp + cb
                        for r in range(r_):
                            for c in range(OB):
                                xv = xl[U(xb + c * sw * c_in + r)]
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
                        xb = kh * xw + ow0 * sw * c_in
                        wb = kh * r_ * cp + cb
                        for r in range(r_):
                            xv = xl[U(xb + r)]
                            for o in range(CB):
                                acc[U(o)] += xv * w1[U(wb + r * cp + o)]
                    for o in range(CB):
                        row[U(ow0 * cp + cb + o)] = acc[U(o)] + bias[U(cb + o)]
        for co in range(co_):
            dst = y0 + n * ysn + co * ysc + oh * ysh
            for ow in range(wo):
                y1[U(dst + ow * ysw)] = row[U(ow * cp + co)]
    return y1


def _make_forward_vec_nchw(lanes):
    """:func:`conv_forward_direct_nchw` with the explicit VOB x (VNV*lanes) block of
    ``conv_forward_direct_vec*`` (CPUs without AVX-512)."""
    vc = VNV * lanes
    nacc = VOB * vc

    @njit(**PARALLEL)
    def conv_forward_direct_vec_nchw(x, wk, bias, y1, ys, co_, ho, wo, sh, sw, dh, ph, pw):
        """The contract of :func:`conv_forward_direct_nchw` (Cp a multiple of VNV*lanes)."""
        # Loop order: one task per output row: gather its input rows, then as
        # conv_forward_direct_vec.
        n_, c_in = x.shape[:2]
        kh_, r_, cp = wk.shape
        y0, ysn, ysc, ysh, ysw = ys[0], ys[1], ys[2], ys[3], ys[4]
        wl = (wo - 1) * sw + r_ // c_in
        xw = wl * c_in
        w1 = wk.ravel()
        nblk = (wo + VOB - 1) // VOB if wo >= VOB else 1
        step = sw * c_in
        for t in prange(n_ * ho):
            n = t // ho
            oh = t % ho
            xl = np.empty(kh_ * xw, dtype=y1.dtype)
            _gather_rows(x, n, oh * sh - ph, dh, pw, xl, wl, kh_)
            row = np.empty(max(wo, VOB) * cp, dtype=y1.dtype)
            acc = stack_array(nacc, y1.dtype)
            for cb in range(0, cp, vc):
                for ob in range(nblk):
                    ow0 = min(ob * VOB, wo - VOB) if wo >= VOB else 0
                    for i in range(VOB * VNV):
                        vstore(acc, i * lanes, vzero(acc))
                    for kh in range(kh_):
                        xb = kh * xw + ow0 * step
                        wb = kh * r_ * cp + cb
                        for r in range(r_):
                            wa = vload(w1, U(wb + r * cp))
                            wz = vload(w1, U(wb + r * cp + lanes))
                            for c in range(VOB):
                                cc = c if wo >= VOB or c < wo else 0
                                xv = vsplat(xl[U(xb + cc * step + r)])
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

    return conv_forward_direct_vec_nchw


conv_forward_direct_vec32_nchw = _make_forward_vec_nchw(8)
conv_forward_direct_vec64_nchw = _make_forward_vec_nchw(4)


# ------------------------------------------------ grad-weight straight from NCHW (no pad passes)


@njit(inline="always")
def _gather_dy(dy, n, oh0, rows, dl, blk):
    """dl[b, p, o] = dy[n, b*blk + o, oh0 + p // W_out, p % W_out] for the rows*W_out pixels p
    of ``rows`` output rows (0 past C_out): dy laid out in blocks of ``blk`` channels, each
    block contiguous over the pixels (dl flat, at least ceil(C_out/blk)*rows*W_out*blk long)."""
    # Loop order: channels, then pixels: contiguous reads, writes strided by blk (in cache).
    co_, _, wo = dy.shape[1:]
    npix = rows * wo
    cp = (co_ + blk - 1) // blk * blk
    for co in range(cp):
        dst = (co // blk) * npix * blk + co % blk
        if co < co_:
            for r in range(rows):
                for ow in range(wo):
                    dl[U(dst + (r * wo + ow) * blk)] = dy[n, co, oh0 + r, ow]
        else:
            for q in range(npix):
                dl[U(dst + q * blk)] = 0


def _weight_sub_rows(wo):
    """Output rows per grad-weight sub-chunk: about MCHUNK pixels (that dy slab and its input
    rows stay in L2)."""
    return max(1, MCHUNK // wo)


def _make_grad_weight_nchw(rbk):
    """The grad-weight kernel from NCHW x and dy: register blocks of ``rbk`` run rows x CB
    channels as explicit 512-bit vectors (``_zmm``; written as a 64-lane loop, LLVM unrolled
    it into scalar FMAs here), for AVX-512; ``_make_grad_weight_vec_nchw``: 256-bit vectors."""
    blk = CB
    zl = blk // 4  # lanes per zmm vector: CB is four of them
    gacc = rbk * blk

    @njit(**PARALLEL)
    def conv_grad_weight_direct_nchw(x, dy, part, kw_, sh, sw, dh, ph, pw, sub):
        """part[t] (kH, Rp, Cp) = sum over the output pixels m of chunk t of
        x-run(m, kh)[r] * dy[m, :] for r < R = kW*C_in; Rp is R rounded up to rbk (rows past R
        are unspecified), Cp C_out rounded up to the channel block.

        x (N, C_in, H, W) and dy (N, C_out, H_out, W_out) NCHW; padding (ph, pw), unit column
        dilation. Chunk t covers output rows [t*NR//T, (t+1)*NR//T) of the NR = N*H_out rows;
        the caller sums part over t in order (the result does not depend on the thread
        count). Each task lays out its own input rows and dy (zero-padded NHWC, in cache) in
        sub-chunks of ``sub`` output rows, so there is no separate pass over x or dy.
        """
        # Loop order: one task per chunk, owning part[t]. Per sub-chunk (rows of one image):
        # gather its input rows and dy, then kernel row, channel block, blocks of rbk run
        # rows, then the sub-chunk's pixels: rbk broadcasts of x x one dy channel block,
        # accumulated in registers and added to part once per sub-chunk.
        n_, c_in, _, _ = x.shape
        co_, ho, wo = dy.shape[1:]
        t_, kh_, rp, cp = part.shape
        wl = (wo - 1) * sw + kw_
        xw = wl * c_in
        nr = n_ * ho
        ncb = cp // blk
        nrb = rp // rbk
        p1 = part.ravel()
        for t in prange(t_):
            pb = t * kh_ * rp * cp
            for i in range(kh_ * rp * cp):
                p1[U(pb + i)] = 0
            # rbk spare zeros at the end: the last run block of the last pixel reads past R
            xn = ((sub - 1) * sh + (kh_ - 1) * dh + 1) * xw
            xl = np.zeros(xn + rbk, dtype=x.dtype)
            dl = np.empty(ncb * sub * wo * blk, dtype=x.dtype)
            xo = np.empty(sub * wo, dtype=np.int64)
            acc = stack_array(gacc, part.dtype)
            g_lo = t * nr // t_
            g_hi = (t + 1) * nr // t_
            for g in range(g_lo, g_hi):
                n = g // ho
                oh0 = g % ho
                if (g - max(g_lo, g - oh0)) % sub:
                    continue  # sub-chunks start every ``sub`` rows, and at each image
                rows = min(sub, g_hi - g, ho - oh0)
                npix = rows * wo
                _gather_rows(x, n, oh0 * sh - ph, 1, pw, xl, wl,
                             (rows - 1) * sh + (kh_ - 1) * dh + 1)
                _gather_dy(dy, n, oh0, rows, dl, blk)
                for q in range(npix):  # pixel q's run in kernel row 0 of xl
                    xo[q] = (q // wo * sh * wl + q % wo * sw) * c_in
                for kh in range(kh_):
                    for cbi in range(ncb):
                        cb = cbi * blk
                        dbb = cbi * npix * blk
                        for rb in range(nrb):
                            r0 = rb * rbk
                            for i in range(gacc):
                                acc[i] = 0
                            xr = kh * dh * xw + r0
                            for q in range(npix):  # one flat loop: its accumulators stay
                                xb = xr + xo[U(q)]  # in registers
                                db = dbb + q * blk
                                d0 = vload16(dl, U(db))
                                d1 = vload16(dl, U(db + zl))
                                d2 = vload16(dl, U(db + 2 * zl))
                                d3 = vload16(dl, U(db + 3 * zl))
                                for c in range(rbk):
                                    xv = vsplat16(xl[U(xb + c)])
                                    k = c * blk
                                    vstore16(acc, k, vfma(xv, d0, vload16(acc, k)))
                                    vstore16(acc, k + zl, vfma(xv, d1, vload16(acc, k + zl)))
                                    vstore16(acc, k + 2 * zl,
                                             vfma(xv, d2, vload16(acc, k + 2 * zl)))
                                    vstore16(acc, k + 3 * zl,
                                             vfma(xv, d3, vload16(acc, k + 3 * zl)))
                            for c in range(rbk):  # constant bounds: acc stays in registers
                                wb = pb + (kh * rp + r0 + c) * cp + cb
                                for o in range(blk):
                                    p1[U(wb + o)] += acc[U(c * blk + o)]
        return part

    conv_grad_weight_direct_nchw.rbk = rbk  # run rows per block: part's Rp is a multiple
    return conv_grad_weight_direct_nchw


def _make_grad_weight_vec_nchw(lanes):
    """:func:`_make_grad_weight_nchw`'s kernel with VOB run rows x VNV vectors of ``lanes``
    (``_simd``), for CPUs without AVX-512."""
    rbk = VOB
    ln = lanes
    blk = VNV * ln
    gacc = rbk * blk

    @njit(**PARALLEL)
    def conv_grad_weight_direct_vec_nchw(x, dy, part, kw_, sh, sw, dh, ph, pw, sub):
        """The contract of the AVX-512 kernel. part[t] (kH, Rp, Cp) = sum over the output pixels m of chunk t of
        x-run(m, kh)[r] * dy[m, :] for r < R = kW*C_in; Rp is R rounded up to rbk (rows past R
        are unspecified), Cp C_out rounded up to the channel block.

        x (N, C_in, H, W) and dy (N, C_out, H_out, W_out) NCHW; padding (ph, pw), unit column
        dilation. Chunk t covers output rows [t*NR//T, (t+1)*NR//T) of the NR = N*H_out rows;
        the caller sums part over t in order (the result does not depend on the thread
        count). Each task lays out its own input rows and dy (zero-padded NHWC, in cache) in
        sub-chunks of ``sub`` output rows, so there is no separate pass over x or dy.
        """
        # Loop order: one task per chunk, owning part[t]. Per sub-chunk (rows of one image):
        # gather its input rows and dy, then kernel row, channel block, blocks of rbk run
        # rows, then the sub-chunk's pixels: rbk broadcasts of x x one dy channel block,
        # accumulated in registers and added to part once per sub-chunk.
        n_, c_in, _, _ = x.shape
        co_, ho, wo = dy.shape[1:]
        t_, kh_, rp, cp = part.shape
        wl = (wo - 1) * sw + kw_
        xw = wl * c_in
        nr = n_ * ho
        ncb = cp // blk
        nrb = rp // rbk
        p1 = part.ravel()
        for t in prange(t_):
            pb = t * kh_ * rp * cp
            for i in range(kh_ * rp * cp):
                p1[U(pb + i)] = 0
            # rbk spare zeros at the end: the last run block of the last pixel reads past R
            xn = ((sub - 1) * sh + (kh_ - 1) * dh + 1) * xw
            xl = np.zeros(xn + rbk, dtype=x.dtype)
            dl = np.empty(ncb * sub * wo * blk, dtype=x.dtype)
            xo = np.empty(sub * wo, dtype=np.int64)
            acc = stack_array(gacc, part.dtype)
            g_lo = t * nr // t_
            g_hi = (t + 1) * nr // t_
            for g in range(g_lo, g_hi):
                n = g // ho
                oh0 = g % ho
                if (g - max(g_lo, g - oh0)) % sub:
                    continue  # sub-chunks start every ``sub`` rows, and at each image
                rows = min(sub, g_hi - g, ho - oh0)
                npix = rows * wo
                _gather_rows(x, n, oh0 * sh - ph, 1, pw, xl, wl,
                             (rows - 1) * sh + (kh_ - 1) * dh + 1)
                _gather_dy(dy, n, oh0, rows, dl, blk)
                for q in range(npix):  # pixel q's run in kernel row 0 of xl
                    xo[q] = (q // wo * sh * wl + q % wo * sw) * c_in
                for kh in range(kh_):
                    for cbi in range(ncb):
                        cb = cbi * blk
                        dbb = cbi * npix * blk
                        for rb in range(nrb):
                            r0 = rb * rbk
                            for i in range(gacc):
                                acc[i] = 0
                            xr = kh * dh * xw + r0
                            for q in range(npix):  # one flat loop: its accumulators stay
                                xb = xr + xo[U(q)]  # in registers
                                db = dbb + q * blk
                                da = vload(dl, U(db))
                                dz = vload(dl, U(db + ln))
                                for c in range(rbk):
                                    xv = vsplat(xl[U(xb + c)])
                                    k = 2 * c * ln
                                    vstore(acc, k, vfma(xv, da, vload(acc, k)))
                                    vstore(acc, k + ln, vfma(xv, dz, vload(acc, k + ln)))
                            for c in range(rbk):  # constant bounds: acc stays in registers
                                wb = pb + (kh * rp + r0 + c) * cp + cb
                                for o in range(blk):
                                    p1[U(wb + o)] += acc[U(c * blk + o)]
        return part

    conv_grad_weight_direct_vec_nchw.rbk = rbk  # run rows per block: part's Rp is a multiple
    return conv_grad_weight_direct_vec_nchw


conv_grad_weight_direct_nchw = _make_grad_weight_nchw(RB)  # float32 only: 6 x 64
conv_grad_weight_direct_vec32_nchw = _make_grad_weight_vec_nchw(8)  # 6 x 16, 256-bit
conv_grad_weight_direct_vec64_nchw = _make_grad_weight_vec_nchw(4)  # 6 x 8
