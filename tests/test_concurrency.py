"""Concurrency: kernels called from many Python threads at once, and from a child after fork.

Each check runs in a fresh subprocess (this file run as a script) so that an abort or a hang in
a compiled backend fails the test through its exit status or a timeout instead of killing or
freezing pytest. The reference for the threaded results is the same backend called serially in
the same process: calls from 8 threads must give bitwise-identical arrays.

The fork check follows ``fastconv.backends.numba._threading``: a child forked after the parent
ran OpenMP threads must either compute the right result (Numba runs serial builds there, with a
``RuntimeWarning``) or fail with a clear Python error; it must never hang or die.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

if __name__ == "__main__":  # the subprocess side: no conftest (it probes every backend)
    TEST_BACKENDS = []
else:
    from helpers import TEST_BACKENDS

import fastconv as fc

THREADS = 8
ITERATIONS = 4
CHILD_TIMEOUT_S = 35  # a hang in a child fails the test after (this - 10) s


# ------------------------------------------------------------------------- the worker side


def _cases(backend: str, rng):
    """(name, function) pairs covering all four ops, both the specialised and generic paths."""
    tiny = backend == "naive"
    n, size = (1, 6) if tiny else (3, 14)
    f32 = np.float32
    x = rng.standard_normal((n, 4, size, size)).astype(f32)
    w = rng.standard_normal((8, 2, 3, 3)).astype(f32)
    b = rng.standard_normal(8).astype(f32)
    generic = dict(stride=2, padding=1, groups=2)
    y = fc.conv2d(x, w, b, backend=backend, **generic)
    dy = rng.standard_normal(y.shape).astype(f32)
    cases = [
        ("conv2d generic", lambda: fc.conv2d(x, w, b, backend=backend, **generic)),
        ("conv2d_backward generic",
         lambda: fc.conv2d_backward(dy, x, w, backend=backend, **generic)),
    ]
    if not tiny:  # C_out >= 32, groups 1: the Winograd and 1x1 matrix-product kernels
        x2 = rng.standard_normal((n, 32, size, size)).astype(f32)
        w2 = rng.standard_normal((32, 32, 3, 3)).astype(f32)
        dy2 = rng.standard_normal((n, 32, size, size)).astype(f32)
        x3 = rng.standard_normal((n, 32, 8, 8)).astype(f32)
        w3 = rng.standard_normal((64, 32, 1, 1)).astype(f32)
        dy3 = rng.standard_normal((n, 64, 8, 8)).astype(f32)
        cases += [
            ("conv2d 3x3", lambda: fc.conv2d(x2, w2, None, padding="same", backend=backend)),
            ("conv2d_backward 3x3",
             lambda: fc.conv2d_backward(dy2, x2, w2, padding="same", backend=backend)),
            ("conv2d 1x1", lambda: fc.conv2d(x3, w3, None, backend=backend)),
            ("conv2d_backward 1x1", lambda: fc.conv2d_backward(dy3, x3, w3, backend=backend)),
        ]
    yp, idx = fc.max_pool2d(x, 3, stride=2, padding=1, backend=backend)
    dyp = rng.standard_normal(yp.shape).astype(f32)
    cases += [
        ("max_pool2d k2s2", lambda: fc.max_pool2d(x, 2, backend=backend)),
        ("max_pool2d generic", lambda: fc.max_pool2d(x, 3, stride=2, padding=1, backend=backend)),
        ("max_pool2d_backward", lambda: fc.max_pool2d_backward(dyp, idx, x.shape, backend=backend)),
    ]
    return cases


def _as_tuple(result):
    return tuple(result) if isinstance(result, tuple) else (result,)


def _same(a, b) -> bool:
    return all(
        (u is None and v is None) or (u is not None and v is not None and u.dtype == v.dtype
                                      and np.array_equal(u, v))
        for u, v in zip(_as_tuple(a), _as_tuple(b))
    )


def threads_worker(backend: str) -> dict:
    """Serial results first, then every case from ``THREADS`` threads at once; compare."""
    threads = 2 if backend == "naive" else THREADS
    cases = [(f"{name} {b}", fn) for b in backend.split("+")
             for name, fn in _cases(b, np.random.default_rng(7))]
    serial = {name: fn() for name, fn in cases}
    barrier = threading.Barrier(threads)
    mismatches, errors = [], []

    def body(t):
        try:
            barrier.wait()
            for it in range(ITERATIONS if backend != "naive" else 1):
                # each thread walks the cases in its own rotation, so different kernels overlap
                for k in range(len(cases)):
                    name, fn = cases[(k + t) % len(cases)]
                    if not _same(fn(), serial[name]):
                        mismatches.append(f"{name} (thread {t}, iteration {it})")
        except Exception as e:  # reported, then the test fails on it
            errors.append(f"thread {t}: {type(e).__name__}: {e}")

    pool = [threading.Thread(target=body, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    out = {"backend": backend, "threads": threads, "cases": len(cases),
           "calls": threads * len(cases) * (ITERATIONS if backend != "naive" else 1),
           "mismatches": mismatches, "errors": errors}
    if "numba" in backend:
        import numba

        out["threading_layer"] = numba.threading_layer()
    return out


def fork_worker(parent_backends: list, child_backend: str) -> dict:
    """Use ``parent_backends`` here, fork, call ``child_backend`` in the child.

    The child reports through a pipe; the parent polls it with a deadline and kills a child
    that hangs. Returns what the child reported, or why it failed.
    """
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 10, 10)).astype(np.float32)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    # the NumPy backend is the reference (no backend probing: it would load other backends)
    reference = fc.conv2d(x, w, padding=1, backend="numpy")
    ref_pool = fc.max_pool2d(x, 2, backend="numpy")[0]
    for name in parent_backends:  # start each backend's threads in the parent
        fc.conv2d(x, w, padding=1, backend=name)
        fc.max_pool2d(x, 2, backend=name)
    parent_layer = None
    if "numba" in parent_backends:
        import numba

        parent_layer = numba.threading_layer()
    read_end, write_end = os.pipe()
    recorder = warnings.catch_warnings(record=True)
    caught = recorder.__enter__()  # also records warnings of at-fork hooks in the child
    warnings.simplefilter("always")
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's stack
        os.close(read_end)
        report = {}
        try:
            y = fc.conv2d(x, w, padding=1, backend=child_backend)
            y2 = fc.conv2d(x, w, padding=1, backend=child_backend)
            yp = fc.max_pool2d(x, 2, backend=child_backend)[0]
            report = {
                "ok": bool(np.allclose(y, reference, rtol=1e-4, atol=1e-4)
                           and np.array_equal(y, y2) and np.array_equal(yp, ref_pool)),
                "warnings": [f"{w_.category.__name__}: {w_.message}" for w_ in caught],
                "parent_layer": parent_layer,
            }
        except Exception as e:  # a clear Python error is an accepted guard
            report = {"ok": None, "error": f"{type(e).__name__}: {e}"}
        finally:
            os.write(write_end, json.dumps(report).encode())
            os._exit(0)
    recorder.__exit__(None, None, None)
    os.close(write_end)
    import time

    deadline = time.monotonic() + CHILD_TIMEOUT_S - 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            data = os.read(read_end, 1 << 16)
            if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
                return {"ok": False, "error": f"child died with wait status {status}"}
            return json.loads(data or b'{"ok": false, "error": "child reported nothing"}')
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return {"ok": False, "error": f"child hung (killed after {CHILD_TIMEOUT_S - 10} s)"}


# ------------------------------------------------------------------------- the pytest side


def _run_script(args, env=None, timeout=300) -> dict:
    """Run this file as a script in a fresh interpreter; its last stdout line is JSON."""
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, (
        f"worker {args} exited with status {proc.returncode} (negative = killed by a signal)\n"
        f"stdout: {proc.stdout[-2000:]}\nstderr: {proc.stderr[-4000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", TEST_BACKENDS)
def test_threads_match_serial_bitwise(name, record_property):
    result = _run_script(["threads", name])
    record_property("result", result)
    assert not result["errors"], result["errors"]
    assert not result["mismatches"], (
        f"{name}: {len(result['mismatches'])} of {result['calls']} threaded calls differ from "
        f"the serial result: {result['mismatches'][:5]}"
    )
    if name == "numba":
        print(f"numba threading layer: {result['threading_layer']}")


@pytest.mark.skipif(not {"numba", "cython"} <= set(TEST_BACKENDS),
                    reason="needs the numba and cython backends")
def test_threads_mixing_numba_and_cython_match_serial_bitwise():
    """Both compiled backends share one GNU OpenMP runtime; threads use them at once."""
    result = _run_script(["threads", "numba+cython"])
    assert not result["errors"] and not result["mismatches"], result


@pytest.mark.skipif("numba" not in TEST_BACKENDS, reason="numba backend not under test")
def test_threads_survive_the_workqueue_layer():
    """``workqueue`` aborts on concurrent parallel launches unless fastconv serialises them."""
    result = _run_script(["threads", "numba"], env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert result["threading_layer"] == "workqueue"
    assert not result["errors"] and not result["mismatches"], result


_LAYER_SCRIPT = """
import sys, numpy as np, fastconv as fc, numba
if sys.argv[1] == "probe":
    fc.available_backends()  # imports every backend module, cython's OpenMP extension included
