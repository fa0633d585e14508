"""Shared fixtures: a seeded ``rng`` and the ``backend`` parametrisation.

Which backends a run covers:
* ``FASTCONV_TEST_BACKENDS=a,b`` (used by the subprocess runs: the CUDA simulator run and the
  numba-blocked run), else
* every available backend except ``cuda``; ``cuda`` joins only when a real GPU is present or the
  simulator is on. Under the simulator the CUDA run uses small shapes (``SMALL`` below).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastconv as fc

_CPU_BACKENDS = ("naive", "numpy", "numba", "cython")
CUDASIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def test_backends() -> list:
    """The backends this pytest process tests."""
    env = os.environ.get("FASTCONV_TEST_BACKENDS")
    if env:
        names = [n.strip() for n in env.split(",") if n.strip()]
        status = fc.backend_status()
        missing = {n: status.get(n, "unknown backend") for n in names if status.get(n, "?")}
        if missing:
            raise RuntimeError(f"FASTCONV_TEST_BACKENDS asks for unavailable backends: {missing}")
        return names
    return [n for n in fc.available_backends() if n in _CPU_BACKENDS]


test_backends.__test__ = False  # not a test function
TEST_BACKENDS = test_backends()

# Backends too slow (Python loops, simulated GPU) for the full grid: they run a reduced grid.
SLOW_BACKENDS = {"naive", "cuda"}


@pytest.fixture
def rng():
    """A fresh, seeded generator per test: results do not depend on test order."""
    return np.random.default_rng(20261123)


@pytest.fixture(params=TEST_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture(params=[b for b in TEST_BACKENDS if b not in SLOW_BACKENDS] or [None])
def fast_backend(request):
    """The backends that run the full grid (compiled CPU backends and numpy)."""
    if request.param is None:
        pytest.skip("no fast backend in this run (a naive/cuda-only subprocess run)")
    return request.param


def pytest_report_header(config):
    return f"fastconv {fc.__version__}; backends under test: {', '.join(TEST_BACKENDS)}"
