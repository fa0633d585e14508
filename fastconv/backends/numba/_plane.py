"""conv2d kernels for few channels (the first layers: C_in = 1, or C_out < 32), stride 1, groups 1.

With stride 1, output pixel (oh, ow) reads input (oh + kh*dil_h, ow + kw*dil_w). In a zero-padded
input plane of width ``Wp = W_out + dil_w*(kW-1)``, the output position ``q = oh*Wp + ow`` reads
``q + kh*dil_h*Wp + kw*dil_w``: every tap is a constant shift of one flat index. So the kernels
vectorize over ``LANES`` consecutive q (a few columns per row, ``dil_w*(kW-1)`` of every ``Wp``, are
computed and dropped), which needs neither many input nor many output channels.

Layouts: ``xp`` (N, C_in, Hx, Wp), zero-padded, with enough rows below that the last block of
lanes reads inside its plane; weights ``wt`` (C_in, kH, kW, Cp), output channels innermost,
zero-padded to a multiple of ``PCB``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._options import PARALLEL, U
from ._simd import LANES as VECTOR_LANES
from ._simd import vfma, vload, vsplat, vstore, vzero
from ._stack import prefer_wide_vectors, stack_array

LANES = 128  # the widest block of consecutive output positions (rows to spare in xp)
FEW_LANES, FEW_PCB = 128, 2  # fewer than PCB output channels (faster than 64 x 4 there)
PCB = 8  # output channels per register block of the main float32 variant
PCB64 = 4  # ... of the float64 variant


@njit(**PARALLEL)
def pad_plane(x, xp, pt, pl, sums):
    """xp[n, c, pt + h, pl + w] = x[n, c, h, w] where it fits; the rest of xp = 0.

    Unless ``sums`` is empty, also sums[n*C + c] = the sum of plane x[n, c] (db on the way,
    when x is dy)."""
    # Loop order: one task per (n, c) plane; rows, then contiguous columns (the plane's sum
    # after the copy, from cache).
    n_, c_, h_, w_ = x.shape
    hx, wp = xp.shape[2], xp.shape[3]
    wmax = min(w_, wp - pl)
    x1 = x.ravel()
    o1 = xp.ravel()
    for t in prange(n_ * c_):
        for r in range(hx):
            dst = (t * hx + r) * wp
            h = r - pt
            if h < 0 or h >= h_:
                for j in range(wp):
                    o1[U(dst + j)] = 0
                continue
            src = (t * h_ + h) * w_
            for j in range(pl):
                o1[U(dst + j)] = 0
            for j in range(wmax):
                o1[U(dst + pl + j)] = x1[U(src + j)]
            for j in range(pl + wmax, wp):
                o1[U(dst + j)] = 0
        if sums.shape[0] > 0:
            acc = x1[U(t * h_ * w_)]
            for i in range(1, h_ * w_):
                acc += x1[U(t * h_ * w_ + i)]
            sums[t] = acc
    return xp


def _make_forward(lanes, pcb, vector_lanes=0):
    """The plane forward kernel with a ``pcb`` channel x ``lanes`` position register block (the
    sizes are closure constants: each variant is compiled, and cached, once per dtype).

    ``vector_lanes`` > 0: the block is written in explicit vectors of that many lanes
    (``_simd``, for CPUs without AVX-512, where the LLVM-vectorized blocks spill), lanes
    a multiple of it; else LLVM vectorizes the lane loop."""
    pacc = pcb * lanes
    nv = lanes // vector_lanes if vector_lanes else 0  # vectors of positions per channel

    @njit(**PARALLEL)
    def conv_forward_plane(xp, wt, bias, y, dil_h, dil_w):
        """y (N, C_out, H_out, W_out) = conv(xp, wt) + bias[:C_out], stride 1; C_out <= Cp."""
        # Loop order: one task per (image, block of lanes output positions), owning those pixels of
        # every output channel. Inside: channel block, input channel, taps, then the pcb x lanes
        # block: one broadcast weight per channel, FMA with lanes contiguous inputs (in vectors:
        # the nv input vectors loaded once per tap for all pcb channels). The block is written
        # row segment by row segment into the NCHW output (no per-element division).
        n_, c_, hx, wp = xp.shape
        kh_, kw_, cp = wt.shape[1], wt.shape[2], wt.shape[3]
        co_, ho, wo = y.shape[1], y.shape[2], y.shape[3]
        plane = hx * wp
        nq = (ho * wp + lanes - 1) // lanes
        x1 = xp.ravel()
        w1 = wt.ravel()
        y1 = y.ravel()
        for t in prange(n_ * nq):
            n = t // nq
            q0 = (t % nq) * lanes
            acc = stack_array(pacc, y.dtype)
            xs = stack_array(lanes, y.dtype)  # the tap's input vectors (vector_lanes only)
            oh0 = q0 // wp
            oh1 = min((q0 + lanes - 1) // wp, ho - 1)
            for cb in range(0, cp, pcb):
                for i in range(pacc):
                    acc[i] = 0
                for ci in range(c_):
                    xb = (n * c_ + ci) * plane + q0
                    for kh in range(kh_):
                        for kw in range(kw_):
                            xo = xb + kh * dil_h * wp + kw * dil_w
                            wb = ((ci * kh_ + kh) * kw_ + kw) * cp + cb
                            if vector_lanes:
                                for v in range(nv):
                                    k = v * vector_lanes
                                    vstore(xs, k, vload(x1, U(xo + k)))
                                for co in range(pcb):
                                    wv = vsplat(w1[U(wb + co)])
                                    for v in range(nv):
                                        k = co * lanes + v * vector_lanes
                                        vstore(acc, k, vfma(wv, vload(xs, v * vector_lanes),
                                                            vload(acc, k)))
                            else:
                                for co in range(pcb):
                                    wv = w1[U(wb + co)]
                                    for j in range(lanes):
                                        acc[U(co * lanes + j)] += wv * x1[U(xo + j)]
                for co in range(min(pcb, co_ - cb)):
                    bv = bias[U(cb + co)]
                    for oh in range(oh0, oh1 + 1):
                        a = max(0, q0 - oh * wp)
                        b = min(wo, q0 + lanes - oh * wp)
                        dst = ((n * co_ + cb + co) * ho + oh) * wo
                        src = co * lanes + oh * wp - q0
                        for ow in range(a, b):
                            y1[U(dst + ow)] = acc[U(src + ow)] + bv
        return y

    return conv_forward_plane


# float32, 8 channels x 48 positions (24 zmm accumulators): faster than 4 x 64 from 8 channels
# on.
conv_forward_plane = _make_forward(48, PCB)
# float32, 5 or 6 output channels (LeNet's first layer, and the grad-input of its second):
# 6 x 64 (24 zmm); faster than 2 x 128 on D's grad-input.
conv_forward_plane6 = _make_forward(64, 6)
# float32, other counts below 8 (grad-input of a first layer: one channel): 2 x 128.
conv_forward_plane_few = _make_forward(FEW_LANES, FEW_PCB)
# float64: 4 channels x 64 positions (32 zmm); the float32 blocks above spill there.
conv_forward_plane64 = _make_forward(64, PCB64)


# 256-bit blocks: 4 channels x 3 vectors (12 accumulators, 3 input vectors, 1 broadcast); 6 x 2
# for 5 or 6 channels (LeNet's first layer and the grad-input of its second: no padding
# channels); 2 x 5 for one or two channels (the grad-input of a first layer).
VEC_PCB, VEC_FEW_PCB = 4, 2
_L32, _L64 = VECTOR_LANES[np.dtype(np.float32)], VECTOR_LANES[np.dtype(np.float64)]
conv_forward_plane_vec32 = _make_forward(3 * _L32, VEC_PCB, _L32)
conv_forward_plane_vec32_6 = _make_forward(2 * _L32, 6, _L32)
conv_forward_plane_vec32_few = _make_forward(5 * _L32, VEC_FEW_PCB, _L32)
conv_forward_plane_vec64 = _make_forward(3 * _L64, VEC_PCB, _L64)


@njit(**PARALLEL)
def conv_grad_weight_plane(xp, dyq, part, dil_h, dil_w):
    """Per-chunk partial sums part[t] (C_out, C_in, kH, kW) of dw.

    ``dyq`` (N, C_out, H_out*Wp) is dy in the padded-width layout (zeros in the dropped
    columns). Chunk t covers images [t*N//T, (t+1)*N//T); the caller sums over t serially.
    """
    # Loop order: one task per chunk of images, owning part[t]. Inside: image, output channel,
    # input channel, taps, and innermost a dot product over the contiguous q of dy and of the
    # shifted input plane (vectorized as a reduction).
    n_, c_, hx, wp = xp.shape
    t_, co_, _, kh_, kw_ = part.shape
    q_ = dyq.shape[2]
    plane = hx * wp
    x1 = xp.ravel()
    d1 = dyq.ravel()
    for t in prange(t_):
        prefer_wide_vectors()
        p1 = part[t].ravel()
        for i in range(p1.shape[0]):
            p1[i] = 0
        zero = p1[0]  # a 0 of the array's dtype (a float64 literal would widen the dot)
        for n in range(t * n_ // t_, (t + 1) * n_ // t_):
            for co in range(co_):
                db = (n * co_ + co) * q_
                for ci in range(c_):
                    for kh in range(kh_):
                        for kw in range(kw_):
                            xo = (n * c_ + ci) * plane + kh * dil_h * wp + kw * dil_w
                            s = zero
                            for q in range(q_):
                                s += d1[U(db + q)] * x1[U(xo + q)]
                            p1[U(((co * c_ + ci) * kh_ + kh) * kw_ + kw)] += s
    return part


@njit(**PARALLEL)
def plane_sums(a, part):
    """part[t, c] = sum of a[n, c, :] over images n in chunk t; the caller sums part serially."""
    # Loop order: one task per chunk of images, owning part[t]; image, channel, contiguous plane.
    n_, c_, p_ = a.shape
    t_ = part.shape[0]
    a1 = a.ravel()
    for t in prange(t_):
        for c in range(c_):
            part[t, c] = 0
        zero = part[t, 0]
        for n in range(t * n_ // t_, (t + 1) * n_ // t_):
            for c in range(c_):
                s = zero
                for i in range(p_):
                    s += a1[U((n * c_ + c) * p_ + i)]
                part[t, c] += s
    return part


def _make_backward_fused(lanes):
    """The fused plane backward with a ``lanes``-position grad-input register block (a closure
    constant: each variant is compiled, and cached, once per dtype)."""

    @njit(**PARALLEL)
    def conv_backward_plane_fused(x, dy, wf, dx, pdw, pdb, pt, pl, dil_h, dil_w, hd, wd, hq, want):
        """dx, and per-chunk partial sums of dw and db, of a stride-1 conv in one pass over dy.

        ``wf`` (C_in, C_out, kH, kW) is the weight flipped in both taps. Layouts, per image:
        ``dyp`` (C_out, hd, wd) is dy placed at (ry, rx) = (dil_h*(kH-1), dil_w*(kW-1)) in zeros,
        with ``wd = W_out + 2*rx``; ``xq`` (C_in, hq, wd) is x placed at (ry + pt, rx + pl).
        Then dx[h, w] = sum of wf * dyp at flat ``(h + pt)*wd + w + pl`` shifted by each tap,
        dw[co, ci, kh, kw] = sum over q of dyp[co, q] * xq[ci, q + kh*dil_h*wd + kw*dil_w], and
        db = sum of dy. ``want`` = (dx, dw, db) flags. Chunk t of ``T = pdw.shape[0]`` covers
        images [t*N//T, (t+1)*N//T); the caller sums pdw and pdb over t in order, so the
        result does not depend on the thread count. Every sum is the exact product sum of the
        definition over the zero-padded planes, so x must be finite for dw (0 * inf).
        """
        # Loop order: one task per chunk of images, owning dx of those images and pdw[t],
        # pdb[t]. Per image: dy is copied once into its padded plane (summing db on the way)
        # and then read from cache by both products: grad-input as ``lanes`` consecutive flat
        # positions x one input channel (taps and output channels in the reduction loop,
        # broadcasting one weight), grad-weight as vectorized dot products over the plane.
        n_, c_in, h_, w_ = x.shape
        c_out, ho, wo = dy.shape[1], dy.shape[2], dy.shape[3]
        kh_, kw_ = wf.shape[2], wf.shape[3]
        t_ = pdw.shape[0]
        ry, rx = dil_h * (kh_ - 1), dil_w * (kw_ - 1)
        pd = hd * wd
        pq = hq * wd
        nq = (h_ * wd + lanes - 1) // lanes
        base = pt * wd + pl
        x1 = x.ravel()
        d1 = dy.ravel()
        w1 = wf.ravel()
        o1 = dx.ravel()
        for t in prange(t_):
            dyp = np.zeros(c_out * pd, dy.dtype)
            xq = np.zeros(c_in * pq, x.dtype)
            acc = stack_array(lanes, dy.dtype)
            pw1 = pdw[t].ravel()
            for i in range(pw1.shape[0]):
                pw1[i] = 0
            for co in range(c_out):
                pdb[t, co] = 0
            zero = pdb[t, 0]
            for n in range(t * n_ // t_, (t + 1) * n_ // t_):
                for co in range(c_out):
                    s = zero
                    for oh in range(ho):
                        src = ((n * c_out + co) * ho + oh) * wo
                        dst = co * pd + (ry + oh) * wd + rx
                        for ow in range(wo):
                            v = d1[U(src + ow)]
                            dyp[U(dst + ow)] = v
                            s += v
                    pdb[t, co] += s
                if want[0]:
                    for ci in range(c_in):
                        for qb in range(nq):
                            q0 = qb * lanes
                            for j in range(lanes):
                                acc[j] = 0
                            for co in range(c_out):
                                for kh in range(kh_):
                                    for kw in range(kw_):
                                        wv = w1[U(((ci * c_out + co) * kh_ + kh) * kw_ + kw)]
                                        src = co * pd + base + q0 + kh * dil_h * wd + kw * dil_w
                                        for j in range(lanes):
                                            acc[j] += wv * dyp[U(src + j)]
                            for h in range(q0 // wd, min((q0 + lanes - 1) // wd + 1, h_)):
                                a = max(0, q0 - h * wd)
                                b = min(w_, q0 + lanes - h * wd)
                                dst = ((n * c_in + ci) * h_ + h) * w_
                                for w in range(a, b):
                                    o1[U(dst + w)] = acc[U(h * wd + w - q0)]
                if want[1]:
                    for ci in range(c_in):
                        for h in range(h_):
                            src = ((n * c_in + ci) * h_ + h) * w_
                            dst = ci * pq + (ry + pt + h) * wd + rx + pl
                            for w in range(w_):
                                xq[U(dst + w)] = x1[U(src + w)]
                    for co in range(c_out):
                        for ci in range(c_in):
                            for kh in range(kh_):
                                kw = 0
                                while kw < kw_:  # up to 3 taps per pass: dy loaded once
                                    xo = ci * pq + kh * dil_h * wd + kw * dil_w
                                    at = ((co * c_in + ci) * kh_ + kh) * kw_ + kw
                                    s0 = zero
                                    s1 = zero
                                    s2 = zero
                                    if kw + 3 <= kw_:
                                        for q in range(ry * wd, (ry + ho) * wd):
                                            d = dyp[U(co * pd + q)]
                                            s0 += d * xq[U(xo + q)]
                                            s1 += d * xq[U(xo + dil_w + q)]
                                            s2 += d * xq[U(xo + 2 * dil_w + q)]
                                        pw1[U(at + 2)] += s2
                                        pw1[U(at + 1)] += s1
                                        kw += 3
                                    elif kw + 2 <= kw_:
                                        for q in range(ry * wd, (ry + ho) * wd):
                                            d = dyp[U(co * pd + q)]
                                            s0 += d * xq[U(xo + q)]
                                            s1 += d * xq[U(xo + dil_w + q)]
                                        pw1[U(at + 1)] += s1
                                        kw += 2
                                    else:
                                        for q in range(ry * wd, (ry + ho) * wd):
                                            s0 += dyp[U(co * pd + q)] * xq[U(xo + q)]
                                        kw += 1
                                    pw1[U(at)] += s0
        return dx

    return conv_backward_plane_fused


FUSED_LANES, FUSED_LANES64 = 128, 64  # 8 zmm accumulators of float32 / of float64
conv_backward_plane_fused = _make_backward_fused(FUSED_LANES)
conv_backward_plane_fused64 = _make_backward_fused(FUSED_LANES64)
