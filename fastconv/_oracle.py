"""The one check of a result against an independent reference, shared by the tests
(``tests/helpers.py``) and the benchmarks (``fastconv._cli.bench``).

Tolerance, per dtype of the expected array: ``|actual - expected| <= atol * max(1,
max|expected|) + rtol * |expected|``; integer arrays (max-pool indices) must match exactly.
"""

from __future__ import annotations

import numpy as np

#: Per-dtype tolerance of the tests (their shapes reduce over at most a few hundred products).
TOLERANCE = {
    np.dtype(np.float32): dict(rtol=2e-4, atol=2e-5),
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12),
}
#: The benchmarks' float32 tolerance: their shapes reduce over up to 2,304 products per output
#: (C_in 256 x 3 x 3), by Winograd transforms among others, against PyTorch's float32.
BENCH_TOLERANCE = {
    np.dtype(np.float32): dict(rtol=1e-3, atol=1e-3),
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-12),
}


def to_host(a):
    """A NumPy array from a host or CUDA device array."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    return np.asarray(a)


def assert_close(actual, expected, what: str, tolerance=None):
    """Raise ``AssertionError`` naming ``what`` unless ``actual`` (host or device) has
    ``expected``'s shape and dtype and its values within the tolerance of that dtype
    (``tolerance``: a table like :data:`TOLERANCE`, the default)."""
    actual, expected = to_host(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if not np.issubdtype(expected.dtype, np.floating):
        np.testing.assert_array_equal(actual, expected, err_msg=what)
        return
    tol = (tolerance or TOLERANCE)[np.dtype(expected.dtype)]
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale,
                               err_msg=what)
