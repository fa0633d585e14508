"""fastconv without Numba: in a subprocess where ``import numba`` fails, ``import fastconv``
works, the numba backend is listed as unavailable with the reason, auto-selection picks the
Cython backend, and the shared correctness suite passes for cython (and the pure-Python
backends) there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastconv as fc

REPO = Path(__file__).resolve().parents[1]
# The shared correctness suite; files not written yet in a partial checkout are left out.
SUITE = ["test_conv.py", "test_pool.py", "test_gradcheck.py", "test_validation.py"]

pytestmark = pytest.mark.skipif(
    "cython" not in fc.available_backends(),
    reason=f"cython backend unavailable here: {fc.backend_status().get('cython')}",
)


def _numba_blocked_env(tmp_path) -> dict:
    """Environment whose Python cannot import numba (nor numba-cuda, which needs it): a
    ``sitecustomize`` puts ``None`` in ``sys.modules`` for them, so ``import numba`` raises
    ImportError and ``importlib.util.find_spec("numba")`` finds nothing, as when Numba is not
    installed."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "for _name in ('numba', 'numba_cuda', 'llvmlite'):\n"
        "    sys.modules[_name] = None  # blocked by tests/test_without_numba.py\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("FASTCONV_BACKEND", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO / "tests")])
    return env


def test_import_and_auto_selection_without_numba(tmp_path):
    script = textwrap.dedent(
        """
        import json
        import sys
        import numpy as np
        import fastconv as fc
        x = np.ones((1, 2, 5, 5), np.float32)
        w = np.ones((3, 2, 3, 3), np.float32)
        y = fc.conv2d(x, w)
        print(json.dumps({
            "numba_blocked": sys.modules.get("numba", 0) is None,
            "status": fc.backend_status(),
            "algorithm": fc.last_algorithm("conv2d"),
            "y": float(y.sum()),
        }))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path,
                         env=_numba_blocked_env(tmp_path), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["numba_blocked"]
    assert out["status"]["numba"] is not None and "numba" in out["status"]["numba"]
    assert out["status"]["cython"] is None
    assert out["algorithm"].startswith("cython:")
    assert out["y"] == 3 * 3 * 3 * 18.0  # 3 channels x 3x3 outputs, each a sum of 18 ones


def test_correctness_suite_passes_without_numba(tmp_path):
    files = [str(REPO / "tests" / f) for f in SUITE if (REPO / "tests" / f).exists()]
    if not files:  # the shared suite is not in this checkout: run the cython-specific one
        files = [str(REPO / "tests" / "test_cython_backend.py")]
    env = _numba_blocked_env(tmp_path)
    # The pure-Python backends need no Numba either (they are in every complete checkout).
    backends = ["cython"] + [b for b in ("numpy", "naive") if b in fc.available_backends()]
    env["FASTCONV_TEST_BACKENDS"] = ",".join(backends)  # conftest fails if one is unavailable
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider",
         "-W", "ignore::UserWarning"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) > 0, tail
