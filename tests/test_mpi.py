"""Data-parallel training over MPI: ``mpiexec -n 2`` in a subprocess, on this machine only.

The ranks talk through shared memory (``UCX_TLS=self,sm``); the launcher is MPICH's
``mpiexec.gforker`` (fork, no network listener) when present, else Hydra with ``-launcher fork``.
Every job runs in its own process group, bounded by a timeout and killed in ``finally``.

This file is also the program the ranks run (``python tests/test_mpi.py MODE OUT ...``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTCONV_DATA_DIR") or REPO.parent / "shared" / "data" / "mnist")
STEPS, BATCH, SEED = 30, 12, 5  # 12 = 6 + 6 images per rank; the last batch of fit is uneven


def _sgd():
    # SGD, not Adam, for the comparison with one process: Adam divides by sqrt(v), so a
    # gradient that is rounding noise around zero moves a weight by a whole lr step.
    from fastconv import nn

    return nn.SGD(0.05, momentum=0.9)


def _launcher():
    bindir = Path(sys.executable).parent
    for name in ("mpiexec.gforker",):
        path = shutil.which(name) or (bindir / name if (bindir / name).exists() else None)
        if path:
            return [str(path)]
    path = shutil.which("mpiexec") or (bindir / "mpiexec" if (bindir / "mpiexec").exists()
                                       else None)
    return [str(path), "-launcher", "fork"] if path else None


def _have_mpi():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return _launcher() is not None


needs_mpi = pytest.mark.skipif(not _have_mpi(), reason='needs pip install "fastconv[mpi]"')
needs_mnist = pytest.mark.skipif(not (DATA / "train-images-idx3-ubyte.gz").exists(),
                                 reason=f"real MNIST not found in {DATA}")


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO), UCX_TLS="self,sm", NUMBA_NUM_THREADS="1",
                OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", FASTCONV_DATA_DIR=str(DATA))


def _mpiexec(n, *program, timeout=90):
    """Run ``program`` on ``n`` ranks; returns ``(returncode, stdout, stderr, seconds)``."""
    cmd = [*_launcher(), "-n", str(n), *program]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
    return proc.returncode, out, err, time.monotonic() - t0


def _worker(mode, out, *args):
    return [sys.executable, str(Path(__file__).resolve()), mode, str(out), *args]


def _train_args(tmp_path, *extra):
    return ["--model", "lenet5", "--backend", "numpy", "--limit", "480", "--test-limit", "200",
            "--batch-size", "32", "--epochs", "2", "--augment", "1", "--seed", "7",
            "--data-dir", str(DATA), "--no-download", "--no-progress", "--blas-threads", "1",
            "--checkpoint", str(tmp_path / "run.ckpt"), "--save", str(tmp_path / "run.model"),
            *extra]


def _data(n):
    rng = np.random.default_rng(SEED)
    return rng.standard_normal((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n)


# ---------------------------------------------------------------------------- tests


@needs_mpi
def test_two_ranks_stay_bitwise_equal_and_match_one_process(tmp_path):
    code, out, err, _ = _mpiexec(2, *_worker("steps", tmp_path / "steps.npz"))
    assert code == 0, out + err
    got = np.load(tmp_path / "steps.npz")
    assert got["allreduce_calls"] == STEPS  # one Allreduce per step, not one per parameter
    assert got["in_sync_steps"] == STEPS  # parameter digests equal on both ranks, every step

    # The reference: one process, plain train_batch over the same global batches.
    from fastconv import nn

    x, y = _data(STEPS * BATCH)
    model = nn.lenet5(rng=SEED, backend="numpy")
    opt = _sgd()
    losses = [model.train_batch(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH],
                                opt) for i in range(STEPS)]
    np.testing.assert_allclose(got["losses"], losses, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters().items():
        np.testing.assert_allclose(got["param/" + name], p, rtol=1e-4, atol=2e-5, err_msg=name)
    assert not np.array_equal(got["param/0.weight"], nn.lenet5(rng=SEED).state_dict()["0.weight"])

    # fit(comm=...) over 2 ranks (uneven last batch) against fit() in one process.
    x, y = _data(100)
    model = nn.lenet5(rng=SEED, backend="numpy")
    history = model.fit(x, y, epochs=2, batch_size=BATCH, rng=3, verbose=False,
                        optimizer=_sgd(), validation_data=(x[:50], y[:50]))
    np.testing.assert_allclose(got["fit_loss"], history["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["fit_val"], history["val_accuracy"], rtol=0, atol=1e-12)
    for name, p in model.named_parameters().items():
        np.testing.assert_allclose(got["fit/" + name], p, rtol=1e-4, atol=2e-5, err_msg=name)
    assert "epoch 2/2" in out and out.count("epoch 2/2") == 1  # rank 0 alone prints


@needs_mpi
@needs_mnist
def test_cli_crash_mid_step_ends_the_job_and_resume_reproduces_the_run(tmp_path):
    straight = tmp_path / "straight"
    crashed = tmp_path / "crashed"
    straight.mkdir()
    crashed.mkdir()
    code, out, err, _ = _mpiexec(2, *_worker("cli", straight, *_train_args(straight)))
    assert code == 0, out + err
    assert "final test accuracy" in out and out.count("final test accuracy") == 1
    assert not (straight / "writes.rank1").exists()  # only rank 0 writes
    assert (straight / "writes.rank0").read_text().split() == ["run.ckpt", "run.ckpt",
                                                               "run.model"]

    # Rank 1 raises in the 4th step of epoch 2 (15 steps per epoch): the job ends, non-zero.
    code, out, err, seconds = _mpiexec(2, *_worker("cli-crash", crashed, *_train_args(crashed)))
    assert code != 0 and seconds < 30, out + err
    assert "injected failure" in err and "rank 1 of 2 failed" in err
    assert not (crashed / "run.model").exists()
    from fastconv import nn

    state = nn.load_checkpoint(crashed / "run.ckpt")  # the last good one: after epoch 1
    assert (state["epoch"], state["batch"]) == (1, 0)
    rank_rngs = state["distributed"]["rank_rngs"]
    assert state["distributed"]["ranks"] == 2 and len(rank_rngs) == 2
    assert rank_rngs[0]["state"] != rank_rngs[1]["state"]  # per-rank shift streams

    code, out, err, _ = _mpiexec(2, *_worker("cli", crashed, *_train_args(crashed, "--resume")))
    assert code == 0, out + err
    assert "resumed from" in out
    a = nn.load_checkpoint(straight / "run.ckpt")
    b = nn.load_checkpoint(crashed / "run.ckpt")
    for key in ("loss", "test_loss", "test_accuracy", "batch_loss"):
        assert a["history"][key] == b["history"][key], key
    for name in a["params"]:
        np.testing.assert_array_equal(a["params"][name], b["params"][name], err_msg=name)

    # The same run with another seed differs: the comparison above can fail.
    other = tmp_path / "other"
    other.mkdir()
    args = _train_args(other, "--epochs", "1")
    args[args.index("--seed") + 1] = "8"
    code, out, err, _ = _mpiexec(2, *_worker("cli", other, *args))
    assert code == 0, out + err
    c = nn.load_checkpoint(other / "run.ckpt")
    assert c["history"]["batch_loss"] != a["history"]["batch_loss"][:15]


@needs_mpi
@needs_mnist
def test_a_rank_without_data_or_a_bad_checkpoint_stops_every_rank(tmp_path):
    # Rank 1 (MPMD: a second program) points at an empty data directory.
    empty = tmp_path / "empty"
    empty.mkdir()
    good = _train_args(tmp_path)
    bad = list(good)
    bad[bad.index("--data-dir") + 1] = str(empty)
    cli = [sys.executable, "-m", "fastconv", "train", "--distributed"]
    cmd = [*_launcher(), "-n", "1", *cli, *good, ":", "-n", "1", *cli, *bad]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 2 and time.monotonic() - t0 < 30, out + err
    assert "rank 1:" in err and str(empty) in err and "Traceback" not in err

    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(b"FASTCONV-CKPT\nnot json\n")
    code, out, err, seconds = _mpiexec(2, *cli, *_train_args(tmp_path, "--resume"))
    assert code == 2 and seconds < 30, out + err
    assert err.count("run.ckpt is unreadable") == 1 and "Traceback" not in err


def test_distributed_without_mpi4py_says_how_to_install(tmp_path, monkeypatch, capsys):
    from fastconv._cli import train as _train_cli

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py now raises ImportError
    assert _train_cli.main(["--distributed", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "fastconv[mpi]"' in err and "Traceback" not in err


def test_shard_covers_a_batch_once_in_order():
    from fastconv.distributed import shard

    for n in (0, 1, 5, 12, 13):
        for size in (1, 2, 3, 8):
            parts = [range(n)[shard(n, r, size)] for r in range(size)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


# ---------------------------------------------------------------------------- the ranks' program


class _CountingComm:
    """Passes every call to ``comm``, counting Allreduce calls."""

    def __init__(self, comm):
        self._comm, self.allreduce_calls = comm, 0

    def Allreduce(self, *a, **kw):
        self.allreduce_calls += 1
        return self._comm.Allreduce(*a, **kw)

    def __getattr__(self, name):
        return getattr(self._comm, name)


def _digest(model):
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(p).tobytes())
    return h.hexdigest()


def _run_steps(out):
    from mpi4py import MPI

    from fastconv import nn
    from fastconv.distributed import GradientAllreduce, broadcast_parameters, shard, train_step

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    x, y = _data(STEPS * BATCH)
    model = nn.lenet5(rng=SEED + rank, backend="numpy")  # differs per rank until the broadcast
    broadcast_parameters(model, comm)
    counting = _CountingComm(comm)
    allreduce, opt = GradientAllreduce(counting), _sgd()
    losses, in_sync = [], 0
    for i in range(STEPS):
        batch = slice(i * BATCH, (i + 1) * BATCH)
        mine = np.arange(STEPS * BATCH)[batch][shard(BATCH, rank, size)]
        loss, _ = train_step(model, x[mine], y[mine], opt, nn.SoftmaxCrossEntropy(), allreduce,
                             BATCH)
        losses.append(loss)
        digests = comm.allgather(_digest(model))
        in_sync += len(set(digests)) == 1
    result = {"losses": np.array(losses), "allreduce_calls": counting.allreduce_calls,
              "in_sync_steps": in_sync}
    result.update({"param/" + k: v for k, v in model.named_parameters().items()})

    x, y = _data(100)
    model = nn.lenet5(rng=SEED, backend="numpy")
    history = model.fit(x, y, epochs=2, batch_size=BATCH, rng=3, comm=comm,
                        optimizer=_sgd(), validation_data=(x[:50], y[:50]))
    result.update(fit_loss=history["loss"], fit_val=history["val_accuracy"])
    result.update({"fit/" + k: v for k, v in model.named_parameters().items()})
    if rank == 0:
        np.savez(out, **result)


def _run_cli(out, argv, crash_at=None):
    """``fastconv train --distributed`` with every checkpoint write logged per rank."""
    from mpi4py import MPI

    from fastconv import nn
    from fastconv._cli import main as cli
    from fastconv.distributed import _train
    from fastconv.nn import checkpoint

    rank = MPI.COMM_WORLD.Get_rank()
    original = checkpoint.save_checkpoint

    def logged(path, state):
        with open(Path(out) / f"writes.rank{rank}", "a") as f:
            f.write(Path(path).name + "\n")
        return original(path, state)

    checkpoint.save_checkpoint = nn.save_checkpoint = logged
    if crash_at is not None:
        step, calls = _train.MPITraining.step, [0]

        def failing(self, *a, **kw):
            calls[0] += 1
            if self.rank == 1 and calls[0] == crash_at:
                raise RuntimeError("injected failure")
            return step(self, *a, **kw)

        _train.MPITraining.step = failing
    return cli.main(["train", "--distributed", *argv])


if __name__ == "__main__":
    mode, out, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    if mode == "steps":
        _run_steps(out)
    elif mode == "cli":
        sys.exit(_run_cli(out, rest))
    elif mode == "cli-crash":
        sys.exit(_run_cli(out, rest, crash_at=15 + 4))
