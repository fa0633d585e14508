"""fastconv and torch in one process, whatever the import order (DESIGN §7).

PyTorch's wheels load their own libgomp into the global symbol scope; Numba's ``omp`` pool,
started later, would bind to it and inherit its spinning wait policy (see
``fastconv.backends._openmp``). In subprocesses, for each order (no torch, torch imported
first, fastconv's first call before ``import torch``, torch ops between fastconv calls):

* a ``fastconv.nn`` training step and a one-image predict give bit-identical results;
* 4 Python threads calling conv2d at once give the serial results;
* with torch first, Numba's pool binds ``GOMP_parallel`` to a libgomp that is not torch's
  (read from the dynamic loader's own trace, ``LD_DEBUG=bindings``, on glibc Linux).

Timings are not asserted here: ``benchmarks/torch_bridge.py`` measures them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
ORDERS = ("no_torch", "torch_first", "fastconv_first", "interleaved")

_WORKER = textwrap.dedent(
    """
    import hashlib, json, sys, threading
    order = sys.argv[1]
    if order == "torch_first":
        import torch
    import numpy as np
    import fastconv as fc
    from fastconv import nn

    def torch_ops():
        if order == "interleaved":
            import torch
            a = torch.randn(8, 4, 12, 12)
            torch.nn.functional.conv2d(a, torch.randn(4, 4, 3, 3)).relu().sum().item()

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    model = nn.lenet5(rng=1)
    opt = nn.SGD(0.05, momentum=0.9)
    losses = []
    for step in range(3):
        losses.append(model.train_batch(x, y, opt))
        if step == 0 and order == "fastconv_first":
            import torch
            torch.randn(64, 64) @ torch.randn(64, 64)
        torch_ops()
    pred = nn.mnist_cnn(rng=2).predict(x[:1])
    torch_ops()
    xs = rng.standard_normal((4, 8, 3, 16, 16)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    serial = [fc.conv2d(a, w, padding=1) for a in xs]
    threaded = [None] * 4
    def work(i):
        for _ in range(5):
            threaded[i] = fc.conv2d(xs[i], w, padding=1)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    h = hashlib.sha256()
    for v in model.named_parameters().values():
        h.update(np.ascontiguousarray(v).tobytes())
    h.update(np.ascontiguousarray(pred).tobytes())
    print("RESULT", json.dumps({"hash": h.hexdigest(), "losses": losses,
                                 "threads_equal": all(np.array_equal(a, b)
                                                      for a, b in zip(serial, threaded)),
                                 "torch_loaded": "torch" in sys.modules}))
    """
)


def _env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTCONV_BACKEND", "OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")}
    env.update(PYTHONPATH=str(REPO), NUMBA_NUM_THREADS="2")
    env.update(extra or {})
    return env


def _run(order, extra=None):
    proc = subprocess.run([sys.executable, "-c", _WORKER, order], cwd=REPO, env=_env(extra),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{order}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_results_identical_in_every_import_order():
    results = {order: _run(order) for order in ORDERS}
    assert not results["no_torch"]["torch_loaded"]
    assert all(r["torch_loaded"] for o, r in results.items() if o != "no_torch")
    for order, r in results.items():
        assert r["threads_equal"], f"{order}: threaded conv2d differs from serial"
        assert r["hash"] == results["no_torch"]["hash"], f"{order}: results differ"
        assert r["losses"] == results["no_torch"]["losses"], order


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_DEBUG is glibc's")
def test_numba_pool_does_not_bind_to_torchs_openmp(tmp_path):
    import numba

    if numba.config.THREADING_LAYER not in ("default", "omp", "threadsafe"):
        pytest.skip(f"NUMBA_THREADING_LAYER={numba.config.THREADING_LAYER}: no omp pool")
    trace = tmp_path / "ld"
    result = _run("torch_first", {"LD_DEBUG": "bindings", "LD_DEBUG_OUTPUT": str(trace)})
    assert result["threads_equal"]
    lines = [ln for p in tmp_path.glob("ld.*") for ln in p.read_text(errors="replace")
             .splitlines() if "omppool" in ln and "`GOMP_parallel'" in ln]
    if not lines:
        pytest.skip("Numba used another threading layer here (no omppool binding traced)")
    torch_lib = str(Path(torch.__file__).parent)
    for ln in lines:
        target = ln.split(" to ", 1)[1]
        assert "libgomp" in target and torch_lib not in target, ln


_FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys, warnings
    import torch
    import numpy as np
    import fastconv as fc
    torch.set_num_threads(2)
    torch.ones(256, 256) @ torch.ones(256, 256)       # torch's OpenMP threads have run
    from fastconv import _dispatch
    _dispatch.get_backend("numba")                    # fastconv's numba side imported, unused
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    ref = fc.conv2d(x, w, backend="numpy")
    pid = os.fork()
    if pid == 0:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = fc.conv2d(x, w, backend="numba")
        ok = np.allclose(y, ref, rtol=1e-4, atol=1e-4)
        forks = [str(c.message) for c in caught if "forked" in str(c.message)]
        os._exit(0 if ok and not forks else 3 if forks else 4)
    _, status = os.waitpid(pid, 0)
    print("CHILD", os.waitstatus_to_exitcode(status))
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_fork_after_torch_keeps_numbas_threads_and_says_nothing(tmp_path):
    """A child forked after torch ran its OpenMP threads (a DataLoader worker) runs numba's
    kernels on numba's own runtime, correctly, with no fork warning: torch's libgomp is not
    the one numba's pool uses."""
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_BACKEND"}
    run = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "CHILD 0" in run.stdout, run.stdout + run.stderr
