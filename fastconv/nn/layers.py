"""Layers: each ``forward`` caches exactly what its ``backward`` needs, beside it.

Conventions (PyTorch's layouts, so weights move between the two unchanged):

* activations are NCHW (``Conv2D``, ``MaxPool2D``) or ``(N, features)`` (``Dense``);
* ``Conv2D.params["weight"]`` is OIHW ``(C_out, C_in // groups, kH, kW)``, ``["bias"]`` is
  ``(C_out,)``; ``Dense.params["weight"]`` is ``(out, in)``, ``["bias"]`` is ``(out,)``;
* ``forward(x, training=True)`` returns the output; ``backward(grad, input_grad=True)`` returns
  the gradient for the input (``None`` when ``input_grad`` is false: the first layer of a model
  needs none) and fills ``layer.grads`` with the same keys as ``layer.params``;
* every layer takes ``backend=`` (a fastconv backend name, ``None`` = the selection order), and
  ``dtype=`` for its parameters (float32 to train, float64 for gradient checks).
"""

from __future__ import annotations

import numpy as np

import fastconv as fc

from .. import _dispatch, _validate
from . import init as _init


def _rng(rng) -> np.random.Generator:
    """A Generator from a Generator, a seed or ``None`` (fresh entropy)."""
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _ops(backend, *arrays):
    """The backend module whose ops (``relu``, ``dense``, ...: the contract of
    ``fastconv._dispatch``) this layer runs: ``backend=``, else the selection order."""
    return _dispatch.resolve(backend, *arrays)


class Layer:
    """Base class: ``params``/``grads`` dicts, ``forward``/``backward``, shape inference."""

    def __init__(self, backend=None):
        self.backend = backend
        self.params: dict = {}
        self.grads: dict = {}
        self._cache = None

    def forward(self, x, training=True):
        raise NotImplementedError

    def backward(self, grad, input_grad=True):
        raise NotImplementedError

    def __call__(self, x, training=True):
        return self.forward(x, training)

    def output_shape(self, input_shape) -> tuple:
        """Output shape for one sample of ``input_shape`` (no batch dimension)."""
        return tuple(input_shape)

    def get_config(self) -> dict:
        """Constructor arguments that rebuild this layer's architecture (JSON-able)."""
        return {}

    def num_params(self) -> int:
        return int(sum(p.size for p in self.params.values()))

    def _no_cache(self):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        return self._cache

    _positional: tuple = ()  # config keys shown without their name in __repr__

    def __repr__(self):
        cfg = self.get_config()
        args = [repr(cfg.pop(k)) for k in self._positional]
        args += [f"{k}={v!r}" for k, v in cfg.items()]
        return f"{type(self).__name__}({', '.join(args)})"


