"""fastconv: hand-optimized 2-D convolution and max-pool kernels, forward and backward.

Semantics are PyTorch's (``torch.nn.functional.conv2d`` / ``max_pool2d``): cross-correlation,
NCHW activations, OIHW weights ``(C_out, C_in // groups, kH, kW)``, zero padding for convolution,
-inf padding for pooling, the first maximum in a window wins.

>>> import numpy as np, fastconv as fc
>>> x = np.random.rand(8, 3, 32, 32).astype(np.float32)
>>> w = np.random.rand(16, 3, 3, 3).astype(np.float32)
>>> fc.conv2d(x, w, padding="same").shape
(8, 16, 32, 32)

Backends: ``naive`` (Python loops), ``numpy`` (vectorized reference), ``numba`` (parallel CPU),
``cython`` (compiled fallback), ``cuda`` (numba.cuda). See :func:`available_backends`.
"""

from __future__ import annotations

import numpy as np

from . import _validate
from ._dispatch import (
    BackendUnavailableError,
    available_backends,
    backend_status,
    last_algorithm,
    resolve,
    set_backend,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    "conv2d",
    "conv2d_backward",
    "max_pool2d",
    "max_pool2d_backward",
    "available_backends",
    "backend_status",
    "set_backend",
    "use_backend",
    "last_algorithm",
    "BackendUnavailableError",
    "__version__",
]


def _is_empty_host_batch(x) -> bool:
    return isinstance(x, np.ndarray) and x.shape[0] == 0


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1, backend=None):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d``.

    Parameters
    ----------
    x : array (N, C_in, H, W), float32 or float64
    w : array (C_out, C_in // groups, kH, kW), same dtype
    b : array (C_out,) or None
    stride, dilation : int or (h, w) pair, >= 1
    padding : int or (h, w) pair >= 0, or ``"valid"`` / ``"same"`` (zero padding; ``"same"``
        needs stride 1 and pads the extra row/column at the bottom/right for even kernels)
    groups : int dividing C_in and C_out
    backend : backend name, or None for the selection order (see ``fastconv._dispatch``)

    Returns
    -------
    y : array (N, C_out, H_out, W_out) of x's dtype, with
        ``H_out = (H + pad_top + pad_bottom - dilation_h*(kH-1) - 1) // stride_h + 1``
        (likewise W_out).
    """
    x, w, b, p = _validate.conv2d_args(x, w, b, stride, padding, dilation, groups)
    module = resolve(backend, x, w, b)
    if _is_empty_host_batch(x):
        return np.zeros((0, w.shape[0], *p.out_hw), x.dtype)
    return module.conv2d(x, w, b, p)


def _conv2d_reusing_weights(x, w, b, weight_cache, stride=1, padding=0, dilation=1, groups=1,
                            backend=None):
    """:func:`conv2d` for a weight that seldom changes (a layer in inference).

    A backend that prepares the weight for its kernels (``REUSES_WEIGHTS``: numba's Winograd
    transform and plane layout) keeps the prepared weight in ``weight_cache``, a dict the caller
    owns, beside a copy of w's bytes, and reuses it while w is unchanged byte for byte: an
    in-place edit of w is seen by the next call. Other backends ignore the cache.
    """
    x, w, b, p = _validate.conv2d_args(x, w, b, stride, padding, dilation, groups)
    module = resolve(backend, x, w, b)
    if _is_empty_host_batch(x):
        return np.zeros((0, w.shape[0], *p.out_hw), x.dtype)
    if getattr(module, "REUSES_WEIGHTS", False):
        return module.conv2d(x, w, b, p, weight_cache=weight_cache)
    return module.conv2d(x, w, b, p)


def conv2d_backward(dy, x, w, stride=1, padding=0, dilation=1, groups=1,
                    needs=("input", "weight", "bias"), backend=None):
    """Gradients of :func:`conv2d` with respect to its input, weight and bias.

    Parameters
    ----------
    dy : array (N, C_out, H_out, W_out): gradient of the loss with respect to the output
    x, w, stride, padding, dilation, groups : as passed to :func:`conv2d`
    needs : the gradients to compute, any of ``"input"``, ``"weight"``, ``"bias"``

    Returns
    -------
    (dx, dw, db) : arrays shaped like x, w and (C_out,), ``None`` for those not in ``needs``.
    """
    dy, x, w, p, needs = _validate.conv2d_backward_args(
        dy, x, w, stride, padding, dilation, groups, needs
    )
    module = resolve(backend, dy, x, w)
    if _is_empty_host_batch(x):
        return (
            np.zeros(x.shape, x.dtype) if "input" in needs else None,
            np.zeros(w.shape, x.dtype) if "weight" in needs else None,
            np.zeros(w.shape[0], x.dtype) if "bias" in needs else None,
        )
    return module.conv2d_backward(dy, x, w, p, needs)


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               backend=None):
    """2-D max-pool with indices, as ``torch.nn.functional.max_pool2d(return_indices=True)``.

    Parameters
    ----------
    x : array (N, C, H, W), float32 or float64
    kernel_size, stride, padding, dilation : int or (h, w) pair; ``stride`` defaults to
        ``kernel_size``; ``padding`` (-inf) is at most half the kernel
    ceil_mode : round the output size up; a window that would start in the right padding is
        dropped

    Returns
    -------
    y : array (N, C, H_out, W_out), x's dtype, with
        ``H_out = floor_or_ceil((H + 2*pad - dilation*(k-1) - 1) / stride) + 1``
    idx : int64 array of y's shape: the flat index ``h * W + w`` of each maximum in its input
        plane. Ties: the first maximum in row-major window order wins. A NaN in a window makes
        the output NaN and idx points at a NaN.
    """
    x, p = _validate.max_pool2d_args(x, kernel_size, stride, padding, dilation, ceil_mode)
    module = resolve(backend, x)
    if _is_empty_host_batch(x):
        shape = (0, x.shape[1], *p.out_hw)
        return np.zeros(shape, x.dtype), np.zeros(shape, np.int64)
    return module.max_pool2d(x, p)


def max_pool2d_backward(dy, idx, input_shape, backend=None):
    """Gradient of :func:`max_pool2d` with respect to its input.

    Parameters
    ----------
    dy : array (N, C, H_out, W_out)
    idx : int64 array of dy's shape, as returned by :func:`max_pool2d`
    input_shape : (N, C, H, W) of the pooled input

    Returns
    -------
    dx : array ``input_shape`` of dy's dtype; each ``dy`` element is added at its index
        (overlapping windows accumulate).
    """
    dy, idx, shape = _validate.max_pool2d_backward_args(dy, idx, input_shape, check_range=False)
    module = resolve(backend, dy, idx)
    if isinstance(idx, np.ndarray) and not getattr(module, "CHECKS_POOL_INDICES", False):
        _validate.check_pool_indices(idx, shape)
    if _is_empty_host_batch(dy):
        return np.zeros(shape, dy.dtype)
    return module.max_pool2d_backward(dy, idx, shape)
