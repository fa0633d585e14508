"""Shared fixtures: a seeded ``rng`` and the ``backend`` parametrisation.

Which backends a run covers:
* ``FASTCONV_TEST_BACKENDS=a,b`` (used by the subprocess runs: the CUDA simulator run and the
  numba-blocked run), else
* every available CPU backend. ``cuda`` runs in its own process under the CUDA simulator
  (tests/test_cuda_simulator.py), where ``SLOW_BACKENDS`` gives it the reduced grid of tiny shapes.

The lists live in ``helpers.py`` so that test modules can import them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastconv as fc

# Automatic selection must not switch from cython to numba in the middle of the suite (see
# fastconv/_coldstart.py): numba compiles in the process, as it always did. tests/test_first_run.py
# turns it back on in its own subprocesses; the subprocesses of other tests inherit this.
os.environ.setdefault("FASTCONV_COLDSTART", "0")

from helpers import SLOW_BACKENDS, TEST_BACKENDS  # noqa: E402  (tests import these from helpers)

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    from _cudasim_fix import lock_shared_array_allocation

    lock_shared_array_allocation()

# Without a GPU the CUDA-specific tests run in tests/test_cuda_simulator.py's subprocess, where
# the simulator makes the backend available; this process does not collect them.
collect_ignore = [] if fc.backend_status()["cuda"] is None else ["test_cuda_backend.py"]


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
