"""The ``numba`` backend: parallel CPU kernels compiled by Numba, the fast path of fastconv.

The five backend functions (see ``fastconv._dispatch``) choose a kernel per shape, call it under
the threading policy of ``_numba_threading`` and record which algorithm ran. Numba is imported
when this module is first used, never by ``import fastconv``.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from .._dispatch import record_algorithm

# Fixed number of grad-weight partial sums (images are split into this many chunks, summed
# serially): the result is the same for every thread count.
WEIGHT_CHUNKS = 8


def unavailable_reason():
    """None when Numba is importable here (nothing is compiled)."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba)"
    return None


def _kernels():
    from . import _numba_conv, _numba_pool, _numba_threading

    return _numba_conv, _numba_pool, _numba_threading


# ------------------------------------------------------------------------------------ conv


def _padded_input(conv, run, x, p):
    n, c, h, w = x.shape
    (sh, sw), (dh, dw) = p.stride, p.dilation
    (kh, kw), (ho, wo) = p.kernel_hw, p.out_hw
    hp = (ho - 1) * sh + dh * (kh - 1) + 1
    wp = (wo - 1) * sw + dw * (kw - 1) + 1
    xp = np.empty((n, hp, wp, c), x.dtype)
    return run(conv.pad_nhwc, x, xp, p.padding[0], p.padding[1])


def _weight_gkkio(w, groups):
    """(C_out, C_in/G, kH, kW) -> (G, kH, kW, C_in/G, C_out/G), output channels innermost."""
    co, cg, kh, kw = w.shape
    return np.ascontiguousarray(w.reshape(groups, co // groups, cg, kh, kw).transpose(0, 3, 4, 2, 1))


def conv2d(x, w, b, p):
    """y (N, C_out, H_out, W_out) = conv2d(x, w) + b; see ``fastconv.conv2d``."""
    conv, _, thr = _kernels()
    run = thr.run
    xp = _padded_input(conv, run, x, p)
    wr = _weight_gkkio(w, p.groups)
    bias = np.zeros(w.shape[0], x.dtype) if b is None else b
    y = np.empty((x.shape[0], w.shape[0], *p.out_hw), x.dtype)
    run(conv.conv_forward_generic, xp, wr, bias, y, *p.stride, *p.dilation)
    record_algorithm("conv2d", "numba:generic")
    return y


def conv2d_backward(dy, x, w, p, needs):
    """(dx, dw, db) of conv2d, ``None`` for the gradients not in ``needs``."""
    conv, _, thr = _kernels()
    run = thr.run
    dyt = run(conv.nchw_to_nhwc, dy, np.empty((dy.shape[0], *dy.shape[2:], dy.shape[1]), dy.dtype))
    wr = _weight_gkkio(w, p.groups)
    dx = dw = db = None
    if "input" in needs:
        n, c, h, w_ = x.shape
        (sh, sw), (dh, dwl) = p.stride, p.dilation
        (kh, kw), (ho, wo) = p.kernel_hw, p.out_hw
        hp = (ho - 1) * sh + dh * (kh - 1) + 1
        wp = (wo - 1) * sw + dwl * (kw - 1) + 1
        dxp = np.zeros((n, hp, wp, c), x.dtype)
        run(conv.conv_grad_input_generic, dyt, wr, dxp, *p.stride, *p.dilation)
        dx = run(conv.crop_nhwc_to_nchw, dxp, np.empty_like(x), p.padding[0], p.padding[1])
    if "weight" in needs or "bias" in needs:
        xp = _padded_input(conv, run, x, p)
        chunks = min(x.shape[0], WEIGHT_CHUNKS)
        part = np.zeros((chunks, *wr.shape), x.dtype)
        partb = np.zeros((chunks, w.shape[0]), x.dtype)
        run(conv.conv_grad_weight_generic, xp, dyt, part, partb, *p.stride, *p.dilation)
        if "weight" in needs:
            g, kh, kw, cg, og = wr.shape
            dwr = _sum_chunks(part)
            dw = np.ascontiguousarray(dwr.transpose(0, 4, 3, 1, 2)).reshape(w.shape)
        if "bias" in needs:
            db = _sum_chunks(partb)
    record_algorithm("conv2d_backward", "numba:generic")
    return dx, dw, db


def _sum_chunks(part):
    """Sum partial results over axis 0 in a fixed serial order."""
    total = part[0].copy()
    for t in range(1, part.shape[0]):
        total += part[t]
    return total


# ------------------------------------------------------------------------------------ pool


def max_pool2d(x, p):
    """(y, idx) of max_pool2d with PyTorch's indices; see ``fastconv.max_pool2d``."""
    _, pool, thr = _kernels()
    n, c, h, w = x.shape
    ho, wo = p.out_hw
    y = np.empty((n, c, ho, wo), x.dtype)
    idx = np.empty((n, c, ho, wo), np.int64)
    if (p.kernel_hw == (2, 2) and p.stride == (2, 2) and p.padding == (0, 0)
            and p.dilation == (1, 1) and 2 * ho <= h and 2 * wo <= w):
        thr.run(pool.max_pool_forward_k2s2, x, y, idx)
        record_algorithm("max_pool2d", "numba:k2s2")
    else:
        thr.run(pool.max_pool_forward, x, y, idx, *p.kernel_hw, *p.stride, *p.padding,
                *p.dilation)
        record_algorithm("max_pool2d", "numba:generic")
    return y, idx


def max_pool2d_backward(dy, idx, input_shape):
    """dx of max_pool2d: each dy element added at its index in its input plane."""
    _, pool, thr = _kernels()
    dx = np.zeros(input_shape, dy.dtype)
    thr.run(pool.max_pool_backward, dy, idx, dx)
    record_algorithm("max_pool2d_backward", "numba:scatter")
    return dx
