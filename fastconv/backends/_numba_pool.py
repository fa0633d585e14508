"""Numba max-pool kernels (NCHW), forward with PyTorch's exact indices, and backward.

The kernels trust their arguments: ``fastconv._validate`` checked the geometry and that every
index lies in ``[0, H*W)``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._numba_options import PARALLEL, U


@njit(**PARALLEL)
def max_pool_forward(x, y, idx, kh_, kw_, sh, sw, ph, pw, dh, dw):
    """y, idx (N, C, H_out, W_out) = max and flat argmax (h*W + w) of each window.

    PyTorch's CPU rule, exactly: windows are clipped to the input (padding is -inf), the
    argmax starts at the first in-bounds element, and an element replaces the running maximum
    when it is greater or NaN. So ties keep the first maximum, and a NaN in a window makes the
    output NaN with idx at the window's last NaN, as ``torch.nn.functional.max_pool2d`` does.
    """
    # Loop order: one task per (n, c) plane, owning its output plane; rows, columns, then the
    # window in row-major order (the order that decides ties).
    n_, c_, h_, w_ = x.shape
    ho, wo = y.shape[2], y.shape[3]
    x1 = x.ravel()
    y1 = y.ravel()
    i1 = idx.ravel()
    for t in prange(n_ * c_):
        src = t * h_ * w_
        dst = t * ho * wo
        for oh in range(ho):
            hs = oh * sh - ph
            he = min(hs + (kh_ - 1) * dh + 1, h_)
            while hs < 0:
                hs += dh
            for ow in range(wo):
                ws = ow * sw - pw
                we = min(ws + (kw_ - 1) * dw + 1, w_)
                while ws < 0:
                    ws += dw
                best = -np.inf
                arg = hs * w_ + ws
                for ih in range(hs, he, dh):
                    for iw in range(ws, we, dw):
                        v = x1[U(src + ih * w_ + iw)]
                        if v > best or np.isnan(v):
                            best = v
                            arg = ih * w_ + iw
                y1[U(dst + oh * wo + ow)] = best
                i1[U(dst + oh * wo + ow)] = arg
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
    """dx (N, C, H, W), zeroed by the caller: dx.plane[idx] += dy for every output element."""
    # Loop order: one task per (n, c) plane, owning its dx plane (windows overlap, so the
    # scatter-add stays inside one task); output elements in order.
    n_, c_, h_, w_ = dx.shape
    ho, wo = dy.shape[2], dy.shape[3]
    d1 = dy.ravel()
    i1 = idx.ravel()
    x1 = dx.ravel()
    for t in prange(n_ * c_):
        src = t * ho * wo
        dst = t * h_ * w_
        for j in range(ho * wo):
            x1[U(dst + i1[U(src + j)])] += d1[U(src + j)]
    return dx
