"""max_pool2d forward (values and int64 indices) and backward, every backend, against PyTorch.

Beyond the grid: ties (the first maximum wins, torch's exact indices), -inf padding, ceil_mode
output sizes equal to torch's, NaN in a window, and accumulation where windows overlap.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import check_pool, to_host
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastconv as fc

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover
    torch = None

F32, F64 = np.float32, np.float64
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (the test extra)")


def case(x_shape, kernel, dtype=F32, **kw):
    label = "x{}-k{}-{}".format("x".join(map(str, x_shape)), kernel, np.dtype(dtype).name)
    label += "".join(f"-{k}={v}" for k, v in kw.items())
    return pytest.param(x_shape, kernel, dtype, kw, id=label.replace(" ", ""))


FULL_GRID = [
    case((2, 3, 8, 8), 2),
    case((2, 3, 8, 8), 2, F64, stride=2),
    case((2, 3, 9, 7), 2, stride=2),  # odd sizes: the last row/column is dropped
    case((2, 3, 9, 7), 2, stride=2, ceil_mode=True),
    case((2, 3, 11, 10), 3, stride=2, padding=1),  # overlapping windows (P3)
    case((2, 3, 11, 10), 3, F64, stride=2, padding=1, ceil_mode=True),
    case((2, 3, 7, 6), 3, stride=1),
    case((2, 3, 7, 6), 3, stride=1, padding=1),
    case((1, 2, 9, 8), (3, 2), stride=(2, 1), padding=(1, 0)),
    case((1, 2, 9, 8), (2, 3), stride=(1, 2), padding=(1, 1), ceil_mode=True),
    case((2, 2, 10, 9), 3, dilation=2),
    case((2, 2, 10, 9), 3, F64, dilation=2, padding=1, ceil_mode=True),
    case((1, 2, 9, 9), 2, stride=1, dilation=(1, 2)),
    case((1, 2, 11, 9), (3, 3), stride=3, dilation=(2, 1), padding=1, ceil_mode=True),
    case((1, 2, 8, 8), 1, stride=2),
    case((1, 2, 12, 11), 4, stride=3, padding=2, ceil_mode=True),
    case((1, 2, 13, 12), 5, stride=2, padding=2, ceil_mode=True),
    case((1, 2, 10, 10), 4, stride=3, padding=1),
    case((1, 1, 1, 1), 1),
    case((1, 1, 3, 5), (3, 5)),  # one window covering the plane
    case((2, 8, 13, 13), 2, stride=2),  # P1-like, odd
    case((2, 8, 14, 14), 2, stride=2),  # P2-like
    case((1, 16, 15, 15), 3, stride=2, padding=1),  # P3-like
    case((1, 16, 15, 15), 3, F64, stride=2, padding=1),
]

SLOW_GRID = [
    case((1, 2, 6, 6), 2),
    case((1, 2, 7, 5), 2, F64, ceil_mode=True),
    case((1, 2, 7, 7), 3, stride=2, padding=1),
    case((1, 2, 6, 5), 3, stride=1),
    case((1, 2, 6, 7), (3, 2), stride=(2, 1), padding=(1, 1), ceil_mode=True),
    case((1, 2, 8, 7), 3, dilation=2, padding=1),
    case((1, 2, 7, 8), 2, F64, stride=1, dilation=(2, 1)),
    case((1, 2, 8, 8), 4, stride=3, padding=2, ceil_mode=True),
    case((1, 2, 5, 5), 1, stride=2),
    case((2, 1, 3, 4), (3, 4)),
]


@pytest.mark.parametrize("x_shape, kernel, dtype, kw", FULL_GRID)
def test_pool_grid(fast_backend, rng, x_shape, kernel, dtype, kw):
    check_pool(fast_backend, rng, x_shape, kernel, dtype=dtype, **kw)


@pytest.mark.parametrize("x_shape, kernel, dtype, kw", SLOW_GRID)
def test_pool_small_grid(backend, rng, x_shape, kernel, dtype, kw):
    check_pool(backend, rng, x_shape, kernel, dtype=dtype, **kw)


@st.composite
def pool_configs(draw):
    """A valid max_pool2d configuration in which every window holds an input element."""
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    # H >= the dilated kernel (>= the dilation) keeps windows from lying wholly in the padding
    hw = [draw(st.integers(d[i] * (k[i] - 1) + 1, d[i] * (k[i] - 1) + 8)) for i in range(2)]
    return dict(
        x_shape=(draw(st.integers(1, 2)), draw(st.integers(1, 3)), *hw), kernel_size=k,
        stride=draw(st.sampled_from([None, s])), padding=p, dilation=d,
        ceil_mode=draw(st.booleans()), dtype=draw(st.sampled_from([F32, F64])),
        ties=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=pool_configs())
def test_pool_hypothesis(fast_backend, cfg):
    cfg = dict(cfg)
    rng = np.random.default_rng(cfg.pop("seed"))
    x_shape = cfg.pop("x_shape")
    if cfg.pop("ties"):  # small integers: many ties, torch's first-maximum indices must match
        cfg["x"] = rng.integers(-2, 3, x_shape).astype(cfg["dtype"])
    check_pool(fast_backend, rng, x_shape, cfg.pop("kernel_size"), **cfg)


# ------------------------------------------------------------------------------ ties


@pytest.mark.parametrize("kernel, kw", [
    (2, {}), (3, dict(stride=1)), (3, dict(stride=2, padding=1)),
    ((2, 3), dict(stride=1, dilation=(2, 1), padding=(1, 1), ceil_mode=True)),
])
def test_constant_input_picks_the_first_element_of_each_window(backend, rng, kernel, kw):
    x = np.full((1, 2, 7, 6), 0.5, np.float32)
    check_pool(backend, rng, x.shape, kernel, x=x, **kw)  # indices equal torch's exactly
    _, idx = fc.max_pool2d(x, kernel, backend=backend, **kw)
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    s = kw.get("stride", k)
    s = (s, s) if isinstance(s, int) else s
    p = kw.get("padding", 0)
    p = (p, p) if isinstance(p, int) else p
    d = kw.get("dilation", 1)
    d = (d, d) if isinstance(d, int) else d
    idx = to_host(idx)
    for oh in range(idx.shape[2]):  # independently: the first in-bounds element of the window
        for ow in range(idx.shape[3]):
            row = min(r for r in (oh * s[0] - p[0] + i * d[0] for i in range(k[0])) if r >= 0)
            col = min(c for c in (ow * s[1] - p[1] + j * d[1] for j in range(k[1])) if c >= 0)
            assert (idx[:, :, oh, ow] == row * 6 + col).all(), (oh, ow)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kernel, kw", [
    (2, {}), (3, dict(stride=1, padding=1)), (3, dict(stride=2, padding=1, ceil_mode=True)),
    (2, dict(stride=1, dilation=2)),
])
def test_repeated_values_first_maximum_wins(backend, rng, kernel, kw, dtype):
    x = rng.integers(0, 3, (2, 2, 7, 8)).astype(dtype)  # many ties in every window
    check_pool(backend, rng, x.shape, kernel, x=x, dtype=dtype, **kw)


def _ties_nan_inf(rng, shape, dtype):
    """Small integers (ties in every window), NaN at every block position of some rows and twice
    in some windows, and a plane of -inf."""
    x = rng.integers(-2, 3, shape).astype(dtype)
    x[0, 0, 0, ::5] = np.nan
    x[0, 0, 1, 1::7] = np.nan  # with row 0's: two NaNs in some 2x2 windows
    x[-1, -1, 3, 2::3] = np.nan
    x[0, -1] = -np.inf
    return x


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("width", [6, 7, 8, 9, 16, 17, 26, 27, 34])
def test_2x2_stride_2_rows_of_every_width(backend, rng, width, dtype):
    """The 2x2 stride-2 kernels compute rows in vector blocks of 8 outputs, the last one shifted
    back to end at W_out (numba, Cython), and rows narrower than a block one output at a time:
    ties, NaN and -inf at every block position; odd widths drop a column."""
    x = _ties_nan_inf(rng, (2, 3, 7, width), dtype)
    check_pool(backend, rng, None, 2, x=x, dtype=dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("width, kernel, kw", [
    (37, 3, dict(stride=2, padding=1)),  # W_out 19: two vector blocks of 16, the second partial
    (112, 3, dict(stride=2, padding=1)),  # P3's rows
    (40, (3, 4), dict(stride=(1, 2), padding=(1, 2), dilation=(2, 3), ceil_mode=True)),
    (35, 2, dict(stride=2, ceil_mode=True)),  # a last window clipped by the input's end
    (33, 1, dict(stride=2)),  # most input columns never read
])
def test_column_stride_2_rows(backend, rng, width, kernel, kw, dtype):
    """Column stride 2 (numba's and Cython's parity-split kernels) on wide rows, with ties, NaN
    and -inf in and around every window."""
    x = _ties_nan_inf(rng, (2, 3, 9, width), dtype)
    check_pool(backend, rng, None, kernel, x=x, dtype=dtype, **kw)


@pytest.mark.parametrize("x_shape, kernel, kw, paths", [
    ((2, 3, 8, 26), 2, {}, dict(numba="numba:k2s2", cython="cython:k2s2")),
    ((2, 3, 15, 15), 3, dict(stride=2, padding=1),
     dict(numba="numba:parity-s2", cython="cython:parity-s2")),
    ((2, 3, 15, 15), 3, dict(stride=1, padding=1),
     dict(numba="numba:generic", cython="cython:direct")),
    ((1, 2, 8, 600), 3, dict(stride=2, padding=1),  # W_out 300: over the Cython row buffers
     dict(numba="numba:parity-s2", cython="cython:direct")),
])
def test_forward_paths(backend, rng, x_shape, kernel, kw, paths):
    """Each CPU path gives torch's results, and the compiled backends record which ran."""
    x = _ties_nan_inf(rng, x_shape, F32)
    check_pool(backend, rng, None, kernel, x=x, **kw)
    fc.max_pool2d(x, kernel, backend=backend, **kw)
    if backend in paths:
        assert fc.last_algorithm("max_pool2d") == paths[backend]


