"""fastconv beyond one machine: data-parallel training over MPI, batch inference over Dask.

Neither engine is needed to import this package: mpi4py (``pip install "fastconv[mpi]"``) and
dask (``pip install "fastconv[dask]"``) are imported when first used.

Training (run the script with ``mpiexec -n N python train.py``)::

    from mpi4py import MPI
    history = model.fit(x, y, batch_size=256, rng=0, comm=MPI.COMM_WORLD)

or, in a loop of your own, Horovod's pieces::

    broadcast_parameters(model, comm)
    opt = DistributedOptimizer(nn.Adam(1e-3), comm)    # step() = one Allreduce + the update
    model.train_batch(x[shard(len(x), rank, size)], ..., opt)

Inference: ``model.predict(dask_array)`` returns a lazy dask array; ``model.evaluate(dask_x, y)``
reduces per-block sums. Both work with the local schedulers and any ``dask.distributed`` Client.
"""

from ._dask import evaluate_dask, predict_dask
from ._fit import sharded_evaluate
from ._mpi import (
    DistributedOptimizer,
    GradientAllreduce,
    abort_on_error,
    broadcast_parameters,
    import_mpi,
    shard,
    train_step,
)

__all__ = [
    "DistributedOptimizer", "GradientAllreduce", "broadcast_parameters", "shard", "train_step",
    "abort_on_error", "import_mpi", "sharded_evaluate", "predict_dask", "evaluate_dask",
]
