"""Losses: ``forward(logits, labels)`` returns the mean loss, ``backward()`` its gradient."""

from __future__ import annotations

import numpy as np


class SoftmaxCrossEntropy:
    """Mean cross-entropy of a softmax over ``logits``, as ``torch.nn.functional.cross_entropy``.

    ``logits`` ``(N, C)`` float, ``labels`` ``(N,)`` integers in ``[0, C)``. The softmax is
    computed stably (max subtracted). ``backward()`` returns ``(softmax - onehot) / N``, of the
    logits' dtype.
    """

    def __init__(self):
        self._cache = None

    def forward(self, logits, labels) -> float:
        logits = np.asarray(logits)
        labels = np.asarray(labels)
        if logits.ndim != 2:
            raise ValueError(f"logits must be (N, C), got shape {logits.shape}")
        if labels.shape != (logits.shape[0],):
            raise ValueError(
                f"labels must have shape ({logits.shape[0]},) to match logits {logits.shape}, "
                f"got {labels.shape}"
            )
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        n, c = logits.shape
        if n and (labels.min() < 0 or labels.max() >= c):
            raise ValueError(
                f"labels must lie in [0, {c}), got values in [{labels.min()}, {labels.max()}]"
            )
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        rows = np.arange(n)
        loss = float(np.mean(np.log(s[:, 0]) - z[rows, labels])) if n else 0.0
        self._cache = (e / s, labels)
        return loss

    __call__ = forward

    def backward(self):
        if self._cache is None:
            raise RuntimeError("SoftmaxCrossEntropy.backward called before forward")
        probs, labels = self._cache
        grad = probs.copy()
        n = grad.shape[0]
        grad[np.arange(n), labels] -= 1
        grad /= max(n, 1)
        return grad

    def __repr__(self):
        return "SoftmaxCrossEntropy()"
