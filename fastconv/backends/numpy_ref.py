"""NumPy backend: vectorized reference kernels, the oracle of the tests and the last fallback.

Convolution is a sum over the kH*kW kernel taps of one matrix product each ("shifted GEMM"). The
input is padded once and laid out channel-major, ``(C_in, N, Hp, Wp)``; for tap ``(i, j)`` the
strided view ``xp[:, :, i*dil_h :: sh, j*dil_w :: sw]`` (cropped to H_out x W_out) holds, for every
output position, the input element that the tap multiplies. Per group,
``w[:, :, i, j] @ view`` is one ``(C_out/g, C_in/g) @ (C_in/g, N*H_out*W_out)`` product (BLAS
through ``np.matmul``; the channel-major layout keeps the batch inside the matrix, because
``np.matmul`` does not call BLAS for broadcast operands). Memory stays O(input + output), unlike
a full im2col matrix. Sums accumulate in the input dtype (float32 or float64), as BLAS does.

Max-pool runs over the kH*kW taps likewise, keeping a running maximum and the tap that holds it
with PyTorch's update rule, so indices are torch's exactly. Arguments arrive validated by
``fastconv._validate`` (4-D, C-contiguous, one float dtype, N >= 1).
"""

from __future__ import annotations

import numpy as np

from .._dispatch import record_algorithm
# The ops fastconv.nn needs (the backend contract: see ``_host_ops``).
from ._host_ops import (COMPILED_ADAM, adam_update, dense, dense_backward,  # noqa: F401
                        dropout, dropout_backward, relu, relu_backward, sgd_update)
from ._plan import backward_name


def unavailable_reason():
    """Always available: needs nothing beyond NumPy."""
    return None


def _tap(a, i, j, p, out_hw):
    """View of padded ``a`` (A, B, Hp, Wp) read by kernel tap ``(i, j)``: (A, B, H_out, W_out)."""
    (sh, sw), (dil_h, dil_w) = p.stride, p.dilation
    ho, wo = out_hw
    return a[:, :, i * dil_h: i * dil_h + (ho - 1) * sh + 1: sh,
             j * dil_w: j * dil_w + (wo - 1) * sw + 1: sw]


def _conv_extent(x_shape, p):
    """Padded size (Hp, Wp) and how many input rows/columns (hh, ww) the windows reach."""
    h, w = x_shape[2], x_shape[3]
    (ph, pw), (pb, pr) = p.padding, p.pad_bottom_right()
    hp, wp = ph + h + pb, pw + w + pr
    return (hp, wp), (min(h, hp - ph), min(w, wp - pw))


def _padded_channel_major(x, p):
    """x as (C, N, Hp, Wp) with zero padding: (top, left) = p.padding, bottom/right so every
    window fits (trailing rows/columns that no window reaches are cropped)."""
    n, c, h, w = x.shape
    (hp, wp), (hh, ww) = _conv_extent(x.shape, p)
    ph, pw = p.padding
    xp = np.zeros((c, n, hp, wp), x.dtype)
    xp[:, :, ph: ph + hh, pw: pw + ww] = x[:, :, :hh, :ww].transpose(1, 0, 2, 3)
    return xp


