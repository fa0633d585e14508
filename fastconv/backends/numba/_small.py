"""conv2d kernels vectorized over 16 output channels (9 <= C_out <= 16, float32, stride 1,
groups 1): LeNet-5's second layer and its like, whose 10-column output rows and few input
channels leave the padded-plane kernels computing dropped columns.

Both passes hold one output channel per lane: 16 channels are two 8-lane vectors (``_simd``,
two 256-bit registers; an AVX-512 core runs the same FLOPs per cycle on them), and the weights
are zero-padded to 16 channels. One ``prange`` region per pass: the forward owns one image per
task; the backward owns a fixed chunk of images per task and computes dx, dw and db of each
image from one layout of its dy, so the result does not depend on the thread count.

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
from numba import njit, prange, types
from numba.extending import intrinsic

from ._options import PARALLEL, U
from ._simd import Vector, vfma, vload, vsplat, vstore, vzero
from ._stack import stack_array

C16 = 16  # output channels per lane group (two 8-lane vectors)
VL = 8  # lanes of one float32 vector


@intrinsic
def vsum(typingctx, v):
    """The sum of the lanes of an 8-lane float32 vector (pairwise halving)."""
    if not isinstance(v, Vector) or v.lanes != 8:
        return None

    def codegen(context, builder, sig, args):
        x = args[0]
        undef = ir.Constant(x.type, ir.Undefined)
        n = 8
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


def _make_forward(p_cols):
    """The forward with a block of ``p_cols`` output columns x 16 channels (2*p_cols vector
    accumulators), a closure constant."""
    nacc = 2 * p_cols * VL

    @njit(**PARALLEL)
    def conv_forward_c16(x, wf, bias, y, pt, pl, dil_h, dil_w, hp, wx):
        """y (N, C_out, H_out, W_out) = conv(x, w) + bias, stride 1, C_out <= 16.

        ``wf`` (C_in, kH, kW, 16): the weight, output channels innermost, zero beyond C_out;
        ``bias`` (16,), zero beyond C_out. ``hp``, ``wx``: the scratch plane's size."""
        # Loop order: one task per image; output row, block of p_cols columns (the last block
        # shifted left to end at W_out, recomputing a few columns), then input channel and
        # taps: two weight vectors loaded per tap, one broadcast input per column. The block
        # is written transposed into NCHW from the stack.
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
            for oh in range(ho):
                for cb in range(0, wo, p_cols):
                    ow0 = max(0, min(cb, wo - p_cols))
                    for i in range(2 * p_cols):
                        vstore(acc, i * VL, vzero(acc))
                    for ci in range(c_in):
                        for kh in range(kh_):
                            xr = (ci * hp + oh + kh * dil_h) * wx + ow0
                            for kw in range(kw_):
                                wb = ((ci * kh_ + kh) * kw_ + kw) * C16
                                wlo = vload(w1, U(wb))
                                whi = vload(w1, U(wb + VL))
                                xo = xr + kw * dil_w
                                for j in range(p_cols):
                                    xv = vsplat(xs[U(xo + j)])
                                    k = 2 * j * VL
                                    vstore(acc, k, vfma(xv, wlo, vload(acc, k)))
                                    vstore(acc, k + VL, vfma(xv, whi, vload(acc, k + VL)))
                    for co in range(c_out):
                        bv = bias[co]
                        dst = ((n * c_out + co) * ho + oh) * wo
                        for j in range(min(p_cols, wo - ow0)):
                            y1[U(dst + ow0 + j)] = acc[U(j * C16 + co)] + bv
        return y

    return conv_forward_c16


def _make_backward(p_cols, cib, kwb):
    """The fused backward with closure-constant blocks: dx ``p_cols`` columns x ``cib`` input
    channels (one 8-lane accumulator each, reduced at the end), dw ``kwb`` taps of one row x
    16 channels."""
    ndx = p_cols * cib * VL
    ndw = 2 * kwb * VL

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
        # dw: input channel, tap row, block of kwb taps, then every output pixel: two dy
        # vectors, one broadcast x per tap. dx: row, the tap rows that reach dy, block of
        # p_cols columns x cib input channels, then taps and both dy vectors (weights
        # broadcast per channel as vectors over output channels); each accumulator is reduced
        # over its lanes at the end.
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
                                for i in range(2 * kwb):
                                    vstore(acc, i * VL, vzero(acc))
                                for oh in range(ho):
                                    xr = (ci * hp + oh + kh * dil_h) * wxs + kb * dil_w
                                    dr = (oh * wt + lft) * C16
                                    for ow in range(wo):
                                        dlo = vload(dyt, U(dr + ow * C16))
                                        dhi = vload(dyt, U(dr + ow * C16 + VL))
                                        for j in range(kwb):
                                            xv = vsplat(xs[U(xr + ow + j * dil_w)])
                                            k = 2 * j * VL
                                            vstore(acc, k, vfma(xv, dlo, vload(acc, k)))
                                            vstore(acc, k + VL, vfma(xv, dhi,
                                                                     vload(acc, k + VL)))
                                base = ((ci * kh_ + kh) * kwp + kb) * C16
                                for i in range(ndw):
                                    pw1[U(base + i)] += acc[i]
                if want[0]:
                    for h in range(h_):
                        for cb in range(0, w_, p_cols):
                            w0 = max(0, min(cb, w_ - p_cols))
                            for c0 in range(0, cip, cib):
                                for i in range(p_cols * cib):
                                    vstore(acc, i * VL, vzero(acc))
                                for kh in range(kh_):
                                    oh = h + pt - kh * dil_h
                                    if oh < 0 or oh >= ho:
                                        continue
                                    for kw in range(kw_):
                                        # dy column of dx column w0: w0 + pl - kw*dil_w + lft
                                        dr = (oh * wt + w0 + dil_w * (kw_ - 1 - kw)) * C16
                                        wb = ((kh * kw_ + kw) * cip + c0) * C16
                                        for half in range(2):
                                            for c in range(cib):
                                                wv = vload(w1, U(wb + c * C16 + half * VL))
                                                for j in range(p_cols):
                                                    dv = vload(dyt, U(dr + j * C16 + half * VL))
                                                    k = (j * cib + c) * VL
                                                    vstore(acc, k, vfma(wv, dv, vload(acc, k)))
                                for c in range(min(cib, c_in - c0)):
                                    dst = ((n * c_in + c0 + c) * h_ + h) * w_ + w0
                                    for j in range(min(p_cols, w_ - w0)):
                                        o1[U(dst + j)] = vsum(vload(acc, (j * cib + c) * VL))
        return dx

    return conv_backward_c16


# Blocks of at most 14 accumulators, so that the same kernels fit the 16 registers of an AVX2
# core: forward 5 columns x 16 channels (10), dx 7 columns x 2 input channels (14), dw 5 taps
# x 16 channels (10). Larger blocks (10 x 16 forward, 4 x 6 dx) were slower on Zen 4 too.
FWD_COLS, DX_COLS, DX_CHANNELS, DW_TAPS = 5, 7, 2, 5
conv_forward_c16 = _make_forward(FWD_COLS)
conv_backward_c16 = _make_backward(DX_COLS, DX_CHANNELS, DW_TAPS)