class Conv2D(Layer):
    """2-D convolution (cross-correlation), as ``torch.nn.Conv2d``.

    Input ``(N, C_in, H, W)``; output ``(N, C_out, H_out, W_out)`` with
    ``H_out = (H + pad_top + pad_bottom - dilation*(kH-1) - 1) // stride + 1`` (likewise W).
    Weight initialised with ``init`` (He normal by default), bias with zeros.
    """

    _positional = ("in_channels", "out_channels")

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, init="he_normal", rng=None, dtype=np.float32,
                 backend=None):
        super().__init__(backend)
        kh, kw = _validate.pair("kernel_size", kernel_size, 1)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = (kh, kw)
        self.stride = _validate.pair("stride", stride, 1)
        if not isinstance(padding, str):
            padding = _validate.pair("padding", padding, 0)
        self.padding = padding
        self.dilation = _validate.pair("dilation", dilation, 1)
        self.groups = int(groups)
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        shape = (self.out_channels, self.in_channels // self.groups, kh, kw)
        self.params["weight"] = _init.get(init)(shape, _rng(rng), dtype=dtype)
        if bias:
            self.params["bias"] = np.zeros(self.out_channels, dtype)

    def _geometry(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    groups=self.groups)

    def forward(self, x, training=True):
        self._cache = x
        if not training:  # the prepared weight is reused while it is unchanged (inference)
            if getattr(self, "_weight_cache", None) is None:
                self._weight_cache = {}
            return fc._conv2d_reusing_weights(x, self.params["weight"], self.params.get("bias"),
                                              self._weight_cache, backend=self.backend,
                                              **self._geometry())
        return fc.conv2d(x, self.params["weight"], self.params.get("bias"),
                         backend=self.backend, **self._geometry())

    def backward(self, grad, input_grad=True):
        x = self._no_cache()
        needs = ("weight",) + (("bias",) if "bias" in self.params else ())
        needs += ("input",) if input_grad else ()
        dx, dw, db = fc.conv2d_backward(grad, x, self.params["weight"], needs=needs,
                                        backend=self.backend, **self._geometry())
        self.grads["weight"] = dw
        if db is not None:
            self.grads["bias"] = db
        return dx

    def output_shape(self, input_shape):
        c, h, w = input_shape
        p = _validate._conv_geometry((1, c, h, w), self.params["weight"].shape,
                                     **self._geometry())
        return (self.out_channels, *p.out_hw)

    def get_config(self):
        cfg = dict(in_channels=self.in_channels, out_channels=self.out_channels,
                   kernel_size=self.kernel_size, stride=self.stride)
        if self.padding != (0, 0):
            cfg["padding"] = self.padding
        if self.dilation != (1, 1):
            cfg["dilation"] = self.dilation
        if self.groups != 1:
            cfg["groups"] = self.groups
        if "bias" not in self.params:
            cfg["bias"] = False
        return cfg


class MaxPool2D(Layer):
    """2-D max-pool, as ``torch.nn.MaxPool2d`` (-inf padding; ties: the first maximum wins).

    Output ``H_out = floor_or_ceil((H + 2*pad - dilation*(k-1) - 1) / stride) + 1``.
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                 backend=None):
        super().__init__(backend)
        self.kernel_size = _validate.pair("kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _validate.pair("stride", stride, 1)
        self.padding = _validate.pair("padding", padding, 0)
        self.dilation = _validate.pair("dilation", dilation, 1)
        self.ceil_mode = bool(ceil_mode)

    def _geometry(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation,
                    ceil_mode=self.ceil_mode)

    def forward(self, x, training=True):
        y, idx = fc.max_pool2d(x, self.kernel_size, backend=self.backend, **self._geometry())
        self._cache = (idx, x.shape)
        return y

    def backward(self, grad, input_grad=True):
        idx, shape = self._no_cache()
        if not input_grad:
            return None
        return fc.max_pool2d_backward(grad, idx, shape, backend=self.backend)

    def output_shape(self, input_shape):
        c, h, w = input_shape
        out = tuple(
            _validate.pool_output_size(size, k, s, p, d, self.ceil_mode)
            for size, k, s, p, d in zip(
                (h, w), self.kernel_size, self.stride, self.padding, self.dilation
            )
        )
        return (c, *out)

    def get_config(self):
        cfg = dict(kernel_size=self.kernel_size, stride=self.stride)
        if self.padding != (0, 0):
            cfg["padding"] = self.padding
        if self.dilation != (1, 1):
            cfg["dilation"] = self.dilation
        if self.ceil_mode:
            cfg["ceil_mode"] = True
        return cfg


class ReLU(Layer):
    """``max(x, 0)`` (NaN stays NaN); the gradient is 0 where ``x <= 0``, else ``grad`` (a select,
    exactly as PyTorch's: 0 even where ``grad`` is NaN, passed on where ``x`` is NaN): the
    backend's ``relu`` / ``relu_backward`` (parallel kernels on the numba backend)."""

    def forward(self, x, training=True):
        y = _ops(self.backend, x).relu(x)
        self._cache = y  # the output itself: backward needs only where it is <= 0
        return y

    def backward(self, grad, input_grad=True):
        y = self._no_cache()
        if not input_grad:
            return None
        grad = np.asarray(grad, dtype=y.dtype)
        return _ops(self.backend, grad).relu_backward(grad, y)


class Flatten(Layer):
    """``(N, d1, d2, ...) -> (N, d1*d2*...)`` (C order, as ``torch.nn.Flatten``)."""

    def forward(self, x, training=True):
        self._cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, grad, input_grad=True):
        shape = self._no_cache()
        return grad.reshape(shape) if input_grad else None

    def output_shape(self, input_shape):
        return (int(np.prod(input_shape)),)


class Dense(Layer):
    """Fully connected: ``y = x @ weight.T + bias``, weight ``(out, in)`` as ``torch.nn.Linear``.

    Input ``(N, in_features)``, output ``(N, out_features)``. The products are the backend's
    ``dense`` / ``dense_backward`` (on the numba backend, large float32 products run as
    register-blocked kernels on numba's threads; elsewhere NumPy's matmul, BLAS).
    """

    _positional = ("in_features", "out_features")

    def __init__(self, in_features, out_features, bias=True, init="he_normal", rng=None,
                 dtype=np.float32, backend=None):
        super().__init__(backend)
        self.in_features, self.out_features = int(in_features), int(out_features)
        shape = (self.out_features, self.in_features)
        self.params["weight"] = _init.get(init)(shape, _rng(rng), dtype=dtype)
        if bias:
            self.params["bias"] = np.zeros(self.out_features, dtype)

    def forward(self, x, training=True):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"Dense expects input (N, {self.in_features}), got shape {tuple(x.shape)}"
            )
        self._cache = x
        return _ops(self.backend, x).dense(x, self.params["weight"], self.params.get("bias"))

    def backward(self, grad, input_grad=True):
        x = self._no_cache()
        dx, self.grads["weight"] = _ops(self.backend, grad).dense_backward(
            grad, x, self.params["weight"], input_grad)
        if "bias" in self.params:
            self.grads["bias"] = grad.sum(axis=0)
        return dx

    def output_shape(self, input_shape):
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(
                f"Dense expects ({self.in_features},) per sample, got {tuple(input_shape)}"
            )
        return (self.out_features,)

    def get_config(self):
        cfg = dict(in_features=self.in_features, out_features=self.out_features)
        if "bias" not in self.params:
            cfg["bias"] = False
        return cfg


