"""Parallel element-wise kernels for the layers (ReLU, Dropout, and the two fused in one pass)
when they run beside the numba backend: NumPy's ufuncs are single-threaded and make one pass per
operation.

Every kernel takes flat, C-contiguous arrays of one length and splits them into ``TASKS`` fixed
slices, one ``prange`` task each (each task owns its slice of the output). The results are the
ones of the NumPy expressions they replace, bit for bit: the selects and products are the same
IEEE operations, element by element.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..._splitmix import GOLDEN, MIX1, MIX2
from ._options import PARALLEL, U

TASKS = 16  # slices per call: enough to balance 2-16 threads, few enough to amortize


@njit(**PARALLEL)
def relu_forward(x, y):
    """y = max(x, 0), NaN kept (as ``np.maximum(x, 0)``)."""
    n = x.size
    for t in prange(TASKS):
        for i in range(t * n // TASKS, (t + 1) * n // TASKS):
            v = x[U(i)]
            y[U(i)] = 0 if v <= 0 else v
    return y


@njit(**PARALLEL)
def relu_backward(grad, y, out):
    """out = 0 where y <= 0, else grad (a select, as PyTorch's ``threshold_backward``: a NaN
    output passes its gradient on)."""
    n = grad.size
    for t in prange(TASKS):
        for i in range(t * n // TASKS, (t + 1) * n // TASKS):
            out[U(i)] = 0 if y[U(i)] <= 0 else grad[U(i)]
    return out


@njit(inline="always")
def _splitmix_hi32(seed, i):
    """Element i of ``fastconv._splitmix.hi32(seed, n)``."""
    z = seed + (np.uint64(i) + np.uint64(1)) * GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return (z ^ (z >> np.uint64(31))) >> np.uint64(32)


@njit(**PARALLEL)
def dropout_forward(x, seed, threshold, scale, y, keep):
    """keep[i] = hi32(splitmix64(seed, i)) >= threshold (uint8 0/1); y = x * (scale if keep
    else 0).

    Each element is dropped with probability ``threshold / 2**32``. The product (not a select)
    propagates NaN and inf as PyTorch does.
    """
    n = x.size
    zero = scale - scale
    for t in prange(TASKS):
        for i in range(t * n // TASKS, (t + 1) * n // TASKS):
            k = _splitmix_hi32(seed, i) >= threshold
            keep[U(i)] = k
            y[U(i)] = x[U(i)] * (scale if k else zero)
    return y


@njit(**PARALLEL)
def dropout_backward(grad, keep, scale, out):
    """out = grad * (scale if keep else 0)."""
    n = grad.size
    zero = scale - scale
    for t in prange(TASKS):
        for i in range(t * n // TASKS, (t + 1) * n // TASKS):
            out[U(i)] = grad[U(i)] * (scale if keep[U(i)] else zero)
    return out



@njit(**PARALLEL)
def relu_dropout_forward(x, seed, threshold, scale, y, code):
    """Dropout of ReLU in one pass: y = max(x, 0) * (scale if kept else 0), with the mask of
    :func:`dropout_forward`; code[i] (uint8) = kept | (ReLU passed, i.e. not x <= 0) << 1.

    The same IEEE operations as ``relu_forward`` then ``dropout_forward``, element by element.
    """
    n = x.size
    zero = scale - scale
    for t in prange(TASKS):
        for i in range(t * n // TASKS, (t + 1) * n // TASKS):
            k = _splitmix_hi32(seed, i) >= threshold
            v = x[U(i)]
            r = zero if v <= 0 else v
            code[U(i)] = np.uint8(k) | (np.uint8(0) if v <= 0 else np.uint8(2))
            y[U(i)] = r * (scale if k else zero)
    return y


@njit(**PARALLEL)
def relu_dropout_backward(grad, code, scale, out):
    """out = 0 where the ReLU did not pass (code bit 1 clear), else grad * (scale if kept
    else 0): ``dropout_backward`` then ``relu_backward``'s select. ``out`` may be ``grad``."""
    n = grad.size
    zero = scale - scale
    for t in prange(TASKS):
        for i in range(t * n // TASKS, (t + 1) * n // TASKS):
            c = code[U(i)]
            d = grad[U(i)] * (scale if c & np.uint8(1) else zero)
            out[U(i)] = d if c & np.uint8(2) else zero
    return out


@njit(**dict(PARALLEL, fastmath=False))
def adam_step(p, g, m, v, b1, b2, eps, step_size, bc2_sqrt, weight_decay):
    """One ``torch.optim.Adam`` step of flat p, m and v in place, one pass (see
    ``fastconv.backends._host_ops.adam_update``); no fast-math: the same IEEE operations, in
    the same order, as the serial pass."""
    n = p.size
    one = p.dtype.type(1)
    for t in prange(TASKS):
        for i in range(t * n // TASKS, (t + 1) * n // TASKS):
            gi = g[U(i)] + weight_decay * p[U(i)]
            mi = b1 * m[U(i)] + (one - b1) * gi
            vi = b2 * v[U(i)] + (one - b2) * gi * gi
            m[U(i)] = mi
            v[U(i)] = vi
            p[U(i)] -= step_size * (mi / (np.sqrt(vi) / bc2_sqrt + eps))
