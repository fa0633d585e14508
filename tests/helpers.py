"""One helper to check any backend's conv2d / max_pool2d, forward and backward, against an
independent reference.

The reference is PyTorch (float64 autograd, cast back) when it is installed, else fastconv's
NumPy reference, else (when the NumPy backend is itself under test) the naive loops. It is never
the backend under test.
"""

from __future__ import annotations

import os

import numpy as np

import fastconv as fc
from fastconv._oracle import TOLERANCE, assert_close, to_host  # noqa: F401  (the one oracle)

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - the test extra may lack torch
    torch = None

# ------------------------------------------------------------- backends under test
# (defined here, not in conftest.py: tests/ and benchmarks/ both have a conftest module, so
# `from conftest import ...` would be ambiguous)

_CPU_BACKENDS = ("naive", "numpy", "numba", "cython")


def _backends_under_test() -> list:
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


TEST_BACKENDS = _backends_under_test()

# Backends too slow (Python loops, simulated GPU) for the full grid: they run a reduced grid.
SLOW_BACKENDS = {"naive", "cuda"}



def _reference_backend(backend: str) -> str:
    return "naive" if backend == "numpy" else "numpy"


# ------------------------------------------------------------------------------ conv


def reference_conv(x, w, b, dy, stride, padding, dilation, groups, backend_under_test):
    """(y, dx, dw, db) from the independent reference, in x's dtype."""
    if torch is not None:
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
        bt = None if b is None else torch.tensor(b, dtype=torch.float64, requires_grad=True)
        yt = F.conv2d(xt, wt, bt, stride=stride, padding=padding, dilation=dilation, groups=groups)
        yt.backward(torch.tensor(dy, dtype=torch.float64))
        cast = lambda t: None if t is None else t.detach().numpy().astype(x.dtype)  # noqa: E731
        return cast(yt), cast(xt.grad), cast(wt.grad), (None if b is None else cast(bt.grad))
    ref = _reference_backend(backend_under_test)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, backend=ref)
    y = fc.conv2d(x, w, b, **kw)
    dx, dw, db = fc.conv2d_backward(dy, x, w, **kw)
    return y, dx, dw, (None if b is None else db)


def check_conv(backend, rng, x_shape, w_shape, *, bias=True, stride=1, padding=0, dilation=1,
               groups=1, dtype=np.float32):
    """Assert ``backend``'s conv2d and all three gradients match the reference."""
    dtype = np.dtype(dtype)
    x = rng.standard_normal(x_shape).astype(dtype)
    w = rng.standard_normal(w_shape).astype(dtype)
    b = rng.standard_normal(w_shape[0]).astype(dtype) if bias else None
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = fc.conv2d(x, w, b, backend=backend, **kw)
    dy = rng.standard_normal(to_host(y).shape).astype(dtype)
    ry, rdx, rdw, rdb = reference_conv(x, w, b, dy, backend_under_test=backend, **kw)
    case = f"[{backend} {dtype} x{x_shape} w{w_shape} {kw} bias={bias}]"
    assert_close(y, ry, f"conv2d forward {case}")
    dx, dw, db = fc.conv2d_backward(dy, x, w, backend=backend, **kw)
    assert_close(dx, rdx, f"conv2d grad input {case}")
    assert_close(dw, rdw, f"conv2d grad weight {case}")
    if bias:
        assert_close(db, rdb, f"conv2d grad bias {case}")
    else:  # db is still defined: the sum of dy over (N, H, W)
        assert_close(db, dy.astype(np.float64).sum(axis=(0, 2, 3)).astype(dtype),
                     f"conv2d grad bias {case}")


WINOGRAD_NON_FINITE = ["w", "b", "dy", "x_inf", "overflow"]


