"""What ``fastconv train`` does differently on one process and on ``mpiexec -n N`` ranks.

``fastconv/_cli/train.py`` runs one training loop; it asks a *context* for everything that
depends on the ranks: which random streams to use, which part of a batch to compute, how to take
a step, how to evaluate, what goes into the checkpoint and who prints. :class:`SingleProcess`
is the plain run, unchanged; :class:`MPITraining` is data parallelism over ``MPI.COMM_WORLD``.

Distributed recipe (``--distributed``):

* ``--batch-size`` is the *global* batch: each step's batch is split into ``N`` contiguous
  shards, one per rank, so N ranks train the same model as one process (same batches, same
  learning rate), only faster. To use more ranks, raise ``--batch-size`` and, following the
  linear scaling rule, ``--lr`` in proportion.
* One generator seeded with ``--seed`` (the same stream on every rank) initialises the weights
  and shuffles; rank ``r`` draws its augmentation shifts and dropout masks from its own stream
  ``SeedSequence(seed, spawn_key=(r,))``. A run is reproducible for a seed and a rank count.
* Rank 0's initial weights are broadcast; gradients, the batch loss and the Ctrl-C flag travel
  in one Allreduce per step; the test set is evaluated in shards and reduced.
* Rank 0 alone prints, writes checkpoints (atomically), the model and pictures. A checkpoint
  holds every rank's generator state; ``--resume`` needs the same number of ranks.
"""

from __future__ import annotations

import sys

import numpy as np


class SingleProcess:
    """The plain run: one generator for everything, every step on the whole batch."""

    rank, size, is_root = 0, 1, True

    def rngs(self, seed):
        """``(shared, local)`` generators: one and the same here."""
        rng = np.random.default_rng(seed)
        return rng, rng

    def print(self, *args, **kwargs):
        print(*args, **kwargs)

    def all_ok(self, ok: bool) -> bool:
        return ok

    def broadcast(self, obj):
        return obj

    def broadcast_parameters(self, model):
        pass

    def shard(self, n: int) -> slice:
        return slice(0, n)

    def any_rank(self, flag: bool) -> bool:
        return bool(flag)

    def step(self, model, x, y, optimizer, loss, n_global, stop_requested):
        """``(global batch loss, stop)``; ``stop_requested()`` is read after the local work."""
        value = model.train_batch(x, y, optimizer, loss)
        return value, bool(stop_requested())

    def evaluate(self, model, x, y, transform):
        return model.evaluate(x, y, transform=transform)

    def checkpoint_extras(self, local_rng) -> dict:
        return {}

    def restore_extras(self, state, local_rng):
        """An error message when ``state`` cannot be resumed here, else None."""
        if "distributed" in state:
            return (f"--resume: the checkpoint was written by {state['distributed']['ranks']} "
                    "MPI ranks; resume it with --distributed and the same number of ranks")
        return None


class MPITraining(SingleProcess):
    """Data parallelism over ``comm`` (``MPI.COMM_WORLD``); see the module docstring."""

    def __init__(self, comm):
        from ._mpi import GradientAllreduce

        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_root = self.rank == 0
        self._allreduce = GradientAllreduce(comm)

    def rngs(self, seed):
        local = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(self.rank,)))
        return np.random.default_rng(seed), local

    def print(self, *args, **kwargs):
        if self.is_root:
            print(*args, **kwargs)

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when ``ok`` is true on every rank (a collective)."""
        return bool(self.comm.allreduce(int(bool(ok)), op=_mpi().MIN))

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on some rank (a collective)."""
        return bool(self.comm.allreduce(int(bool(flag)), op=_mpi().MAX))

    def broadcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def broadcast_parameters(self, model):
        from ._mpi import broadcast_parameters

        broadcast_parameters(model, self.comm)

    def shard(self, n: int) -> slice:
        from ._mpi import shard

        return shard(n, self.rank, self.size)

    def step(self, model, x, y, optimizer, loss, n_global, stop_requested):
        from ._mpi import train_step

        value, stops = train_step(model, x, y, optimizer, loss, self._allreduce, n_global,
                                  stop_requested)
        return value, stops > 0

    def evaluate(self, model, x, y, transform):
        from ._fit import sharded_evaluate

        return sharded_evaluate(model, x, y, self.comm, transform=transform)

    def checkpoint_extras(self, local_rng) -> dict:
        states = self.comm.gather(local_rng.bit_generator.state, root=0)
        return {"distributed": {"ranks": self.size, "rank_rngs": states}}

    def restore_extras(self, state, local_rng):
        info = state.get("distributed")
        if info is None:
            return ("--resume: the checkpoint was written by a run without --distributed; "
                    "resume it the same way")
        if info["ranks"] != self.size:
            return (f"--resume: the checkpoint was written by {info['ranks']} ranks, this job "
                    f"has {self.size}; the random streams need the same number")
        local_rng.bit_generator.state = info["rank_rngs"][self.rank]
        return None


def _mpi():
    from ._mpi import import_mpi

    return import_mpi()


def context(distributed: bool):
    """The context for a run: :class:`MPITraining` on ``COMM_WORLD`` or :class:`SingleProcess`.

    Raises ``ImportError`` (saying how to install it) when ``distributed`` and mpi4py is missing.
    """
    if not distributed:
        return SingleProcess()
    from ._mpi import world

    return MPITraining(world())


def main_guard(ctx, run):
    """Run ``run()`` and return its exit status; on a rank of a multi-rank job an exception
    aborts the whole job (``MPI_Abort``) instead of leaving the other ranks waiting."""
    if ctx.size == 1:
        return run()
    from ._mpi import abort_on_error

    with abort_on_error(ctx.comm, prefix="fastconv train"):
        status = run()
    sys.stdout.flush()
    return status
