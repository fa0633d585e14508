"""Cython-specific checks: the block/tail paths of the compiled kernels against PyTorch, the
OpenMP flag, determinism of the parallel kernels, the unavailable-extension message, and a
bounds-checked debug build (``FASTCONV_CYTHON_DEBUG=1``) run on adversarial-but-valid shapes.

The shared suites (test_conv.py, test_pool.py, test_gradcheck.py) cover the public semantics
for every backend; the cases here target the code paths the Cython kernels choose by shape.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import fastconv as fc
from helpers import check_conv, check_pool

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    "cython" not in fc.available_backends(),
    reason=f"cython backend unavailable here: {fc.backend_status().get('cython')}",
)


def _kernels():
    from fastconv.backends import cython_cpu

    return cython_cpu


# (x_shape, w_shape, kwargs): full 4-column x 64/32/16-channel register blocks, channel and
# column tails, CIB=4 input-channel blocks and their tails, groups, depthwise, stride (the
# zero-inserted grad-input), dilation, asymmetric 'same' padding, padding larger than the
# kernel reach (negative grad-input padding), trailing rows no window reaches.
CONV_CASES = [
    ((2, 3, 7, 9), (64, 3, 3, 3), dict(padding=1)),
    ((2, 4, 6, 8), (32, 4, 1, 1), dict()),
    ((1, 8, 6, 10), (16, 8, 3, 3), dict(stride=2, padding=1)),
    ((2, 5, 7, 6), (80, 5, 2, 3), dict(padding="same")),
    ((2, 6, 9, 9), (12, 3, 3, 3), dict(groups=2, dilation=2)),
    ((2, 4, 8, 8), (4, 1, 3, 3), dict(groups=4, padding=1)),
    ((1, 1, 10, 11), (6, 1, 5, 5), dict(padding=2)),
    ((2, 1, 9, 9), (32, 1, 3, 3), dict()),
    ((2, 16, 6, 6), (6, 16, 3, 3), dict(stride=(2, 1), padding=(0, 1))),
    ((1, 4, 5, 5), (16, 4, 1, 1), dict(padding=2)),
    ((1, 3, 8, 7), (20, 3, 3, 3), dict(stride=3, dilation=(1, 2))),
    ((2, 3, 5, 15), (16, 3, 3, 3), dict()),  # 10-column blocks, the last one shifted
    ((2, 5, 7, 8), (16, 5, 3, 3), dict(padding=1)),  # 16-channel grad-weight, 12 + 3 run rows
    ((1, 2, 4, 20), (16, 2, 3, 3), dict()),  # NCHW direct forward, 16-column blocks, x unpadded
    ((2, 3, 14, 14), (6, 3, 5, 5), dict()),  # 208-position plane blocks; grad-input at pitch W
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape,w_shape,kw", CONV_CASES)
def test_conv_paths_match_torch(rng, x_shape, w_shape, kw, dtype):
    check_conv("cython", rng, x_shape, w_shape, dtype=dtype, **kw)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "x_shape,k,kw",
    [
        ((2, 3, 9, 8), 2, dict()),
        ((1, 2, 9, 9), 3, dict(stride=2, padding=1, ceil_mode=True)),
        ((1, 2, 10, 7), (3, 2), dict(stride=(1, 2), dilation=2)),
    ],
)
def test_pool_paths_match_torch(rng, x_shape, k, kw, dtype):
    check_pool("cython", rng, x_shape, k, dtype=dtype, **kw)


def test_pool_nan_and_ties_match_torch(rng):
    x = np.zeros((1, 1, 5, 5), np.float32)
    x[0, 0, 1, 1] = x[0, 0, 1, 2] = np.nan
    x[0, 0, 4, 4] = 1.0
    check_pool("cython", rng, None, 2, x=x)
    check_pool("cython", rng, None, 3, stride=1, padding=1, x=x)


@pytest.mark.parametrize("width", [26, 24, 27])
def test_pool_2x2_blocks_nan_and_ties_match_torch(rng, width):
    """The 2x2 stride-2 kernel runs rows in vectorized blocks of 8 outputs (the last one
    shifted back): ties, NaN and -inf in every block position, odd widths (a dropped column)."""
    x = rng.integers(-2, 3, (2, 3, 6, width)).astype(np.float32)  # many ties
    x[0, 0, 0, ::5] = np.nan
    x[1, 2, 3, 7::3] = np.nan
    x[0, 1] = -np.inf
    check_pool("cython", rng, None, 2, x=x)


def test_openmp_flag_is_bool():
    assert isinstance(_kernels().OPENMP, bool)
    assert _kernels().unavailable_reason() is None


def test_missing_extension_reason(monkeypatch):
    cc = _kernels()
    monkeypatch.setattr(cc, "_k", None)
    monkeypatch.setattr(
        cc, "_IMPORT_ERROR", ImportError("No module named 'fastconv.backends._cython_kernels'")
    )
    reason = cc.unavailable_reason()
    assert "not built" in reason and "pip install" in reason


def _workload(seed):
    r = np.random.default_rng(seed)
    x = r.standard_normal((4, 8, 12, 12)).astype(np.float32)
    w = r.standard_normal((32, 8, 3, 3)).astype(np.float32)
    y = fc.conv2d(x, w, padding=1, backend="cython")
    dx, dw, db = fc.conv2d_backward(y, x, w, padding=1, backend="cython")
    p, idx = fc.max_pool2d(y, 3, stride=2, padding=1, backend="cython")
    return [y, dx, dw, db, p, idx, fc.max_pool2d_backward(p, idx, y.shape, backend="cython")]


def test_parallel_results_are_deterministic():
    """Repeated calls, and calls from concurrent Python threads, give bit-identical results."""
    first = _workload(1)
    results = [None] * 3

    def run(i):
        results[i] = _workload(1)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for again in [_workload(1), *results]:
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ bounds-checked debug build

_DEBUG_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.path.insert(0, {build!r})
    sys.path.insert(0, {tests!r})
    import _cython_kernels as debug_kernels
    from fastconv.backends import cython_cpu
    from helpers import check_conv, check_pool
    assert debug_kernels.BOUNDSCHECK, "the debug build has bounds checks off"
    # An out-of-bounds index must raise in this build (proves the checks are live).
    try:  # an index past the plane, which fastconv._validate would have rejected
        debug_kernels.max_pool_bwd(np.ones((1, 1, 1, 1)), np.full((1, 1, 1, 1), 4),
                                   np.zeros((1, 4)))
    except IndexError:
        pass
    else:
        raise SystemExit("bounds checks are not active")
    cython_cpu._k = debug_kernels
    rng = np.random.default_rng(0)
    for x_shape, w_shape, kw in {conv_cases!r}:
        for dtype in (np.float32, np.float64):
            check_conv("cython", rng, x_shape, w_shape, dtype=dtype, **kw)
    for x_shape, k, kw in {pool_cases!r}:
        check_pool("cython", rng, x_shape, k, **kw)
    print("DEBUG-BUILD-OK")
    """
)

