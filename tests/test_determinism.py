"""Determinism: the same seed and thread count give bitwise-identical training.

Each run is a fresh process (this file run as a script) that trains a small CNN for ``STEPS``
mini-batches and prints every loss as a float64 hex string plus a digest of the final weights.
Two runs of one backend with the same thread count must agree bitwise. Across thread counts
(1 vs 2) both compiled backends split their work so that every output element is computed by
one task in a fixed order (grad-weight partial sums are reduced serially over a fixed number of
chunks), so the result must not depend on the thread count either; the measured differences
are in docs/reliability.md.

Data: the first ``STEPS * BATCH`` real MNIST training images when ``FASTCONV_DATA_DIR`` holds
them, else synthetic 28x28 images with learnable labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

if __name__ == "__main__":  # the subprocess side: no conftest (it probes every backend)
    TEST_BACKENDS = []
else:
    from helpers import TEST_BACKENDS

STEPS = 50
BATCH = 16
SEED = 1234
COMPILED = [b for b in ("numba", "cython") if b in TEST_BACKENDS]


# ------------------------------------------------------------------------- the worker side


def _data(n: int, rng):
    """(images float32 (n, 1, 28, 28), labels int64 (n,)): real MNIST if available."""
    root = os.environ.get("FASTCONV_DATA_DIR")
    if root:
        from fastconv.datasets import load_mnist, normalize

        try:
            (x, y), _ = load_mnist(root, download=False, progress=False)
            return normalize(x[:n]), y[:n]
        except (OSError, ValueError):
            pass  # fall back to synthetic data
    x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
    proj = rng.standard_normal((28 * 28, 10))
    return x, np.argmax(x.reshape(n, -1) @ proj, axis=1).astype(np.int64)


def train_worker(backend: str) -> dict:
    """Train ``STEPS`` steps of a small CNN (both conv paths, pool, dropout, Adam)."""
    from fastconv import nn

    rng = np.random.default_rng(SEED)
    x, y = _data(STEPS * BATCH, rng)
    kw = dict(rng=rng, backend=backend)
    model = nn.Sequential(
        nn.Conv2D(1, 8, 3, **kw), nn.ReLU(), nn.MaxPool2D(2),
        nn.Conv2D(8, 32, 3, padding=1, **kw), nn.ReLU(), nn.MaxPool2D(3, stride=2),
        nn.Dropout(0.25, rng=rng), nn.Flatten(), nn.Dense(32 * 6 * 6, 10, **kw),
        backend=backend,
    )
    model.set_rng(rng)
    optimizer = nn.Adam(2e-3)
    losses = []
    for step in range(STEPS):
        s = slice(step * BATCH, (step + 1) * BATCH)
        losses.append(float(model.train_batch(x[s], y[s], optimizer)))
    digest = hashlib.sha256()
    for name, p in sorted(model.named_parameters().items()):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(p).tobytes())
    return {"losses": [v.hex() for v in losses], "weights_sha256": digest.hexdigest()}


# ------------------------------------------------------------------------- the pytest side


def _train(backend: str, threads: int) -> dict:
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
           # the spinning default makes the cython backend crawl on a busy machine; the wait
           # policy does not change results
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run([sys.executable, __file__, backend], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"training run exited {proc.returncode}: {proc.stderr[-3000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["losses"] = np.array([float.fromhex(v) for v in out["losses"]])
    return out


@pytest.fixture(scope="module")
def runs():
    """{(backend, threads, repeat): result}, computed once for this module."""
    cache = {}

    def get(backend, threads, repeat=0):
        key = (backend, threads, repeat)
        if key not in cache:
            cache[key] = _train(backend, threads)
        return cache[key]

    return get


@pytest.mark.parametrize("backend", COMPILED)
def test_same_seed_same_threads_is_bitwise_identical(backend, runs):
    a, b = runs(backend, 2, 0), runs(backend, 2, 1)
    assert len(a["losses"]) == STEPS
    assert np.all(np.isfinite(a["losses"]))
    assert a["losses"][-10:].mean() < a["losses"][:10].mean(), "the net did not learn"
    differ = np.flatnonzero(a["losses"] != b["losses"])
    assert differ.size == 0, (
        f"{backend}: {differ.size} of {STEPS} losses differ between two identical runs, first at "
        f"step {differ[0]}: {a['losses'][differ[0]]!r} vs {b['losses'][differ[0]]!r}"
    )
    assert a["weights_sha256"] == b["weights_sha256"]


@pytest.mark.parametrize("backend", COMPILED)
def test_thread_count_does_not_change_training(backend, runs):
    one, two = runs(backend, 1), runs(backend, 2, 0)
    diff = float(np.max(np.abs(one["losses"] - two["losses"])))
    print(f"{backend}: 1 vs 2 threads, max |loss difference| over {STEPS} steps = {diff:.3g}, "
          f"bitwise {'yes' if diff == 0 else 'no'}")
    assert diff == 0.0, f"{backend}: 1 vs 2 threads differ by up to {diff:.3g}"
    assert one["weights_sha256"] == two["weights_sha256"]


def test_numba_and_cython_agree_closely(runs):
    """Different backends need not agree bitwise, but must follow one trajectory."""
    if len(COMPILED) < 2:
        pytest.skip("needs both numba and cython under test")
    a, b = runs("numba", 2, 0), runs("cython", 2, 0)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=2e-3, atol=1e-4)


if __name__ == "__main__":
    print(json.dumps(train_worker(sys.argv[1])))
