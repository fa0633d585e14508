"""Every bad input is a ValueError / TypeError naming the argument and the value, raised by the
validation layer before any backend kernel runs (hence the parametrisation over backends).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastconv as fc

X = np.zeros((2, 3, 8, 8), np.float32)
W = np.zeros((4, 3, 3, 3), np.float32)
B = np.zeros(4, np.float32)
DY = np.zeros((2, 4, 6, 6), np.float32)
PY = np.zeros((2, 3, 4, 4), np.float32)  # max_pool2d(X, 2) output
IDX = np.zeros((2, 3, 4, 4), np.int64)


def conv(x=X, w=W, b=B, **kw):
    return lambda backend: fc.conv2d(x, w, b, backend=backend, **kw)


def conv_bwd(dy=DY, x=X, w=W, **kw):
    return lambda backend: fc.conv2d_backward(dy, x, w, backend=backend, **kw)


def pool(x=X, kernel_size=2, **kw):
    return lambda backend: fc.max_pool2d(x, kernel_size, backend=backend, **kw)


def pool_bwd(dy=PY, idx=IDX, input_shape=X.shape):
    return lambda backend: fc.max_pool2d_backward(dy, idx, input_shape, backend=backend)


V, T = ValueError, TypeError

BAD_CALLS = [
    # wrong ndim
    ("x-3d", conv(x=X[0]), V, "x must be 4-D, got 3-D array of shape (3, 8, 8)"),
    ("w-5d", conv(w=W[None]), V, "w must be 4-D, got 5-D"),
    ("b-2d", conv(b=B[None]), V, "b must be 1-D, got 2-D array of shape (1, 4)"),
    ("dy-3d", conv_bwd(dy=DY[0]), V, "dy must be 4-D, got 3-D"),
    ("pool-x-2d", pool(x=X[0, 0]), V, "x must be 4-D, got 2-D"),
    ("pool-dy-5d", pool_bwd(dy=PY[None]), V, "dy must be 4-D, got 5-D"),
    # channels, groups, bias
    ("channels", conv(w=np.zeros((4, 4, 3, 3), np.float32)), V,
     "x has 3 channels but w expects 4"),
    ("groups-x", conv(groups=2, w=np.zeros((4, 1, 3, 3), np.float32)), V,
     "x has 3 channels, which groups=2 does not divide"),
    ("groups-w", conv(x=np.zeros((1, 4, 5, 5), np.float32), w=np.zeros((3, 2, 3, 3),
                                                                        np.float32),
                      b=None, groups=2), V, "w has 3 output channels, which groups=2"),
    ("groups-0", conv(groups=0), V, "groups must be >= 1, got 0"),
    ("groups-float", conv(groups=1.0), T, "groups must be an int, got 1.0"),
    ("bias-length", conv(b=np.zeros(5, np.float32)), V,
     "b has length 5 but w has 4 output channels"),
    # kernel larger than the padded input
    ("conv-kernel-too-large", conv(x=np.zeros((1, 3, 2, 8), np.float32), b=None), V,
     "kernel of effective size (3, 3)"),
    ("conv-dilated-too-large", conv(dilation=4, b=None), V,
     "kernel of effective size (9, 9) (kernel (3, 3), dilation (4, 4)) is larger than the "
     "padded input (8, 8)"),
    ("pool-kernel-too-large", pool(kernel_size=9), V, "kernel of effective size (9, 9)"),
    ("pool-dilated-too-large", pool(kernel_size=3, dilation=(4, 1)), V,
     "kernel of effective size (9, 3)"),
    # stride, dilation, padding values
    ("stride-0", conv(stride=0), V, "stride must be >= 1, got 0"),
    ("stride-neg", conv(stride=(1, -2)), V, "stride must be >= 1, got -2"),
    ("stride-float", conv(stride=1.5), T, "stride must be an int, got 1.5"),
    ("stride-triple", conv(stride=(1, 1, 1)), V,
     "stride must be an int or an (h, w) pair, got (1, 1, 1)"),
    ("dilation-0", conv(dilation=0), V, "dilation must be >= 1, got 0"),
    ("dilation-neg", conv(dilation=(-1, 1)), V, "dilation must be >= 1, got -1"),
    ("padding-neg", conv(padding=-1), V, "padding must be >= 0, got -1"),
    ("padding-neg-pair", conv(padding=(0, -2)), V, "padding must be >= 0, got -2"),
    ("padding-string", conv(padding="full"), V,
     "padding must be an int, an (h, w) pair, 'same' or 'valid', got 'full'"),
    ("padding-bool", conv(padding=True), T, "padding must be an int, got True"),
    ("same-stride-2", conv(padding="same", stride=2), V,
     "padding='same' needs stride 1, got stride=(2, 2)"),
    ("pool-stride-0", pool(stride=0), V, "stride must be >= 1, got 0"),
    ("pool-dilation-0", pool(dilation=0), V, "dilation must be >= 1, got 0"),
    ("pool-kernel-0", pool(kernel_size=0), V, "kernel_size must be >= 1, got 0"),
    ("pool-padding-neg", pool(padding=-1), V, "padding must be >= 0, got -1"),
    ("pool-padding-over-half", pool(kernel_size=3, padding=2), V,
     "padding=(2, 2) must be at most half of kernel_size=(3, 3)"),
    ("pool-padding-over-half-w", pool(kernel_size=(4, 2), padding=(2, 2)), V,
     "must be at most half of kernel_size=(4, 2)"),
    ("pool-ceil-mode-int", pool(ceil_mode=1), T, "ceil_mode must be a bool, got 1"),
    # dtypes
    ("x-int", conv(x=X.astype(np.int64)), T, "x has dtype int64, expected float32 or float64"),
    ("x-bool", conv(x=X.astype(bool)), T, "x has dtype bool, expected float32 or float64"),
    ("w-complex", conv(w=W.astype(np.complex64)), T, "w has dtype complex64, expected"),
    ("x-float16", conv(x=X.astype(np.float16)), T, "x has dtype float16, expected"),
    ("b-int", conv(b=B.astype(np.int32)), T, "b has dtype int32"),
    ("mixed-w", conv(w=W.astype(np.float64)), T, "mixed dtypes: x is float32, w is float64"),
    ("mixed-b", conv(b=B.astype(np.float64)), T, "b is float64"),
    ("mixed-dy", conv_bwd(dy=DY.astype(np.float64)), T, "mixed dtypes: dy is float64"),
    ("pool-x-int", pool(x=X.astype(np.int32)), T, "x has dtype int32"),
    ("pool-x-complex", pool(x=X.astype(np.complex128)), T, "x has dtype complex128"),
    ("pool-dy-int", pool_bwd(dy=PY.astype(np.int64)), T, "dy has dtype int64"),
    # non-arrays
    ("x-list", conv(x=X.tolist()), T, "x must be a numpy.ndarray or a CUDA device array, "
                                      "got list"),
    ("x-none", conv(x=None), T, "x must be a numpy.ndarray or a CUDA device array, got NoneType"),
    ("w-scalar", conv(w=1.0), T, "w must be a numpy.ndarray or a CUDA device array, got float"),
    ("b-list", conv(b=[0.0] * 4), T, "b must be a numpy.ndarray"),
    ("x-0d", conv(x=np.array(1.0, np.float32)), V, "x must be 4-D, got 0-D"),
    ("dy-none", conv_bwd(dy=None), T, "dy must be a numpy.ndarray"),
    ("pool-x-list", pool(x=X.tolist()), T, "x must be a numpy.ndarray"),
    ("pool-dy-tuple", pool_bwd(dy=(1.0,)), T, "dy must be a numpy.ndarray"),
    ("pool-idx-list", pool_bwd(idx=IDX.tolist()), T, "idx must be an array of int64 indices, "
                                                     "got list"),
    # conv dy shape, needs
    ("dy-shape", conv_bwd(dy=np.zeros((2, 4, 6, 5), np.float32)), V,
     "dy has shape (2, 4, 6, 5), expected (2, 4, 6, 6) (the output shape)"),
    ("dy-batch", conv_bwd(dy=np.zeros((1, 4, 6, 6), np.float32)), V,
     "dy has shape (1, 4, 6, 6), expected (2, 4, 6, 6)"),
    ("needs-unknown", conv_bwd(needs=("input", "bogus")), V,
     "needs has unknown entries ['bogus']"),
    ("needs-typo-string", conv_bwd(needs="inputs"), V, "needs has unknown entries ['inputs']"),
    ("needs-none", conv_bwd(needs=None), T, "needs must be a collection of"),
    ("needs-mixed-types", conv_bwd(needs=("input", 1, "bogus")), V, "needs has unknown entries"),
    # pool indices and input_shape
    ("idx-shape", pool_bwd(idx=IDX[:, :, :3]), V,
     "idx has shape (2, 3, 3, 4) but dy has shape (2, 3, 4, 4)"),
    ("idx-float", pool_bwd(idx=IDX.astype(np.float64)), T, "idx has dtype float64, expected int64"),
    ("idx-bool", pool_bwd(idx=IDX.astype(bool)), T, "idx has dtype bool, expected int64"),
    ("idx-out-of-range", pool_bwd(idx=np.full((2, 3, 4, 4), 64, np.int64)), V,
     "idx has values in [64, 64], expected [0, 64) for input planes of 8x8"),
    ("idx-negative", pool_bwd(idx=np.full((2, 3, 4, 4), -1, np.int64)), V,
     "idx has values in [-1, -1], expected [0, 64)"),
    ("input-shape-3", pool_bwd(input_shape=(2, 3, 8)), V,
     "input_shape must have 4 entries (N, C, H, W), got (2, 3, 8)"),
    ("input-shape-int", pool_bwd(input_shape=8), T, "input_shape must be a tuple of 4 ints, got 8"),
    ("input-shape-float", pool_bwd(input_shape=(2, 3, 8.0, 8)), T,
     "input_shape must be a tuple of 4 ints, got (2, 3, 8.0, 8)"),
    ("input-shape-negative", pool_bwd(input_shape=(2, 3, -8, 8)), V,
     "input_shape must be >= 0, got -8"),
    ("input-shape-nc", pool_bwd(input_shape=(2, 4, 8, 8)), V,
     "input_shape (2, 4, 8, 8) has (N, C) = (2, 4)"),
]


@pytest.mark.parametrize("call, exc, message", [c[1:] for c in BAD_CALLS],
                         ids=[c[0] for c in BAD_CALLS])
def test_bad_input_is_a_clear_error(backend, call, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        call(backend)


def test_bad_calls_are_good_after_the_fix(backend):
    """The unmodified base arguments are valid: each error above comes from its one change."""
    assert fc.conv2d(X, W, B, backend=backend).shape == DY.shape
    assert all(g is not None for g in fc.conv2d_backward(DY, X, W, backend=backend))
    assert fc.max_pool2d(X, 2, backend=backend)[0].shape == PY.shape
    assert fc.max_pool2d_backward(PY, IDX, X.shape, backend=backend).shape == X.shape


def test_int32_indices_are_accepted(backend):
    dx = fc.max_pool2d_backward(PY + 1, IDX.astype(np.int32), X.shape, backend=backend)
    assert dx.shape == X.shape and dx[:, :, 0, 0].sum() == 2 * 3 * 16


@pytest.mark.parametrize("name, hint", [("numbaa", "numba"), ("cyton", "cython"),
                                        ("Numpy", "numpy"), ("nave", "naive")])
def test_unknown_backend_suggests_a_name(name, hint):
    with pytest.raises(ValueError, match=re.escape(f"did you mean {hint!r}")) as err:
        fc.conv2d(X, W, backend=name)
    assert repr(name) in str(err.value)


def test_unknown_backend_error_lists_the_available_ones():
    with pytest.raises(ValueError) as err:
        fc.max_pool2d(X, 2, backend="tpu")
    for name in fc.available_backends():
        assert name in str(err.value)


@pytest.mark.parametrize("name", [5, "", "numba ", ("numpy",)])
def test_backend_name_of_the_wrong_kind(name):
    with pytest.raises(ValueError, match="unknown backend"):
        fc.conv2d(X, W, backend=name)
