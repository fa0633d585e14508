"""fastconv.torch operators and functional wrappers against torch.nn.functional.

* ``torch.library.opcheck`` on each of the four ``fastconv::`` operators over a grid of
  geometries (stride, int/pair/'same' padding, dilation, groups incl. depthwise, ceil_mode) in
  float32 and float64: schema, fake kernel, autograd registration, AOT dispatch.
* ``gradcheck`` (and ``gradgradcheck``) in float64 on both functional wrappers.
* Values and indices equal torch's; CPU tensors are used without copies; channels_last,
  unbatched input, no_grad / inference_mode / requires_grad=False behave as torch's.
* Bad input gets the NumPy API's errors. CUDA routing is checked under the CUDA simulator.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import fastconv as fc  # noqa: E402
import fastconv.torch as ft  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float64]

# (x shape, w shape, kwargs): every conv option torch has, on small shapes
CONV_CASES = [
    ((2, 3, 7, 8), (4, 3, 3, 3), dict()),
    ((2, 3, 9, 8), (4, 3, 3, 2), dict(stride=2, padding=1)),
    ((1, 2, 8, 9), (3, 2, 3, 3), dict(stride=(2, 1), padding=(0, 2))),
    ((2, 4, 7, 7), (6, 2, 3, 3), dict(padding="same", dilation=2, groups=2)),
    ((2, 4, 6, 7), (4, 1, 3, 3), dict(padding=1, groups=4)),          # depthwise
    ((1, 3, 6, 6), (2, 3, 2, 2), dict(padding="same")),               # even kernel: bottom/right
    ((2, 2, 6, 6), (3, 2, 1, 1), dict(padding="valid")),
]
# (x shape, kwargs)
POOL_CASES = [
    ((2, 3, 8, 8), dict(kernel_size=2)),
    ((2, 3, 9, 7), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)),
    ((1, 2, 10, 9), dict(kernel_size=(2, 3), stride=(1, 2), dilation=2)),
    ((2, 2, 7, 7), dict(kernel_size=2, stride=2, ceil_mode=True)),
]


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def _conv_args(kw):
    """The operator's normalised arguments for the functional ``kw``."""
    pair = ft._functional._pair
    padding = kw.get("padding", 0)
    same = padding == "same"
    pad = [0, 0] if isinstance(padding, str) else pair("padding", padding)
    return [pair("stride", kw.get("stride", 1)), pad, pair("dilation", kw.get("dilation", 1)),
            kw.get("groups", 1), same, ""]


def _pool_args(kw):
    pair = ft._functional._pair
    k = pair("kernel_size", kw["kernel_size"])
    s = pair("stride", kw["stride"]) if "stride" in kw else k
    return [k, s, pair("padding", kw.get("padding", 0)), pair("dilation", kw.get("dilation", 1)),
            kw.get("ceil_mode", False), ""]


