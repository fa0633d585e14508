"""Element-wise kernels for the layers (ReLU, Dropout, the two fused in one pass, and Adam's
update) when they run beside the numba backend: NumPy's ufuncs are single-threaded and make
one pass per operation.

Every op is a loop over one slice ``[lo, hi)`` of flat, C-contiguous arrays of one length
(``_*_slice``, inlined), compiled twice: ``<op>`` splits the arrays into ``TASKS`` fixed slices,
one ``prange`` task each (each task owns its slice of the output); ``<op>_serial`` runs the
whole range on the calling thread, for arrays too small to pay for waking other threads (it
starts no thread, so it is safe in any thread and after ``fork``). The results are the ones of
the NumPy expressions they replace, bit for bit: the selects and products are the same IEEE
operations, element by element, whichever build runs.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..._splitmix import GOLDEN, MIX1, MIX2
from ._options import PARALLEL, SERIAL_CACHED, U

TASKS = 16  # slices per call: enough to balance 2-16 threads, few enough to amortize
# The serial builds: the same options without threads (cached: they are distinct functions).
SERIAL = SERIAL_CACHED
# Adam's update: no fast-math, so the same IEEE operations in the same order as written.
EXACT = dict(PARALLEL, fastmath=False)
EXACT_SERIAL = dict(SERIAL, fastmath=False)


@njit(inline="always")
def _relu_slice(lo, hi, x, y):
    """y = max(x, 0), NaN kept (as ``np.maximum(x, 0)``)."""
    for i in range(lo, hi):
        v = x[U(i)]
        y[U(i)] = 0 if v <= 0 else v


@njit(inline="always")
def _relu_backward_slice(lo, hi, grad, y, out):
    """out = 0 where y <= 0, else grad (a select, as PyTorch's ``threshold_backward``: a NaN
    output passes its gradient on). ``out`` may be ``grad``."""
    for i in range(lo, hi):
        out[U(i)] = 0 if y[U(i)] <= 0 else grad[U(i)]


@njit(inline="always")
def _splitmix_hi32(seed, i):
    """Element i of ``fastconv._splitmix.hi32(seed, n)``."""
    z = seed + (np.uint64(i) + np.uint64(1)) * GOLDEN
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return (z ^ (z >> np.uint64(31))) >> np.uint64(32)


@njit(inline="always")
def _dropout_slice(lo, hi, x, seed, threshold, scale, keep, y):
    """keep[i] = hi32(splitmix64(seed, i)) >= threshold (uint8 0/1); y = x * (scale if keep
    else 0).

    Each element is dropped with probability ``threshold / 2**32``. The product (not a select)
    propagates NaN and inf as PyTorch does.
    """
    zero = scale - scale
    for i in range(lo, hi):
        k = _splitmix_hi32(seed, i) >= threshold
        keep[U(i)] = k
        y[U(i)] = x[U(i)] * (scale if k else zero)


@njit(inline="always")
def _dropout_backward_slice(lo, hi, grad, keep, scale, out):
    """out = grad * (scale if keep else 0)."""
    zero = scale - scale
    for i in range(lo, hi):
        out[U(i)] = grad[U(i)] * (scale if keep[U(i)] else zero)


@njit(inline="always")
def _relu_dropout_slice(lo, hi, x, seed, threshold, scale, code, y):
    """Dropout of ReLU in one pass: y = max(x, 0) * (scale if kept else 0), with the mask of
    ``_dropout_slice``; code[i] (uint8) = kept | (ReLU passed, i.e. not x <= 0) << 1.

    The same IEEE operations as ``_relu_slice`` then ``_dropout_slice``, element by element.
    """
    zero = scale - scale
    for i in range(lo, hi):
        k = _splitmix_hi32(seed, i) >= threshold
        v = x[U(i)]
        r = zero if v <= 0 else v
        code[U(i)] = np.uint8(k) | (np.uint8(0) if v <= 0 else np.uint8(2))
        y[U(i)] = r * (scale if k else zero)


@njit(inline="always")
def _relu_dropout_backward_slice(lo, hi, grad, code, scale, out):
    """out = 0 where the ReLU did not pass (code bit 1 clear), else grad * (scale if kept
    else 0): ``dropout_backward`` then ``relu_backward``'s select. ``out`` may be ``grad``."""
    zero = scale - scale
    for i in range(lo, hi):
        c = code[U(i)]
        d = grad[U(i)] * (scale if c & np.uint8(1) else zero)
        out[U(i)] = d if c & np.uint8(2) else zero


@njit(inline="always")
def _adam_slice(lo, hi, g, m, v, b1, b2, eps, step_size, bc2_sqrt, weight_decay, p):
    """One ``torch.optim.Adam`` step of p, m and v in place (see
    ``fastconv.backends._host_ops.adam_update``): one pass instead of NumPy's ~13."""
    one = p.dtype.type(1)
    for i in range(lo, hi):
        gi = g[U(i)] + weight_decay * p[U(i)]
        mi = b1 * m[U(i)] + (one - b1) * gi
        vi = b2 * v[U(i)] + (one - b2) * gi * gi
        m[U(i)] = mi
        v[U(i)] = vi
        p[U(i)] -= step_size * (mi / (np.sqrt(vi) / bc2_sqrt + eps))


