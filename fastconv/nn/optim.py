"""Optimizers with PyTorch's update rules (``torch.optim.SGD`` / ``torch.optim.Adam``).

An optimizer is not bound to a model: ``step(params, grads)`` takes two dicts with the same keys
(``Sequential.named_parameters()`` / ``named_grads()``) and updates the parameter arrays in
place. Its state (momentum buffers, Adam moments, step count) is keyed by those names, and
``state_dict()`` / ``load_state_dict()`` move it in and out of checkpoints. ``lr`` is a plain
attribute, so a schedule can set it between steps.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _coldstart
from .._validate import check_finite_scalar


def _nonneg(name, v):
    v = check_finite_scalar(name, v)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")
    return v


class Optimizer:
    def __init__(self, lr):
        self.lr = _nonneg("lr", lr)

    def step(self, params: dict, grads: dict) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    @staticmethod
    def _check(params, grads):
        missing = set(params) - set(grads)
        if missing:
            raise KeyError(f"no gradient for parameters {sorted(missing)} (run backward first)")


_FUSED_ADAM = None


def _adam_update(p, g, m, v, b1, b2, eps, step_size, bc2_sqrt, weight_decay):
    """One fused pass over flat float arrays (compiled by Numba when it is installed): the
    NumPy version makes about 13 passes over model-sized arrays per step."""
    one = p.dtype.type(1)
    for i in range(p.size):
        gi = g[i] + weight_decay * p[i]
        mi = b1 * m[i] + (one - b1) * gi
        vi = b2 * v[i] + (one - b2) * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] -= step_size * (mi / (np.sqrt(vi) / bc2_sqrt + eps))


def _fused_adam(defer=False):
    """The compiled fused Adam update, or None without Numba (NumPy fallback)."""
    global _FUSED_ADAM
    if defer and _FUSED_ADAM is None and _coldstart.deferring():
        return None  # numba's kernels are compiling in the background: NumPy until they are
    if _FUSED_ADAM is None:
        try:
            from numba import njit

            from ..backends._numba_options import CACHE
        except Exception:  # not installed, or raising at import (built for another NumPy)
            _FUSED_ADAM = False
        else:
            # Serial on purpose: safe in any thread and after fork; one pass is memory-bound.
            _FUSED_ADAM = njit(cache=CACHE, nogil=True, error_model="numpy")(_adam_update)
    return _FUSED_ADAM or None


def _copy_tree(d: dict) -> dict:
    return {k: np.array(v, copy=True) for k, v in d.items()}


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, dampening, Nesterov and L2 weight
    decay, exactly as ``torch.optim.SGD``::

        g = grad + weight_decay * p
        buf = g (first step) or momentum * buf + (1 - dampening) * g
        g = g + momentum * buf (nesterov) or buf
        p -= lr * g
    """

    def __init__(self, lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(lr)
        self.momentum = _nonneg("momentum", momentum)
        self.dampening = _nonneg("dampening", dampening)
        self.weight_decay = _nonneg("weight_decay", weight_decay)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and dampening = 0")
        self.buffers: dict = {}

    def step(self, params, grads):
        self._check(params, grads)
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                buf = self.buffers.get(name)
                if buf is None:
                    buf = self.buffers[name] = np.array(g, copy=True)
                else:
                    buf *= self.momentum
                    buf += (1.0 - self.dampening) * g
                g = g + self.momentum * buf if self.nesterov else buf
            p -= self.lr * g

    def state_dict(self):
        return {"lr": self.lr, "momentum_buffer": _copy_tree(self.buffers)}

    def load_state_dict(self, state):
        self.lr = float(state["lr"])
        self.buffers = _copy_tree(state["momentum_buffer"])

    def __repr__(self):
        return (f"SGD(lr={self.lr}, momentum={self.momentum}, dampening={self.dampening}, "
                f"weight_decay={self.weight_decay}, nesterov={self.nesterov})")


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction and L2 weight decay, as ``torch.optim.Adam``::

        g = grad + weight_decay * p
        m = b1 * m + (1 - b1) * g;   v = b2 * v + (1 - b2) * g**2
        p -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps)
    """

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=None):
        super().__init__(lr)
        self.fused = fused  # None: the fused Numba update when Numba is installed
        b1, b2 = (check_finite_scalar("betas", b) for b in betas)
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {tuple(betas)!r}")
        self.betas = (b1, b2)
        self.eps = _nonneg("eps", eps)
        self.weight_decay = _nonneg("weight_decay", weight_decay)
        self.t = 0
        self.exp_avg: dict = {}
        self.exp_avg_sq: dict = {}

    def step(self, params, grads):
        self._check(params, grads)
        self.t += 1
        b1, b2 = self.betas
        step_size = self.lr / (1.0 - b1 ** self.t)
        bc2_sqrt = math.sqrt(1.0 - b2 ** self.t)
        kernel = _fused_adam(defer=self.fused is None) if self.fused in (None, True) else None
        if self.fused and kernel is None:
            raise RuntimeError("Adam(fused=True) needs Numba")
        for name, p in params.items():
            g = grads[name]
            m = self.exp_avg.get(name)
            if m is None:
                m = self.exp_avg[name] = np.zeros_like(p)
                self.exp_avg_sq[name] = np.zeros_like(p)
            v = self.exp_avg_sq[name]
            if kernel is not None and p.flags.c_contiguous and g.shape == p.shape:
                f = p.dtype.type
                kernel(p.reshape(-1), np.ascontiguousarray(g, p.dtype).reshape(-1),
                       m.reshape(-1), v.reshape(-1), f(b1), f(b2), f(self.eps), f(step_size),
                       f(bc2_sqrt), f(self.weight_decay))
                continue
            if self.weight_decay:
                g = g + self.weight_decay * p
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
            tmp += self.eps
            np.divide(m, tmp, out=tmp)
            tmp *= step_size
            p -= tmp

    def state_dict(self):
        return {"lr": self.lr, "step": self.t, "exp_avg": _copy_tree(self.exp_avg),
                "exp_avg_sq": _copy_tree(self.exp_avg_sq)}

    def load_state_dict(self, state):
        self.lr = float(state["lr"])
        self.t = int(state["step"])
        self.exp_avg = _copy_tree(state["exp_avg"])
        self.exp_avg_sq = _copy_tree(state["exp_avg_sq"])

    def __repr__(self):
        return (f"Adam(lr={self.lr}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay})")


OPTIMIZERS = {"sgd": SGD, "adam": Adam}
