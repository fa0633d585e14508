"""conv2d kernels vectorized over 16 output channels (9 <= C_out <= 16, float32, stride 1,
groups 1): LeNet-5's second layer and its like, whose 10-column output rows and few input
channels leave the padded-plane kernels computing dropped columns.

Both passes hold one output channel per lane: 16 channels are one 16-lane vector where Numba
compiles for AVX-512, else two 8-lane vectors (``_simd``, 256-bit blocks that fit AVX2's 16
registers), with the weights zero-padded to 16 channels. One ``prange`` region per pass: the
forward owns one image per task; the backward owns a fixed chunk of images per task and
computes dx, dw and db of each image from one layout of its dy, so the result does not depend
on the thread count.

Per task, each image is copied once into scratch planes that are zero-padded so that no
register block tests a bound inside its tap loop:

* ``xs`` (C_in, Hp, WX): x placed at (pt, pl), zeros around and beyond; Hp = H_out +
  dil_h*(kH-1), WX wide enough for the last block of ``P`` output columns and of ``KWB`` taps.
* ``dyt`` (H_out, WT, 16): dy with its channels innermost, placed at column
  ``L = dil_w*(kW-1) - pl``, zeros left and right (dx reads it shifted by every tap).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba.extending import intrinsic

from ._options import PARALLEL, U
from ._simd import Vector, vfma, vload, vsplat, vstore
from ._stack import stack_array
from ._zmm import vload16, vsplat16

C16 = 16  # output channels per lane group (two 8-lane vectors)


@intrinsic
def vsum(typingctx, v):
    """The sum of the lanes of a float32 vector of 8 or 16 lanes (pairwise halving)."""
    if not isinstance(v, Vector) or v.lanes not in (8, 16):
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        undef = ir.Constant(x.type, ir.Undefined)
        n = sig.args[0].lanes
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(x, undef, ir.Constant(ir.VectorType(ir.IntType(32), n),
                                                              list(range(n))))
            hi = builder.shuffle_vector(x, undef, ir.Constant(ir.VectorType(ir.IntType(32), n),
                                                              list(range(n, 2 * n))))
            x = builder.fadd(lo, hi)
            undef = ir.Constant(x.type, ir.Undefined)
        return builder.extract_element(x, ir.Constant(ir.IntType(32), 0))

    return v.dtype(v), codegen


@njit(inline="always", **{k: v for k, v in PARALLEL.items() if k != "parallel"})
def _place_x(x1, xs, n, c_in, h_, w_, hp, wx, pt, pl):
    """xs[ci, pt + h, pl + w] = x[n, ci, h, w] (the zero border stays as it is)."""
    for ci in range(c_in):
        for h in range(h_):
            src = ((n * c_in + ci) * h_ + h) * w_
            dst = (ci * hp + pt + h) * wx + pl
            for w in range(w_):
                xs[U(dst + w)] = x1[U(src + w)]


def _ops(vw):
    """(load, splat) of ``vw``-lane float32 vectors (16: one AVX-512 register, 8: ``_simd``)."""
    return (vload16, vsplat16) if vw == 16 else (vload, vsplat)


def _make_forward(p_cols, vw):
    """The forward with a block of ``p_cols`` output columns x 16 channels in ``vw``-lane
    vectors (``16 // vw`` per column), closure constants."""
    nv = C16 // vw
    nacc = p_cols * C16
    ld, splat = _ops(vw)

    @njit(**PARALLEL)
    def conv_forward_c16(x, wf, bias, y, pt, pl, dil_h, dil_w, hp, wx):
        """y (N, C_out, H_out, W_out) = conv(x, w) + bias, stride 1, C_out <= 16.

        ``wf`` (C_in, kH, kW, 16): the weight, output channels innermost, zero beyond C_out;
        ``bias`` (16,), zero beyond C_out. ``hp``, ``wx``: the scratch plane's size."""
        # Loop order: one task per image; output row, block of p_cols columns (the last block
        # shifted left to end at W_out, recomputing a few columns), then input channel and
        # taps: the weight vectors loaded once per tap, one broadcast input per column. The
        # block is written transposed into NCHW from the stack.
        n_, c_in, h_, w_ = x.shape
        kh_, kw_ = wf.shape[1], wf.shape[2]
        c_out, ho, wo = y.shape[1], y.shape[2], y.shape[3]
        x1 = x.ravel()
        w1 = wf.ravel()
        y1 = y.ravel()
        for n in prange(n_):
            xs = np.zeros(c_in * hp * wx, x.dtype)
            _place_x(x1, xs, n, c_in, h_, w_, hp, wx, pt, pl)
            acc = stack_array(nacc, x.dtype)
            zero = splat(np.float32(0))
            for oh in range(ho):
                for cb in range(0, wo, p_cols):
                    ow0 = max(0, min(cb, wo - p_cols))
                    for i in range(p_cols * nv):
                        vstore(acc, i * vw, zero)
                    for ci in range(c_in):
                        for kh in range(kh_):
                            xr = (ci * hp + oh + kh * dil_h) * wx + ow0
                            for kw in range(kw_):
                                wb = ((ci * kh_ + kh) * kw_ + kw) * C16
                                xo = xr + kw * dil_w
                                for v in range(nv):
                                    wv = ld(w1, U(wb + v * vw))
                                    for j in range(p_cols):
                                        k = j * C16 + v * vw
                                        vstore(acc, k, vfma(splat(xs[U(xo + j)]), wv,
                                                            ld(acc, k)))
                    for co in range(c_out):
                        bv = bias[co]
                        dst = ((n * c_out + co) * ho + oh) * wo
                        for j in range(min(p_cols, wo - ow0)):
                            y1[U(dst + ow0 + j)] = acc[U(j * C16 + co)] + bv
        return y

    return conv_forward_c16


def _make_backward(p_cols, cib, kwb, vw):
    """The fused backward with closure-constant blocks: dx ``p_cols`` columns x ``cib`` input
    channels (one ``vw``-lane accumulator each, over the 16 output channels in 16 // vw
    parts, reduced over its lanes at the end), dw ``kwb`` taps of one row x 16 channels."""
    nv = C16 // vw
    ndx = p_cols * cib * vw
    ndw = kwb * C16
    ld, splat = _ops(vw)

    @njit(**PARALLEL)
    def conv_backward_c16(x, dy, wx_, dx, pdw, pdb, pt, pl, dil_h, dil_w, hp, wxs, wt, want):
        """dx, and per-chunk partial sums of dw and db, of a stride-1 conv with C_out <= 16.

        ``wx_`` (kH, kW, CIP, 16): w[co, ci, kh, kw] at [kh, kw, ci, co], zero beyond C_out and
        C_in (CIP = C_in rounded up to ``cib``). ``pdw`` (T, C_in, kH, KWP, 16): chunk t's dw
        (KWP = kW rounded up to ``kwb``; the padding taps are computed and dropped), ``pdb``
        (T, 16). Chunk t covers images [t*N//T, (t+1)*N//T). ``hp``, ``wxs``, ``wt``: the
        scratch sizes (module docstring). ``want`` = (dx, dw, db) flags; dx needs pt, pl at
        most the dilated kernel's reach."""
        # Loop order: one task per chunk of images, owning dx of its images, pdw[t], pdb[t].
        # Per image: dy transposed once into dyt (db summed on the way), x copied into xs.
        # dw: input channel, tap row, block of kwb taps, then every output pixel: the dy
        # vectors, one broadcast x per tap. dx: row, block of p_cols columns x cib input
        # channels, the tap rows that reach dy, taps, then the dy vectors times the weight
        # vectors of each channel; each accumulator is reduced over its lanes at the end.
        n_, c_in, h_, w_ = x.shape
        c_out, ho, wo = dy.shape[1], dy.shape[2], dy.shape[3]
        kh_, kw_, cip = wx_.shape[0], wx_.shape[1], wx_.shape[2]
        t_, kwp = pdw.shape[0], pdw.shape[3]
        lft = dil_w * (kw_ - 1) - pl
        x1 = x.ravel()
        d1 = dy.ravel()
        w1 = wx_.ravel()
        o1 = dx.ravel()
        for t in prange(t_):
            xs = np.zeros(c_in * hp * wxs, x.dtype)
            dyt = np.zeros(ho * wt * C16, x.dtype)
            pw1 = pdw[t].ravel()
            for i in range(pw1.shape[0]):
                pw1[i] = 0
            for co in range(C16):
                pdb[t, co] = 0
            acc = stack_array(ndw if ndw > ndx else ndx, x.dtype)
            zero = splat(np.float32(0))
            for n in range(t * n_ // t_, (t + 1) * n_ // t_):
                for co in range(c_out):
                    s = pdb[t, co] * 0
                    for oh in range(ho):
                        src = ((n * c_out + co) * ho + oh) * wo
                        dst = (oh * wt + lft) * C16 + co
                        for ow in range(wo):
                            v = d1[U(src + ow)]
                            dyt[U(dst + ow * C16)] = v
                            s += v
                    pdb[t, co] += s
                if want[1]:
                    _place_x(x1, xs, n, c_in, h_, w_, hp, wxs, pt, pl)
                    for ci in range(c_in):
                        for kh in range(kh_):
                            for kb in range(0, kwp, kwb):
                                for i in range(kwb * nv):
                                    vstore(acc, i * vw, zero)
                                for oh in range(ho):
                                    xr = (ci * hp + oh + kh * dil_h) * wxs + kb * dil_w
                                    dr = (oh * wt + lft) * C16
                                    for ow in range(wo):
                                        for v in range(nv):
                                            dv = ld(dyt, U(dr + ow * C16 + v * vw))
                                            for j in range(kwb):
                                                xv = splat(xs[U(xr + ow + j * dil_w)])
                                                k = j * C16 + v * vw
                                                vstore(acc, k, vfma(xv, dv, ld(acc, k)))
                                base = ((ci * kh_ + kh) * kwp + kb) * C16
                                for i in range(ndw):
                                    pw1[U(base + i)] += acc[i]
                if want[0]:
                    for h in range(h_):
                        for cb in range(0, w_, p_cols):
                            w0 = max(0, min(cb, w_ - p_cols))
                            for c0 in range(0, cip, cib):
                                for i in range(p_cols * cib):
                                    vstore(acc, i * vw, zero)
                                for kh in range(kh_):
                                    oh = h + pt - kh * dil_h
                                    if oh < 0 or oh >= ho:
                                        continue
                                    for kw in range(kw_):
                                        # dy column of dx column w0: w0 + pl - kw*dil_w + lft
                                        dr = (oh * wt + w0 + dil_w * (kw_ - 1 - kw)) * C16
                                        wb = ((kh * kw_ + kw) * cip + c0) * C16
                                        for v in range(nv):
                                            for c in range(cib):
                                                wv = ld(w1, U(wb + c * C16 + v * vw))
                                                for j in range(p_cols):
                                                    dv = ld(dyt, U(dr + j * C16 + v * vw))
                                                    k = (j * cib + c) * vw
                                                    vstore(acc, k, vfma(wv, dv, ld(acc, k)))
                                for c in range(min(cib, c_in - c0)):
                                    dst = ((n * c_in + c0 + c) * h_ + h) * w_ + w0
                                    for j in range(min(p_cols, w_ - w0)):
                                        o1[U(dst + j)] = vsum(ld(acc, (j * cib + c) * vw))
        return dx

    return conv_backward_c16


# Register blocks per vector width, as (forward columns, dx columns, dx input channels, dw
# taps). 8 lanes: at most 14 accumulators, so that they fit AVX2's 16 registers (10 x 16
# forward and 4 x 6 dx blocks were slower on Zen 4 as well). 16 lanes: 10 forward columns (10
# accumulators), the rest as the 8-lane blocks (not tuned further).
BLOCKS = {8: (5, 7, 2, 5), 16: (10, 7, 2, 5)}
KERNELS = {vw: (_make_forward(b[0], vw), _make_backward(*b[1:], vw)) for vw, b in BLOCKS.items()}
