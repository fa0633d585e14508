"""Numba max-pool kernels (NCHW), forward with PyTorch's exact indices, and backward.

The kernels trust their arguments: ``fastconv._validate`` checked the geometry and that every
index lies in ``[0, H*W)``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numba_options import PARALLEL, U
from ._numba_stack import prefer_wide_vectors


@njit(**PARALLEL)
def max_pool_forward(x, y, idx, h0, hn, w0, wn, dh, dw):
    """y, idx (N, C, H_out, W_out) = max and flat argmax (h*W + w) of each window.

    Window ``(oh, ow)`` covers rows ``h0[oh] + i*dh`` for ``i < hn[oh]`` and columns
    ``w0[ow] + j*dw`` for ``j < wn[ow]``: the taps inside the input, as PyTorch clips them
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
                    rowi = (hs + i * dh) * w_ + ws
                    for j in range(nw):
                        v = x1[U(src + rowi + j * dw)]
                        if v > best or np.isnan(v):
                            best = v
                            arg = rowi + j * dw
                y1[U(dst + oh * wo + ow)] = best
                i1[U(dst + oh * wo + ow)] = arg
    return y, idx


@njit(**PARALLEL)
def max_pool_forward_s2(x, y, idx, h0, hn, w0, jlo, jhi, kw_, pw, dh, dw):
    """:func:`max_pool_forward` for column stride 2 (same results), vectorized over ow.

    Window ``(oh, ow)`` covers rows ``h0[oh] + i*dh`` for ``i < hn[oh]`` and the columns
    ``ow*2 - pw + j*dw`` (j < kW) inside the input; tap column j is inside for
    ``jlo[j] <= ow < jhi[j]``. These are the taps PyTorch visits (padding is -inf, so padded
    taps never win), in the same row-major order. PyTorch's CPU rule, exactly: the argmax
    starts at the first in-bounds tap ``(h0[oh], w0[ow])``, and a tap replaces the running
    maximum when it is greater or NaN.
    """
    # Loop order: one task per (n, c) plane, owning its output plane. For each output row: tap
    # row i, tap column j, then every output column at once (the running max and argmax live in
    # the output row itself), so the innermost loop is a branch-free compare-and-select over
    # ow that LLVM vectorizes (the stride is a constant 2: shuffles, not gathers), and each
    # window still sees its taps in row-major order.
    n_, c_, h_, w_ = x.shape
    ho, wo = y.shape[2], y.shape[3]
    x1 = x.ravel()
    y1 = y.ravel()
    i1 = idx.ravel()
    for t in prange(n_ * c_):
        prefer_wide_vectors()
        src = t * h_ * w_
        for oh in range(ho):
            dst = (t * ho + oh) * wo
            first = h0[oh] * w_
            for ow in range(wo):
                y1[U(dst + ow)] = -np.inf
                i1[U(dst + ow)] = first + w0[ow]
            for i in range(hn[oh]):
                row = (h0[oh] + i * dh) * w_
                for j in range(kw_):
                    col = j * dw - pw
                    for ow in range(jlo[j], jhi[j]):
                        at = row + ow * 2 + col
                        v = x1[U(src + at)]
                        b = y1[U(dst + ow)]
                        a = i1[U(dst + ow)]
                        take = v > b or v != v
                        y1[U(dst + ow)] = v if take else b
                        i1[U(dst + ow)] = at if take else a
    return y, idx


@njit(**PARALLEL)
def max_pool_forward_k2s2(x, y, idx):
    """The 2x2, stride 2, no padding/dilation case of :func:`max_pool_forward` (same rule)."""
    # Loop order: one task per (n, c) plane; output row, then output column; the four window
    # elements in row-major order.
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
            for ow in range(wo):
                a = r0 + 2 * ow
                best = x1[U(a)]
                arg = 0
                v = x1[U(a + 1)]
                if v > best or np.isnan(v):
                    best = v
                    arg = 1
                v = x1[U(a + w_)]
                if v > best or np.isnan(v):
                    best = v
                    arg = w_
                v = x1[U(a + w_ + 1)]
                if v > best or np.isnan(v):
                    best = v
                    arg = w_ + 1
                y1[U(dst + oh * wo + ow)] = best
                i1[U(dst + oh * wo + ow)] = 2 * oh * w_ + 2 * ow + arg
    return y, idx


@njit(**PARALLEL)
def max_pool_backward(dy, idx, dx):
    """dx (N, C, H, W) = 0, then dx.plane[idx] += dy for every output element."""
    # Loop order: one task per (n, c) plane, owning its dx plane (windows overlap, so the
    # scatter-add stays inside one task): zero the plane (cache-hot for the scatter, and no
    # separate single-threaded memset), then the output elements in order.
    n_, c_, h_, w_ = dx.shape
    ho, wo = dy.shape[2], dy.shape[3]
    d1 = dy.ravel()
    i1 = idx.ravel()
    x1 = dx.ravel()
    for t in prange(n_ * c_):
        src = t * ho * wo
        dst = t * h_ * w_
        for j in range(h_ * w_):
            x1[U(dst + j)] = 0
        for j in range(ho * wo):
            x1[U(dst + i1[U(src + j)])] += d1[U(src + j)]
    return dx
