"""DistributedDataParallel over fastconv.torch layers: 2 gloo processes on 127.0.0.1.

A converted model trains 20 SGD steps in 2 ranks (each on its half of every global batch);
both replicas end equal, and equal (within float32 rounding) to one process trained on the
whole global batches: the gradient allreduce-average of the halves' mean losses is the global
mean's gradient. The ranks run in their own process group with a deadline and are always
killed and reaped.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover - torch builds without it
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORKER = TESTS / "torch_ddp_worker.py"
DEADLINE_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_BACKEND"}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), str(TESTS)]), GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    return env


# A free port can be taken by another process between the probe and the bind; such a start
# (and only such) is retried on a new port.
_PORT_TROUBLE = ("address already in use", "eaddrinuse", "connection refused",
                 "connection reset")


def _start_ranks(world: int, out: Path) -> list:
    """Run the ranks once; returns [(returncode, output)], the processes always reaped."""
    port = _free_port()
    procs, results = [], []
    try:
        for rank in range(world):
            procs.append(subprocess.Popen(
                [sys.executable, str(WORKER), str(rank), str(world), str(port), str(out)],
                env=_env(), cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, start_new_session=True))
        for proc in procs:
            output, _ = proc.communicate(timeout=DEADLINE_S)
            results.append((proc.returncode, output))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return results


def _run_ranks(world: int, out: Path, attempts: int = 3) -> None:
    for attempt in range(attempts):
        results = _start_ranks(world, out)
        failed = [(rank, rc, output) for rank, (rc, output) in enumerate(results) if rc != 0]
        if not failed:
            return
        port_trouble = any(t in output.lower() for _, _, output in failed for t in _PORT_TROUBLE)
        if not port_trouble or attempt == attempts - 1:
            rank, rc, output = failed[0]
            raise AssertionError(f"rank {rank} failed ({rc}), attempt {attempt + 1}:\n{output}")


def test_ddp_two_ranks_match_one_process(tmp_path):
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    single.mkdir()
    _run_ranks(2, ddp)
    _run_ranks(1, single)
    r0, r1, ref = (np.load(p) for p in (ddp / "rank0.npz", ddp / "rank1.npz",
                                          single / "rank0.npz"))
    names = [k for k in ref.files if k != "losses"]
    assert names and set(r0.files) == set(ref.files)
    for name in names:
        np.testing.assert_array_equal(r0[name], r1[name], err_msg=f"replicas differ: {name}")
        np.testing.assert_allclose(r0[name], ref[name], rtol=1e-4, atol=1e-5,
                                   err_msg=f"DDP vs one process: {name}")
        assert not np.array_equal(ref[name], np.zeros_like(ref[name]))
    # each rank's loss is its half's mean; their average is the global batch's mean loss
    np.testing.assert_allclose((r0["losses"] + r1["losses"]) / 2, ref["losses"], rtol=1e-4)
