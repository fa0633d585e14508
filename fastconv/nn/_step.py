"""The training step of ``Sequential``: the layers' forward and backward, with the element-wise
layers fused into their neighbours where the result is provably the same.

``Sequential.train_batch`` runs the model as a list of *stages*; each is one layer, or one of
these fusions, which give the same outputs and the same gradients as the layers one by one:

* ``ReLU -> MaxPool2D`` runs as ``MaxPool2D -> ReLU``: the max-pool of ``relu(x)`` equals
  ``relu`` of the max-pool of ``x`` (ReLU is monotone, so it commutes with a maximum), and the
  ReLU then runs on the pooled tensor (``k*k`` times smaller for a ``k x k``, stride ``k``
  pool). The gradients are equal too: where a window's maximum is > 0 (or NaN), it sits at the
  same first position in ``x`` and in ``relu(x)``, and ReLU passes its gradient there; where
  it is <= 0, the layers one by one scatter the window's gradient onto an element with
  ``relu(x) = 0``, whose ReLU gradient is 0 (a select: even for a NaN or inf gradient), and
  the fused stage zeroes it before the scatter. An element that is the maximum of no window
  gets 0 either way. MaxPool's -inf padding never wins a window (PyTorch's geometry keeps a
  real element in each), and -0.0 becomes 0 in either order. Only the cached argmax indices
  differ (those of ``x`` instead of ``relu(x)``), and they stay inside the step.
* ``ReLU -> Dropout`` (also after such a pool) runs as one pass (``dropout(..., relu=True)``):
  the same mask from the same draw of the Dropout's generator, the same products.
* A lone ``ReLU`` writes its output over its input when that is an array of the step's own
  (the fresh output of a ``Conv2D``, ``Dense`` or ``MaxPool2D``, which do not keep it), and its
  gradient over the incoming one (gradients between layers are the step's own; the loss's is
  not written to).

The layers' public ``forward`` / ``backward`` and ``Sequential.forward`` / ``backward`` are
unchanged (each layer on its own); the stages keep their caches to themselves and use the
layers' ops (``backend=``, else the selection order) as the layers do.
"""

from __future__ import annotations

import numpy as np

from .layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, _ops

# Layers whose forward output is a new array they keep no reference to.
_FRESH_OUTPUT = (Conv2D, Dense, MaxPool2D)


def _writable(a) -> bool:
    """A C-contiguous, writeable NumPy array (an op may write its result over it)."""
    return isinstance(a, np.ndarray) and a.flags.writeable and a.flags.c_contiguous


class _Stage:
    """One layer, run as its own ``forward`` / ``backward``."""

    owns_output = False  # whether the output is a new array no layer keeps

    def __init__(self, layer, index):
        self.layer, self.first = layer, index

    def forward(self, x, owned):
        y = self.layer.forward(x, training=True)
        kind = type(self.layer)
        # Dropout (training) makes a new array; Flatten's is a view of x; either passes x
        # through when it is x itself.
        self.owns_output = kind in _FRESH_OUTPUT or (
            kind in (Dropout, Flatten) and (owned or not np.may_share_memory(y, x)))
        return y

    def backward(self, grad, input_grad):
        return self.layer.backward(grad, input_grad=input_grad)

    def describe(self) -> str:
        return f"{self.first:2d} {self.layer!r}"


class _ReLUStage(_Stage):
    """A lone ``ReLU``, in place on the arrays the step owns."""

    def forward(self, x, owned):
        layer = self.layer
        ops = _ops(layer.backend, x)
        inplace = owned and _writable(x)
        y = ops.relu(x, out=x) if inplace else ops.relu(x)
        layer._cache = y  # as ReLU.forward: its backward reads where y <= 0
        return y

    def backward(self, grad, input_grad, owned=True):
        if not input_grad:
            return None
        y = self.layer._no_cache()
        grad = np.asarray(grad, dtype=y.dtype)
        ops = _ops(self.layer.backend, grad)
        if owned and _writable(grad):
            return ops.relu_backward(grad, y, out=grad)
        return ops.relu_backward(grad, y)


