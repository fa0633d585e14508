"""Naive backend: the textbook nested loops in plain Python, the readable specification.

Every function here is the definition written out loop by loop, with no vectorization and no
tricks: it is the "naive loops" baseline of the benchmarks and the last-resort reference of the
tests. It is slow by design (one Python multiply-add per MAC); use it on tiny shapes only.

Arrays are converted once to nested Python lists (``tolist()``), so the loops run over Python
floats: every sum accumulates in double precision (Python ``float``) and the result is cast to
the input dtype (float32 or float64) once at the end. Semantics are PyTorch's; the arguments
arrive validated by ``fastconv._validate`` (4-D, C-contiguous, one float dtype, N >= 1).
"""

from __future__ import annotations

import math

import numpy as np

from .._dispatch import record_algorithm
# The ops fastconv.nn needs (the backend contract: see ``_host_ops``).
from ._host_ops import (COMPILED_ADAM, adam_update, dense, dense_backward,  # noqa: F401
                        dropout, dropout_backward, relu, relu_backward, sgd_update)
from ._plan import backward_name

ALGORITHM = "naive:python-loops"


def unavailable_reason():
    """Always available: needs nothing beyond NumPy."""
    return None


def _zeros(*shape):
    """A nested list of Python zeros of the given shape."""
    if len(shape) == 1:
        return [0.0] * shape[0]
    return [_zeros(*shape[1:]) for _ in range(shape[0])]


# ------------------------------------------------------------------------------------- conv


