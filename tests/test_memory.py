"""Memory: repeated kernel calls do not grow the process, and a training epoch's peak.

Each measurement runs in a fresh process (this file run as a script) so that other tests'
allocations do not blur it. RSS is read from ``/proc/self/statm`` after ``WARMUP`` calls (JIT
compiles, allocator pools and caches settle) and again after ``CALLS`` more calls of the same
kernel. Shapes are chosen so that every call returns at least ``MIN_OUTPUT_BYTES``: leaking one
output per call would grow RSS by at least twice ``MAX_GROWTH``, so the bound catches the
realistic leak (a kernel result or scratch buffer kept alive). Naive Python loops use tiny
shapes: their leaks would be Python objects, which the same bound catches.

The peak-memory comparison with PyTorch (``ru_maxrss`` of a one-epoch run of the same net) is a
report printed with ``-s`` and recorded in docs/reliability.md; its assert is a sanity bound
only.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest

if __name__ == "__main__":  # the subprocess side: no conftest (it probes every backend)
    TEST_BACKENDS = []
else:
    from helpers import TEST_BACKENDS

WARMUP = 200
CALLS = 2000
MAX_GROWTH = 8 * 2**20  # bytes; measured growth is below 0.2 MiB
MIN_OUTPUT_BYTES = 2 * MAX_GROWTH // CALLS
EPOCH_IMAGES = 512
# libgomp's default (spinning) wait policy makes tiny parallel calls very slow on a busy machine;
# it does not change what is allocated
ENV = {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------- the worker side


def _kernels(backend: str):
    """{name: (call, output bytes)} for the four ops (two conv geometries)."""
    import fastconv as fc

    rng = np.random.default_rng(5)
    f32 = np.float32
    if backend == "naive":
        x = xp = rng.standard_normal((1, 2, 5, 5)).astype(f32)
        convs = {"conv": (rng.standard_normal((2, 2, 2, 2)).astype(f32), {})}
    else:
        x = rng.standard_normal((1, 8, 16, 16)).astype(f32)
        xp = rng.standard_normal((2, 8, 16, 16)).astype(f32)
        convs = {
            "conv C_out=32": (rng.standard_normal((32, 8, 3, 3)).astype(f32), dict(padding=1)),
            "conv grouped": (rng.standard_normal((16, 4, 3, 3)).astype(f32),
                             dict(padding=1, groups=2)),
        }
    calls = {}
    for name, (w, kw) in convs.items():
        b = rng.standard_normal(w.shape[0]).astype(f32)
        y = fc.conv2d(x, w, b, backend=backend, **kw)
        dy = rng.standard_normal(y.shape).astype(f32)
        calls[f"{name} forward"] = (
            lambda x=x, w=w, b=b, kw=kw: fc.conv2d(x, w, b, backend=backend, **kw), y.nbytes)
        calls[f"{name} backward"] = (
            lambda dy=dy, x=x, w=w, kw=kw: fc.conv2d_backward(dy, x, w, backend=backend, **kw),
            x.nbytes + w.nbytes + b.nbytes)
    yp, idx = fc.max_pool2d(xp, 2, backend=backend)
    dyp = rng.standard_normal(yp.shape).astype(f32)
    calls["max_pool2d"] = (lambda: fc.max_pool2d(xp, 2, backend=backend), yp.nbytes + idx.nbytes)
    calls["max_pool2d_backward"] = (
        lambda: fc.max_pool2d_backward(dyp, idx, xp.shape, backend=backend), xp.nbytes)
    return calls


def growth_worker(backend: str) -> dict:
    """{kernel: {"growth": bytes, "output": bytes}} after WARMUP + CALLS calls each."""
    out = {}
    for name, (call, nbytes) in _kernels(backend).items():
        for _ in range(WARMUP):
            call()
        gc.collect()
        before = rss_bytes()
        for _ in range(CALLS):
            call()
        gc.collect()
        out[name] = {"growth": rss_bytes() - before, "output": nbytes}
    return out


def _mnist_subset(n: int):
    """(uint8 images (n, 28, 28), int64 labels): real MNIST if FASTCONV_DATA_DIR has it."""
    root = os.environ.get("FASTCONV_DATA_DIR")
    if root:
        from fastconv.datasets import load_mnist

        try:
            (x, y), _ = load_mnist(root, download=False, progress=False)
            return x[:n].copy(), y[:n].copy(), "MNIST"
        except (OSError, ValueError):
            pass
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64), "synthetic")


def epoch_worker(framework: str, n: int, backend: str | None = None) -> dict:
    """Train PyTorch's examples/mnist net for one epoch of ``n`` images, batch 64, Adam.

    Returns the peak RSS (ru_maxrss) and the RSS just before training (after imports, data and
    the model), in bytes.
    """
    x, y, source = _mnist_subset(n)
    xf = ((x.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    if framework == "torch":
        import torch

        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 64, 3),
            torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Dropout(0.25), torch.nn.Flatten(),
            torch.nn.Linear(9216, 128), torch.nn.ReLU(), torch.nn.Dropout(0.5),
            torch.nn.Linear(128, 10))
        opt = torch.optim.Adam(model.parameters(), 1e-3)
        xt, yt = torch.from_numpy(xf), torch.from_numpy(y)

        def step(s):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[s:s + 64]), yt[s:s + 64])
            loss.backward()
            opt.step()
            return loss.item()
    else:
        from fastconv import nn

        model = nn.mnist_cnn(rng=0, backend=backend)
        opt = nn.Adam(1e-3)

        def step(s):
            return float(model.train_batch(xf[s:s + 64], y[s:s + 64], opt))

    before = rss_bytes()
    step(0)  # warm-up: lazy imports, JIT compiles, optimizer state
    after_warmup = rss_bytes()
    hwm_reset = _reset_peak()
    for s in range(0, n, 64):
        last = step(s)
    return {"framework": framework, "backend": backend, "images": n, "data": source,
            "rss_before_training": before, "rss_after_warmup": after_warmup,
            "epoch_peak": _peak_since_reset() if hwm_reset else None,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "last_loss": last}


def _reset_peak() -> bool:
    """Reset this process's peak RSS (VmHWM) counter; False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_since_reset() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ------------------------------------------------------------------------- the pytest side