def test_first_maximum_in_row_major_order(backend):
    # window 0 (rows 0-1, cols 0-1) holds 5 at (0, 1) and (1, 0): row-major order picks (0, 1)
    x = np.array([[1, 5, 2, 2], [5, 0, 2, 2]], np.float64).reshape(1, 1, 2, 4)
    y, idx = fc.max_pool2d(x, 2, backend=backend)
    np.testing.assert_array_equal(to_host(idx), [[[[1, 2]]]])
    np.testing.assert_array_equal(to_host(y), [[[[5.0, 2.0]]]])


# ------------------------------------------------------------------------------ -inf padding


@pytest.mark.parametrize("kernel, kw", [
    (3, dict(stride=2, padding=1)), (3, dict(stride=1, padding=1)),
    (2, dict(stride=2, padding=1, ceil_mode=True)), (4, dict(stride=3, padding=2)),
    ((3, 2), dict(stride=(1, 2), padding=(1, 1), dilation=(2, 1), ceil_mode=True)),
])
def test_padding_is_minus_infinity(backend, rng, kernel, kw):
    """All-negative inputs: zero padding would win; -inf padding never does."""
    x = -rng.uniform(1.0, 2.0, (1, 2, 7, 6))
    check_pool(backend, rng, x.shape, kernel, x=x, dtype=F64, **kw)
    y, idx = map(to_host, fc.max_pool2d(x, kernel, backend=backend, **kw))
    assert (y <= -1.0).all() and np.isfinite(y).all()
    assert ((idx >= 0) & (idx < 42)).all()
    planes = x.reshape(1, 2, 42)
    np.testing.assert_array_equal(np.take_along_axis(planes, idx.reshape(1, 2, -1), 2),
                                  y.reshape(1, 2, -1))