def conv2d(x, w, b, p):
    """y = conv2d(x, w) + b, zero padding, by direct summation.

    Parameters
    ----------
    x : (N, C_in, H, W) float32/float64
    w : (C_out, C_in // groups, kH, kW), x's dtype
    b : (C_out,) or None
    p : fastconv._validate.ConvParams (stride, top/left padding, dilation, groups, out_hw)

    Returns
    -------
    y : (N, C_out, H_out, W_out) of x's dtype::

        y[n, co, oh, ow] = b[co] + sum_{ci, i, j} x[n, g*Cg + ci, ih, iw] * w[co, ci, i, j]
        ih = oh*stride_h - pad_top + i*dilation_h,  iw = ow*stride_w - pad_left + j*dilation_w

    with ``g = co // (C_out // groups)``, ``Cg = C_in // groups``; input positions outside
    ``[0, H) x [0, W)`` are padding (zero) and are skipped, so a NaN in x reaches exactly the
    outputs whose window contains it.
    """
    n_batch, _, h, wd = x.shape
    c_out, c_group, kh, kw = w.shape
    ho, wo = p.out_hw
    sh, sw = p.stride
    ph, pw = p.padding
    dil_h, dil_w = p.dilation
    out_per_group = c_out // p.groups
    xl, wl = x.tolist(), w.tolist()
    y = _zeros(n_batch, c_out, ho, wo)
    # Loop order: the formula's, output element by output element (n, co, oh, ow), then the
    # window (ci, i, j); one accumulator per output.
    for n in range(n_batch):
        for co in range(c_out):
            c_first = (co // out_per_group) * c_group
            for oh in range(ho):
                for ow in range(wo):
                    acc = 0.0
                    for ci in range(c_group):
                        x_plane = xl[n][c_first + ci]
                        w_plane = wl[co][ci]
                        for i in range(kh):
                            ih = oh * sh - ph + i * dil_h
                            if ih < 0 or ih >= h:
                                continue
                            for j in range(kw):
                                iw = ow * sw - pw + j * dil_w
                                if iw < 0 or iw >= wd:
                                    continue
                                acc += x_plane[ih][iw] * w_plane[i][j]
                    if b is not None:
                        acc += float(b[co])
                    y[n][co][oh][ow] = acc
    record_algorithm("conv2d", ALGORITHM)
    return np.array(y, dtype=x.dtype).reshape(n_batch, c_out, ho, wo)


def conv2d_backward(dy, x, w, p, needs):
    """Gradients of :func:`conv2d`: the forward loops with each product's two partials.

    Parameters
    ----------
    dy : (N, C_out, H_out, W_out), x's dtype
    x, w, p : as for :func:`conv2d`
    needs : frozenset of ``"input"``, ``"weight"``, ``"bias"``

    Returns
    -------
    (dx, dw, db) : shaped like x, w and (C_out,), x's dtype; ``None`` for those not needed::

        dx[n, g*Cg + ci, ih, iw] += dy[n, co, oh, ow] * w[co, ci, i, j]
        dw[co, ci, i, j]         += dy[n, co, oh, ow] * x[n, g*Cg + ci, ih, iw]
        db[co]                   += dy[n, co, oh, ow]
    """
    n_batch, c_in, h, wd = x.shape
    c_out, c_group, kh, kw = w.shape
    ho, wo = p.out_hw
    sh, sw = p.stride
    ph, pw = p.padding
    dil_h, dil_w = p.dilation
    out_per_group = c_out // p.groups
    want_dx, want_dw = "input" in needs, "weight" in needs
    xl, wl, dyl = x.tolist(), w.tolist(), dy.tolist()
    dx = _zeros(n_batch, c_in, h, wd)
    dw = _zeros(c_out, c_group, kh, kw)
    db = [0.0] * c_out
    # Loop order: the forward's (n, co, oh, ow, ci, i, j); each visited product scatters its
    # partials, so the backward is the forward read the other way.
    for n in range(n_batch):
        for co in range(c_out):
            c_first = (co // out_per_group) * c_group
            for oh in range(ho):
                for ow in range(wo):
                    g = dyl[n][co][oh][ow]
                    db[co] += g
                    for ci in range(c_group):
                        for i in range(kh):
                            ih = oh * sh - ph + i * dil_h
                            if ih < 0 or ih >= h:
                                continue
                            for j in range(kw):
                                iw = ow * sw - pw + j * dil_w
                                if iw < 0 or iw >= wd:
                                    continue
                                if want_dx:
                                    dx[n][c_first + ci][ih][iw] += g * wl[co][ci][i][j]
                                if want_dw:
                                    dw[co][ci][i][j] += g * xl[n][c_first + ci][ih][iw]
    record_algorithm("conv2d_backward", backward_name("naive", tuple(
        (g, "python-loops") for g in ("input", "weight", "bias") if g in needs)))
    dtype = x.dtype
    return (
        np.array(dx, dtype=dtype).reshape(x.shape) if want_dx else None,
        np.array(dw, dtype=dtype).reshape(w.shape) if want_dw else None,
        np.array(db, dtype=dtype) if "bias" in needs else None,
    )


# ------------------------------------------------------------------------------------- pool


def max_pool2d(x, p):
    """Max-pool with PyTorch's exact indices.

    Parameters
    ----------
    x : (N, C, H, W) float32/float64
    p : fastconv._validate.PoolParams

    Returns
    -------
    y : (N, C, H_out, W_out) of x's dtype, the maximum of each window
    idx : int64, same shape: the flat index ``ih * W + iw`` of that maximum in its plane

    PyTorch's CPU rule, exactly: padding is -inf and never chosen (the search starts at the
    window's first in-bounds element); an element replaces the running maximum when it is
    greater, or when it is NaN. So ties keep the first maximum in row-major window order, and a
    NaN makes the output NaN with idx at the window's *last* NaN (what torch returns). A window
    with no in-bounds element (possible with dilation, e.g. k=2, padding=1, dilation=2, H=1)
    gives -inf and torch's index for it, ``first_row * W + first_col`` of the window's first
    non-negative row and column, which can lie outside the plane.
    """
    n_batch, c, h, wd = x.shape
    ho, wo = p.out_hw
    kh, kw = p.kernel_hw
    sh, sw = p.stride
    ph, pw = p.padding
    dil_h, dil_w = p.dilation
    xl = x.tolist()
    y = _zeros(n_batch, c, ho, wo)
    idx = _zeros(n_batch, c, ho, wo)
    # Loop order: output element by output element, then the window in row-major order (the
    # order that decides ties).
    for n in range(n_batch):
        for ch in range(c):
            plane = xl[n][ch]
            for oh in range(ho):
                rows = [oh * sh - ph + i * dil_h for i in range(kh)]
                first_row = min(r for r in rows if r >= 0)
                rows = [r for r in rows if 0 <= r < h]
                for ow in range(wo):
                    cols = [ow * sw - pw + j * dil_w for j in range(kw)]
                    first_col = min(q for q in cols if q >= 0)
                    cols = [q for q in cols if 0 <= q < wd]
                    best = -math.inf
                    arg = first_row * wd + first_col
                    for ih in rows:
                        for iw in cols:
                            v = plane[ih][iw]
                            if v > best or math.isnan(v):
                                best = v
                                arg = ih * wd + iw
                    y[n][ch][oh][ow] = best
                    idx[n][ch][oh][ow] = arg
    record_algorithm("max_pool2d", ALGORITHM)
    shape = (n_batch, c, ho, wo)
    return np.array(y, dtype=x.dtype).reshape(shape), np.array(idx, dtype=np.int64).reshape(shape)


def max_pool2d_backward(dy, idx, input_shape):
    """Gradient of :func:`max_pool2d`: each ``dy`` element is added at its index.

    Parameters
    ----------
    dy : (N, C, H_out, W_out) float32/float64
    idx : int64, dy's shape, values in ``[0, H*W)``
    input_shape : (N, C, H, W)

    Returns
    -------
    dx : ``input_shape`` of dy's dtype; overlapping windows that chose the same element
    accumulate.
    """
    n_batch, c, h, wd = input_shape
    ho, wo = dy.shape[2], dy.shape[3]
    dyl, il = dy.tolist(), idx.tolist()
    dx = _zeros(n_batch, c, h, wd)
    for n in range(n_batch):
        for ch in range(c):
            for oh in range(ho):
                for ow in range(wo):
                    k = il[n][ch][oh][ow]
                    dx[n][ch][k // wd][k % wd] += dyl[n][ch][oh][ow]
    record_algorithm("max_pool2d_backward", ALGORITHM)
    return np.array(dx, dtype=dy.dtype).reshape(input_shape)
