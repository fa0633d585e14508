"""Float64 central finite differences for every backend's gradients, independent of PyTorch.

For a loss ``L = sum(forward(...) * G)`` with a fixed random ``G``, the analytic gradients are
the backward functions applied to ``G``; each element of x, w and b is nudged by ``±h`` and
``(L(+h) - L(-h)) / 2h`` must agree. Convolution is linear in each argument and max-pool is
piecewise linear, so the difference quotient is exact up to rounding (inputs to the pool are
spaced far apart relative to ``h``, so no nudge changes an argmax).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import to_host

import fastconv as fc

H = 1e-6
TOL = dict(rtol=1e-6, atol=1e-7)
# Backends whose every call is slow (the CUDA simulator) check a random sample of elements.
SAMPLED = {"cuda": 12}


def numeric_grad(loss, a, sample=None, rng=None):
    """Central differences of ``loss()`` with respect to the elements of ``a`` (nudged in place):
    all of them, or ``sample`` random ones (the others are left NaN)."""
    grad = np.zeros_like(a)
    positions = list(np.ndindex(a.shape))
    if sample is not None and sample < len(positions):
        grad[...] = np.nan
        positions = [positions[k] for k in rng.choice(len(positions), sample, replace=False)]
    for i in positions:
        old = a[i]
        a[i] = old + H
        plus = loss()
        a[i] = old - H
        minus = loss()
        a[i] = old
        grad[i] = (plus - minus) / (2 * H)
    return grad


@pytest.mark.parametrize("x_shape, w_shape, kw", [
    ((2, 2, 5, 4), (3, 2, 3, 2), dict(stride=2, padding=1)),
    ((1, 4, 5, 5), (2, 2, 2, 3), dict(padding="same", dilation=2, groups=2)),
    ((1, 3, 6, 5), (3, 1, 3, 3), dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2), groups=3)),
    ((1, 2, 7, 6), (2, 2, 3, 3), dict(stride=3, padding=2)),  # trailing rows no window reads
], ids=["stride2-pad1", "same-dil2-groups2", "depthwise-asym", "stride3-pad2"])
def test_conv_gradients_match_finite_differences(backend, rng, x_shape, w_shape, kw):
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal(w_shape)
    b = rng.standard_normal(w_shape[0])
    g = rng.standard_normal(to_host(fc.conv2d(x, w, b, backend=backend, **kw)).shape)

    def loss():
        return float((to_host(fc.conv2d(x, w, b, backend=backend, **kw)) * g).sum())

    dx, dw, db = map(to_host, fc.conv2d_backward(g, x, w, backend=backend, **kw))
    for name, analytic, a in (("dx", dx, x), ("dw", dw, w), ("db", db, b)):
        numeric = numeric_grad(loss, a, SAMPLED.get(backend), rng)
        checked = ~np.isnan(numeric)
        np.testing.assert_allclose(analytic[checked], numeric[checked], **TOL, err_msg=name)
    assert np.abs(dx).max() > 0.1 and np.abs(dw).max() > 0.1  # not trivially zero


@pytest.mark.parametrize("x_shape, kernel, kw", [
    ((1, 2, 6, 6), 2, {}),
    ((1, 2, 7, 6), 3, dict(stride=2, padding=1)),  # overlapping windows share elements
    ((1, 1, 7, 7), 3, dict(stride=1)),
    ((2, 1, 8, 7), (2, 3), dict(stride=(2, 1), dilation=(2, 1), padding=(1, 1),
                                ceil_mode=True)),
], ids=["k2", "k3-s2-p1", "k3-s1", "dilated-ceil"])
def test_pool_gradient_matches_finite_differences(backend, rng, x_shape, kernel, kw):
    size = int(np.prod(x_shape))
    # distinct values at least 0.1 apart: no near-ties, so no nudge of +-h changes an argmax
    x = (rng.permutation(size) * 0.1 + rng.uniform(0, 0.01, size)).reshape(x_shape)
    y, idx = map(to_host, fc.max_pool2d(x, kernel, backend=backend, **kw))
    g = rng.standard_normal(y.shape)

    def loss():
        return float((to_host(fc.max_pool2d(x, kernel, backend=backend, **kw)[0]) * g).sum())

    dx = to_host(fc.max_pool2d_backward(g, idx, x.shape, backend=backend))
    numeric = numeric_grad(loss, x, SAMPLED.get(backend), rng)
    checked = ~np.isnan(numeric)
    np.testing.assert_allclose(dx[checked], numeric[checked], **TOL)
    assert np.count_nonzero(dx) > 0
