"""The ops ``fastconv.nn`` needs beyond convolution and pooling, in NumPy: every backend's
version where it has no faster one (and the compiled backends' fallback for the dtypes and
sizes their kernels do not take).

The backend contract (``fastconv._dispatch``) names them; the layers and optimizers reach them
only through it::

    relu(x, out=None) -> y                        relu_backward(grad, y, out=None) -> dx
    dropout(x, seed, threshold, scale, relu=False) -> (y, keep)
    dropout_backward(grad, keep, scale, relu=False) -> dx
    dense(x, w, b) -> x @ w.T + b                 dense_backward(grad, x, w, input_grad) -> (dx, dw)
    sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov) -> buf
    adam_update(p, g, m, v, b1, b2, eps, step_size, bc2_sqrt, weight_decay)   (in place)

Semantics are PyTorch's: ReLU's gradient is a select (0 where y <= 0, even for a NaN grad);
dropout draws element i's mask from splitmix64(seed, i) (``fastconv._splitmix``), so every
backend gives the same mask from the same seed, and scales by a product (NaN and inf
propagate); the optimizer updates are ``torch.optim.SGD`` / ``torch.optim.Adam``'s.

``out=`` may be the input itself (``relu(x, out=x)``, ``relu_backward(g, y, out=g)``): the
training step of ``Sequential`` passes arrays it owns. ``dropout(..., relu=True)`` is dropout
of ``relu(x)`` in one op, the same values; its ``keep`` then holds ``kept | passed << 1``
(``passed``: not ``x <= 0``), and ``dropout_backward(..., relu=True)`` is the gradient of both
(``Sequential``'s training step fuses ReLU -> Dropout with them).
"""

from __future__ import annotations

import numpy as np

from .. import _splitmix

#: Whether ``adam_update`` is one compiled pass (False: NumPy, about 13 passes).
COMPILED_ADAM = False


def relu(x, out=None):
    """max(x, 0), NaN kept. Into ``out`` when given (may be x)."""
    return np.maximum(x, x.dtype.type(0), out=out)


def relu_backward(grad, y, out=None):
    """0 where the ReLU output y <= 0, else grad. Into ``out`` when given (may be grad)."""
    dx = np.where(y <= 0, y.dtype.type(0), grad)
    if out is None:
        return dx
    out[...] = dx
    return out


def dropout(x, seed, threshold, scale, relu=False):
    """(x * (scale where kept, else 0), keep): element i is dropped when the high 32 bits of
    splitmix64(seed, i) are below ``threshold`` (uint32). With ``relu``, of ``relu(x)``, and
    keep (uint8) = kept | (not x <= 0) << 1."""
    keep = (_splitmix.hi32(seed, x.size) >= threshold).reshape(x.shape)
    with np.errstate(invalid="ignore"):  # inf * 0 = NaN, as in PyTorch
        if not relu:
            return x * np.where(keep, scale, x.dtype.type(0)), keep
        y = np.maximum(x, x.dtype.type(0)) * np.where(keep, scale, x.dtype.type(0))
    return y, keep.astype(np.uint8) | np.where(x <= 0, np.uint8(0), np.uint8(2))


def dropout_backward(grad, keep, scale, relu=False):
    """grad * (scale where kept, else 0); with ``relu`` (``keep`` from ``dropout(...,
    relu=True)``), then 0 where the ReLU did not pass."""
    zero = scale.dtype.type(0)
    with np.errstate(invalid="ignore"):
        if not relu:
            return grad * np.where(keep, scale, zero)
        dx = grad * np.where(keep & 1, scale, zero)
    return np.where(keep & 2, dx, zero)



def dense(x, w, b):
    """x (N, in) @ w.T (in, out) + b: ``Dense.forward``."""
    # (out, in) @ (in, N): OpenBLAS takes this orientation about twice as fast as
    # (N, in) @ (in, out) when the batch N is small (docs/performance.md, "lead")
    y = np.ascontiguousarray((w @ x.T).T)
    if b is not None:
        y += b
    return y


def dense_backward(grad, x, w, input_grad=True):
    """(dx = grad @ w or None, dw = grad.T @ x) of ``Dense`` for grad (N, out)."""
    return (grad @ w if input_grad else None), grad.T @ x


def sgd_update(p, g, buf, lr, momentum, dampening, weight_decay, nesterov):
    """One ``torch.optim.SGD`` step of p in place; returns the momentum buffer (None without
    momentum; a new one on the first step, when ``buf`` is None)."""
    if weight_decay:
        g = g + weight_decay * p
    if momentum:
        if buf is None:
            buf = np.array(g, copy=True)
        else:
            buf *= momentum
            buf += (1.0 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    p -= lr * g
    return buf


def adam_update(p, g, m, v, b1, b2, eps, step_size, bc2_sqrt, weight_decay):
    """One ``torch.optim.Adam`` step of p, m and v in place (``step_size`` = lr / (1 - b1**t),
    ``bc2_sqrt`` = sqrt(1 - b2**t))."""
    if weight_decay:
        g = g + weight_decay * p
    # In place, with one temporary: these arrays are the model's size on every step.
    m *= b1
    tmp = np.multiply(g, 1.0 - b1, dtype=p.dtype)
    m += tmp
    v *= b2
    np.multiply(g, g, out=tmp)
    tmp *= 1.0 - b2
    v += tmp
    np.sqrt(v, out=tmp)
    tmp /= bc2_sqrt
    tmp += eps
    np.divide(m, tmp, out=tmp)
    tmp *= step_size
    p -= tmp


NN_OPS = ("relu", "relu_backward", "dropout", "dropout_backward", "dense", "dense_backward",
          "sgd_update", "adam_update")
