"""Batch inference over dask arrays (``dask[array]``; any scheduler, ``dask.distributed`` too).

``predict_dask`` maps :meth:`Sequential.predict` over the chunks of the batch axis and stays
lazy. The model is one node of the graph (a ``dask.delayed`` snapshot of its parameters) that
every block task depends on: the scheduler ships it to each worker once, not once per block.
A chunk of the wrong shape or dtype fails with the same error as NumPy input: the model first
runs on one zero sample of the array's per-sample shape and dtype, eagerly.
"""

from __future__ import annotations

import copy

import numpy as np

INSTALL_HINT = 'pip install "fastconv[dask]"'


def _import_dask():
    try:
        import dask
        import dask.array as da
    except ImportError as e:
        raise ImportError(f"dask inference needs dask[array] ({e}); install it with: "
                          f"{INSTALL_HINT}") from e
    return dask, da


def _snapshot(model):
    """A copy of ``model`` for inference: its own parameter arrays, no gradients or caches.

    The result of ``predict_dask`` is lazy; the snapshot makes it use the weights as they were
    when it was called, and keeps the graph small (no training caches)."""
    snap = copy.copy(model)
    snap.layers = []
    for layer in model.layers:
        clone = copy.copy(layer)
        clone.params = {k: np.array(v, copy=True) for k, v in layer.params.items()}
        clone.grads = {}
        clone._cache = None
        snap.layers.append(clone)
    return snap


def _predict_block(block, model, batch_size, transform, out_tail, out_dtype):
    if len(block) == 0:
        return np.empty((0, *out_tail), out_dtype)
    return model.predict(block, batch_size=batch_size, transform=transform)


def _batch_axis_only(x):
    if x.ndim < 1:
        raise ValueError("x must have a batch axis, got a 0-d dask array")
    if any(len(c) > 1 for c in x.chunks[1:]):
        x = x.rechunk({i: -1 for i in range(1, x.ndim)})
    return x


def predict_dask(model, x, batch_size=256, transform=None):
    """Lazy outputs of ``model`` for the dask array ``x`` ``(N, ...)``.

    Returns a dask array ``(N, *out)`` with ``x``'s chunks along the batch axis (other axes are
    merged into one chunk first). Each block runs ``model.predict(block, batch_size, transform)``.
    """
    dask, da = _import_dask()
    x = _batch_axis_only(x)
    probe = np.zeros((1, *x.shape[1:]), x.dtype)
    out = _snapshot(model).predict(probe, batch_size=1, transform=transform)  # NumPy's errors
    snap = _snapshot(model)  # a fresh one: the probe left caches behind
    out_tail, out_dtype = out.shape[1:], out.dtype
    model_node = dask.delayed(snap, pure=False, traverse=False)
    return da.map_blocks(
        _predict_block, x, model_node, batch_size, transform, out_tail, out_dtype,
        chunks=(x.chunks[0], *((s,) for s in out_tail)),
        drop_axis=list(range(1, x.ndim)), new_axis=list(range(1, 1 + len(out_tail))),
        dtype=out_dtype, meta=np.empty((0,) * (1 + len(out_tail)), out_dtype),
        name="fastconv-predict",
    )


def _block_sums(out, labels, loss):
    """``[loss sum, correct, count]`` of one block."""
    labels = np.asarray(labels)
    if len(labels) != len(out):
        raise ValueError(f"a block has {len(out)} outputs but {len(labels)} labels")
    if len(out) == 0:
        return np.zeros(3)
    value = loss.forward(out, labels)
    return np.array([value * len(out), np.sum(out.argmax(axis=1) == labels), len(out)],
                    np.float64)


def evaluate_dask(model, x, y, batch_size=256, transform=None, loss=None):
    """``(mean loss, accuracy)`` of ``model`` on dask (or NumPy) ``x`` with labels ``y``.

    Computes with the current scheduler (a ``dask.distributed`` Client when one is active);
    each block sends back three numbers.
    """
    from ..nn.losses import SoftmaxCrossEntropy

    dask, da = _import_dask()
    if not hasattr(x, "__dask_graph__"):
        x = da.from_array(np.asarray(x), chunks=(batch_size * 16,) + np.shape(x)[1:])
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    out = predict_dask(model, x, batch_size=batch_size, transform=transform)
    labels = y if hasattr(y, "__dask_graph__") else da.from_array(np.asarray(y))
    labels = labels.rechunk((out.chunks[0],))
    loss = loss or SoftmaxCrossEntropy()
    parts = [dask.delayed(_block_sums)(o, t, loss)
             for o, t in zip(out.to_delayed().ravel(), labels.to_delayed().ravel())]
    total = np.sum(dask.compute(*parts), axis=0) if parts else np.zeros(3)
    n = max(total[2], 1.0)
    return float(total[0] / n), float(total[1] / n)
