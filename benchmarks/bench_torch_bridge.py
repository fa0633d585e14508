"""The fastconv.torch bridge's per-call cost on a tiny shape: the raw NumPy call, the bridge on
tensors (no gradient recorded, and recording one) and torch.nn.functional, one pytest-benchmark
group per op. The full comparison (training steps, coexistence) is benchmarks/torch_bridge.py."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastconv as fc  # noqa: E402
import fastconv.torch as ft  # noqa: E402

F = torch.nn.functional
WHO = ["fastconv raw", "fastconv.torch no_grad", "fastconv.torch grad", "torch"]


def _tiny():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((1, 2, 6, 6)).astype(np.float32),
            rng.standard_normal((3, 2, 3, 3)).astype(np.float32))


def _call(who, raw, bridge, stock, x, w):
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    if who == "fastconv raw":
        return lambda: raw(x, w)
    if who == "fastconv.torch grad":
        twg = tw.clone().requires_grad_(True)
        return lambda: bridge(tx, twg)

    def no_grad():
        with torch.no_grad():
            return (bridge if who == "fastconv.torch no_grad" else stock)(tx, tw)
    return no_grad


@pytest.mark.benchmark(group="torch bridge: conv2d (1,2,6,6) x (3,2,3,3)")
@pytest.mark.parametrize("who", WHO)
def test_bridge_conv2d(benchmark, who):
    x, w = _tiny()
    fn = _call(who, lambda x, w: fc.conv2d(x, w), ft.conv2d, F.conv2d, x, w)
    fn()
    out = benchmark(fn)
    out = out.detach().numpy() if isinstance(out, torch.Tensor) else out
    expected = F.conv2d(torch.from_numpy(x), torch.from_numpy(w)).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.benchmark(group="torch bridge: max_pool2d (1,2,6,6) k2")
@pytest.mark.parametrize("who", WHO)
def test_bridge_max_pool2d(benchmark, who):
    x, _ = _tiny()
    fn = _call(who, lambda x, w: fc.max_pool2d(x, 2)[0], lambda t, w: ft.max_pool2d(t, 2),
               lambda t, w: F.max_pool2d(t, 2), x, x)
    fn()
    out = benchmark(fn)
    out = out.detach().numpy() if isinstance(out, torch.Tensor) else out
    np.testing.assert_array_equal(out, F.max_pool2d(torch.from_numpy(x), 2).numpy())