# Adversarial but valid: 1x1 inputs and outputs, kernels as large as the padded input,
# padding beyond the kernel reach, every tail, strides larger than the kernel, ceil-mode
# windows hanging over the edge, a single column, channel counts of 1.
_DEBUG_CONV = CONV_CASES + [
    ((1, 1, 1, 1), (1, 1, 1, 1), dict()),
    ((1, 2, 3, 3), (65, 2, 3, 3), dict()),
    ((1, 2, 1, 1), (17, 2, 3, 3), dict(padding=1)),
    ((2, 4, 2, 9), (33, 4, 2, 2), dict(padding=3, dilation=(1, 3))),
    ((1, 3, 9, 1), (7, 3, 1, 1), dict(stride=4, padding=(0, 2))),
    ((1, 8, 5, 5), (8, 1, 5, 5), dict(groups=8, padding="same")),
    ((1, 5, 4, 6), (16, 5, 4, 4), dict(padding="same", dilation=2)),
]
_DEBUG_POOL = [
    ((1, 1, 1, 1), 1, dict()),
    ((1, 2, 5, 4), 3, dict(stride=2, padding=1, ceil_mode=True)),
    ((1, 1, 7, 3), (2, 3), dict(stride=3, dilation=(3, 1), ceil_mode=True, padding=(1, 1))),
    ((2, 3, 8, 8), 2, dict()),
]


def test_debug_build_never_indexes_out_of_bounds(tmp_path):
    """Build the extension with FASTCONV_CYTHON_DEBUG=1 (bounds checks on) in a temporary tree
    and run adversarial-but-valid shapes through it: any out-of-bounds access would raise
    IndexError. Needs a C compiler, like the normal build (this test only runs where the
    extension was built)."""
    tree = tmp_path / "src"
    (tree / "fastconv" / "backends").mkdir(parents=True)
    shutil.copy(REPO / "setup.py", tree / "setup.py")
    shutil.copy(REPO / "fastconv" / "backends" / "_cython_kernels.pyx",
                tree / "fastconv" / "backends" / "_cython_kernels.pyx")
    build = tmp_path / "build"
    env = {**os.environ, "FASTCONV_CYTHON_DEBUG": "1"}
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(build),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300,
    )
    built = list((build / "fastconv" / "backends").glob("_cython_kernels*"))
    assert proc.returncode == 0 and built, proc.stdout + proc.stderr
    script = _DEBUG_SCRIPT.format(
        build=str(built[0].parent), tests=str(REPO / "tests"),
        conv_cases=_DEBUG_CONV, pool_cases=_DEBUG_POOL,
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_BACKEND"}
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "DEBUG-BUILD-OK" in run.stdout, run.stdout + run.stderr
