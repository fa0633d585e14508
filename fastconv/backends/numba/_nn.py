"""The numba backend's versions of the ops ``fastconv.nn`` needs (see ``_host_ops``): ReLU,
dropout (and the two fused) and Adam's update as element-wise kernels (``_elementwise``:
parallel, or serial on small arrays), large float32 Dense products as register-blocked kernels
on numba's threads (``_gemm``). Each falls back to the NumPy version for the dtypes and sizes
its kernel does not take. Numba is imported on first call, not with this module."""

from __future__ import annotations

import numpy as np

from .. import _host_ops
from .._host_ops import sgd_update  # noqa: F401  (NumPy: a handful of passes already)

COMPILED_ADAM = True
#: Fixed number of partial products of the Dense forward (its inner dimension is split so that
#: both cores work on a batch of 64): the result does not depend on the thread count.
DENSE_CHUNKS = 8


def _compiled(*arrays) -> bool:
    return all(isinstance(a, np.ndarray) and a.dtype in (np.float32, np.float64) for a in arrays)


#: Element-wise ops on fewer elements run as the serial builds, on the calling thread: waking
#: the other threads costs about as much as the pass, and on a loaded machine a sleeping thread
#: can take milliseconds to get a core (docs/performance.md).
SERIAL_BELOW = 1 << 14
#: The same for Adam's pass over one parameter (about 4x the work per element).
ADAM_SERIAL_BELOW = 1 << 20


_KERNELS: dict = {}  # name -> (parallel build, serial build), imported on first use


def _launch(name, *args, serial_below=None):
    """Run ``_elementwise.<name>`` (parallel, through ``_threading.run``) on ``args``, or its
    ``<name>_serial`` build when the first array has fewer than ``serial_below`` (default
    ``SERIAL_BELOW``) elements."""
    kernels = _KERNELS.get(name)
    if kernels is None:
        from . import _elementwise

        kernels = _KERNELS[name] = (getattr(_elementwise, name),
                                    getattr(_elementwise, name + "_serial"))
    if args[0].size < (SERIAL_BELOW if serial_below is None else serial_below):
        return kernels[1](*args)
    from ._threading import run

    return run(kernels[0], *args)


def _into(out, like):
    """``out`` if it is a C-contiguous array of ``like``'s shape and dtype, else a new one."""
    if (isinstance(out, np.ndarray) and out.shape == like.shape and out.dtype == like.dtype
            and out.flags.c_contiguous and out.flags.writeable):
        return out
    return np.empty_like(like)


def relu(x, out=None):
    if not _compiled(x):
        return _host_ops.relu(x, out)
    x = np.ascontiguousarray(x)
    y = _into(out, x)
    _launch("relu_forward", x.reshape(-1), y.reshape(-1))
    if out is not None and y is not out:
        out[...] = y
        return out
    return y


def relu_backward(grad, y, out=None):
    if not _compiled(grad) or grad.shape != y.shape:
        return _host_ops.relu_backward(grad, y, out)
    grad = np.ascontiguousarray(grad)
    y = np.ascontiguousarray(y)
    dx = _into(out, grad)
    _launch("relu_backward", grad.reshape(-1), y.reshape(-1), dx.reshape(-1))
    if out is not None and dx is not out:
        out[...] = dx
        return out
    return dx


def dropout(x, seed, threshold, scale, relu=False):
    if not _compiled(x):
        return _host_ops.dropout(x, seed, threshold, scale, relu)
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    keep = np.empty(x.shape, np.uint8)
    _launch("relu_dropout_forward" if relu else "dropout_forward", x.reshape(-1), seed,
            np.uint64(threshold), scale, keep.reshape(-1), y.reshape(-1))
    return y, keep


def dropout_backward(grad, keep, scale, relu=False):
    if not _compiled(grad) or grad.shape != keep.shape or grad.dtype != scale.dtype:
        return _host_ops.dropout_backward(grad, keep, scale, relu)
    grad = np.ascontiguousarray(grad)
    out = np.empty_like(grad)
    _launch("relu_dropout_backward" if relu else "dropout_backward", grad.reshape(-1),
            keep.reshape(-1), scale, out.reshape(-1))
    return out


def _gemm(a, m, k, n):
    """(``_gemm``, run) for a float32 product (m, k) @ (k, n) large enough for the
    register blocks (n >= 64) to pay, else None."""
    if not _compiled(a) or a.dtype != np.float32 or n < 64 or m * k * n < 1 << 20:
        return None
    from . import _gemm, _threading

    return _gemm, _threading.run


def dense(x, w, b):
    compiled = _gemm(x, w.shape[0], w.shape[1], x.shape[0])
    if compiled is None or w.dtype != x.dtype:
        return _host_ops.dense(x, w, b)
    # y.T = w @ x.T (+ bias): the batch is the contiguous, vectorized dimension
    gemm, run = compiled
    xt = run(gemm.transpose, np.ascontiguousarray(x)[None], np.empty((1, *x.shape[::-1]), x.dtype))
    chunks = min(DENSE_CHUNKS, x.shape[1])
    part = run(gemm.chunks_kernel(), w, xt, np.zeros(w.shape[0], x.dtype) if b is None else b,
               np.empty((chunks, 1, w.shape[0], x.shape[0]), x.dtype))
    yt = part[0, 0].copy()
    for t in range(1, chunks):
        yt += part[t, 0]
    return np.ascontiguousarray(yt.T)


def dense_backward(grad, x, w, input_grad=True):
    compiled = _gemm(grad, w.shape[0], grad.shape[0], x.shape[1])
    if compiled is None or not (grad.dtype == x.dtype == w.dtype):
        return _host_ops.dense_backward(grad, x, w, input_grad)
    gemm, run = compiled
    x = np.ascontiguousarray(x)
    dw = run(gemm.chunks_kernel(), grad.T, x[None], np.zeros(w.shape[0], x.dtype),
             np.empty((1, 1, *w.shape), x.dtype))[0, 0]
    dx = run(gemm.chunks_kernel(), grad, np.ascontiguousarray(w)[None],
             np.zeros(x.shape[0], x.dtype), np.empty((1, 1, *x.shape), x.dtype))[0, 0] \
        if input_grad else None
    return dx, dw


def adam_update(p, g, m, v, b1, b2, eps, step_size, bc2_sqrt, weight_decay):
    if not (_compiled(p) and p.flags.c_contiguous and g.shape == p.shape):
        return _host_ops.adam_update(p, g, m, v, b1, b2, eps, step_size, bc2_sqrt, weight_decay)
    f = p.dtype.type
    _launch("adam_step", np.ascontiguousarray(g, p.dtype).reshape(-1), m.reshape(-1),
            v.reshape(-1), f(b1), f(b2), f(eps), f(step_size), f(bc2_sqrt), f(weight_decay),
            p.reshape(-1), serial_below=ADAM_SERIAL_BELOW)
