"""Small work (issue 18): the per-call shortcuts give the same results and errors as the full
path. References are PyTorch (float64) or fastconv's NumPy backend, never the code under test."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import _validate, nn
from fastconv.backends import _plan

from helpers import assert_close as _assert_close

torch = pytest.importorskip("torch")
F = torch.nn.functional
numba = pytest.importorskip("numba")


def assert_close(actual, expected, _dtype, what):
    """fastconv's oracle tolerance for the dtype of ``actual`` (expected: float64, cast)."""
    _assert_close(actual, np.asarray(expected).astype(actual.dtype), what)


def _torch_conv(x, w, b=None, **geometry):
    out = F.conv2d(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64)),
                   None if b is None else torch.from_numpy(b.astype(np.float64)), **geometry)
    return out.numpy()


# ------------------------------------------------------------------ the inference weight cache


@pytest.mark.parametrize("c_in, c_out, hw, padding", [
    (32, 64, 12, 0),   # numba: winograd-f2x2 (transformed weight kept)
    (32, 40, 9, 1),    # winograd, odd output size
    (1, 8, 10, 1),     # plane (laid-out weight kept)
    (3, 5, 7, 0),      # plane, 5 output channels
    (8, 16, 6, 1),     # plane (c_out < 32)
])
def test_inference_sees_in_place_weight_edits(c_in, c_out, hw, padding):
    """Two inference forwards with the weight (and bias) edited in place in between: the second
    uses the new values, as PyTorch computes them."""
    rng = np.random.default_rng(c_in * 100 + c_out)
    layer = nn.Conv2D(c_in, c_out, 3, padding=padding, rng=rng, backend="numba")
    layer.params["bias"][:] = rng.standard_normal(c_out)
    x = rng.standard_normal((2, c_in, hw, hw)).astype(np.float32)
    geometry = dict(padding=padding)
    w, b = layer.params["weight"], layer.params["bias"]
    for step in range(4):
        y = layer.forward(x, training=False)
        assert_close(y, _torch_conv(x, w, b, **geometry), np.float32, f"step {step}")
        if step == 0:
            w *= -0.5  # in place, as an optimizer step does
        elif step == 1:
            w[c_out - 1, c_in - 1, 2, 2] += 3.0  # one element
        else:
            b += 1.0
    assert fc.last_algorithm().startswith("numba:")


