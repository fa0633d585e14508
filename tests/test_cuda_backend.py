"""The ``cuda`` backend's own concerns: device arrays in and out, many blocks, fallbacks, errors.

Shared correctness (every option, both dtypes) comes from tests/test_conv.py, test_pool.py and
test_gradcheck.py, which tests/test_cuda_simulator.py runs for ``cuda`` under the simulator
together with this file. References are PyTorch / the NumPy reference via tests/helpers.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastconv as fc

if fc.backend_status().get("cuda") is not None:
    pytest.skip("cuda backend unavailable (run via tests/test_cuda_simulator.py)",
                allow_module_level=True)

from helpers import (  # noqa: E402
    assert_close,
    check_conv,
    check_pool,
    reference_conv,
    reference_pool,
    to_host,
)

from fastconv.backends.cuda import executor as numba_cuda  # noqa: E402

F32, F64 = np.float32, np.float64


def is_device(a) -> bool:
    return hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray)


class Foreign:
    """A stranger's device array: only ``__cuda_array_interface__`` (like CuPy or torch)."""

    def __init__(self, device_array):
        self._keep = device_array
        self.__cuda_array_interface__ = device_array.__cuda_array_interface__
        self.shape = tuple(device_array.shape)
        self.dtype = np.dtype(device_array.dtype)