class _FusedStage(_Stage):
    """``[MaxPool2D] -> ReLU [-> Dropout]``: an optional max-pool (moved in front of the ReLU,
    see the module docstring), then the ReLU, fused with a following Dropout when there is one
    in training mode (p > 0)."""

    owns_output = True

    def __init__(self, relu, pool, dropout, index):
        super().__init__(relu, index)
        self.relu, self.pool, self.dropout = relu, pool, dropout
        self._cache = None

    def describe(self) -> str:
        layers = [self.pool, self.relu, self.dropout]
        return f"{self.first:2d} " + " + ".join(repr(la) for la in layers if la is not None)

    def forward(self, x, owned):
        if self.pool is not None:
            x = self.pool.forward(x, training=True)  # the pool's own cache: its argmax
            owned = True
        ops = _ops(self.relu.backend, x)
        drop = self.dropout
        if drop is not None and drop.p > 0.0:
            seed, scale = drop._draw(x.dtype)
            y, code = ops.dropout(x, seed, drop._threshold(), scale, relu=True)
            self._cache = ("dropout", code, scale)
        else:
            y = ops.relu(x, out=x) if owned and _writable(x) else ops.relu(x)
            self._cache = ("relu", y)
            self.owns_output = False  # y is the ReLU's cache
        self.relu._cache = None
        if drop is not None:
            drop._cache = None
        return y

    def backward(self, grad, input_grad, owned=True):
        if not input_grad:  # no parameters in these layers
            return None
        if self._cache is None:
            raise RuntimeError("backward called before the training forward")
        ops = _ops(self.relu.backend, grad)
        if self._cache[0] == "dropout":
            _, code, scale = self._cache
            grad = ops.dropout_backward(np.asarray(grad), code, scale, relu=True)
        else:
            y = self._cache[1]
            grad = np.asarray(grad, dtype=y.dtype)
            if owned and _writable(grad):
                grad = ops.relu_backward(grad, y, out=grad)
            else:
                grad = ops.relu_backward(grad, y)
        if self.pool is not None:
            grad = self.pool.backward(grad, input_grad=input_grad)
        return grad


def plan(layers) -> list:
    """The stages of a training step over ``layers`` (see the module docstring)."""
    stages, i, n = [], 0, len(layers)

    def at(j, cls):
        return j < n and type(layers[j]) is cls

    while i < n:
        layer = layers[i]
        if type(layer) is ReLU:
            pool = layers[i + 1] if at(i + 1, MaxPool2D) else None
            j = i + 1 + (pool is not None)
            drop = layers[j] if at(j, Dropout) and layers[j].backend == layer.backend else None
            if pool is None and drop is None:
                stages.append(_ReLUStage(layer, i))
                i += 1
            else:
                stages.append(_FusedStage(layer, pool, drop, i))
                i = j + (drop is not None)
        else:
            stages.append(_Stage(layer, i))
            i += 1
    return stages


def forward(stages, x):
    """The training forward over ``stages``; the input ``x`` is the caller's (never written)."""
    owned = False
    for stage in stages:
        x = stage.forward(x, owned)
        owned = stage.owns_output
    return x


def backward(stages, grad, input_grad=False):
    """Backpropagate ``grad`` (the loss's: never written) through ``stages``."""
    owned = False
    for k in range(len(stages) - 1, -1, -1):
        new = backward_one(stages[k], grad, input_grad or stages[k].first > 0, owned)
        # a layer's new gradient is the step's own; one passed through (a view) stays as it was
        owned = owned or (new is not None and not np.may_share_memory(new, grad))
        grad = new
    return grad


def backward_one(stage, grad, input_grad, owned):
    """``stage``'s backward; ``owned``: whether ``grad`` is the step's own (may be written)."""
    if isinstance(stage, (_ReLUStage, _FusedStage)):
        return stage.backward(grad, input_grad, owned)
    return stage.backward(grad, input_grad)