def test_minus_infinity_in_the_input_is_a_value(backend):
    x = np.full((1, 1, 4, 4), -np.inf)  # every element ties with the -inf padding
    y, idx = map(to_host, fc.max_pool2d(x, 3, stride=1, padding=1, backend=backend))
    assert np.isneginf(y).all()
    if torch is not None:
        _, ti = F.max_pool2d(torch.tensor(x), 3, 1, 1, return_indices=True)
        np.testing.assert_array_equal(idx, ti.numpy())
    assert ((idx >= 0) & (idx < 16)).all()


def test_window_entirely_in_padding_is_rejected():
    """k=2, padding=1, dilation=2 on H=1: output row 0 reads rows -1 and 1, neither in the
    input. torch returns -inf and an index outside the plane, which max_pool2d_backward then
    rejects; fastconv's validation should refuse the geometry up front with a ValueError."""
    x = np.arange(3.0).reshape(1, 1, 1, 3)
    with pytest.raises(ValueError, match="padding|dilation"):
        fc.max_pool2d(x, 2, stride=1, padding=1, dilation=2, backend="numpy")


# ------------------------------------------------------------------------------ ceil_mode sizes


def _pair(v):
    return (v, v) if isinstance(v, int) else v


@needs_torch
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("k, s, d", [
    (1, 1, 1), (1, 2, 1), (2, 1, 1), (2, 2, 1), (2, 3, 1), (3, 2, 1), (3, 3, 1), (4, 3, 1),
    (5, 2, 1), (2, 2, 2), (3, 2, 2), (3, 1, 3),
])
def test_output_sizes_equal_torch(k, s, d, ceil_mode):
    """Output shape (and values) for H in 1..12 (W = H + 1) and every legal padding; where torch
    refuses the geometry, fastconv raises ValueError."""
    for h in range(1, 13):
        x = np.random.default_rng(h).standard_normal((1, 1, h, h + 1))
        for p in range(k // 2 + 1):
            try:
                ty, ti = F.max_pool2d(torch.tensor(x), k, s, p, d, ceil_mode,
                                      return_indices=True)
            except RuntimeError:
                with pytest.raises(ValueError):
                    fc.max_pool2d(x, k, s, p, d, ceil_mode, backend="numpy")
                continue
            if (ti < 0).any() or (ti >= x[0, 0].size).any() or torch.isinf(ty).any():
                with pytest.raises(ValueError):  # a window entirely in the padding
                    fc.max_pool2d(x, k, s, p, d, ceil_mode, backend="numpy")
                continue
            y, idx = fc.max_pool2d(x, k, s, p, d, ceil_mode, backend="numpy")
            where = f"H={h} k={k} s={s} p={p} d={d} ceil_mode={ceil_mode}"
            assert y.shape == tuple(ty.shape), where
            np.testing.assert_array_equal(idx, ti.numpy(), err_msg=where)
            np.testing.assert_array_equal(y, ty.numpy(), err_msg=where)


@pytest.mark.parametrize("h, k, s, p, expected", [
    (5, 2, 2, 0, 3), (6, 2, 2, 0, 3), (7, 3, 2, 1, 4), (8, 3, 2, 1, 5), (4, 2, 3, 1, 2),
    (5, 4, 3, 2, 3), (1, 1, 2, 0, 1), (9, 3, 3, 0, 3), (10, 3, 3, 0, 4), (3, 2, 2, 1, 2),
])
def test_ceil_mode_sizes_every_backend(backend, rng, h, k, s, p, expected):
    """Each backend returns the ceil_mode size (torch's, listed; the last window starting in the
    right padding dropped), with values and indices equal to the reference."""
    x = rng.standard_normal((1, 1, h, h))
    y, _ = fc.max_pool2d(x, k, s, p, ceil_mode=True, backend=backend)
    assert to_host(y).shape == (1, 1, expected, expected)
    check_pool(backend, rng, x.shape, k, stride=s, padding=p, ceil_mode=True, x=x, dtype=F64)


# ------------------------------------------------------------------------------ NaN


@pytest.mark.parametrize("nans", [
    [(0, 0, 1, 1)],  # one NaN
    [(0, 1, 0, 0), (0, 1, 1, 1)],  # two NaNs in one window: torch points at the last
    [(1, 0, 2, 3), (1, 0, 3, 2), (1, 0, 4, 4)],  # NaNs shared by overlapping windows
])
@pytest.mark.parametrize("kernel, kw", [(2, {}), (3, dict(stride=2, padding=1))])
def test_nan_in_a_window(backend, rng, nans, kernel, kw):
    x = rng.standard_normal((2, 2, 6, 6))
    for pos in nans:
        x[pos] = np.nan
    check_pool(backend, rng, x.shape, kernel, x=x, dtype=F64, **kw)  # equals torch's indices
    y, idx = map(to_host, fc.max_pool2d(x, kernel, backend=backend, **kw))
    picked = np.take_along_axis(x.reshape(2, 2, 36), idx.reshape(2, 2, -1), 2).reshape(y.shape)
    np.testing.assert_array_equal(np.isnan(picked), np.isnan(y))  # idx points at a NaN
    # exactly the windows holding a NaN are NaN
    k = _pair(kernel)
    s = _pair(kw.get("stride", kernel))
    p = _pair(kw.get("padding", 0))
    expected = np.zeros(y.shape, bool)
    for n, c, h0, w0 in nans:
        for oh in range(y.shape[2]):
            for ow in range(y.shape[3]):
                if 0 <= h0 - (oh * s[0] - p[0]) < k[0] and 0 <= w0 - (ow * s[1] - p[1]) < k[1]:
                    expected[n, c, oh, ow] = True
    np.testing.assert_array_equal(np.isnan(y), expected)


# ------------------------------------------------------------------------------ backward


@pytest.mark.parametrize("dtype", [F32, F64])
def test_backward_accumulates_over_overlapping_windows(backend, rng, dtype):
    x = rng.uniform(-1, 0, (1, 2, 5, 5)).astype(dtype)
    x[0, 0, 2, 2] = 10.0  # the maximum of all nine 3x3 windows (stride 1, padding 1) around it
    y, idx = fc.max_pool2d(x, 3, stride=1, padding=1, backend=backend)
    dy = rng.uniform(0.5, 1.0, (1, 2, 5, 5)).astype(dtype)
    dx = to_host(fc.max_pool2d_backward(dy, idx, x.shape, backend=backend))
    assert dx.dtype == dtype
    np.testing.assert_allclose(dx[0, 0, 2, 2], dy[0, 0, 1:4, 1:4].astype(np.float64).sum(),
                               rtol=1e-6)
    # gradient is conserved: every dy element lands somewhere
    np.testing.assert_allclose(dx.astype(np.float64).sum(), dy.astype(np.float64).sum(),
                               rtol=1e-6)


def test_backward_from_given_indices(backend):
    """Scatter-add of hand-written indices (repeated ones accumulate) into the right planes."""
    dy = np.arange(1.0, 9.0).reshape(1, 2, 2, 2)
    idx = np.array([[[[0, 0], [5, 3]], [[8, 8], [8, 1]]]], np.int64)
    dx = to_host(fc.max_pool2d_backward(dy, idx, (1, 2, 3, 3), backend=backend))
    expected = np.zeros((1, 2, 9))
    expected[0, 0, [0, 5, 3]] = [1 + 2, 3, 4]
    expected[0, 1, [8, 1]] = [5 + 6 + 7, 8]
    np.testing.assert_array_equal(dx, expected.reshape(1, 2, 3, 3))