# ------------------------------------------------------------------ opcheck


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_shape,kw", CONV_CASES)
def test_opcheck_conv2d_ops(x_shape, w_shape, kw, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(w_shape, dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(w_shape[0], dtype=dtype, generator=g, requires_grad=True)
    args = _conv_args(kw)
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, (x, w, b, *args))
    torch.library.opcheck(torch.ops.fastconv.conv2d.default, (x, w, None, *args))
    dy = torch.randn(F.conv2d(x, w, b, **kw).shape, dtype=dtype, generator=g)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(torch.ops.fastconv.conv2d_backward.default,
                              (dy, x.detach(), w.detach(), *args, mask))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,kw", POOL_CASES)
def test_opcheck_pool_ops(x_shape, kw, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(x_shape, dtype=dtype, generator=g, requires_grad=True)
    args = _pool_args(kw)
    torch.library.opcheck(torch.ops.fastconv.max_pool2d.default, (x, *args))
    y, idx = torch.ops.fastconv.max_pool2d(x.detach(), *args)
    dy = torch.randn(y.shape, dtype=dtype, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.fastconv.max_pool2d_backward.default,
                          (dy, idx, list(x_shape), ""))


# ------------------------------------------------------------------ values and gradients


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,w_shape,kw", CONV_CASES)
def test_conv2d_matches_torch(x_shape, w_shape, kw, dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(x_shape, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(w_shape, dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(w_shape[0], dtype=dtype, generator=g, requires_grad=True)
    y = ft.conv2d(x, w, b, **kw)
    ref = F.conv2d(x, w, b, **kw)
    torch.testing.assert_close(y, ref, **_tol(dtype))
    dy = torch.randn(ref.shape, dtype=dtype, generator=g)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(ref, (x, w, b), dy)
    for name, a, e in zip(("input", "weight", "bias"), got, want):
        torch.testing.assert_close(a, e, **_tol(dtype), msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_shape,kw", POOL_CASES)
def test_max_pool2d_matches_torch(x_shape, kw, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(x_shape, dtype=dtype, generator=g)
    x[0, 0, 1, :] = x[0, 0, 0, :]  # ties: the first maximum wins, as in torch
    x.requires_grad_(True)
    y, idx = ft.max_pool2d(x, return_indices=True, **kw)
    ref, ref_idx = F.max_pool2d(x, return_indices=True, **kw)
    assert torch.equal(y, ref)
    assert idx.dtype == torch.int64 and torch.equal(idx, ref_idx)
    dy = torch.randn(ref.shape, dtype=dtype, generator=g)
    torch.testing.assert_close(torch.autograd.grad(y, x, dy)[0],
                               torch.autograd.grad(ref, x, dy)[0], **_tol(dtype))
    assert torch.equal(ft.max_pool2d(x, **kw), ref)  # return_indices=False: the output alone


@pytest.mark.parametrize("x_shape,w_shape,kw", CONV_CASES)
def test_conv2d_gradcheck(x_shape, w_shape, kw):
    g = torch.Generator().manual_seed(4)
    args = [torch.randn(s, dtype=torch.float64, generator=g, requires_grad=True)
            for s in (x_shape, w_shape, (w_shape[0],))]
    fn = lambda x, w, b: ft.conv2d(x, w, b, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("x_shape,kw", POOL_CASES)
def test_max_pool2d_gradcheck(x_shape, kw):
    # distinct values: finite differences are only valid away from ties
    n = int(np.prod(x_shape))
    x = (torch.randperm(n, generator=torch.Generator().manual_seed(5)).to(torch.float64)
         .reshape(x_shape) / n).requires_grad_(True)
    fn = lambda x: ft.max_pool2d(x, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


# ------------------------------------------------------------------ memory and modes


def test_cpu_tensors_are_used_without_copies(monkeypatch):
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    seen = {}
    real = fc.conv2d

    def spy(xa, wa, *args, **kwargs):
        seen["x"], seen["w"] = xa, wa
        return real(xa, wa, *args, **kwargs)

    monkeypatch.setattr(fc, "conv2d", spy)
    y = ft.conv2d(x, w)
    assert isinstance(seen["x"], np.ndarray)
    assert seen["x"].ctypes.data == x.data_ptr() and seen["w"].ctypes.data == w.data_ptr()
    torch.testing.assert_close(y, F.conv2d(x, w), rtol=1e-4, atol=1e-5)


def test_results_are_not_overwritten_by_later_calls():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    first = ft.conv2d(x, w)
    keep = first.clone()
    ft.conv2d(torch.randn(2, 3, 8, 8), w)
    p1, _ = ft.max_pool2d(x, 2, return_indices=True)
    keep_p = p1.clone()
    ft.max_pool2d(torch.randn(2, 3, 8, 8), 2)
    assert torch.equal(first, keep) and torch.equal(p1, keep_p)


def test_channels_last_and_strided_inputs():
    x = torch.randn(2, 4, 9, 9).to(memory_format=torch.channels_last)
    w = torch.randn(6, 4, 3, 3).to(memory_format=torch.channels_last)
    torch.testing.assert_close(ft.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1),
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(ft.max_pool2d(x, 3, 2), F.max_pool2d(x, 3, 2))
    xs = torch.randn(2, 4, 18, 9)[:, :, ::2]  # a strided view
    torch.testing.assert_close(ft.conv2d(xs, w), F.conv2d(xs, w), rtol=1e-4, atol=1e-5)


def test_unbatched_input_as_torch():
    x = torch.randn(3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    y = ft.conv2d(x, w, padding=1)
    assert y.shape == (4, 8, 8)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-4, atol=1e-5)
    y, idx = ft.max_pool2d(x, 2, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(y, ref) and torch.equal(idx, ref_idx)


def test_no_grad_inference_mode_and_frozen_inputs():
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4)  # requires_grad=False
    with torch.no_grad():
        y = ft.conv2d(x, w, b)
    assert not y.requires_grad and y.grad_fn is None
    with torch.inference_mode():
        yi = ft.conv2d(x, w, b)
        pi = ft.max_pool2d(yi, 2)
    assert yi.is_inference() and pi.is_inference()
    torch.testing.assert_close(yi, F.conv2d(x, w, b), rtol=1e-4, atol=1e-5)
    y = ft.conv2d(x, w, b)
    assert y.requires_grad
    y.sum().backward()
    assert x.grad is None and b.grad is None
    torch.testing.assert_close(w.grad, torch.autograd.grad(F.conv2d(x, w, b).sum(), w)[0],
                               rtol=1e-4, atol=1e-4)
    frozen = torch.randn(4, 3, 3, 3)
    assert not ft.conv2d(x, frozen).requires_grad  # no input needs a gradient, as in torch


def test_dispatch_modes_see_the_operators_even_without_grad():
    # Eager calls that record no gradient skip the dispatcher; under a dispatch mode (here a
    # recording one, as profilers and FakeTensorMode are) they must go through it.
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(1, 2, 6, 6), torch.randn(3, 2, 3, 3)
    with torch.no_grad(), Record() as rec:
        y = ft.conv2d(x, w)
        p = ft.max_pool2d(x, 2)
    assert "fastconv.conv2d.default" in rec.ops and "fastconv.max_pool2d.default" in rec.ops
    torch.testing.assert_close(y, F.conv2d(x, w), rtol=1e-4, atol=1e-5)
    assert torch.equal(p, F.max_pool2d(x, 2))


def test_torch_compile_inductor_of_the_functional_ops():
    # The default (inductor) backend, forward and backward, in one graph (fullgraph=True: the
    # operators do not break the graph).
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)

    def f(x, w):
        return ft.max_pool2d(torch.relu(ft.conv2d(x, w, padding=1)), 2, ceil_mode=True)

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(x, w)
    ref = f(x, w)
    torch.testing.assert_close(out, ref)
    dy = torch.randn(ref.shape)
    got = torch.autograd.grad(out, (x, w), dy)
    want = torch.autograd.grad(ref, (x, w), dy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


# ------------------------------------------------------------------ bad input


def _numpy_error(fn):
    with pytest.raises(Exception) as info:
        fn()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.float16, torch.bfloat16])
def test_bad_dtypes_are_type_errors(dtype):
    x = torch.ones(1, 2, 5, 5, dtype=dtype)
    w = torch.ones(3, 2, 3, 3)
    with pytest.raises(TypeError, match=rf"input has dtype {dtype}, expected float32 or float64"):
        ft.conv2d(x, w)
    with pytest.raises(TypeError, match=r"weight has dtype .*, expected float32 or float64"):
        ft.conv2d(w.new_ones(1, 2, 5, 5), w.to(dtype))
    with pytest.raises(TypeError, match=r"input has dtype .*, expected float32 or float64"):
        ft.max_pool2d(x, 2)
    # the NumPy API's message, same wording
    if dtype in (torch.int64, torch.complex64):
        kind, msg = _numpy_error(lambda: fc.conv2d(x.numpy(), w.numpy()))
        assert kind is TypeError and "expected float32 or float64" in msg


def test_mismatched_channels_and_dtypes_match_the_numpy_api():
    x, w = torch.ones(1, 3, 5, 5), torch.ones(4, 2, 3, 3)
    kind, msg = _numpy_error(lambda: fc.conv2d(x.numpy(), w.numpy()))
    with pytest.raises(kind) as info:
        ft.conv2d(x, w)
    assert str(info.value) == msg and "3 channels" in msg
    kind, msg = _numpy_error(lambda: fc.conv2d(x.numpy(), w.numpy()[:, :1], groups=2))
    with pytest.raises(kind, match="groups"):
        ft.conv2d(x, w[:, :1], groups=2)
    with pytest.raises(TypeError, match="mixed dtypes"):
        ft.conv2d(x, w.double()[:, :1].expand(4, 3, 3, 3).contiguous())
    with pytest.raises(ValueError, match="padding"):
        ft.max_pool2d(x, 2, padding=2)  # more than half the kernel, as fastconv's API says


def test_wrong_ndim_and_types():
    w = torch.ones(4, 3, 3, 3)
    with pytest.raises(ValueError, match=r"input must be 3-D .* or 4-D .* got 2-D"):
        ft.conv2d(torch.ones(5, 5), w)
    with pytest.raises(ValueError, match=r"input must be 3-D .* or 4-D .* got 5-D"):
        ft.max_pool2d(torch.ones(1, 1, 3, 5, 5), 2)
    with pytest.raises(ValueError, match=r"weight must be 4-D"):
        ft.conv2d(torch.ones(1, 3, 5, 5), torch.ones(4, 3, 3))
    with pytest.raises(TypeError, match=r"input must be a torch.Tensor, got ndarray"):
        ft.conv2d(np.ones((1, 3, 5, 5), np.float32), w)
    with pytest.raises(ValueError, match=r"padding must be .* got 'full'"):
        ft.conv2d(torch.ones(1, 3, 5, 5), w, padding="full")
    with pytest.raises(TypeError, match=r"stride must be an int or a pair"):
        ft.conv2d(torch.ones(1, 3, 5, 5), w, stride=(1, 2, 3))
    with pytest.raises(ValueError, match=r"stride"):
        ft.conv2d(torch.ones(1, 3, 5, 5), w, stride=0)
    with pytest.raises(ValueError, match=r"unknown backend|backend"):
        ft.conv2d(torch.ones(1, 3, 5, 5), w, backend="nope")


def test_mixed_devices():
    x = torch.ones(1, 3, 5, 5)
    w = torch.ones(4, 3, 3, 3, device="meta")
    with pytest.raises(ValueError, match=r"mixed devices: input is on cpu, weight is on meta"):
        ft.conv2d(x, w)
    with pytest.raises(ValueError, match=r"mixed devices: input is on cpu, bias is on meta"):
        ft.conv2d(x, torch.ones(4, 3, 3, 3), torch.ones(4, device="meta"))


# ------------------------------------------------------------------ CUDA routing (simulator)

def test_cuda_tensors_route_to_the_cuda_backend_under_the_simulator():
    script = textwrap.dedent(
        """
        import numpy as np, torch
        from numba import cuda
        import fastconv as fc
        from fastconv.backends.cuda import executor as numba_cuda
        from fastconv.torch import _bridge

        class FakeCudaTensor:
            # What the bridge uses of a torch CUDA tensor: device, dtype, shape, detach(),
            # contiguous() and __cuda_array_interface__ (here over simulated device memory).
            def __init__(self, host):
                self.device = torch.device("cuda", 0)
                self.keep = numba_cuda.to_device(host)
                self.__cuda_array_interface__ = self.keep.__cuda_array_interface__
                self.shape = torch.Size(host.shape)
                self.dtype = torch.float32
            def detach(self):
                return self
            def contiguous(self):
                return self

        wrapped = []
        def as_tensor(a, device=None):
            wrapped.append(device)
            return a
        torch.as_tensor = as_tensor  # torch here has no CUDA: record what would be wrapped

        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)
        w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
        tx, tw = FakeCudaTensor(x), FakeCudaTensor(w)
        xa, wa = _bridge.to_array(tx), _bridge.to_array(tw)
        assert xa.tensor is tx and xa.dtype == np.float32 and xa.shape == x.shape
        assert xa.__cuda_array_interface__["data"] == tx.__cuda_array_interface__["data"]
        y = fc.conv2d(xa, wa, padding=1)
        assert fc.last_algorithm().startswith("cuda"), fc.last_algorithm()
        assert not isinstance(y, np.ndarray) and hasattr(y, "__cuda_array_interface__"), type(y)
        out = _bridge.to_tensor(y, tx)
        assert out is y and wrapped == [torch.device("cuda", 0)], wrapped
        ref = fc.conv2d(x, w, padding=1, backend="numpy")
        np.testing.assert_allclose(y.copy_to_host(), ref, rtol=1e-4, atol=1e-5)
        p, idx = fc.max_pool2d(xa, 2)
        assert hasattr(p, "__cuda_array_interface__")
        rp, ridx = fc.max_pool2d(x, 2, backend="numpy")
        np.testing.assert_array_equal(idx.copy_to_host(), ridx)
        print("ROUTED")
        """
    )
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(REPO))
    env.pop("FASTCONV_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ROUTED" in proc.stdout, proc.stdout + proc.stderr[-4000:]
