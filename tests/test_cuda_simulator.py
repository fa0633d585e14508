"""Run the shared correctness suite on the ``cuda`` backend under the CUDA simulator.

numba reads ``NUMBA_ENABLE_CUDASIM`` once, when it is imported, so the simulated run needs its own
process: this test starts pytest in a subprocess with the simulator on, only the ``cuda`` backend
under test, 2 x 2 thread blocks and at most 3 blocks per grid (so tiny inputs span many tiles and
every grid-stride loop wraps around), and checks that it passed. ``-k cuda`` keeps the tests that
exercise the backend (parametrized with it, or in test_cuda_backend.py); the backend-independent
ones already ran in the main process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The shared suites (reduced grids for SLOW_BACKENDS) and the cuda-specific tests.
SUITE = (
    "tests/test_conv.py",
    "tests/test_pool.py",
    "tests/test_gradcheck.py",
    "tests/test_cuda_backend.py",
)

# The simulator runs each CUDA thread as a Python thread and polls them at every syncthreads;
# a short GIL switch interval makes those barriers ~5x cheaper.
_RUNNER = (
    "import sys; sys.setswitchinterval(5e-5); import pytest; sys.exit(pytest.main(sys.argv[1:]))"
)


def test_cuda_suite_under_simulator():
    files = [f for f in SUITE if (ROOT / f).exists()]
    assert "tests/test_cuda_backend.py" in files
    env = dict(
        os.environ,
        NUMBA_ENABLE_CUDASIM="1",
        FASTCONV_TEST_BACKENDS="cuda",
        FASTCONV_CUDA_BLOCK="2",
        FASTCONV_CUDA_MAX_BLOCKS="3",
    )
    env.pop("FASTCONV_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, "-q", "-p", "no:cacheprovider", "-k", "cuda", *files],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    tail = out[-6000:]
    assert proc.returncode == 0, f"simulated cuda suite failed (exit {proc.returncode}):\n{tail}"
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, f"no test passed under the simulator:\n{tail}"
    assert not re.search(r"\d+ (failed|error)", summary), tail