# Loop order: the parallel builds give task t the slice [t*n//TASKS, (t+1)*n//TASKS) of the
# flat arrays; the serial builds run [0, n). Each returns its output (``p`` for Adam).


@njit(**PARALLEL)
def relu_forward(x, y):
    """``_relu_slice`` over ``TASKS`` slices, in parallel."""
    n = x.size
    for t in prange(TASKS):
        _relu_slice(t * n // TASKS, (t + 1) * n // TASKS, x, y)
    return y


@njit(**SERIAL)
def relu_forward_serial(x, y):
    """``_relu_slice`` over the whole range, on the calling thread."""
    _relu_slice(0, x.size, x, y)
    return y


@njit(**PARALLEL)
def relu_backward(grad, y, out):
    """``_relu_backward_slice`` over ``TASKS`` slices, in parallel."""
    n = grad.size
    for t in prange(TASKS):
        _relu_backward_slice(t * n // TASKS, (t + 1) * n // TASKS, grad, y, out)
    return out


@njit(**SERIAL)
def relu_backward_serial(grad, y, out):
    """``_relu_backward_slice`` over the whole range, on the calling thread."""
    _relu_backward_slice(0, grad.size, grad, y, out)
    return out


@njit(**PARALLEL)
def dropout_forward(x, seed, threshold, scale, keep, y):
    """``_dropout_slice`` over ``TASKS`` slices, in parallel."""
    n = x.size
    for t in prange(TASKS):
        _dropout_slice(t * n // TASKS, (t + 1) * n // TASKS, x, seed, threshold, scale, keep, y)
    return y


@njit(**SERIAL)
def dropout_forward_serial(x, seed, threshold, scale, keep, y):
    """``_dropout_slice`` over the whole range, on the calling thread."""
    _dropout_slice(0, x.size, x, seed, threshold, scale, keep, y)
    return y


@njit(**PARALLEL)
def dropout_backward(grad, keep, scale, out):
    """``_dropout_backward_slice`` over ``TASKS`` slices, in parallel."""
    n = grad.size
    for t in prange(TASKS):
        _dropout_backward_slice(t * n // TASKS, (t + 1) * n // TASKS, grad, keep, scale, out)
    return out


@njit(**SERIAL)
def dropout_backward_serial(grad, keep, scale, out):
    """``_dropout_backward_slice`` over the whole range, on the calling thread."""
    _dropout_backward_slice(0, grad.size, grad, keep, scale, out)
    return out


@njit(**PARALLEL)
def relu_dropout_forward(x, seed, threshold, scale, code, y):
    """``_relu_dropout_slice`` over ``TASKS`` slices, in parallel."""
    n = x.size
    for t in prange(TASKS):
        _relu_dropout_slice(t * n // TASKS, (t + 1) * n // TASKS, x, seed, threshold, scale, code, y)
    return y


@njit(**SERIAL)
def relu_dropout_forward_serial(x, seed, threshold, scale, code, y):
    """``_relu_dropout_slice`` over the whole range, on the calling thread."""
    _relu_dropout_slice(0, x.size, x, seed, threshold, scale, code, y)
    return y


@njit(**PARALLEL)
def relu_dropout_backward(grad, code, scale, out):
    """``_relu_dropout_backward_slice`` over ``TASKS`` slices, in parallel."""
    n = grad.size
    for t in prange(TASKS):
        _relu_dropout_backward_slice(t * n // TASKS, (t + 1) * n // TASKS, grad, code, scale,
                                     out)
    return out


@njit(**SERIAL)
def relu_dropout_backward_serial(grad, code, scale, out):
    """``_relu_dropout_backward_slice`` over the whole range, on the calling thread."""
    _relu_dropout_backward_slice(0, grad.size, grad, code, scale, out)
    return out


@njit(**EXACT)
def adam_step(g, m, v, b1, b2, eps, step_size, bc2_sqrt, weight_decay, p):
    """``_adam_slice`` over ``TASKS`` slices, in parallel."""
    n = g.size
    for t in prange(TASKS):
        _adam_slice(t * n // TASKS, (t + 1) * n // TASKS, g, m, v, b1, b2, eps, step_size,
                    bc2_sqrt, weight_decay, p)
    return p


@njit(**EXACT_SERIAL)
def adam_step_serial(g, m, v, b1, b2, eps, step_size, bc2_sqrt, weight_decay, p):
    """``_adam_slice`` over the whole range, on the calling thread."""
    _adam_slice(0, g.size, g, m, v, b1, b2, eps, step_size, bc2_sqrt, weight_decay, p)
    return p
