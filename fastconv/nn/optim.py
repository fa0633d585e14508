"""Optimizers with PyTorch's update rules (``torch.optim.SGD`` / ``torch.optim.Adam``).

An optimizer is not bound to a model: ``step(params, grads)`` takes two dicts with the same keys
(``Sequential.named_parameters()`` / ``named_grads()``) and updates the parameter arrays in
place. Its state (momentum buffers, Adam moments, step count) is keyed by those names, and
``state_dict()`` / ``load_state_dict()`` move it in and out of checkpoints. ``lr`` is a plain
attribute, so a schedule can set it between steps. The update itself is the backend's
``sgd_update`` / ``adam_update`` (``backend=``, else the selection order, as for the layers).
"""

from __future__ import annotations

import math

import numpy as np

from .. import _dispatch
from .._validate import check_finite_scalar


def _nonneg(name, v):
    v = check_finite_scalar(name, v)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")
    return v


class Optimizer:
    def __init__(self, lr, backend=None):
        self.lr = _nonneg("lr", lr)
        self.backend = backend

    def _ops(self, p):
        """The backend module whose update runs on parameter ``p``."""
        return _dispatch.resolve(self.backend, p)

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

    def __init__(self, lr=0.01, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 backend=None):
        super().__init__(lr, backend)
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
            buf = self._ops(p).sgd_update(p, grads[name], self.buffers.get(name), self.lr,
                                          self.momentum, self.dampening, self.weight_decay,
                                          self.nesterov)
            if buf is not None:
                self.buffers[name] = buf

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

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=None,
                 backend=None):
        super().__init__(lr, backend)
        # None: the backend's update (one compiled pass on numba); True: insist on a compiled
        # one; False: NumPy's
        self.fused = fused
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
        ops = None
        for name, p in params.items():
            m = self.exp_avg.get(name)
            if m is None:
                m = self.exp_avg[name] = np.zeros_like(p)
                self.exp_avg_sq[name] = np.zeros_like(p)
            if ops is None:  # one backend for the whole step (parameters share a device)
                ops = self._update_ops(p)
            ops.adam_update(p, grads[name], m, self.exp_avg_sq[name], b1, b2, self.eps,
                            step_size, bc2_sqrt, self.weight_decay)

    def _update_ops(self, p):
        """The backend whose ``adam_update`` runs: NumPy for ``fused=False``; for
        ``fused=True`` a backend with a compiled update (the named one, else numba, even while
        automatic selection runs cython during a background compile); else the selection."""
        if self.fused is False:
            return _dispatch.get_backend("numpy")
        if not self.fused:
            return self._ops(p)
        name = self.backend or "numba"
        ops = _dispatch.get_backend(name)
        if not ops.COMPILED_ADAM:
            raise RuntimeError(f"Adam(fused=True) needs a backend with a compiled update "
                               f"(numba), not {name!r}")
        return ops

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
