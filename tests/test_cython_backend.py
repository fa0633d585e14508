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
from helpers import (WINOGRAD_NON_FINITE, check_conv, check_partial_needs, check_pool,
                     check_winograd_non_finite)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    "cython" not in fc.available_backends(),
    reason=f"cython backend unavailable here: {fc.backend_status().get('cython')}",
)


def _kernels():
    from fastconv.backends.cython import executor as cython_cpu

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
    # The 16-register variants (baseline, avx2): 6-column blocks and the last one shifted,
    # rows narrower than 6 (single columns), 6- and 3-row grad-weight blocks shifted back.
    ((2, 8, 6, 9), (16, 8, 3, 3), dict()),
    ((1, 8, 5, 7), (32, 8, 3, 3), dict()),
    ((1, 3, 9, 17), (16, 3, 3, 3), dict(stride=2)),
    ((1, 3, 6, 6), (16, 3, 3, 3), dict()),
    ((2, 7, 9, 9), (16, 7, 1, 1), dict(stride=2)),
    ((2, 5, 9, 9), (10, 5, 1, 1), dict(stride=2)),
    ((2, 2, 9, 9), (16, 2, 1, 1), dict(stride=2)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape,w_shape,kw", CONV_CASES)
def test_conv_paths_match_torch(rng, x_shape, w_shape, kw, dtype):
    check_conv("cython", rng, x_shape, w_shape, dtype=dtype, **kw)


WINO = "cython:winograd-f2x2"
POINTWISE = "cython:pointwise-gemm"

# (x_shape, w_shape, kwargs, float32 forward algorithm, float32 backward algorithm) of the
# float32-only algorithms (as the numba backend's): Winograd F(2x2, 3x3) with C_out padded to
# 128, paired 32-channel blocks (C_out and, for dx, C_in <= 32), odd output sizes, asymmetric
# padding, padding > 2 and inputs narrower than 7 columns (dx by the exact kernels), dy shared
# between the dx and dw passes at either column parity, a grad-weight channel tail (C_in % 4);
# 1x1 as matrix products (>= 64 pixels; backward needs C_out >= 64): remainder rows, a shifted
# last 64-column block, several column blocks of dw, and C_out < 64 (backward: exact kernels).
WB = "cython:input:winograd-f2x2 weight:winograd-f2x2 bias:sum"
POINTWISE_BWD = "cython:input:pointwise-gemm weight:pointwise-gemm bias:sum"
WINO_CASES = [
    ((2, 33, 7, 7), (70, 33, 3, 3), dict(padding=1), WINO, WB),
    ((1, 32, 4, 4), (32, 32, 3, 3), dict(padding=3), WINO,
     "cython:input:direct-blocked weight:winograd-f2x2 bias:sum"),
    ((2, 16, 18, 17), (32, 16, 3, 3), dict(), WINO, WB),
    ((2, 24, 9, 10), (48, 24, 3, 3), dict(padding=(2, 1)), WINO, WB),
    ((2, 64, 11, 9), (64, 64, 3, 3), dict(padding=(1, 2)), WINO, WB),
    ((2, 64, 10, 9), (64, 64, 3, 3), dict(padding=1), WINO, WB),
    ((2, 48, 6, 5), (32, 48, 3, 3), dict(padding=(0, 2)), WINO,
     "cython:input:direct-blocked weight:winograd-f2x2 bias:sum"),
    ((3, 32, 26, 26), (64, 32, 3, 3), dict(), WINO, WB),  # shape B in small: paired dx
    ((2, 70, 8, 9), (64, 70, 1, 1), dict(), POINTWISE, POINTWISE),
    ((3, 33, 5, 13), (130, 33, 1, 1), dict(), POINTWISE, POINTWISE),
    ((2, 16, 8, 8), (40, 16, 1, 1), dict(), POINTWISE, "cython:input:direct-blocked "
     "weight:direct-blocked bias:sum"),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape,w_shape,kw,fwd,bwd", WINO_CASES)
def test_winograd_and_pointwise_paths_match_torch(rng, x_shape, w_shape, kw, fwd, bwd, dtype):
    check_conv("cython", rng, x_shape, w_shape, dtype=dtype, **kw)
    if dtype == np.float32:
        assert fc.last_algorithm("conv2d") == fwd
        assert fc.last_algorithm("conv2d_backward") == (POINTWISE_BWD if bwd == POINTWISE
                                                         else bwd)
    else:  # float32 only
        assert fc.last_algorithm("conv2d") not in (WINO, POINTWISE)
        assert "winograd" not in fc.last_algorithm("conv2d_backward")


def test_winograd_and_pointwise_partial_needs(rng):
    for x_shape, w_shape in (((2, 32, 10, 10), (64, 32, 3, 3)), ((2, 32, 8, 8), (64, 32, 1, 1))):
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        dy = rng.standard_normal(fc.conv2d(x, w, backend="cython").shape).astype(np.float32)
        full = fc.conv2d_backward(dy, x, w, backend="cython")
        for need, i in (("input", 0), ("weight", 1), ("bias", 2)):
            part = fc.conv2d_backward(dy, x, w, needs=(need,), backend="cython")
            assert [g is None for g in part] == [j != i for j in range(3)]
            np.testing.assert_array_equal(part[i], full[i])


# The fused backward vectorized over 16 output channels (float32, stride 1, groups 1, 9-16
# output channels, 5-16 input channels): column and channel blocks shifted back or padded,
# padding taps, dilation, uneven image chunks.
C16 = "cython:input:c16-fused weight:c16-fused bias:c16-fused"
C16_CASES = [
    ((9, 6, 14, 14), (16, 6, 5, 5), {}),  # LeNet's second layer (shape D) on 9 images
    ((2, 5, 12, 11), (10, 5, 5, 3), dict(padding=2)),
    ((2, 5, 11, 9), (11, 5, 3, 3), dict(padding=(2, 0), dilation=(2, 1))),
    ((2, 7, 6, 3), (9, 7, 4, 3), dict(padding="same")),  # rows narrower than a block
    ((2, 12, 9, 17), (13, 12, 3, 7), dict(padding=(1, 3), dilation=(1, 2))),
    ((1, 16, 5, 2), (16, 16, 2, 2), {}),
]


@pytest.mark.parametrize("x_shape, w_shape, kw", C16_CASES)
def test_few_output_channels_take_the_16_channel_backward(rng, x_shape, w_shape, kw):
    check_conv("cython", rng, x_shape, w_shape, **kw)
    assert fc.last_algorithm("conv2d_backward") == C16
    check_conv("cython", rng, x_shape, w_shape, dtype=np.float64, **kw)
    assert "c16" not in fc.last_algorithm("conv2d_backward")


@pytest.mark.parametrize("needs", [("input",), ("weight",), ("bias",), ("weight", "bias")])
def test_16_channel_backward_computes_what_is_asked(rng, needs):
    x = rng.standard_normal((3, 6, 9, 8)).astype(np.float32)
    w = rng.standard_normal((12, 6, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((3, 12, 9, 8)).astype(np.float32)
    full = fc.conv2d_backward(dy, x, w, padding=1, backend="numpy")
    got = fc.conv2d_backward(dy, x, w, padding=1, backend="cython", needs=needs)
    assert fc.last_algorithm("conv2d_backward") == "cython:" + " ".join(
        f"{g}:c16-fused" for g in needs)
    for name, g, ref in zip(("input", "weight", "bias"), got, full):
        if name in needs:
            np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4, err_msg=name)
        else:
            assert g is None


# The fused plane backward of first layers (C_in <= 4, stride 1, groups 1, dx wanted).
FUSED = "cython:input:plane-fused weight:plane-fused bias:plane-fused"
FUSED_CASES = [
    ((5, 1, 28, 28), (32, 1, 3, 3), {}),  # shape A on 5 images (chunks of 1)
    ((9, 1, 28, 28), (6, 1, 5, 5), dict(padding=2)),  # shape C on 9 images (uneven chunks)
    ((2, 3, 11, 9), (7, 3, 3, 2), dict(padding=(1, 0), dilation=(2, 3))),  # 2-column pass
    ((2, 2, 9, 8), (5, 2, 3, 3), dict(padding=3)),  # padding beyond the kernel's reach
    ((3, 4, 7, 10), (12, 4, 4, 4), dict(padding="same")),  # uneven "same": 3 + 1 columns
    ((1, 1, 40, 3), (2, 1, 1, 3), {}),  # one output column per row
    # padding beyond the reach on a plane of several dx blocks: dy's rows run past the
    # furthest row dx reads (the planes are sized for both)
    ((2, 1, 40, 40), (2, 1, 1, 1), dict(padding=3)),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("x_shape, w_shape, kw", FUSED_CASES)
def test_first_layers_take_the_fused_backward(rng, x_shape, w_shape, kw, dtype):
    """dx, dw and db in one pass over dy (each image's dy copied once into padded planes)."""
    check_conv("cython", rng, x_shape, w_shape, dtype=dtype, **kw)
    assert fc.last_algorithm("conv2d_backward") == FUSED


@pytest.mark.parametrize("needs", [("input",), ("input", "bias"), ("input", "weight")])
def test_fused_backward_computes_what_is_asked(rng, needs):
    algorithm = check_partial_needs("cython", rng, needs)
    assert algorithm == "cython:" + " ".join(f"{g}:plane-fused" for g in needs)


def test_fused_backward_leaves_non_finite_x_to_the_exact_kernels(rng):
    """The fused dot products meet x's zero padding: with an inf in x, dw takes the exact
    kernels; dx alone (it never reads x) still takes the fused one."""
    x = rng.standard_normal((2, 1, 12, 12)).astype(np.float32)
    x[1, 0, 5, 0] = np.inf
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    dy = rng.uniform(0.5, 1.5, (2, 8, 12, 12)).astype(np.float32)
    fc.conv2d_backward(dy, x, w, padding=1, backend="cython")
    assert "plane-fused" not in fc.last_algorithm("conv2d_backward")
    dx = fc.conv2d_backward(dy, x, w, padding=1, backend="cython", needs=("input",))[0]
    assert fc.last_algorithm("conv2d_backward") == "cython:input:plane-fused"
    np.testing.assert_allclose(dx, fc.conv2d_backward(dy, x, w, padding=1, backend="numpy",
                                                      needs=("input",))[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("width, algo", [(8, "cython:direct-blocked"), (10, WINO)])
def test_nan_propagates_to_exactly_the_outputs_it_touches(rng, width, algo):
    x = rng.standard_normal((1, 40, 8, width)).astype(np.float32)
    w = rng.standard_normal((64, 40, 3, 3)).astype(np.float32)
    fc.conv2d(x, w, backend="cython")
    assert fc.last_algorithm("conv2d") == algo  # (the path a finite x takes)
    x[0, 5, 3, 4] = np.nan
    y = fc.conv2d(x, w, backend="cython")
    touched = np.zeros((6, width - 2), bool)
    touched[1:4, 2:5] = True
    assert np.isnan(y[0][:, touched]).all()
    assert not np.isnan(y[0][:, ~touched]).any()
    # Winograd mixes a whole 4x4 input tile, so it noticed the NaN and ran the exact kernel
    exact = f"{WINO}>direct-blocked" if algo == WINO else algo
    assert fc.last_algorithm("conv2d") == exact


@pytest.mark.parametrize("where", WINOGRAD_NON_FINITE)
def test_winograd_hands_non_finite_values_to_the_exact_kernels(rng, where):
    """A tile's transforms mix its 16 inputs (and a filter's 9 taps): an inf or NaN there, or
    an overflow inside the transforms, would reach outputs and gradients that PyTorch keeps
    finite. Each case gives PyTorch's values and non-finite pattern, and the exact kernels
    took over where the transforms saw a non-finite value."""
    pytest.importorskip("torch")
    forward, backward = check_winograd_non_finite("cython", rng, where)
    assert forward == (WINO if where in ("dy", "b") else f"{WINO}>direct-blocked")
    assert backward.startswith("cython:input:winograd-f2x2")
    assert "weight:winograd-f2x2" in backward
    assert (">" in backward) == (where != "b"), backward


def _new_algorithm_results(fc_, np_):
    """y, dx, dw, db of a Winograd layer (8 grad-weight chunks, paired dx), a 1x1 layer and a
    first layer (the fused plane backward: 8 image chunks, uneven)."""
    r = np_.random.default_rng(7)
    out = []
    for x_shape, w_shape, pad in (((4, 32, 18, 20), (64, 32, 3, 3), 1),
                                  ((9, 48, 9, 10), (64, 48, 1, 1), 0),
                                  ((11, 2, 20, 17), (6, 2, 5, 5), 2)):
        x = r.standard_normal(x_shape).astype(np_.float32)
        w = r.standard_normal(w_shape).astype(np_.float32)
        b = r.standard_normal(w_shape[0]).astype(np_.float32)
        y = fc_.conv2d(x, w, b, padding=pad, backend="cython")
        dy = r.standard_normal(y.shape).astype(np_.float32)
        out += [y, *fc_.conv2d_backward(dy, x, w, padding=pad, backend="cython"),
                fc_.last_algorithm("conv2d_backward")]
    return out


_THREADS_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    import fastconv as fc
    from test_cython_backend import _new_algorithm_results
    for a in _new_algorithm_results(fc, np):
        print(a if isinstance(a, str) else hashlib.sha256(a.tobytes()).hexdigest())
    """
)


def test_winograd_and_pointwise_identical_for_one_and_two_threads():
    """The Winograd grad-weight sums a fixed number of chunks (8) in order, the 1x1 and the
    fused grad-weights 8 fixed image chunks: bitwise the same result on 1 and 2 OpenMP threads
    (thread counts are fixed when libgomp loads: one process each)."""
    script = _THREADS_SCRIPT.format(tests=str(REPO / "tests"))
    outs = []
    for threads in ("1", "2"):
        env = {k: v for k, v in os.environ.items() if k != "FASTCONV_BACKEND"}
        env["OMP_NUM_THREADS"] = threads
        run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        outs.append(run.stdout.split())
    assert WB in " ".join(outs[0])
    assert POINTWISE_BWD in " ".join(outs[0])
    assert FUSED in " ".join(outs[0])
    assert outs[0] == outs[1]


def test_winograd_and_pointwise_serial_path_matches(monkeypatch):
    """The serial loops (after a fork) give the same bits as the parallel ones."""
    parallel = _new_algorithm_results(fc, np)
    monkeypatch.setattr(_kernels(), "_serial_after_fork", True)
    for a, b in zip(parallel, _new_algorithm_results(fc, np)):
        np.testing.assert_array_equal(a, b)


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


def test_openmp_flag_says_whether_the_kernels_run_in_parallel():
    """``OPENMP`` is what the extension was compiled with: with OpenMP a ``prange`` may use
    OMP_NUM_THREADS threads, without it exactly one (one process: libgomp reads the variable
    when it loads)."""
    code = ("from fastconv.backends.cython import executor as e\n"
            "print(e.OPENMP, e._k.OPENMP, e._k.max_threads())")
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_BACKEND"}
    env["OMP_NUM_THREADS"] = "3"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    flag, compiled, threads = run.stdout.split()
    assert flag == compiled in ("True", "False")
    assert int(threads) == (3 if flag == "True" else 1)
    assert _kernels().unavailable_reason() is None


def test_missing_extension_reason(monkeypatch):
    cc = _kernels()
    monkeypatch.setattr(cc, "_k", None)
    monkeypatch.setattr(
        cc, "_IMPORT_ERROR", ImportError("No module named 'fastconv.backends.cython._kernels_avx2'")
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
    import _kernels_baseline as debug_kernels
    from fastconv.backends.cython import executor as cython_cpu
    from helpers import check_conv, check_pool
    assert debug_kernels.BOUNDSCHECK, "the debug build has bounds checks off"
    # An out-of-bounds index must raise in this build (proves the checks are live).
    try:  # a db shorter than dy's channels, which the caller never passes
        debug_kernels.conv_grad_bias(np.ones((1, 2, 4)), np.zeros(1))
    except IndexError:
        pass
    else:
        raise SystemExit("bounds checks are not active")
    # The executor's layouts follow its variant's block sizes: the same as the debug build's.
    assert cython_cpu._k.BLOCK_SIZES == debug_kernels.BLOCK_SIZES, cython_cpu.VARIANT
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
_DEBUG_CONV = CONV_CASES + [c[:3] for c in WINO_CASES] + FUSED_CASES + [
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
    pkg = Path("fastconv", "backends", "cython")
    (tree / pkg).mkdir(parents=True)
    shutil.copy(REPO / "setup.py", tree / "setup.py")
    for name in ("_kernels.pyx.tp", "_cpu.pyx"):
        shutil.copy(REPO / pkg / name, tree / pkg / name)
    build = tmp_path / "build"
    env = {**os.environ, "FASTCONV_CYTHON_DEBUG": "1"}
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(build),
         "--build-temp", str(tmp_path / "tmp")],
        cwd=tree, env=env, capture_output=True, text=True, timeout=300,
    )
    built = list((build / "fastconv" / "backends" / "cython").glob("_kernels_baseline*.so"))
    assert proc.returncode == 0 and built, proc.stdout + proc.stderr
    script = _DEBUG_SCRIPT.format(
        build=str(built[0].parent), tests=str(REPO / "tests"),
        conv_cases=_DEBUG_CONV, pool_cases=_DEBUG_POOL,
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_BACKEND"}
    env["FASTCONV_CYTHON_VARIANT"] = "baseline"  # the debug build's variant
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "DEBUG-BUILD-OK" in run.stdout, run.stdout + run.stderr
