"""conv2d forward and backward, every backend, against PyTorch (float64) through check_conv.

The full grid runs for the fast backends; the slow ones (Python loops, simulated GPU) run a
reduced grid of tiny shapes. Plus hypothesis-generated configurations, non-contiguous inputs,
dtype preservation, exact NaN propagation, empty batches and ``padding='same'``.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import SLOW_BACKENDS, assert_close, check_conv, reference_conv, to_host
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastconv as fc

F32, F64 = np.float32, np.float64
# torch warns that it copies the input for even-kernel 'same' padding: not our concern here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def case(x_shape, w_shape, dtype=F32, **kw):
    kw.setdefault("bias", True)
    label = "x{}-w{}-{}".format(
        "x".join(map(str, x_shape)), "x".join(map(str, w_shape)), np.dtype(dtype).name
    ) + "".join(f"-{k}={v}" for k, v in kw.items() if k != "bias" or not v)
    return pytest.param(x_shape, w_shape, dtype, kw, id=label.replace(" ", ""))


# Full grid: ~44 configurations. Small spatial sizes keep the reference and the JIT cheap; the
# "wide" cases (>= 32 channels) reach the register-blocked and grad-input-as-forward paths of
# the compiled backends, the C_in = 1 cases their first-layer path.
FULL_GRID = [
    # stride x padding
    *(case((2, 3, 9, 8), (4, 3, 3, 3), stride=s, padding=p) for s in (1, 2, 3) for p in (0, 1, 2)),
    case((2, 3, 9, 8), (4, 3, 3, 3), F64, stride=2, padding=1),
    case((1, 2, 8, 11), (3, 2, 2, 4), stride=(1, 2), padding=(2, 1)),
    case((2, 2, 10, 7), (3, 2, 4, 3), stride=(3, 2), padding=(0, 1), bias=False),
    # 'same' (odd and even kernels, dilation) and 'valid'
    case((2, 3, 7, 9), (4, 3, 3, 3), padding="same"),
    case((2, 3, 7, 9), (4, 3, 2, 2), padding="same"),
    case((1, 3, 7, 6), (2, 3, 4, 3), padding="same", dilation=(1, 2)),
    case((1, 2, 8, 8), (3, 2, 3, 2), F64, padding="same", dilation=2),
    case((2, 3, 6, 7), (2, 3, 3, 3), padding="valid"),
    # dilation
    case((2, 3, 9, 10), (4, 3, 3, 3), dilation=2),
    case((2, 3, 9, 10), (4, 3, 3, 2), dilation=(2, 1), padding=2),
    case((1, 2, 11, 9), (2, 2, 3, 3), dilation=(1, 3), stride=2, padding=1),
    case((1, 2, 9, 9), (2, 2, 2, 3), F64, dilation=2, stride=(2, 3), padding=(1, 2)),
    # groups and depthwise
    case((2, 4, 8, 7), (6, 2, 3, 3), groups=2, padding=1),
    case((2, 4, 8, 7), (6, 2, 3, 3), F64, groups=2, stride=2),
    case((2, 6, 7, 7), (6, 2, 3, 2), groups=3, dilation=(1, 2), bias=False),
    case((2, 4, 8, 8), (4, 1, 3, 3), groups=4, padding=1),  # depthwise
    case((1, 3, 9, 8), (6, 1, 3, 3), groups=3, stride=2, padding=1),  # depthwise, multiplier 2
    case((2, 4, 7, 9), (4, 1, 5, 3), F64, groups=4, padding="same"),
    # batch 1, 1x1 kernels, kernel as large as the (padded) input, trailing rows no window reads
    case((1, 5, 6, 6), (3, 5, 1, 1)),
    case((1, 5, 6, 6), (3, 5, 1, 1), stride=2, bias=False),
    case((2, 2, 5, 4), (3, 2, 5, 4)),
    case((1, 2, 3, 3), (2, 2, 5, 5), padding=1),
    case((2, 2, 8, 8), (3, 2, 2, 2), stride=3, padding=1),
    case((2, 2, 9, 7), (3, 2, 3, 3), stride=(4, 3)),
    case((1, 1, 1, 1), (1, 1, 1, 1)),
    # wide channels: register-blocked / NHWC paths of the compiled backends
    case((1, 1, 9, 9), (32, 1, 3, 3)),
    case((1, 1, 10, 10), (6, 1, 5, 5), padding=2),
    case((2, 1, 8, 9), (40, 1, 5, 5), F64, padding=2),
    case((2, 32, 7, 6), (32, 32, 3, 3), padding=1),
    case((2, 32, 7, 6), (64, 32, 3, 3), F64),
    case((1, 40, 6, 7), (48, 40, 3, 2), stride=2, padding=(1, 0)),
    case((1, 32, 8, 8), (33, 32, 3, 3), padding="same", dilation=(2, 1)),
    case((1, 32, 7, 7), (70, 32, 1, 1), bias=False),
    case((1, 64, 6, 6), (64, 32, 3, 3), groups=2, padding=1),
    case((2, 48, 6, 5), (32, 48, 3, 3), stride=1, padding=(0, 2)),
    case((1, 36, 6, 6), (36, 1, 3, 3), groups=36, padding=1),  # depthwise, many channels
    case((1, 16, 7, 7), (64, 16, 3, 3), F64, dilation=2, padding=2),
]

# Reduced grid for the slow backends: H, W <= 8, channels <= 4.
SLOW_GRID = [
    case((2, 3, 6, 5), (4, 3, 3, 3)),
    case((1, 2, 7, 6), (3, 2, 3, 2), F64, stride=2, padding=1),
    case((1, 2, 8, 7), (2, 2, 3, 3), stride=3, padding=2),
    case((1, 2, 6, 6), (2, 2, 3, 3), stride=(1, 2), padding=(2, 1), bias=False),
    case((1, 2, 5, 6), (3, 2, 3, 3), padding="same"),
    case((1, 2, 6, 5), (2, 2, 2, 2), F64, padding="same"),
    case((1, 2, 6, 6), (2, 2, 2, 3), padding="same", dilation=2),
    case((1, 2, 5, 5), (2, 2, 3, 3), padding="valid"),
    case((1, 2, 8, 7), (2, 2, 3, 2), dilation=(2, 1), padding=1),
    case((1, 4, 6, 5), (4, 2, 3, 3), groups=2, padding=1),
    case((1, 4, 5, 6), (4, 1, 3, 3), F64, groups=4, stride=2, padding=1),
    case((1, 2, 5, 5), (4, 1, 2, 3), groups=2, bias=False),
    case((1, 3, 4, 4), (2, 3, 1, 1)),
    case((1, 1, 3, 3), (2, 1, 5, 5), padding=1),
    case((1, 2, 8, 8), (2, 2, 2, 2), stride=3, padding=1),
]


@pytest.mark.parametrize("x_shape, w_shape, dtype, kw", FULL_GRID)
def test_conv_grid(fast_backend, rng, x_shape, w_shape, dtype, kw):
    check_conv(fast_backend, rng, x_shape, w_shape, dtype=dtype, **kw)


@pytest.mark.parametrize("x_shape, w_shape, dtype, kw", SLOW_GRID)
def test_conv_small_grid(backend, rng, x_shape, w_shape, dtype, kw):
    """Every backend, the slow ones included, on tiny shapes."""
    check_conv(backend, rng, x_shape, w_shape, dtype=dtype, **kw)


@st.composite
def conv_configs(draw):
    """A valid conv2d configuration: shapes, stride, padding, dilation, groups, bias, dtype."""
    groups = draw(st.integers(1, 3))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kind = draw(st.sampled_from(["int", "pair", "same", "valid"]))
    eff = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    if kind == "same":  # stride 1 only; the output is the input's size, any size fits
        padding, stride, min_hw = "same", (1, 1), (1, 1)
    elif kind == "valid":
        padding, min_hw = "valid", eff
    else:
        ph = draw(st.integers(0, 2))
        padding = ph if kind == "int" else (ph, draw(st.integers(0, 2)))
        pads = padding if kind == "pair" else (ph, ph)
        min_hw = (max(1, eff[0] - 2 * pads[0]), max(1, eff[1] - 2 * pads[1]))
    h = draw(st.integers(min_hw[0], min_hw[0] + 6))
    w = draw(st.integers(min_hw[1], min_hw[1] + 6))
    return dict(
        x_shape=(draw(st.integers(1, 2)), c_in, h, w),
        w_shape=(c_out, c_in // groups, kh, kw),
        stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=draw(st.booleans()), dtype=draw(st.sampled_from([F32, F64])),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=conv_configs())
def test_conv_hypothesis(fast_backend, cfg):
    cfg = dict(cfg)
    rng = np.random.default_rng(cfg.pop("seed"))
    check_conv(fast_backend, rng, cfg.pop("x_shape"), cfg.pop("w_shape"), **cfg)


def test_non_contiguous_inputs(backend, rng):
    """Strided and transposed views give the same results as their contiguous copies would,
    checked against the reference on the copies."""
    base = rng.standard_normal((2, 3, 12, 10))
    x = base[:, :, ::2, 1::2]  # (2, 3, 6, 5), strided
    w = rng.standard_normal((3, 4, 3, 3)).transpose(1, 0, 2, 3)  # (4, 3, 3, 3), transposed
    b = rng.standard_normal(8)[::2]
    dy = rng.standard_normal((2, 6, 5, 3)).transpose(0, 2, 1, 3)[:, :4, :, :]  # (2, 4, 6, 3)
    assert not (x.flags.c_contiguous or w.flags.c_contiguous or dy.flags.c_contiguous)
    kw = dict(stride=1, padding=(1, 0), dilation=1, groups=1)
    ry, rdx, rdw, rdb = reference_conv(*map(np.ascontiguousarray, (x, w, b, dy)),
                                       backend_under_test=backend, **kw)
    assert_close(fc.conv2d(x, w, b, backend=backend, **kw), ry, "forward")
    dx, dw, db = fc.conv2d_backward(dy, x, w, backend=backend, **kw)
    assert_close(dx, rdx, "grad input")
    assert_close(dw, rdw, "grad weight")
    assert_close(db, rdb, "grad bias")


@pytest.mark.parametrize("dtype", [F32, F64])
def test_dtype_preserved(backend, rng, dtype):
    x = rng.standard_normal((1, 2, 5, 5)).astype(dtype)
    w = rng.standard_normal((3, 2, 3, 3)).astype(dtype)
    b = rng.standard_normal(3).astype(dtype)
    y = to_host(fc.conv2d(x, w, b, backend=backend, padding=1))
    assert y.dtype == dtype
    grads = fc.conv2d_backward(y, x, w, padding=1, backend=backend)
    assert [to_host(g).dtype for g in grads] == [np.dtype(dtype)] * 3
    # only the requested gradients are computed
    dx, dw, db = fc.conv2d_backward(y, x, w, padding=1, needs=("weight",), backend=backend)
    assert dx is None and db is None and to_host(dw).dtype == dtype


def _touched(x_shape, w_shape, nan_at, stride, pad, dilation, groups, out_hw):
    """Boolean mask of the outputs whose receptive field contains input element ``nan_at``."""
    n0, c0, h0, w0 = nan_at
    c_out, c_group, kh, kw = w_shape
    mask = np.zeros((x_shape[0], c_out, *out_hw), bool)
    group = c0 // c_group
    per_group = c_out // groups
    for oh in range(out_hw[0]):
        for ow in range(out_hw[1]):
            rows = {oh * stride[0] - pad[0] + i * dilation[0] for i in range(kh)}
            cols = {ow * stride[1] - pad[1] + j * dilation[1] for j in range(kw)}
            if h0 in rows and w0 in cols:
                mask[n0, group * per_group:(group + 1) * per_group, oh, ow] = True
    return mask


@pytest.mark.parametrize("stride, padding, dilation, groups, nan_at", [
    ((1, 1), (1, 1), (1, 1), 1, (1, 2, 3, 4)),
    ((2, 1), (2, 0), (1, 2), 2, (0, 3, 0, 6)),
    ((1, 2), (0, 1), (2, 1), 4, (1, 1, 7, 0)),
    ((3, 3), (1, 1), (1, 1), 1, (0, 0, 8, 7)),  # possibly in trailing rows no window reads
])
def test_nan_propagates_to_exactly_the_touched_outputs(backend, rng, stride, padding,
                                                       dilation, groups, nan_at):
    x = rng.standard_normal((2, 4, 9, 8))
    w = rng.uniform(0.5, 1.5, (4, 4 // groups, 3, 3))  # no zero weight: every product is NaN
    x[nan_at] = np.nan
    y = to_host(fc.conv2d(x, w, stride=stride, padding=padding, dilation=dilation,
                          groups=groups, backend=backend))
    expected = _touched(x.shape, w.shape, nan_at, stride, padding, dilation, groups,
                        y.shape[2:])
    np.testing.assert_array_equal(np.isnan(y), expected)
    assert np.isfinite(y[~expected]).all()


@pytest.mark.parametrize("x_shape, w_shape, padding, bad_at", [
    # few channels (plane / flat kernels): an edge column, read by one tap column only
    ((2, 6, 14, 14), (16, 6, 5, 5), 0, (0, 0, 3, 13)),
    ((2, 1, 12, 12), (8, 1, 3, 3), 0, (1, 0, 5, 0)),
    ((2, 1, 12, 12), (8, 1, 5, 5), 2, (1, 0, 11, 10)),
    # many channels (register-blocked NHWC kernels)
    ((2, 32, 9, 9), (64, 32, 3, 3), 0, (1, 31, 4, 8)),
    ((1, 3, 8, 11), (4, 3, 3, 3), 1, (0, 2, 0, 10)),  # few channels, padded
])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf_in_x_reach_exactly_the_gradients_pytorch_gives(backend, rng, x_shape,
                                                                      w_shape, padding, bad_at,
                                                                      bad):
    """A NaN or inf in x makes NaN/inf exactly the dw entries PyTorch's does (no kernel may
    multiply it by a zero from a padded or dropped position), and never touches dx."""
    if backend in SLOW_BACKENDS:  # Python loops / the simulator: the same case on 4 channels
        x_shape, w_shape = (*x_shape[:1], min(x_shape[1], 4), *x_shape[2:]), \
            (min(w_shape[0], 4), min(w_shape[1], 4), *w_shape[2:])
        bad_at = (bad_at[0], min(bad_at[1], 3), *bad_at[2:])
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    x[bad_at] = bad
    y_shape = to_host(fc.conv2d(x, w, padding=padding, backend="numpy")).shape
    dy = rng.uniform(0.5, 1.5, y_shape).astype(np.float32)  # no zero: every product is bad
    _, rdx, rdw, rdb = reference_conv(x, w, None, dy, 1, padding, 1, 1, backend)
    dx, dw, db = (to_host(a) for a in fc.conv2d_backward(dy, x, w, padding=padding,
                                                          backend=backend))
    np.testing.assert_array_equal(np.isfinite(dw), np.isfinite(rdw))
    np.testing.assert_array_equal(np.isnan(dw), np.isnan(rdw))
    assert not np.isfinite(rdw).all()  # the case does reach dw
    assert np.isfinite(dx).all() and np.isfinite(db).all()


def test_empty_batch_every_function(backend, rng):
    x = np.zeros((0, 3, 7, 6), np.float32)
    w = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
    y = fc.conv2d(x, w, stride=2, padding=1, backend=backend)
    assert to_host(y).shape == (0, 4, 4, 4) and to_host(y).dtype == np.float32
    dx, dw, db = fc.conv2d_backward(np.zeros((0, 4, 4, 4), np.float32), x, w, stride=2,
                                    padding=1, backend=backend)
    assert to_host(dx).shape == x.shape
    np.testing.assert_array_equal(to_host(dw), np.zeros(w.shape, np.float32))
    np.testing.assert_array_equal(to_host(db), np.zeros(4, np.float32))
    py, idx = fc.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True, backend=backend)
    assert to_host(py).shape == (0, 3, 4, 4) and to_host(idx).dtype == np.int64
    dx = fc.max_pool2d_backward(np.zeros((0, 3, 4, 4)), np.zeros((0, 3, 4, 4), np.int64),
                                (0, 3, 7, 6), backend=backend)
    assert to_host(dx).shape == (0, 3, 7, 6) and to_host(dx).dtype == np.float64


@pytest.mark.parametrize("kernel, dilation", [
    ((1, 1), 1), ((3, 3), 1), ((2, 2), 1), ((4, 5), 1), ((3, 2), 2), ((2, 3), (3, 1)),
])
def test_same_padding_keeps_the_input_shape(backend, rng, kernel, dilation):
    x = rng.standard_normal((1, 2, 7, 6))
    w = rng.standard_normal((3, 2, *kernel))
    y = to_host(fc.conv2d(x, w, padding="same", dilation=dilation, backend=backend))
    assert y.shape == (1, 3, 7, 6)