def test_inference_after_optimizer_steps_matches_training_forward():
    """SGD updates the weights in place between predicts; predict stays equal to the training
    forward (which never uses the cache) and to PyTorch."""
    rng = np.random.default_rng(5)
    model = nn.Sequential(nn.Conv2D(1, 16, 3, rng=rng), nn.ReLU(),
                          nn.Conv2D(16, 32, 3, rng=rng), nn.ReLU(),
                          nn.Conv2D(32, 32, 3, rng=rng), nn.Flatten(),
                          nn.Dense(32 * 10 * 10, 10, rng=rng), backend="numba")
    x = rng.standard_normal((4, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 10, 4)
    opt = nn.SGD(0.5)
    model.predict(x)
    assert fc.last_algorithm() == "numba:winograd-f2x2"
    for _ in range(3):
        before = model.predict(x)
        model.train_batch(x, y, opt)
        after = model.predict(x)
        assert not np.allclose(before, after)
        assert_close(after, model.forward(x, training=True), np.float32, "predict")


def test_weight_replaced_by_another_array():
    rng = np.random.default_rng(2)
    layer = nn.Conv2D(16, 32, 3, rng=rng, backend="numba")
    x = rng.standard_normal((1, 16, 10, 10)).astype(np.float32)
    layer.forward(x, training=False)
    assert fc.last_algorithm() == "numba:winograd-f2x2"
    layer.params["weight"] = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    assert_close(layer.forward(x, training=False),
                 _torch_conv(x, layer.params["weight"], layer.params["bias"]), np.float32, "new w")


@pytest.mark.parametrize("backend", ["numpy", "cython"])
def test_inference_path_on_backends_without_a_weight_cache(backend):
    if backend not in fc.available_backends():  # as tests/test_cython_backend.py
        pytest.skip(f"{backend} backend unavailable here: {fc.backend_status()[backend]}")
    rng = np.random.default_rng(3)
    layer = nn.Conv2D(2, 4, 3, padding=1, rng=rng, backend=backend)
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    layer.forward(x, training=False)
    layer.params["weight"] += 1.0
    assert_close(layer.forward(x, training=False),
                 _torch_conv(x, layer.params["weight"], layer.params["bias"], padding=1),
                 np.float32, backend)


# ------------------------------------------------------------------ one-thread small work


@pytest.mark.parametrize("shape, w_shape, geometry", [
    ((1, 1, 8, 8), (4, 1, 3, 3), {}),
    ((1, 3, 9, 7), (6, 3, 3, 3), dict(padding=1)),
    ((2, 16, 6, 6), (32, 16, 3, 3), {}),               # winograd on one thread
    ((1, 8, 7, 7), (16, 8, 1, 1), {}),
    ((1, 4, 9, 9), (8, 4, 3, 3), dict(stride=2, padding=1)),
    ((1, 2, 10, 10), (4, 1, 3, 3), dict(groups=2, dilation=2)),
])
def test_small_conv_on_one_thread_matches_torch_and_keeps_thread_count(shape, w_shape, geometry):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    b = rng.standard_normal(w_shape[0]).astype(np.float32)
    p = _validate.conv2d_args(x, w, b, **{"stride": 1, "padding": 0, "dilation": 1,
                                          "groups": 1, **geometry})[3]
    assert p.macs(shape[0], shape[1], w_shape[0]) < _plan.SMALL_CONV_MACS
    threads = numba.get_num_threads()
    for _ in range(2):
        y = fc.conv2d(x, w, b, backend="numba", **geometry)
        assert_close(y, _torch_conv(x, w, b, **geometry), np.float32, str(geometry))
    assert numba.get_num_threads() == threads


def test_small_conv_with_a_nan_matches_torch():
    x = np.ones((1, 16, 6, 6), np.float32)
    x[0, 3, 2, 2] = np.nan
    w = np.full((32, 16, 3, 3), 0.1, np.float32)
    y = fc.conv2d(x, w, backend="numba")
    assert_close(y, _torch_conv(x, w), np.float32, "nan")


@pytest.fixture(params=[512, 256], ids=["avx512-blocks", "v256-blocks"])
def vectors(request, monkeypatch):
    """Both register-block families of the plane forward (each correct on any CPU)."""
    from fastconv.backends.numba import _simd

    monkeypatch.setattr(_simd, "WIDE_VECTORS", request.param == 512)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("c_out, padding", [(1, 1), (4, 0), (6, 2), (8, 1), (12, 0)])
def test_small_plane_forward_runs_serial_builds_equal_to_parallel(vectors, dtype, c_out,
                                                                   padding):
    """The serial builds (``_serial``) give the parallel kernels' results bit for bit, and
    PyTorch's within tolerance; the caller's numba thread count is left as it was."""
    from fastconv.backends.numba import _plane, _serial
    from fastconv.backends.numba import executor as ex

    rng = np.random.default_rng(c_out)
    x = rng.standard_normal((1, 2, 9, 8)).astype(dtype)
    w = rng.standard_normal((c_out, 2, 3, 3)).astype(dtype)
    b = rng.standard_normal(c_out).astype(dtype)
    p = _validate.conv2d_args(x, w, b, 1, padding, 1, 1)[3]
    threads = numba.get_num_threads()
    y = fc.conv2d(x, w, b, padding=padding, backend="numba")
    assert fc.last_algorithm() == "numba:plane"
    assert numba.get_num_threads() == threads
    kernel = ex._plane_kernel(_plane, np.dtype(dtype), c_out)[0]
    built = _serial._builds.get(kernel)
    assert built is not None and built.py_func.__qualname__.endswith("__serial")
    parallel = ex._forward_plane(ex._kernels(), x, w, b, p)  # the parallel builds
    np.testing.assert_array_equal(y, parallel)
    assert_close(y, _torch_conv(x, w, b, padding=padding), dtype, f"{vectors} {c_out}")


def test_tiny_conv_propagates_nan_like_torch():
    x = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8) / 64
    w = np.linspace(-1, 1, 36, dtype=np.float32).reshape(4, 1, 3, 3)
    x[0, 0, 3, 4] = np.nan
    w[2, 0, 1, 1] = np.nan
    for padding in (0, 1):
        y = fc.conv2d(x, w, padding=padding, backend="numba")
        t = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=padding).numpy()
        np.testing.assert_array_equal(np.isnan(y), np.isnan(t))
        np.testing.assert_allclose(y, t, rtol=1e-5, atol=1e-5)


