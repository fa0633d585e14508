"""Synchronous data parallelism over MPI, in Horovod's shape (mpi4py, imported lazily).

* :func:`broadcast_parameters` copies rank 0's parameters to every rank (one ``Bcast`` per dtype).
* :class:`GradientAllreduce` averages gradients with one ``Allreduce`` per step over one flat
  buffer per dtype (a float32 model: exactly one call), never one call per parameter. A few
  extra scalars (the batch loss, a stop flag) ride in the same buffer for free.
* :class:`DistributedOptimizer` wraps any fastconv optimizer: its ``step`` averages, then steps.
* :func:`shard` gives each rank its contiguous part of a global batch.
* :func:`abort_on_error` turns an exception on one rank into ``MPI_Abort`` of the whole job, so
  that the other ranks do not wait forever inside a collective.

Every rank receives the same reduced buffer (MPICH reduces each element in one order for all
ranks), and the optimizers are deterministic, so the parameters stay bitwise equal across ranks;
``tests/test_mpi.py`` checks it after every step.
"""

from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager

import numpy as np

INSTALL_HINT = 'pip install "fastconv[mpi]"'


def import_mpi():
    """``mpi4py.MPI``, or an ``ImportError`` that says how to install it."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ImportError(
            f"distributed training needs mpi4py and an MPI library ({e}); "
            f"install them with: {INSTALL_HINT}"
        ) from e
    return MPI


def world():
    """``MPI.COMM_WORLD`` (imports mpi4py)."""
    return import_mpi().COMM_WORLD


def shard(n: int, rank: int, size: int) -> slice:
    """The contiguous part of ``range(n)`` that ``rank`` of ``size`` takes.

    Parts differ in length by at most one (``np.array_split``'s rule) and may be empty when
    ``n < size``; concatenated in rank order they give ``range(n)`` back.
    """
    return slice(rank * n // size, (rank + 1) * n // size)


def _check_comm(comm):
    for attr in ("Get_rank", "Get_size", "Allreduce", "Bcast"):
        if not hasattr(comm, attr):
            raise TypeError(f"comm must be an mpi4py communicator (e.g. MPI.COMM_WORLD), "
                            f"got {type(comm).__name__}")
    return comm


def _buckets(arrays: dict):
    """``{dtype: [(name, shape, offset, size), ...]}`` in the dict's order."""
    buckets: dict = {}
    for name, a in arrays.items():
        entries = buckets.setdefault(np.dtype(a.dtype), [])
        offset = entries[-1][2] + entries[-1][3] if entries else 0
        entries.append((name, a.shape, offset, a.size))
    return buckets


def broadcast_parameters(model, comm, root: int = 0) -> None:
    """Overwrite every rank's parameters with ``root``'s (one ``Bcast`` per dtype).

    ``model`` is a :class:`fastconv.nn.Sequential` (anything with ``named_parameters()``).
    """
    _check_comm(comm)
    params = model.named_parameters()
    for dtype, entries in _buckets(params).items():
        total = entries[-1][2] + entries[-1][3]
        flat = np.empty(total, dtype)
        if comm.Get_rank() == root:
            for name, _, off, size in entries:
                flat[off:off + size] = params[name].reshape(-1)
        comm.Bcast(flat, root=root)
        for name, shape, off, size in entries:
            params[name][...] = flat[off:off + size].reshape(shape)


class GradientAllreduce:
    """Sum ``weight * grad`` over all ranks with one ``Allreduce`` per dtype.

    With ``weight = n_local / n_global`` (this rank's share of the global batch) the result is
    the gradient of the mean loss over the global batch, whatever the shard sizes.

    Parameters
    ----------
    comm : mpi4py communicator

    Calling it returns ``(grads, extras)``: the averaged gradients as views of the flat buffer
    (valid until the next call), and the sums of ``extras`` over ranks (float64 array).
    """

    def __init__(self, comm):
        self.comm = _check_comm(comm)
        self._layout = None
        self._buffers: dict = {}
        self._entries: dict = {}
        self._n_extras = 0

    def _build(self, grads, n_extras):
        self._entries = _buckets(grads)
        self._buffers = {}
        first = True
        for dtype, entries in self._entries.items():
            total = entries[-1][2] + entries[-1][3]
            # The extras ride in the first bucket, after the gradients.
            self._buffers[dtype] = np.zeros(total + (n_extras if first else 0), dtype)
            first = False
        self._n_extras = n_extras

    def __call__(self, grads: dict, weight: float, extras=()):
        MPI = import_mpi()
        layout = (tuple((k, g.shape, g.dtype.str) for k, g in grads.items()), len(extras))
        if layout != self._layout:
            self._build(grads, len(extras))
            self._layout = layout
        out = {}
        extras_out = np.zeros(len(extras))
        for i, (dtype, entries) in enumerate(self._entries.items()):
            buf = self._buffers[dtype]
            for name, shape, off, size in entries:
                view = buf[off:off + size]
                if weight == 0:  # an empty shard: contributes nothing (not 0 * stale NaN)
                    view[...] = 0
                else:
                    np.multiply(grads[name].reshape(-1), weight, out=view, casting="unsafe")
                out[name] = view.reshape(shape)
            if i == 0 and len(extras):
                buf[-len(extras):] = extras
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            if i == 0 and len(extras):
                extras_out[:] = buf[-len(extras):]
        return out, extras_out


class DistributedOptimizer:
    """Wrap a fastconv optimizer so that ``step`` first averages the gradients over ``comm``.

    >>> opt = DistributedOptimizer(nn.Adam(1e-3), MPI.COMM_WORLD)     # doctest: +SKIP
    >>> model.train_batch(x_local, y_local, opt)                      # doctest: +SKIP

    ``weight`` (attribute): this rank's share of the global batch for the next step; ``None``
    (default) means ``1 / size``, right when every rank's batch has the same size.
    ``lr``, ``state_dict`` and ``load_state_dict`` are the wrapped optimizer's.
    """

    def __init__(self, optimizer, comm):
        self.optimizer = optimizer
        self.comm = _check_comm(comm)
        self.weight = None
        self._allreduce = GradientAllreduce(comm)

    def step(self, params: dict, grads: dict) -> None:
        weight = 1.0 / self.comm.Get_size() if self.weight is None else self.weight
        averaged, _ = self._allreduce(grads, weight)
        self.optimizer.step(params, averaged)

    @property
    def lr(self):
        return self.optimizer.lr

    @lr.setter
    def lr(self, value):
        self.optimizer.lr = value

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def __repr__(self):
        return f"DistributedOptimizer({self.optimizer!r}, ranks={self.comm.Get_size()})"


def train_step(model, x, y, optimizer, loss, allreduce, n_global: int, flag: float = 0.0):
    """One synchronous step on this rank's shard ``(x, y)`` of a global batch of ``n_global``.

    Forward and backward run on the shard (skipped when it is empty), the gradients are averaged
    over the global batch with one Allreduce that also carries the loss and ``flag``, and
    ``optimizer`` steps. Returns ``(global mean loss, sum of flag over ranks)``; ``flag`` may be
    a callable, read just before the Allreduce (e.g. "was Ctrl-C pressed").
    """
    n_local = len(y)
    params = model.named_parameters()
    if n_local:
        local_loss = loss.forward(model.forward(x, training=True), y)
        model.backward(loss.backward())
        grads = model.named_grads()
    else:
        local_loss = 0.0
        grads = {k: np.zeros_like(p) for k, p in params.items()}
    weight = n_local / n_global
    flag = float(flag() if callable(flag) else flag)
    averaged, (total_loss, flags) = allreduce(grads, weight, (local_loss * weight, flag))
    optimizer.step(params, averaged)
    return float(total_loss), float(flags)


@contextmanager
def abort_on_error(comm, prefix="fastconv"):
    """Run the body; an exception escaping it on any rank aborts the whole MPI job.

    Without this an exception on one rank leaves the others blocked in their next collective
    forever. The traceback is printed (with the rank) before ``comm.Abort(1)``. ``SystemExit``
    passes through: the caller decides exit codes. With one rank, exceptions propagate as usual.
    """
    try:
        yield
    except SystemExit:
        raise
    except BaseException:
        if comm.Get_size() == 1:
            raise
        print(f"{prefix}: rank {comm.Get_rank()} of {comm.Get_size()} failed; aborting the job",
              file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        comm.Abort(1)
