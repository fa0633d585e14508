"""Numba conv2d kernels, generic: every stride, padding, dilation and group count.

The kernels trust their arguments (``fastconv._validate`` checked every shape and size; bounds
checks are off). Internal layouts, chosen so the innermost loop runs over contiguous memory:

* ``xp``  (N, Hp, Wp, C_in)  the input in NHWC, zero-padded once (no branch in any inner loop);
  ``Hp = (H_out - 1) * stride + dilation * (kH - 1) + 1`` (likewise Wp), so trailing rows that no
  window reaches are simply not copied.
* ``wr``  (G, kH, kW, C_in/G, C_out/G)  the weight with output channels innermost.
* ``dyt`` (N, H_out, W_out, C_out)  dy in NHWC.

Arrays are indexed through flat 1-D views with unsigned indices (``U``), which keeps LLVM's
loads contiguous (see ``_options``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._options import PARALLEL, U
from ._stack import stack_array

TB = 16  # pad_nhwc's transpose tile: TB channels x TB columns
TT = TB * TB


@njit(**PARALLEL)
def pad_nhwc(x, xp, pt, pl):
    """xp[n, pt + h, pl + w, c] = x[n, c, h, w]; the rest of xp (the padding) = 0."""
    # Loop order: one task per padded row (n, hp); inside, TB x TB (channel, column) tiles: TB
    # contiguous reads of x per channel into a stack tile, then TB contiguous writes per column
    # (faster than channel-outer loops with strided writes on F's input); the
    # channel and column tails one element at a time.
    n_, c_, h_, w_ = x.shape
    hp_, wp_ = xp.shape[1], xp.shape[2]
    wmax = min(w_, wp_ - pl)
    x1 = x.ravel()
    xp1 = xp.ravel()
    for t in prange(n_ * hp_):
        n = t // hp_
        h = t % hp_ - pt
        row = t * wp_ * c_
        if h < 0 or h >= h_:
            for i in range(wp_ * c_):
                xp1[U(row + i)] = 0
            continue
        for i in range(pl * c_):
            xp1[U(row + i)] = 0
        for i in range((pl + wmax) * c_, wp_ * c_):
            xp1[U(row + i)] = 0
        src = (n * c_ * h_ + h) * w_
        dst = row + pl * c_
        tile = stack_array(TT, x.dtype)
        cfull = c_ // TB * TB
        wfull = wmax // TB * TB
        for c0 in range(0, cfull, TB):
            for w0 in range(0, wfull, TB):
                for c in range(TB):
                    for w in range(TB):
                        tile[w * TB + c] = x1[U(src + (c0 + c) * h_ * w_ + w0 + w)]
                for w in range(TB):
                    for c in range(TB):
                        xp1[U(dst + (w0 + w) * c_ + c0 + c)] = tile[w * TB + c]
            for w in range(wfull, wmax):
                for c in range(c0, c0 + TB):
                    xp1[U(dst + w * c_ + c)] = x1[U(src + c * h_ * w_ + w)]
        for c in range(cfull, c_):
            for w in range(wmax):
                xp1[U(dst + w * c_ + c)] = x1[U(src + c * h_ * w_ + w)]
    return xp


@njit(**PARALLEL)
def nchw_to_nhwc(a, out):
    """out[n, h, w, c] = a[n, c, h, w]."""
    # Loop order: one task per (n, h) row; c outer, w inner: contiguous reads, strided writes
    # within one output row (in L1).
    n_, c_, h_, w_ = a.shape
    a1 = a.ravel()
    o1 = out.ravel()
    for t in prange(n_ * h_):
        n = t // h_
        h = t % h_
        for c in range(c_):
            src = (n * c_ + c) * h_ * w_ + h * w_
            for w in range(w_):
                o1[U(t * w_ * c_ + w * c_ + c)] = a1[U(src + w)]
    return out


@njit(**PARALLEL)
def crop_nhwc_to_nchw(xp, out, pt, pl):
    """out[n, c, h, w] = xp[n, pt + h, pl + w, c] for the rows/columns xp holds, else 0."""
    # Loop order: one task per (n, c) plane; h, w inner: contiguous writes, strided reads.
    n_, c_, h_, w_ = out.shape
    hp_, wp_ = xp.shape[1], xp.shape[2]
    hmax = min(h_, hp_ - pt)
    wmax = min(w_, wp_ - pl)
    x1 = xp.ravel()
    o1 = out.ravel()
    for t in prange(n_ * c_):
        n = t // c_
        c = t % c_
        for h in range(h_):
            dst = (t * h_ + h) * w_
            if h >= hmax:
                for w in range(w_):
                    o1[U(dst + w)] = 0
                continue
            src = ((n * hp_ + pt + h) * wp_ + pl) * c_ + c
            for w in range(wmax):
                o1[U(dst + w)] = x1[U(src + w * c_)]
            for w in range(wmax, w_):
                o1[U(dst + w)] = 0
    return out


@njit(**PARALLEL)
def conv_forward_generic(xp, wr, b, y, sh, sw, dil_h, dil_w):
    """y (N, C_out, H_out, W_out) = conv(xp, wr) + b, any stride/dilation/groups."""
    # Loop order: one task per output row (n, oh), owning y[n, :, oh, :]. Inside: ow, group,
    # kernel taps, input channel, and innermost the group's output channels (contiguous in wr
    # and in the row buffer) so LLVM vectorizes the multiply-add over output channels.
    n_, hp_, wp_, c_ = xp.shape
    g_, kh_, kw_, cg, og = wr.shape
    co_ = g_ * og
    ho, wo = y.shape[2], y.shape[3]
    x1 = xp.ravel()
    w1 = wr.ravel()
    y1 = y.ravel()
    for t in prange(n_ * ho):
        n = t // ho
        oh = t % ho
        buf = np.empty(wo * co_, dtype=y.dtype)
        for ow in range(wo):
            for g in range(g_):
                base = ow * co_ + g * og
                for o in range(og):
                    buf[U(base + o)] = b[U(g * og + o)]
                for kh in range(kh_):
                    xrow = ((n * hp_ + oh * sh + kh * dil_h) * wp_ + ow * sw) * c_ + g * cg
                    for kw in range(kw_):
                        xo = xrow + kw * dil_w * c_
                        wo_ = ((g * kh_ + kh) * kw_ + kw) * cg * og
                        for ci in range(cg):
                            xv = x1[U(xo + ci)]
                            wb = wo_ + ci * og
                            for o in range(og):
                                buf[U(base + o)] += xv * w1[U(wb + o)]
        for co in range(co_):
            dst = ((n * co_ + co) * ho + oh) * wo
            for ow in range(wo):
                y1[U(dst + ow)] = buf[U(ow * co_ + co)]
    return y


@njit(**PARALLEL)
def conv_grad_input_generic(dyt, wr, dxp, sh, sw, dil_h, dil_w):
    """dxp (N, Hp, Wp, C_in), zeroed by the caller, += the transposed convolution of dyt."""
    # Loop order: one task per image n, owning dxp[n] (windows of one image overlap, so finer
    # tasks would race). Inside: output pixel, group, taps, input channel, and innermost a dot
    # product over the group's output channels (contiguous in dyt and wr).
    n_, hp_, wp_, c_ = dxp.shape
    g_, kh_, kw_, cg, og = wr.shape
    co_ = g_ * og
    ho, wo = dyt.shape[1], dyt.shape[2]
    d1 = dyt.ravel()
    w1 = wr.ravel()
    x1 = dxp.ravel()
    for n in prange(n_):
        for oh in range(ho):
            for ow in range(wo):
                dyo = ((n * ho + oh) * wo + ow) * co_
                for g in range(g_):
                    for kh in range(kh_):
                        xrow = ((n * hp_ + oh * sh + kh * dil_h) * wp_ + ow * sw) * c_ + g * cg
                        for kw in range(kw_):
                            xo = xrow + kw * dil_w * c_
                            wo_ = ((g * kh_ + kh) * kw_ + kw) * cg * og
                            for ci in range(cg):
                                wb = wo_ + ci * og
                                s = x1[U(xo + ci)]
                                for o in range(og):
                                    s += d1[U(dyo + g * og + o)] * w1[U(wb + o)]
                                x1[U(xo + ci)] = s
    return dxp


@njit(**PARALLEL)
def conv_grad_weight_generic(xp, dyt, part, partb, sh, sw, dil_h, dil_w):
    """Per-chunk partial sums: part[t] (G, kH, kW, C_in/G, C_out/G) and partb[t] (C_out,).

    Chunk t covers images [t*N//T, (t+1)*N//T); the caller zeroes part/partb and sums over t
    serially, so the result does not depend on the thread count.
    """
    # Loop order: one task per chunk of images, owning part[t]. Inside: image, output pixel,
    # group, taps, input channel, and innermost the group's output channels (contiguous in dyt
    # and part): an outer-product update vectorized over output channels.
    n_, hp_, wp_, c_ = xp.shape
    t_, g_, kh_, kw_, cg, og = part.shape
    co_ = g_ * og
    ho, wo = dyt.shape[1], dyt.shape[2]
    x1 = xp.ravel()
    d1 = dyt.ravel()
    for t in prange(t_):
        p1 = part[t].ravel()
        pb = partb[t]
        for n in range(t * n_ // t_, (t + 1) * n_ // t_):
            for oh in range(ho):
                for ow in range(wo):
                    dyo = ((n * ho + oh) * wo + ow) * co_
                    for o in range(co_):
                        pb[U(o)] += d1[U(dyo + o)]
                    for g in range(g_):
                        for kh in range(kh_):
                            xrow = ((n * hp_ + oh * sh + kh * dil_h) * wp_ + ow * sw) * c_ + g * cg
                            for kw in range(kw_):
                                xo = xrow + kw * dil_w * c_
                                po = ((g * kh_ + kh) * kw_ + kw) * cg * og
                                for ci in range(cg):
                                    xv = x1[U(xo + ci)]
                                    pbse = po + ci * og
                                    for o in range(og):
                                        p1[U(pbse + o)] += xv * d1[U(dyo + g * og + o)]
    return part