# ------------------------------------------------------------------------ device arrays


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("wrap", ["numba", "interface"])
def test_device_arrays_in_device_arrays_out(rng, dtype, wrap):
    x = rng.standard_normal((2, 3, 6, 5)).astype(dtype)
    w = rng.standard_normal((4, 3, 3, 2)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    kw = dict(stride=(2, 1), padding=(1, 0), dilation=1, groups=1)
    dev = [numba_cuda.to_device(a) for a in (x, w, b)]
    if wrap == "interface":
        dev = [Foreign(a) for a in dev]
    y = fc.conv2d(*dev, **kw)  # device arrays pick the cuda backend automatically
    assert is_device(y) and fc.last_algorithm("conv2d").startswith("cuda:")
    dy = rng.standard_normal(y.shape).astype(dtype)
    dy_dev = numba_cuda.to_device(dy)
    if wrap == "interface":
        dy_dev = Foreign(dy_dev)
    grads = fc.conv2d_backward(dy_dev, *dev[:2], **kw)
    assert all(is_device(g) for g in grads)
    ry, rdx, rdw, rdb = reference_conv(x, w, b, dy, backend_under_test="cuda", **kw)
    for got, want, what in zip((y, *grads), (ry, rdx, rdw, rdb), ("y", "dx", "dw", "db")):
        assert_close(to_host(got), want, what)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_pool_on_device_arrays_chains_without_the_host(rng, dtype):
    x = rng.standard_normal((2, 2, 7, 6)).astype(dtype)
    y, idx = fc.max_pool2d(numba_cuda.to_device(x), 3, stride=2, padding=1)
    assert is_device(y) and is_device(idx)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = fc.max_pool2d_backward(numba_cuda.to_device(dy), idx, x.shape)  # idx stays on device
    assert is_device(dx)
    ry, ridx, rdx = reference_pool(x, dy, 3, 2, 1, 1, False, backend_under_test="cuda")
    np.testing.assert_array_equal(to_host(idx), ridx)
    assert_close(to_host(y), ry, "pool forward")
    assert_close(to_host(dx), rdx, "pool backward")


def test_conv_output_feeds_the_pool_on_device(rng):
    x = rng.standard_normal((1, 2, 8, 8)).astype(F32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(F32)
    y = fc.conv2d(numba_cuda.to_device(x), numba_cuda.to_device(w), padding=1)
    p, idx = fc.max_pool2d(y, 2)
    assert is_device(p)
    ry = reference_conv(x, w, None, np.zeros((1, 3, 8, 8), F32), 1, 1, 1, 1, "cuda")[0]
    rp, ridx, _ = reference_pool(ry, np.zeros((1, 3, 4, 4), F32), 2, None, 0, 1, False, "cuda")
    assert_close(to_host(p), rp, "conv then pool")
    np.testing.assert_array_equal(to_host(idx), ridx)


def test_device_batch_of_zero(rng):
    x = numba_cuda.to_device(np.zeros((0, 2, 5, 5), F32))
    w = numba_cuda.to_device(rng.standard_normal((3, 2, 3, 3)).astype(F32))
    y = fc.conv2d(x, w)
    assert is_device(y) and tuple(y.shape) == (0, 3, 3, 3)
    dw = fc.conv2d_backward(y, x, w, needs=("weight",))[1]
    np.testing.assert_array_equal(to_host(dw), np.zeros((3, 2, 3, 3), F32))


@pytest.mark.parametrize("bad", [-1, 25])
def test_out_of_range_device_indices_are_caught_on_the_device(bad):
    dy = numba_cuda.to_device(np.ones((1, 1, 2, 2), F32))
    idx = np.array([0, 3, bad, 24], np.int64).reshape(1, 1, 2, 2)
    with pytest.raises(ValueError, match=r"outside \[0, 25\)"):
        fc.max_pool2d_backward(dy, numba_cuda.to_device(idx), (1, 1, 5, 5))


# ------------------------------------------------------------------------ blocks and grids


def test_small_input_spans_many_blocks_and_wraps_the_grid(rng, monkeypatch):
    monkeypatch.setenv("FASTCONV_CUDA_BLOCK", "2")
    monkeypatch.setenv("FASTCONV_CUDA_MAX_BLOCKS", "5")
    check_conv("cuda", rng, (2, 2, 6, 5), (3, 2, 3, 3), padding=1)
    check_pool("cuda", rng, (2, 2, 6, 5), 2)
    launches = numba_cuda.last_launch
    for name in ("conv_forward_tiled", "conv_grad_input_tiled", "conv_grad_weight",
                 "conv_grad_bias", "pool_forward", "pool_backward"):
        grid, block, _ = launches[name]
        assert grid > 1, (name, grid)
        assert block in ((2, 2), 4), (name, block)
    # 2 images x 3 tiles x 3 tiles of forward work on a grid of 5: the loop wraps
    assert launches["conv_forward_tiled"][0] == 5


def test_block_reductions_hold_when_the_simulator_is_preempted_mid_allocation(rng, monkeypatch):
    """The simulator's shared-array race, forced: every first lookup of a block's shared array
    yields the GIL for a millisecond between its check and its set. Without the lock of
    tests/_cudasim_fix.py, threads of one block then get different arrays and grad-weight /
    grad-bias come out wrong on every call (measured: dw off by 15); with it they are exact.
    On a real GPU the patched simulator class is never used and the check holds as it is."""
    import time

    from numba.cuda.simulator import kernelapi

    class SlowMissDict(dict):
        def get(self, key, default=None):
            found = dict.get(self, key, default)
            if found is None:
                time.sleep(0.001)
            return found

    original_init = kernelapi.FakeCUDAShared.__init__

    def init(self, dynshared_size):
        original_init(self, dynshared_size)
        self._allocations = SlowMissDict()

    monkeypatch.setattr(kernelapi.FakeCUDAShared, "__init__", init)
    monkeypatch.setenv("FASTCONV_CUDA_BLOCK", "2")
    monkeypatch.setenv("FASTCONV_CUDA_MAX_BLOCKS", "5")
    x = rng.standard_normal((2, 3, 6, 6)).astype(F32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(F32)
    dy = rng.standard_normal((2, 4, 4, 4)).astype(F32)
    got = fc.conv2d_backward(dy, x, w, backend="cuda")
    want = fc.conv2d_backward(dy, x, w, backend="numpy")
    for name, g, r in zip(("input", "weight", "bias"), got, want):
        assert_close(g, r, name)


@pytest.mark.parametrize("block", ["1", "3"])
def test_odd_block_sizes(rng, monkeypatch, block):
    """Non-power-of-two blocks: tiles overhang the output and the tree reduction is uneven."""
    monkeypatch.setenv("FASTCONV_CUDA_BLOCK", block)
    check_conv("cuda", rng, (1, 3, 5, 7), (5, 3, 2, 3), stride=(1, 2), padding=(1, 0))
    check_pool("cuda", rng, (1, 2, 5, 7), (2, 3), stride=1, padding=1)


def test_single_block_grid(rng, monkeypatch):
    monkeypatch.setenv("FASTCONV_CUDA_MAX_BLOCKS", "1")
    check_conv("cuda", rng, (2, 4, 5, 5), (4, 2, 3, 3), groups=2, padding=1)
    check_pool("cuda", rng, (2, 2, 5, 5), 3, stride=1, padding=1)


def test_invalid_block_size_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("FASTCONV_CUDA_BLOCK", "64")
    with pytest.raises(ValueError, match="FASTCONV_CUDA_BLOCK"):
        fc.conv2d(np.ones((1, 1, 3, 3), F32), np.ones((1, 1, 1, 1), F32), backend="cuda")


# ------------------------------------------------------------------------ algorithms


def test_direct_kernels_when_the_tile_does_not_fit(rng, monkeypatch):
    monkeypatch.setattr(numba_cuda, "SHARED_LIMIT", 0)
    check_conv("cuda", rng, (2, 4, 6, 7), (6, 2, 3, 2), stride=(2, 1), padding=(1, 2),
               dilation=(1, 2), groups=2)
    assert fc.last_algorithm("conv2d") == "cuda:direct"
    assert "input:gather-direct" in fc.last_algorithm("conv2d_backward")
    check_conv("cuda", rng, (1, 2, 5, 5), (3, 2, 2, 2), dtype=F64, padding="same", bias=False)


def test_forward_stages_input_channels_in_chunks(rng, monkeypatch):
    check_conv("cuda", rng, (1, 9, 5, 4), (3, 9, 3, 3), padding=1)  # chunks of 4, 4, 1
    shared_four = numba_cuda.last_launch["conv_forward_tiled"][2]
    monkeypatch.setattr(numba_cuda, "SHARED_LIMIT", shared_four // 4)  # room for one channel
    check_conv("cuda", rng, (1, 9, 5, 4), (3, 9, 3, 3), padding=1)
    assert numba_cuda.last_launch["conv_forward_tiled"][2] == shared_four // 4
    assert fc.last_algorithm("conv2d") == "cuda:tiled-smem"


def test_tiled_kernels_are_the_default(rng):
    check_conv("cuda", rng, (1, 2, 5, 5), (3, 2, 3, 3))
    assert fc.last_algorithm("conv2d") == "cuda:tiled-smem"
    assert fc.last_algorithm("conv2d_backward") == (
        "cuda:input:gather-smem weight:block-reduce bias:block-reduce")


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("x_shape, w_shape, kw", [
    ((2, 3, 5, 5), (10, 3, 3, 3), dict(padding=1)),  # more output channels than one chunk
    ((1, 4, 6, 6), (4, 1, 3, 3), dict(groups=4, stride=2, padding=1)),  # depthwise
    ((2, 2, 4, 5), (3, 2, 4, 5), dict()),  # kernel as large as the input: 1x1 output
    ((1, 2, 1, 1), (2, 2, 1, 1), dict(bias=False)),  # 1x1 everything
])
def test_gradients_against_the_reference(rng, dtype, x_shape, w_shape, kw):
    check_conv("cuda", rng, x_shape, w_shape, dtype=dtype, **kw)


# ------------------------------------------------------------------------ pool semantics


@pytest.mark.parametrize("dtype", [F32, F64])
def test_pool_overlapping_windows_and_ties(rng, dtype):
    # integers in a small range: many ties, and overlapping windows accumulate gradients
    x = rng.integers(0, 3, (2, 2, 6, 6)).astype(dtype)
    check_pool("cuda", rng, x.shape, 3, stride=1, padding=1, dtype=dtype, x=x)
    check_pool("cuda", rng, x.shape, (3, 2), stride=(2, 1), dilation=(1, 2), ceil_mode=True,
               dtype=dtype, x=x)


def test_pool_nan_and_inf_match_torch(rng):
    x = rng.standard_normal((1, 2, 6, 6)).astype(F32)
    x[0, 0, 1, 1] = x[0, 0, 1, 2] = np.nan
    x[0, 1, :3, :3] = -np.inf
    check_pool("cuda", rng, x.shape, 3, stride=2, padding=1, x=x)


def test_pool_one_by_one_output(rng):
    check_pool("cuda", rng, (2, 3, 4, 5), (4, 5))
    check_pool("cuda", rng, (1, 1, 1, 1), 1, dtype=F64)


# ------------------------------------------------------------------------ no GPU


_NO_GPU_CHILD = textwrap.dedent("""
    import sys, warnings
    import numpy as np
    import fastconv.backends.cuda.executor as nc
    assert "numba.cuda" not in sys.modules, "numba.cuda imported at module import"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nc.unavailable_reason()
    assert not caught, [str(w.message) for w in caught]
    import fastconv as fc
    from numba import cuda
    if cuda.is_available():
        assert fc.backend_status()["cuda"] is None
        print("GPU")
    else:
        reason = fc.backend_status()["cuda"]
        assert reason == "no CUDA GPU found and NUMBA_ENABLE_CUDASIM is not set", reason
        assert "cuda" not in fc.available_backends()
        try:
            fc.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 1, 1)), backend="cuda")
        except fc.BackendUnavailableError as e:
            assert "no CUDA GPU found" in str(e), e
            print("NO-GPU")
""")

_NO_NUMBA_CUDA_CHILD = textwrap.dedent("""
    import sys
    sys.modules["numba.cuda"] = None  # as if numba-cuda were not installed
    import fastconv as fc
    reason = fc.backend_status()["cuda"]
    assert reason.startswith("numba.cuda cannot be imported"), reason
    assert "fastconv[cuda]" in reason, reason
    print("OK")
""")


def _child(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_ENABLE_CUDASIM", "FASTCONV_BACKEND")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


def test_without_gpu_or_simulator_the_backend_is_unavailable_with_a_reason():
    proc = _child(_NO_GPU_CHILD)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() in ("GPU", "NO-GPU"), proc.stdout
    assert "CUDA" not in proc.stderr, proc.stderr  # nothing spilled into the caller's output


def test_without_numba_cuda_the_reason_says_how_to_install():
    proc = _child(_NO_NUMBA_CUDA_CHILD)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"