def check_winograd_non_finite(backend, rng, where):
    """Run a Winograd-eligible float32 layer (x (2, 32, 9, 10), w (64, 32, 3, 3)) with a
    non-finite value in ``where`` (or a finite overflow inside the tile transforms) through
    ``backend`` and assert PyTorch's NaN/inf pattern and finite values for y, dx, dw and db.

    Returns (forward algorithm, backward algorithm) for the caller to check which kernels ran.
    The bias is added after the transforms, element by element, so a NaN there needs no exact
    path. Not checked for an inf weight: dx (every compiled kernel computes it as a correlation
    of zero-padded dy, and inf times that padding is NaN where PyTorch, which skips the padding,
    is finite; the same holds for x's padding in y, hence padding 0 in that case). Needs
    torch."""
    x = rng.standard_normal((2, 32, 9, 10)).astype(np.float32)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    dy = rng.standard_normal((2, 64, 9, 10)).astype(np.float32)
    if where == "w":
        w[3, 4, 1, 2] = np.inf
    elif where == "b":
        b[7] = np.nan
    elif where == "dy":
        dy[1, 5, 2, 3] = -np.inf
    elif where == "x_inf":
        x[0, 2, 4, 4] = np.inf
    else:  # finite inputs whose tile transform overflows float32 (2e38 + 2e38), while the
        # direct sums stay finite (small weights and dy): with padding 1, x columns 4 and 5
        # are positions 1 and 2 of a tile, and B^T d B takes their difference
        x[1, 0, 3, 4:6] = -2e38, 2e38
        w *= 0.01
        dy *= 0.1
    pad = 0 if where == "w" else 1
    dy = dy[:, :, : 9 - 2 + 2 * pad, : 10 - 2 + 2 * pad].copy()
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ty = F.conv2d(tx, tw, tb, padding=pad)
    ty.backward(torch.tensor(dy))
    dx, dw, db = fc.conv2d_backward(dy, x, w, padding=pad, backend=backend)
    backward = fc.last_algorithm("conv2d_backward")
    y = fc.conv2d(x, w, b, padding=pad, backend=backend)
    checks = [("y", y, ty), ("dx", dx, tx.grad), ("dw", dw, tw.grad), ("db", db, tb.grad)]
    if where == "w":
        del checks[1]
    for name, got, want in checks:
        want = want.detach().numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=name)
        fin = np.isfinite(want)
        np.testing.assert_allclose(got[fin], want[fin], rtol=2e-4,
                                   atol=2e-5 * max(1, np.abs(want[fin]).max()), err_msg=name)
    return fc.last_algorithm("conv2d"), backward


# ------------------------------------------------------------------------------ pool


def reference_pool(x, dy, kernel_size, stride, padding, dilation, ceil_mode, backend_under_test):
    """(y, idx, dx) from the independent reference."""
    if torch is not None:
        xt = torch.tensor(x, requires_grad=True)
        yt, it = F.max_pool2d(xt, kernel_size, stride, padding, dilation, ceil_mode,
                              return_indices=True)
        yt.backward(torch.tensor(dy))
        return yt.detach().numpy(), it.numpy(), xt.grad.numpy()
    ref = _reference_backend(backend_under_test)
    y, idx = fc.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, backend=ref)
    return y, idx, fc.max_pool2d_backward(dy, idx, x.shape, backend=ref)


def check_pool(backend, rng, x_shape, kernel_size, *, stride=None, padding=0, dilation=1,
               ceil_mode=False, dtype=np.float32, x=None):
    """Assert ``backend``'s max_pool2d (values and indices) and its backward match the reference.

    Random inputs have no ties, so indices must match exactly.
    """
    dtype = np.dtype(dtype)
    if x is None:
        x = rng.standard_normal(x_shape).astype(dtype)
    kw = dict(stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    y, idx = fc.max_pool2d(x, kernel_size, backend=backend, **kw)
    y, idx = to_host(y), to_host(idx)
    dy = rng.standard_normal(y.shape).astype(dtype)
    ry, ridx, rdx = reference_pool(x, dy, kernel_size, stride, padding, dilation, ceil_mode,
                                   backend_under_test=backend)
    case = f"[{backend} {dtype} x{x.shape} k={kernel_size} {kw}]"
    assert idx.dtype == np.int64, f"max_pool2d indices dtype {idx.dtype} {case}"
    np.testing.assert_array_equal(idx, ridx, err_msg=f"max_pool2d indices {case}")
    assert_close(y, ry, f"max_pool2d forward {case}")
    dx = fc.max_pool2d_backward(dy, idx, x.shape, backend=backend)
    assert_close(dx, rdx, f"max_pool2d backward {case}")


def check_partial_needs(backend, rng, needs):
    """Run a first-layer-shaped conv2d_backward (x (3, 2, 10, 9), w (8, 2, 3, 3), padding 1)
    through ``backend`` with only ``needs``: assert None for every gradient not asked for and
    the NumPy reference's values for the rest. Returns the backward algorithm recorded."""
    x = rng.standard_normal((3, 2, 10, 9)).astype(np.float32)
    w = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((3, 8, 10, 9)).astype(np.float32)
    full = fc.conv2d_backward(dy, x, w, padding=1, backend="numpy")
    got = fc.conv2d_backward(dy, x, w, padding=1, backend=backend, needs=needs)
    algorithm = fc.last_algorithm("conv2d_backward")
    for name, g, ref in zip(("input", "weight", "bias"), got, full):
        if name in needs:
            np.testing.assert_allclose(to_host(g), ref, rtol=1e-4, atol=1e-4,
                                       err_msg=f"{backend} {name} with needs={needs}")
        else:
            assert g is None, f"{backend} computed {name}, not in needs={needs}"
    return algorithm