def _run_script(args, timeout=600) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ENV})
    assert proc.returncode == 0, f"worker {args} exited {proc.returncode}: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_repeated_calls_do_not_grow_rss(backend, record_property):
    result = _run_script(["growth", backend])
    record_property("rss_growth", result)
    mib = {k: round(v["growth"] / 2**20, 2) for k, v in result.items()}
    print(f"{backend}: RSS growth over {CALLS} calls (MiB): {mib}")
    assert len(result) >= 4
    if backend != "naive":
        assert all(v["output"] >= MIN_OUTPUT_BYTES for v in result.values()), result
    grew = {k: v for k, v in mib.items() if v * 2**20 > MAX_GROWTH}
    assert not grew, f"{backend}: RSS grew past {MAX_GROWTH / 2**20:.0f} MiB: {grew}"


def leak_worker() -> dict:
    """RSS growth while keeping one MIN_OUTPUT_BYTES array per call (a deliberate leak)."""
    kept = []
    before = rss_bytes()
    for _ in range(CALLS):
        kept.append(np.ones(MIN_OUTPUT_BYTES // 8))
    return {"growth": rss_bytes() - before}


def test_the_bound_catches_a_leak_of_one_output_per_call():
    """The detector itself, in a fresh process like the measurements (in this one, memory that
    earlier tests freed would absorb the leak): one kept result per call exceeds the bound."""
    assert _run_script(["leak"])["growth"] > MAX_GROWTH


def test_training_epoch_peak_memory_is_sane():
    """One epoch on EPOCH_IMAGES images: fastconv's peak RSS next to PyTorch's (a report)."""
    fast = [b for b in ("numba", "cython", "numpy") if b in TEST_BACKENDS]
    if not fast:
        pytest.skip("no fast CPU backend under test")
    ours = _run_script(["epoch", "fastconv", str(EPOCH_IMAGES), fast[0]])
    line = f"one epoch, {ours['images']} {ours['data']} images, batch 64: " + _describe(
        f"fastconv[{fast[0]}]", ours)
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        line += "; " + _describe("torch", _run_script(["epoch", "torch", str(EPOCH_IMAGES)]))
    print(line)
    assert np.isfinite(ours["last_loss"])
    # sanity only: parameters, Adam state and one batch's activations and gradients need
    # ~60 MiB; ru_maxrss also counts imports and JIT compiles
    assert ours["peak_rss"] - ours["rss_before_training"] < 1024 * 2**20, line
    if ours["epoch_peak"] is not None:
        assert ours["epoch_peak"] - ours["rss_after_warmup"] < 256 * 2**20, line


def _describe(name, r) -> str:
    mib = lambda v: f"{v / 2**20:.0f} MiB"  # noqa: E731
    text = (f"{name} ru_maxrss {mib(r['peak_rss'])} "
            f"(before the first step {mib(r['rss_before_training'])})")
    if r["epoch_peak"] is not None:
        text += (f", epoch peak after a warm-up step {mib(r['epoch_peak'])} "
                 f"(+{mib(r['epoch_peak'] - r['rss_after_warmup'])} over the warm RSS)")
    return text


if __name__ == "__main__":
    if sys.argv[1] == "growth":
        print(json.dumps(growth_worker(sys.argv[2])))
    elif sys.argv[1] == "leak":
        print(json.dumps(leak_worker()))
    else:
        print(json.dumps(epoch_worker(sys.argv[2], int(sys.argv[3]),
                                      sys.argv[4] if len(sys.argv) > 4 else None)))