def conv2d(x, w, b, p):
    """y = conv2d(x, w) + b as a sum over kernel taps of per-group matrix products.

    Parameters
    ----------
    x : (N, C_in, H, W) float32/float64
    w : (C_out, C_in // groups, kH, kW), x's dtype
    b : (C_out,) or None
    p : fastconv._validate.ConvParams

    Returns
    -------
    y : (N, C_out, H_out, W_out) of x's dtype (``H_out, W_out = p.out_hw``),
    ``y[n, co, oh, ow] = b[co] + sum_{ci,i,j} x_pad[n, g*Cg+ci, oh*sh + i*dil_h, ow*sw + j*dil_w]
    * w[co, ci, i, j]``. Zero padding contributes exact zeros, so a NaN in x reaches exactly
    the outputs whose window contains it.
    """
    n = x.shape[0]
    c_out, c_group, kh, kw = w.shape
    g = p.groups
    ho, wo = p.out_hw
    xp = _padded_channel_major(x, p)
    wg = w.reshape(g, c_out // g, c_group, kh, kw)
    y = np.zeros((g, c_out // g, n * ho * wo), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols = _tap(xp, i, j, p, p.out_hw).reshape(g, c_group, n * ho * wo)
            y += np.ascontiguousarray(wg[:, :, :, i, j]) @ cols
    if b is not None:
        y += b.reshape(g, c_out // g, 1)
    record_algorithm("conv2d", "numpy:shifted-matmul")
    return np.ascontiguousarray(y.reshape(c_out, n, ho, wo).transpose(1, 0, 2, 3))


def conv2d_backward(dy, x, w, p, needs):
    """Gradients of :func:`conv2d`, tap by tap.

    Parameters
    ----------
    dy : (N, C_out, H_out, W_out), x's dtype
    x, w, p : as for :func:`conv2d`
    needs : frozenset of ``"input"``, ``"weight"``, ``"bias"``

    Returns
    -------
    (dx, dw, db) : shaped like x, w and (C_out,), x's dtype, ``None`` for those not needed.
    For tap ``(i, j)``, per group: ``dx_pad[tap view] += w[:, :, i, j].T @ dy`` and
    ``dw[:, :, i, j] = dy @ (tap view).T``, both reducing over (N, H_out, W_out) inside one
    matrix product; ``db = dy.sum((0, 2, 3))``.
    """
    n, c_in, h, wd = x.shape
    c_out, c_group, kh, kw = w.shape
    g = p.groups
    og = c_out // g
    ho, wo = p.out_hw
    m = n * ho * wo
    dx = dw = db = None
    if "input" in needs or "weight" in needs:
        dy_c = np.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(g, og, m)
    if "input" in needs:
        (hp, wp), (hh, ww) = _conv_extent(x.shape, p)
        dxp = np.zeros((c_in, n, hp, wp), x.dtype)
        w_t = w.reshape(g, og, c_group, kh, kw).transpose(0, 2, 1, 3, 4)  # (g, Cg, og, kh, kw)
        for i in range(kh):
            for j in range(kw):
                contrib = np.ascontiguousarray(w_t[:, :, :, i, j]) @ dy_c  # (g, Cg, m)
                _tap(dxp, i, j, p, p.out_hw)[...] += contrib.reshape(c_in, n, ho, wo)
        ph, pw = p.padding
        dx = np.zeros(x.shape, x.dtype)
        dx[:, :, :hh, :ww] = dxp[:, :, ph: ph + hh, pw: pw + ww].transpose(1, 0, 2, 3)
    if "weight" in needs:
        xp = _padded_channel_major(x, p)
        dw = np.empty((g, og, c_group, kh, kw), x.dtype)
        for i in range(kh):
            for j in range(kw):
                cols = _tap(xp, i, j, p, p.out_hw).reshape(g, c_group, m)
                for k in range(g):  # 2-D products: np.matmul skips BLAS for a stacked A @ B.T
                    dw[k, :, :, i, j] = dy_c[k] @ cols[k].T
        dw = dw.reshape(w.shape)
    if "bias" in needs:
        db = dy.sum(axis=(0, 2, 3))
    record_algorithm("conv2d_backward", backward_name("numpy", tuple(
        (g, "shifted-matmul") for g in ("input", "weight", "bias") if g in needs)))
    return dx, dw, db


def _first_in_bounds(out, s, pad, d):
    """Per output position, the window's first non-negative input coordinate (torch's start)."""
    start = np.arange(out) * s - pad
    return np.where(start < 0, start + (-start + d - 1) // d * d, start)


def max_pool2d(x, p):
    """Max-pool with PyTorch's exact indices, vectorized over (N, C, H_out, W_out).

    Parameters
    ----------
    x : (N, C, H, W) float32/float64
    p : fastconv._validate.PoolParams

    Returns
    -------
    y : (N, C, H_out, W_out) of x's dtype
    idx : int64, y's shape: flat index ``ih * W + iw`` of each maximum in its plane

    The input is padded once with -inf; the taps are visited in row-major window order and an
    element replaces the running maximum when it is greater or NaN (PyTorch's CPU rule). The
    index starts at the window's first in-bounds element, so padding is never chosen; ties keep
    the first maximum; a NaN makes the output NaN with idx at the window's last NaN.
    """
    n, c, h, w = x.shape
    kh, kw = p.kernel_hw
    sh, sw = p.stride
    ph, pw = p.padding
    dil_h, dil_w = p.dilation
    ho, wo = p.out_hw
    hp = max(ph + h, (ho - 1) * sh + dil_h * (kh - 1) + 1)
    wp = max(pw + w, (wo - 1) * sw + dil_w * (kw - 1) + 1)
    xp = np.full((n, c, hp, wp), -np.inf, x.dtype)
    xp[:, :, ph: ph + h, pw: pw + w] = x
    best = np.full((n, c, ho, wo), -np.inf, x.dtype)
    tap = np.full((n, c, ho, wo), -1, np.int32)  # the tap holding the maximum; -1: none yet
    has_nan = bool(np.isnan(x).any())
    for i in range(kh):
        for j in range(kw):
            v = xp[:, :, i * dil_h: i * dil_h + (ho - 1) * sh + 1: sh,
                   j * dil_w: j * dil_w + (wo - 1) * sw + 1: sw]
            take = v > best
            if has_nan:
                take |= np.isnan(v)
            np.copyto(best, v, where=take)
            np.copyto(tap, i * kw + j, where=take)
    ti, tj = np.divmod(tap, kw)
    rows = (np.arange(ho) * sh - ph)[:, None] + ti.astype(np.int64) * dil_h
    cols = np.arange(wo) * sw - pw + tj.astype(np.int64) * dil_w
    arg = rows * w + cols
    # never replaced (every element -inf, or no element in the window): torch's start index
    first = _first_in_bounds(ho, sh, ph, dil_h)[:, None] * w + _first_in_bounds(wo, sw, pw, dil_w)
    np.copyto(arg, np.broadcast_to(first, arg.shape), where=tap < 0)
    record_algorithm("max_pool2d", "numpy:tap-running-max")
    return best, arg


def max_pool2d_backward(dy, idx, input_shape):
    """Gradient of :func:`max_pool2d`: scatter-add of ``dy`` at ``idx``, per (n, c) plane.

    Parameters
    ----------
    dy : (N, C, H_out, W_out) float32/float64
    idx : int64, dy's shape, values in ``[0, H*W)``
    input_shape : (N, C, H, W)

    Returns
    -------
    dx : ``input_shape`` of dy's dtype; elements chosen by several (overlapping) windows
    accumulate. One ``np.bincount`` over plane-offset indices (sums in float64, then cast).
    """
    n, c, h, w = input_shape
    plane = h * w
    offsets = (np.arange(n * c, dtype=np.int64) * plane).reshape(n, c, 1, 1)
    dx = np.bincount((idx + offsets).ravel(), weights=dy.ravel(), minlength=n * c * plane)
    record_algorithm("max_pool2d_backward", "numpy:bincount")
    return dx.astype(dy.dtype, copy=False).reshape(input_shape)
