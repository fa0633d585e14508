"""``Sequential.fit(..., comm=MPI.COMM_WORLD)`` and the sharded evaluation it uses.

Semantics (Horovod's, with a *global* batch):

* every rank calls ``fit`` with the same ``x``, ``y`` (or at least the same length) and options;
* rank 0's parameters are broadcast first, so all ranks start from the same model;
* ``batch_size`` is the global batch; each one is split into contiguous per-rank shards, and the
  gradients are averaged over the global batch with one Allreduce per step, so the updates are
  those of a one-process ``fit`` over the same batches (up to float32 rounding);
* shuffling uses a stream shared by all ranks, seeded by rank 0 (an int ``rng`` gives the same
  shuffles as a one-process ``fit(rng=...)``; a Generator or ``None``: rank 0 draws the seed);
  dropout uses a per-rank stream derived from it;
* rank 0 alone prints; validation is evaluated in shards and reduced; every rank returns the
  same history.
"""

from __future__ import annotations

import time

import numpy as np

from ._mpi import GradientAllreduce, broadcast_parameters, import_mpi, shard, train_step


def sharded_evaluate(model, x, y, comm, batch_size=256, transform=None, loss=None):
    """``(mean loss, accuracy)`` over ``(x, y)``, each rank evaluating its contiguous shard;
    the sums are reduced so that every rank returns the same numbers."""
    from ..nn.losses import SoftmaxCrossEntropy

    MPI = import_mpi()
    y = np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    s = shard(len(x), comm.Get_rank(), comm.Get_size())
    sums = np.zeros(2)
    if s.stop > s.start:
        loss_value, accuracy = model.evaluate(x[s], y[s], batch_size=batch_size,
                                              transform=transform,
                                              loss=loss or SoftmaxCrossEntropy())
        n_local = s.stop - s.start
        sums[:] = loss_value * n_local, accuracy * n_local
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    n = max(len(x), 1)
    return float(sums[0] / n), float(sums[1] / n)


def _streams(rng, comm):
    """``(shared, local)`` generators: shared draws the same on every rank (shuffling); local
    is this rank's own (dropout)."""
    if isinstance(rng, np.random.Generator):  # rank 0's generator decides
        seed = comm.bcast(int(rng.integers(2**63)) if comm.Get_rank() == 0 else None, root=0)
    else:  # an int seed gives the shuffles of a one-process fit(rng=seed)
        seed = comm.bcast(int(np.random.SeedSequence(rng).entropy) if comm.Get_rank() == 0
                          else None, root=0)
    shared = np.random.default_rng(seed)
    local = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(comm.Get_rank(),)))
    return shared, local


def fit(model, x, y, comm, epochs=1, batch_size=64, optimizer=None, loss=None, rng=None,
        shuffle=True, validation_data=None, transform=None, lr_schedule=None, verbose=True):
    """Data-parallel :meth:`fastconv.nn.Sequential.fit` over ``comm``; see the module docstring."""
    from ..nn.losses import SoftmaxCrossEntropy
    from ..nn.optim import Adam

    optimizer = optimizer or Adam()
    loss = loss or SoftmaxCrossEntropy()
    rank, size = comm.Get_rank(), comm.Get_size()
    y = np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    lengths = comm.allgather(len(x))
    if len(set(lengths)) != 1:
        raise ValueError(f"every rank must pass the same training set; lengths per rank: "
                         f"{lengths}")
    shared, local = _streams(rng, comm)
    model.set_rng(local)
    broadcast_parameters(model, comm)
    allreduce = GradientAllreduce(comm)
    history = {"loss": [], "time": [], "images_per_s": []}
    n = len(x)
    for epoch in range(epochs):
        if lr_schedule is not None:
            optimizer.lr = float(lr_schedule(epoch))
        order = shared.permutation(n) if shuffle else np.arange(n)
        t0, total = time.perf_counter(), 0.0
        for start in range(0, n, batch_size):
            batch = order[start:start + batch_size]
            idx = batch[shard(len(batch), rank, size)]
            xb = x[idx] if transform is None else transform(x[idx])
            value, _ = train_step(model, xb, y[idx], optimizer, loss, allreduce, len(batch))
            total += value * len(batch)
        dt = time.perf_counter() - t0
        history["loss"].append(total / max(n, 1))
        history["time"].append(dt)
        history["images_per_s"].append(n / dt if dt else float("inf"))
        line = f"epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.4f}"
        if validation_data is not None:
            vl, va = sharded_evaluate(model, *validation_data, comm, transform=transform,
                                      loss=loss)
            history.setdefault("val_loss", []).append(vl)
            history.setdefault("val_accuracy", []).append(va)
            line += f", val loss {vl:.4f}, val accuracy {va:.4f}"
        if verbose and rank == 0:
            print(f"{line}, {dt:.1f} s ({size} ranks)", flush=True)
    return history