x = np.ones((2, 3, 8, 8), np.float32)
fc.conv2d(x, np.ones((4, 3, 3, 3), np.float32), backend="numba")
print(numba.threading_layer())
"""


@pytest.mark.skipif(not {"numba", "cython"} <= set(TEST_BACKENDS),
                    reason="needs the numba and cython backends")
def test_threading_layer_does_not_depend_on_probing_backends():
    """Listing the backends first (``fastconv info``, this test suite's conftest) must not
    change the threading layer numba then uses in an ordinary (not forked) process."""
    layers = {}
    for mode in ("plain", "probe"):
        proc = subprocess.run([sys.executable, "-c", _LAYER_SCRIPT, mode], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        layers[mode] = proc.stdout.strip().splitlines()[-1]
    print(f"numba threading layer: {layers}")
    assert layers["probe"] == layers["plain"], layers


FORK_CASES = [
    (["numba"], "numba"),
    (["cython"], "cython"),
    (["cython"], "numba"),
    (["numba"], "cython"),
]


@pytest.mark.parametrize(
    "parent,child",
    [c for c in FORK_CASES if set(c[0]) | {c[1]} <= set(TEST_BACKENDS)],
    ids=lambda v: "+".join(v) if isinstance(v, list) else v,
)
def test_call_in_forked_child(parent, child):
    """After the parent ran ``parent`` backends, a forked child calling ``child`` either gets
    the right result or a clear error; a hang or a crash fails."""
    result = _run_script(["fork", ",".join(parent), child], timeout=CHILD_TIMEOUT_S + 60)
    assert result.get("ok") is not False, (
        f"child using {child} after the parent used {parent}: {result}"
    )
    if result.get("ok") is None:  # a guard that refuses must say why
        assert "fork" in result["error"].lower(), result["error"]
    # a fallback warns at most once per process, and says why
    assert len(result.get("warnings", [])) <= 1, result["warnings"]
    assert all("fork" in w for w in result.get("warnings", [])), result["warnings"]
    if child == "numba" and result.get("parent_layer") == "omp" and result.get("ok"):
        # _numba_threading's documented fallback: serial builds, with one warning
        assert len(result["warnings"]) == 1 and "RuntimeWarning" in result["warnings"][0]


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "threads":
        out = threads_worker(sys.argv[2])
    else:
        out = fork_worker(sys.argv[2].split(","), sys.argv[3])
    print(json.dumps(out))