class Dropout(Layer):
    """Inverted dropout: in training, zero each element with probability ``p`` and scale the
    rest by ``1 / (1 - p)``; identity at inference. The mask is drawn from ``rng`` (a
    ``numpy.random.Generator``; ``Sequential`` can share one generator across layers)."""

    def __init__(self, p=0.5, rng=None, backend=None):
        super().__init__(backend)
        p = _validate.check_finite_scalar("p", p)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"p must be in [0, 1), got {p!r}")
        self.p = p
        self.rng = _rng(rng)

    def _threshold(self) -> int:
        """Draws below this uint32 value drop their element: P(drop) = threshold / 2**32,
        within 2**-32 of ``p``."""
        return min(int(round(self.p * 2.0**32)), 2**32 - 1)

    def _draw(self, dtype):
        """(seed, scale) of one training forward: one draw from the generator per call seeds
        a counter-based stream (``_splitmix``), so every backend gives the same mask from the
        same seed. (``Sequential``'s training step draws through this too.)"""
        return np.uint64(self.rng.bit_generator.random_raw()), dtype.type(1.0 / (1.0 - self.p))

    def forward(self, x, training=True):
        if not training or self.p == 0.0:
            self._cache = None
            return x
        seed, scale = self._draw(x.dtype)
        y, keep = _ops(self.backend, x).dropout(x, seed, self._threshold(), scale)
        self._cache = (keep, scale)
        return y

    def backward(self, grad, input_grad=True):
        if not input_grad:
            return None
        if self._cache is None:
            return grad
        keep, scale = self._cache
        grad = np.asarray(grad)
        return _ops(self.backend, grad).dropout_backward(grad, keep, scale)

    def get_config(self):
        return dict(p=self.p)


LAYERS = {cls.__name__: cls for cls in (Conv2D, MaxPool2D, ReLU, Flatten, Dense, Dropout)}
