"""The numba backend's own paths: each kernel variant against PyTorch (``tests/helpers.py``),
PyTorch's exact max-pool index rules, and the threading policy (several threads at once, thread
counts, fork)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastconv as fc
from helpers import (WINOGRAD_NON_FINITE, check_conv, check_partial_needs, check_pool,
                     check_winograd_non_finite)

pytestmark = pytest.mark.skipif(
    fc.backend_status()["numba"] is not None, reason="numba is not installed here"
)
numba = pytest.importorskip("numba")

DTYPES = [np.float32, np.float64]

WINO = "numba:winograd-f2x2"
DIRECT = "numba:direct-nhwc-c64"  # the AVX-512 block (the 256-bit one: "numba:direct-nhwc-v256")
DIRECT_FAMILY = "numba:direct-nhwc-"  # either block, as this CPU chooses
POINTWISE = "numba:pointwise-gemm"

# (x_shape, w_shape, kwargs, forward algorithm expected: one name, or (float32, float64))
CONV_CASES = [
    # Winograd F(2x2, 3x3) (float32 only): C_out padded to 128, paired 32-channel blocks (C_out
    # and, for dx, C_in <= 32), odd output sizes, asymmetric padding, padding > 2 (dx by the
    # exact kernels), dy shared between the dx and dw passes at either column parity
    ((2, 33, 7, 7), (70, 33, 3, 3), dict(padding=1), (WINO, DIRECT)),
    ((1, 32, 4, 4), (32, 32, 3, 3), dict(padding=3), (WINO, DIRECT)),  # pad > kernel
    ((2, 16, 18, 17), (32, 16, 3, 3), dict(), (WINO, DIRECT)),
    ((2, 24, 9, 10), (48, 24, 3, 3), dict(padding=(2, 1)), (WINO, DIRECT)),
    ((2, 64, 11, 9), (64, 64, 3, 3), dict(padding=(1, 2)), (WINO, DIRECT)),
    ((2, 64, 10, 9), (64, 64, 3, 3), dict(padding=1), (WINO, DIRECT)),
    ((2, 48, 6, 5), (32, 48, 3, 3), dict(padding=(0, 2)), (WINO, DIRECT)),  # dx too narrow
    # 1x1 as matrix products (float32, >= 64 pixels; backward needs C_out >= 64): remainder
    # rows, a shifted last column block, several column blocks of dw
    ((2, 70, 8, 9), (64, 70, 1, 1), dict(), (POINTWISE, DIRECT)),
    ((3, 33, 5, 13), (130, 33, 1, 1), dict(), (POINTWISE, DIRECT)),
    # register-blocked direct path: tail columns, C_out padded to 64, strides, row dilation
    ((2, 8, 7, 9), (64, 8, 3, 3), dict(), DIRECT),
    ((2, 3, 7, 9), (64, 3, 3, 3), dict(stride=(1, 2)), DIRECT),
    ((2, 33, 7, 6), (70, 33, 3, 3), dict(padding=1), DIRECT),
    ((2, 40, 6, 9), (40, 40, 3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
     DIRECT),
    ((2, 35, 8, 7), (40, 35, 4, 2), dict(padding="same", dilation=(2, 1)), DIRECT),
    ((1, 64, 5, 5), (64, 64, 1, 1), dict(), DIRECT),
    ((2, 32, 9, 9), (64, 32, 3, 3), dict(stride=2, padding=1), DIRECT),
    ((1, 32, 4, 3), (32, 32, 3, 3), dict(padding=(3, 1)), DIRECT),  # pad > kernel
    ((2, 8, 5, 3), (64, 8, 3, 2), dict(), DIRECT),  # rows narrower than a block
    ((2, 16, 7, 7), (40, 16, 3, 3), dict(), DIRECT),  # 5 columns: narrower than a 256-bit block
    ((2, 1, 9, 9), (32, 1, 3, 3), dict(stride=2), DIRECT),  # a run (kW*C_in) shorter than a block
    # padded-plane path (few channels, stride 1): first layers, dilation, even kernels, padding
    # larger than the kernel (grad-input falls back to the generic scatter)
    ((2, 1, 12, 11), (32, 1, 3, 3), dict(), "numba:plane"),
    ((2, 1, 12, 12), (6, 1, 5, 5), dict(padding=2), "numba:plane"),
    ((2, 6, 14, 14), (16, 6, 5, 5), dict(), ("numba:c16", "numba:plane")),
    ((2, 3, 8, 7), (5, 3, 4, 2), dict(padding="same"), "numba:plane"),
    ((2, 6, 9, 9), (40, 6, 3, 3), dict(dilation=(1, 2)), "numba:plane"),
    ((1, 2, 5, 5), (3, 2, 2, 2), dict(padding=3), "numba:plane"),
    ((1, 1, 70, 3), (2, 1, 3, 3), dict(), "numba:plane"),  # many lane blocks, narrow rows
    ((2, 3, 7, 9), (64, 3, 3, 3), dict(), "numba:plane"),
    # 6 x 64 blocks (5 or 6 channels), and dx of unpadded columns with rows wrapped at W
    ((2, 6, 10, 12), (6, 6, 3, 3), dict(dilation=(1, 2)), "numba:plane"),
    ((2, 5, 9, 8), (5, 5, 3, 2), dict(padding=(1, 0)), "numba:plane"),
    ((2, 6, 8, 8), (7, 6, 3, 3), dict(padding=(0, 1)), "numba:plane"),
    # generic path: groups, depthwise, strided few-channel layers
    ((2, 4, 9, 8), (6, 2, 3, 2), dict(stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2),
     "numba:generic"),
    ((1, 4, 8, 8), (4, 1, 3, 3), dict(padding="same", groups=4), "numba:generic"),
    ((3, 3, 10, 9), (5, 3, 2, 2), dict(stride=2, padding=1), "numba:generic"),
]


@pytest.fixture(params=[512, 256], ids=["v512", "v256"])
def vector_bits(request, monkeypatch):
    """Both families of register-blocked kernels, whatever this CPU: the LLVM-vectorized ones
    tuned for AVX-512 and the explicit 256-bit ones (``backends.numba._simd``); each is correct
    on any CPU, only its speed depends on the vector registers there."""
    from fastconv.backends.numba import _simd as _numba_simd

    monkeypatch.setattr(_numba_simd, "WIDE_VECTORS", request.param == 512)
    return request.param


@pytest.mark.parametrize("value, wide", [("512", True), ("256", False), ("128", None)])
def test_vector_width_override(value, wide):
    """FASTCONV_NUMBA_VECTORS chooses the family of register blocks; a bad value is a clear
    error naming the variable and the values accepted, on first use of the backend."""
    code = ("import numpy as np, fastconv as fc\n"
            "from fastconv.backends.numba import _simd as s\n"
            "fc.conv2d(np.ones((1, 8, 5, 9), np.float32), np.ones((32, 8, 3, 3), np.float32),\n"
            "          backend='numba')\n"
            "print(s.WIDE_VECTORS, fc.last_algorithm('conv2d'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, FASTCONV_NUMBA_VECTORS=value), timeout=300)
    if wide is None:
        assert out.returncode != 0
        assert "FASTCONV_NUMBA_VECTORS='128': expected '256', '512' or unset" in out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(wide), DIRECT if wide else "numba:direct-nhwc-v256"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, kw, algo", CONV_CASES)
def test_conv_paths_match_torch(rng, x_shape, w_shape, kw, algo, dtype, vector_bits):
    if isinstance(algo, tuple):
        algo = algo[0] if dtype == np.float32 else algo[1]
    if algo == DIRECT and vector_bits == 256:
        algo = "numba:direct-nhwc-v256"
    check_conv("numba", rng, x_shape, w_shape, dtype=dtype, **kw)
    fc.conv2d(np.zeros(x_shape, dtype), np.zeros(w_shape, dtype), backend="numba", **kw)
    assert fc.last_algorithm("conv2d") == algo
    family = algo.split(":")[1].split("-")[0]  # the backward runs in the same family
    assert f":{family}" in fc.last_algorithm("conv2d_backward")


@pytest.mark.parametrize("m, k, n", [(1, 9, 64), (5, 33, 65), (6, 8, 70), (13, 70, 64),
                                     (64, 256, 196)])
def test_matrix_products_match_numpy_in_both_vector_families(rng, m, k, n, vector_bits):
    """The matrix products behind 1x1 convolutions and ``nn.Dense`` (N >= 64, their contract):
    fewer rows than a block, shifted last row and column blocks, the inner dimension in 3
    chunks with the bias in the first; and the batched sum of products behind the 1x1
    grad-weight."""
    from fastconv.backends.numba import _gemm as gemm

    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((2, k, n)).astype(np.float32)
    bias = rng.standard_normal(m).astype(np.float32)
    part = gemm.chunks_kernel()(a[:, ::1], b, bias, np.full((3, 2, m, n), np.nan, np.float32))
    want = np.einsum("mk,bkn->bmn", a.astype(np.float64), b) + bias[:, None]
    np.testing.assert_allclose(part.sum(axis=0), want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    a3 = rng.standard_normal((4, m, k)).astype(np.float32)
    b3 = rng.standard_normal((4, k, n)).astype(np.float32)
    part = gemm.sum_kernel()(a3, b3, np.full((2, m, n), np.nan, np.float32))
    want = np.einsum("bmk,bkn->mn", a3.astype(np.float64), b3)
    np.testing.assert_allclose(part.sum(axis=0), want, rtol=1e-4, atol=1e-4 * np.sqrt(4 * k))


@pytest.mark.parametrize("x_shape, w_shape, kw", [
    ((3, 17, 8, 8), (16, 17, 3, 3), {}),
    ((2, 20, 12, 11), (10, 20, 5, 3), dict(padding=2)),  # padded
    ((2, 18, 11, 9), (11, 18, 3, 3), dict(padding=(2, 0), dilation=(2, 1))),  # row dilation
    ((2, 24, 6, 3), (9, 24, 4, 3), dict(padding="same")),  # a run longer than one block
])
def test_few_output_channels_take_the_16_channel_grad_weight_blocks(rng, x_shape, w_shape, kw,
                                                                   vector_bits):
    """float32, stride 1, 9-16 output channels, more input channels than the kernels
    vectorized over output channels take, a run of >= 12 rows, unit column dilation: dw by
    16-channel register blocks (the last block's padding rows computed and dropped); float64
    keeps the plane kernel."""
    check_conv("numba", rng, x_shape, w_shape, **kw)
    assert "weight:direct-c16" in fc.last_algorithm("conv2d_backward")
    check_conv("numba", rng, x_shape, w_shape, dtype=np.float64, **kw)
    assert "weight:plane" in fc.last_algorithm("conv2d_backward")


C16 = "numba:input:c16-fused weight:c16-fused bias:c16-fused"
C16_CASES = [
    ((3, 6, 14, 14), (16, 6, 5, 5), {}),  # LeNet's second layer (shape D) on 3 images
    ((9, 6, 14, 14), (16, 6, 5, 5), {}),  # uneven image chunks
    ((2, 5, 12, 11), (10, 5, 5, 3), dict(padding=2)),  # padded, odd C_in, 10 channels
    ((2, 5, 11, 9), (11, 5, 3, 3), dict(padding=(2, 0), dilation=(2, 1))),  # row dilation
    ((2, 7, 6, 3), (9, 7, 4, 3), dict(padding="same")),  # rows narrower than a block
    ((2, 12, 9, 17), (13, 12, 3, 7), dict(padding=(1, 3), dilation=(1, 2))),  # column dilation
    ((1, 16, 5, 2), (16, 16, 2, 2), {}),  # one output column
]


@pytest.mark.parametrize("x_shape, w_shape, kw", C16_CASES)
def test_few_output_channels_take_the_kernels_vectorized_over_them(rng, x_shape, w_shape, kw,
                                                                    vector_bits):
    """float32, stride 1, 9-16 output channels, 5-16 input channels: the forward and the fused
    backward vectorized over 16 output channels (blocks wider than a row shifted back,
    padding taps and input channels computed and dropped); float64 keeps the plane kernels."""
    check_conv("numba", rng, x_shape, w_shape, **kw)
    assert fc.last_algorithm("conv2d") == "numba:c16"
    assert fc.last_algorithm("conv2d_backward") == C16
    check_conv("numba", rng, x_shape, w_shape, dtype=np.float64, **kw)
    assert fc.last_algorithm("conv2d") == "numba:plane"


@pytest.mark.parametrize("needs", [("input",), ("weight",), ("bias",), ("input", "bias"),
                                   ("weight", "bias")])
def test_c16_backward_computes_what_is_asked(rng, needs):
    x = rng.standard_normal((3, 6, 9, 8)).astype(np.float32)
    w = rng.standard_normal((12, 6, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((3, 12, 9, 8)).astype(np.float32)
    full = fc.conv2d_backward(dy, x, w, padding=1, backend="numpy")
    got = fc.conv2d_backward(dy, x, w, padding=1, backend="numba", needs=needs)
    assert fc.last_algorithm("conv2d_backward") == "numba:" + " ".join(
        f"{g}:c16-fused" for g in needs)
    for name, g, ref in zip(("input", "weight", "bias"), got, full):
        if name in needs:
            np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-4, err_msg=name)
        else:
            assert g is None


def test_c16_kernels_propagate_nan_as_torch(rng):
    """A NaN in x reaches exactly the outputs whose windows hold it, and every weight gradient
    whose taps meet it; dx and db stay finite (dw multiplies x by real dy only)."""
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((2, 6, 10, 9)).astype(np.float32)
    x[1, 2, 0, 8] = np.nan
    w = rng.standard_normal((16, 6, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((2, 16, 8, 7)).astype(np.float32)
    tx, tw = torch.from_numpy(x).requires_grad_(), torch.from_numpy(w).requires_grad_()
    ty = torch.nn.functional.conv2d(tx, tw)
    ty.backward(torch.from_numpy(dy))
    y = fc.conv2d(x, w, backend="numba")
    assert fc.last_algorithm("conv2d") == "numba:c16"
    dx, dw, _ = fc.conv2d_backward(dy, x, w, backend="numba")
    assert fc.last_algorithm("conv2d_backward") == C16
    for got, ref in ((y, ty), (dx, tx.grad), (dw, tw.grad)):
        ref = ref.detach().numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("needs", [("input", "bias"), ("weight", "bias"), ("bias",),
                                   ("input", "weight", "bias")])
def test_winograd_backward_sums_db_while_laying_out_dy(rng, needs):
    """db comes from the row sums of the pass that lays dy out for the first Winograd gradient
    computed (dx's, else dw's), or from the plain sums when neither runs."""
    x = rng.standard_normal((3, 32, 9, 10)).astype(np.float32)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((3, 64, 9, 10)).astype(np.float32)
    full = fc.conv2d_backward(dy, x, w, padding=1, backend="numpy")
    got = fc.conv2d_backward(dy, x, w, padding=1, backend="numba", needs=needs)
    if needs != ("bias",):
        assert "winograd" in fc.last_algorithm("conv2d_backward")
    for name, g, ref in zip(("input", "weight", "bias"), got, full):
        if name in needs:
            np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-3)
        else:
            assert g is None


FUSED = "numba:input:plane-fused weight:plane-fused bias:plane-fused"
FUSED_CASES = [
    ((5, 1, 28, 28), (32, 1, 3, 3), {}),  # shape A on 5 images (chunks of 1)
    ((9, 1, 28, 28), (6, 1, 5, 5), dict(padding=2)),  # shape C on 9 images (uneven chunks)
    ((2, 3, 11, 9), (7, 3, 3, 2), dict(padding=(1, 0), dilation=(2, 3))),
    ((2, 2, 9, 8), (5, 2, 3, 3), dict(padding=3)),  # padding beyond the kernel's reach
    ((3, 4, 7, 10), (12, 4, 4, 4), dict(padding="same")),  # uneven "same" padding
    ((1, 1, 40, 3), (2, 1, 1, 3), {}),  # one output column per row
    ((1, 1, 100, 100), (2, 1, 1, 1), dict(padding=3)),  # dy taller than dx's reach
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, w_shape, kw", FUSED_CASES)
def test_first_layers_take_the_fused_backward(rng, x_shape, w_shape, kw, dtype):
    """C_in <= 4, stride 1: dx, dw and db in one pass over dy (plane-fused)."""
    check_conv("numba", rng, x_shape, w_shape, dtype=dtype, **kw)
    assert fc.last_algorithm("conv2d_backward") == FUSED


@pytest.mark.parametrize("needs", [("input",), ("input", "bias"), ("input", "weight"),
                                   ("weight", "bias"), ("weight",)])
def test_fused_backward_computes_what_is_asked(rng, needs):
    algorithm = check_partial_needs("numba", rng, needs)
    assert algorithm == "numba:" + " ".join(f"{g}:plane-fused" for g in needs)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_without_bias_and_partial_needs(rng, bias):
    check_conv("numba", rng, (2, 8, 6, 6), (64, 8, 3, 3), bias=bias, padding=1)
    x = rng.standard_normal((2, 8, 6, 6)).astype(np.float32)
    w = rng.standard_normal((64, 8, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((2, 64, 4, 4)).astype(np.float32)
    full = fc.conv2d_backward(dy, x, w, backend="numba")
    for need, i in (("input", 0), ("weight", 1), ("bias", 2)):
        part = fc.conv2d_backward(dy, x, w, needs=(need,), backend="numba")
        assert [g is None for g in part] == [j != i for j in range(3)]
        np.testing.assert_array_equal(part[i], full[i])


@pytest.mark.parametrize("width, algo", [(8, DIRECT), (10, WINO)])
def test_nan_propagates_to_exactly_the_outputs_it_touches(rng, width, algo):
    x = rng.standard_normal((1, 40, 8, width)).astype(np.float32)
    x[0, 5, 3, 4] = np.nan
    w = rng.standard_normal((64, 40, 3, 3)).astype(np.float32)
    y = fc.conv2d(x, w, backend="numba")
    touched = np.zeros((6, width - 2), bool)
    touched[1:4, 2:5] = True
    assert np.isnan(y[0][:, touched]).all()
    assert not np.isnan(y[0][:, ~touched]).any()
    # Winograd mixes a whole 4x4 input tile, so it noticed the NaN and ran the exact kernel
    fallback = f"{WINO}>direct-nhwc-" if algo == WINO else DIRECT_FAMILY
    assert fc.last_algorithm("conv2d").startswith(fallback)


@pytest.mark.parametrize("where", WINOGRAD_NON_FINITE)
def test_winograd_hands_non_finite_values_to_the_exact_kernels(rng, where, vector_bits):
    """A tile's transforms mix its 16 inputs (and a filter's 9 taps): an inf or NaN there, or
    an overflow inside the transforms, would reach outputs and gradients that PyTorch keeps
    finite. Each case gives PyTorch's values and non-finite pattern, and the exact kernels
    took over where the transforms saw a non-finite value."""
    pytest.importorskip("torch")
    forward, backward = check_winograd_non_finite("numba", rng, where)
    exact = f"{WINO}>direct-nhwc-"  # the exact kernel recomputed y
    assert forward == WINO if where in ("dy", "b") else forward.startswith(exact)
    assert backward.startswith("numba:input:winograd-f2x2")
    assert "weight:winograd-f2x2" in backward
    assert (">" in backward) == (where != "b"), backward


def test_winograd_is_float32_only_and_reports_its_passes(rng):
    x = rng.standard_normal((2, 32, 12, 12))
    w = rng.standard_normal((64, 32, 3, 3))
    fc.conv2d(x.astype(np.float32), w.astype(np.float32), backend="numba")
    assert fc.last_algorithm("conv2d") == WINO
    fc.conv2d_backward(np.ones((2, 64, 10, 10), np.float32), x.astype(np.float32),
                       w.astype(np.float32), backend="numba")
    assert fc.last_algorithm("conv2d_backward") == \
        "numba:input:winograd-f2x2 weight:winograd-f2x2 bias:sum"
    fc.conv2d(x, w, backend="numba")
    assert fc.last_algorithm("conv2d").startswith(DIRECT_FAMILY)


# --------------------------------------------------------------------------------- pool

POOL_CASES = [
    ((2, 3, 8, 8), 2, dict(), "numba:k2s2"),
    ((2, 3, 9, 7), 2, dict(), "numba:k2s2"),
    ((2, 3, 9, 7), 2, dict(ceil_mode=True), "numba:parity-s2"),
    ((2, 3, 9, 7), 3, dict(stride=2, padding=1, ceil_mode=True), "numba:parity-s2"),
    ((2, 3, 12, 11), (3, 4), dict(stride=(1, 2), padding=(1, 2), dilation=(2, 3)),
     "numba:parity-s2"),
    ((2, 3, 5, 33), 1, dict(stride=2), "numba:parity-s2"),  # most input columns never read
    ((1, 2, 6, 40), (2, 3), dict(stride=2, padding=(1, 1), dilation=(1, 4), ceil_mode=True),
     "numba:parity-s2"),
    ((2, 2, 7, 37), 3, dict(stride=2, padding=1), "numba:parity-s2"),  # W_out 19: 2 blocks of 16
    ((2, 3, 9, 7), (3, 2), dict(stride=(2, 1), padding=(1, 1), dilation=(2, 1)), "numba:generic"),
    ((1, 2, 11, 10), 3, dict(stride=1, padding=1), "numba:generic"),
    ((1, 2, 11, 10), 3, dict(stride=3, padding=1, ceil_mode=True), "numba:generic"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape, k, kw, algo", POOL_CASES)
def test_pool_paths_match_torch(rng, x_shape, k, kw, algo, dtype):
    check_pool("numba", rng, x_shape, k, dtype=dtype, **kw)
    assert fc.last_algorithm("max_pool2d") == algo


@pytest.mark.parametrize("k, kw", [(2, {}), (3, dict(stride=2, padding=1, ceil_mode=True)),
                                   (3, dict(stride=1, padding=1))])
def test_pool_ties_nan_and_inf_follow_torch(rng, k, kw):
    """Ties keep the first maximum; NaN wins (torch points at the window's last NaN); -inf
    inputs and -inf padding give torch's indices."""
    x = rng.integers(-2, 2, size=(2, 3, 9, 9)).astype(np.float32)  # many ties
    x[0, 0, 1, 1] = x[0, 1, 4, 4] = x[0, 1, 4, 5] = np.nan
    x[1, 2] = -np.inf
    check_pool("numba", rng, x.shape, k, x=x, **kw)


# ---------------------------------------------------------------------------- threading


def _conv_case(rng):
    x = rng.standard_normal((4, 32, 10, 10)).astype(np.float32)
    w = rng.standard_normal((64, 32, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((4, 64, 8, 8)).astype(np.float32)
    return x, w, dy


def test_parallel_kernels_use_more_than_one_thread():
    from fastconv.backends.numba import _threading as _numba_threading

    ids = _numba_threading.run(_numba_threading.thread_ids, np.empty(64, np.int64))
    if numba.config.NUMBA_NUM_THREADS >= 2 and numba.get_num_threads() >= 2:
        assert len(set(ids.tolist())) >= 2, ids
    assert _numba_threading.threading_layer() in {"tbb", "omp", "workqueue"}


def test_results_identical_for_one_and_two_threads(rng):
    x, w, dy = _conv_case(rng)
    before = numba.get_num_threads()
    out = []
    try:
        for n in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(n)
            out.append((fc.conv2d(x, w, backend="numba"),
                        *fc.conv2d_backward(dy, x, w, backend="numba"),
                        *fc.max_pool2d(x, 2, backend="numba")))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(out[0], out[-1]):
        np.testing.assert_array_equal(a, b)


def test_eight_python_threads_match_serial_calls(rng):
    x, w, dy = _conv_case(rng)
    expected = [fc.conv2d(x * (i + 1), w, backend="numba") for i in range(8)]
    grads = fc.conv2d_backward(dy, x, w, backend="numba")
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def work(i):
        try:
            barrier.wait()
            for _ in range(3):
                y = fc.conv2d(x * (i + 1), w, backend="numba")
                g = fc.conv2d_backward(dy, x, w, backend="numba")
            results[i] = (y, g)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, (y, g) in enumerate(results):
        np.testing.assert_array_equal(y, expected[i])
        for a, b in zip(g, grads):
            np.testing.assert_array_equal(a, b)


_FORK_SCRIPT = r"""
import json, os, warnings, numpy as np, fastconv as fc
x = np.random.default_rng(0).standard_normal((2, 4, 6, 6))
w = np.random.default_rng(1).standard_normal((6, 2, 3, 3))
y = fc.conv2d(x, w, groups=2, backend="numba")  # starts the threading layer in the parent
r, wfd = os.pipe()
pid = os.fork()
if pid == 0:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yc = fc.conv2d(x, w, groups=2, backend="numba")
        yc = fc.conv2d(x, w, groups=2, backend="numba")
    os.write(wfd, json.dumps([bool(np.allclose(y, yc, rtol=1e-12, atol=1e-12)),
                              [str(c.message) for c in caught]]).encode())
    os._exit(0)
os.close(wfd)
data = os.read(r, 100000)
_, status = os.waitpid(pid, 0)
from fastconv.backends.numba import _threading as _numba_threading
print(json.dumps([status, _numba_threading.threading_layer(), json.loads(data)]))
"""


def test_fork_after_parallel_use_works():
    env = dict(os.environ, FASTCONV_BACKEND="numba")
    proc = subprocess.run([sys.executable, "-c", _FORK_SCRIPT], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    status, layer, (same, messages) = json.loads(proc.stdout.strip().splitlines()[-1])
    assert status == 0 and same
    if layer == "omp":  # GNU OpenMP is not fork-safe: serial kernels, one warning
        assert len(messages) == 1 and "fork" in messages[0], messages
    else:
        assert messages == []


def test_large_pool_gradient_is_streamed_and_exact(rng, monkeypatch):
    """dx of at least STREAM_MIN_BYTES is assembled per plane and written by non-temporal
    stores: the result is still the scatter-add (threshold lowered so the case stays small;
    odd plane sizes put the 64-byte line boundaries everywhere)."""
    from fastconv.backends.numba import _pool as _numba_pool

    monkeypatch.setattr(_numba_pool, "STREAM_MIN_BYTES", 1)
    check_pool("numba", rng, (3, 5, 13, 11), 3, stride=2, padding=1)
    check_pool("numba", rng, (2, 4, 9, 9), 2, dtype=np.float64)
    # the kernel's own index check holds on this path too: one bad index, a clear error
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    y, idx = fc.max_pool2d(x, 2, backend="numba")
    idx[1, 2, 3, 1] = 64
    with pytest.raises(ValueError, match=r"idx has values in \[\d+, 64\], expected \[0, 64\)"):
        fc.max_pool2d_backward(np.ones_like(y), idx, x.shape, backend="numba")