def test_tiny_conv_sees_in_place_weight_and_bias_edits():
    """Small weights' plane layouts are kept keyed by their bytes: an edit is a new layout."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    for step in range(3):
        for bias in (None, b):
            y = fc.conv2d(x, w, bias, backend="numba")
            assert_close(y, _torch_conv(x, w, bias), np.float32, f"step {step}")
        w[step, 0, step, 1] += 1.0
        b[step] -= 2.0
    w2 = w.copy()
    w2[0] = -0.0 * w2[0]  # -0.0 and 0.0 are different bytes, the same values
    assert_close(fc.conv2d(x, w2, backend="numba"), _torch_conv(x, w2), np.float32, "-0.0")


def test_small_pool_on_one_thread_matches_torch():
    rng = np.random.default_rng(8)
    for shape, k, s, pad in [((1, 1, 8, 8), 2, 2, 0), ((1, 3, 9, 9), 3, 2, 1),
                             ((2, 4, 7, 5), 2, 1, 0)]:
        x = rng.standard_normal(shape).astype(np.float32)
        assert x.size < _plan.SMALL_POOL_ELEMENTS
        y, idx = fc.max_pool2d(x, k, s, pad, backend="numba")
        ty, tidx = F.max_pool2d(torch.from_numpy(x), k, s, pad, return_indices=True)
        np.testing.assert_array_equal(y, ty.numpy())
        np.testing.assert_array_equal(idx, tidx.numpy())


# ------------------------------------------------------------------ repeated geometries


X = np.zeros((2, 3, 8, 8), np.float32)
W = np.zeros((4, 3, 3, 3), np.float32)


def test_repeated_call_still_rejects_a_bool_where_an_int_was_cached():
    """True == 1 and hash(True) == hash(1): the cache must not let True through."""
    fc.conv2d(X, W, padding=1)
    fc.conv2d(X, W, stride=(1, 1))
    with pytest.raises(TypeError, match="padding must be an int, got True"):
        fc.conv2d(X, W, padding=True)
    with pytest.raises(TypeError, match="stride must be an int"):
        fc.conv2d(X, W, stride=(True, 1))
    fc.max_pool2d(X, 2, ceil_mode=True)
    with pytest.raises(TypeError, match="ceil_mode must be a bool, got 1"):
        fc.max_pool2d(X, 2, ceil_mode=1)
    with pytest.raises(TypeError, match="kernel_size must be an int, got True"):
        fc.max_pool2d(X, True)


def test_repeated_call_checks_dtypes_kinds_and_layout():
    fc.conv2d(X, W)
    with pytest.raises(TypeError, match="mixed dtypes"):
        fc.conv2d(X, W.astype(np.float64))
    with pytest.raises(TypeError, match="b must be a numpy.ndarray"):
        fc.conv2d(X, W, [0.0] * 4)
    with pytest.raises(ValueError, match="b has length 3"):
        fc.conv2d(X, W, np.zeros(3, np.float32))
    # a non-contiguous x of a cached shape is still made contiguous
    rng = np.random.default_rng(1)
    xt = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    fc.conv2d(np.ascontiguousarray(xt), w)
    xf = np.asfortranarray(xt)
    assert_close(fc.conv2d(xf, w), _torch_conv(xt, w), np.float32, "fortran x")
    assert_close(fc.conv2d(xt, w, stride=[1, 1]), _torch_conv(xt, w), np.float32, "list stride")


def test_repeated_backward_checks_needs_and_shapes():
    dy = np.ones((2, 4, 6, 6), np.float32)
    for _ in range(2):
        dx, dw, db = fc.conv2d_backward(dy, X, W, needs=("input", "bias"))
        assert dw is None and dx.shape == X.shape and db.shape == (4,)
    with pytest.raises(ValueError, match="needs has unknown entries"):
        fc.conv2d_backward(dy, X, W, needs=("input", "bogus"))
    with pytest.raises(ValueError, match="dy has shape"):
        fc.conv2d_backward(dy[:, :, :5], X, W, needs=("input", "bias"))


def test_geometry_cache_is_bounded():
    for h in range(8, 8 + 2 * _validate._GEOMETRY_CACHE_MAX):
        _validate.conv2d_args(np.zeros((1, 1, h, 4), np.float32), W[:, :1], None, 1, 0, 1, 1)
    assert len(_validate._conv_cache) <= _validate._GEOMETRY_CACHE_MAX
