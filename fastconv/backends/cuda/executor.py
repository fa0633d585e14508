"""The ``cuda`` backend: numba.cuda kernels (``numba-cuda``), tested under the CUDA simulator.

Arrays:

* NumPy arrays are copied to the device, the kernels run, and the results come back as NumPy
  arrays.
* Device arrays (numba device arrays, or anything with ``__cuda_array_interface__``: CuPy, torch
  CUDA tensors, ...) are used in place, and the results are numba device arrays: no round trip
  through the host. Kernels are queued on the default stream and not waited for: synchronise
  (``numba.cuda.synchronize()``) before timing. Under the simulator (``NUMBA_ENABLE_CUDASIM=1``)
  device memory is host memory; :func:`to_device` makes simulated device arrays that carry the
  interface (the simulator's own arrays lack it, so fastconv would not see them as device arrays).

The kernels live in :mod:`fastconv.backends.cuda._kernels`; nothing is imported from numba,
probed or compiled when this module is imported, and each kernel compiles at its first launch.

Tuning knobs, read at every call (so tests can shrink them):

* ``BLOCK`` (env ``FASTCONV_CUDA_BLOCK``): the tile side; tiled kernels run ``BLOCK x BLOCK``
  threads per block, 1-D kernels ``BLOCK**2``. Tests use 2-4 so tiny inputs span many blocks.
* ``MAX_BLOCKS`` (env ``FASTCONV_CUDA_MAX_BLOCKS``): the grid never exceeds it; grid-stride
  loops cover the rest. Tests set it to 3 so that every kernel's loop wraps around.
* ``SHARED_LIMIT``: bytes of shared memory a tiled kernel may ask for (48 KiB, the most a block
  gets without opting in). The forward pass stages fewer input channels per barrier to fit;
  where even one does not fit, the direct (no shared memory) kernel runs instead.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..._dispatch import record_algorithm
# The ops fastconv.nn needs (the backend contract: see ``_host_ops``).
from .._host_ops import (COMPILED_ADAM, adam_update, dense, dense_backward,  # noqa: F401
                         dropout, dropout_backward, relu, relu_backward, sgd_update)

BLOCK = 16
MAX_BLOCKS = 65535
SHARED_LIMIT = 48 * 1024

# (grid, block, shared bytes) of the last launch of each kernel, for tests and benchmarks.
last_launch: dict = {}

_INSTALL_HINT = 'pip install "fastconv[cuda]" (numba-cuda; add its cu12/cu13 extra for the toolkit)'


# ----------------------------------------------------------------------------- availability


def _cuda():
    from numba import cuda

    return cuda


def simulator_enabled() -> bool:
    """True when numba.cuda runs the CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` at numba import)."""
    try:
        from numba.cuda.core import config
    except ImportError:  # older numba-cuda / numba-bundled cuda
        from numba import config
    return bool(getattr(config, "ENABLE_CUDASIM", False))


def unavailable_reason() -> str | None:
    """None when a CUDA GPU or the simulator is there, else why not. Compiles nothing."""
    try:
        cuda = _cuda()
    except Exception as e:  # ImportError, or numba-cuda missing its CUDA bindings
        return f"numba.cuda cannot be imported ({e}); install it with {_INSTALL_HINT}"
    if simulator_enabled():
        return None
    try:
        if cuda.is_available():
            return None
    except Exception as e:  # a broken driver install
        return f"the CUDA driver failed to initialise ({e})"
    return "no CUDA GPU found and NUMBA_ENABLE_CUDASIM is not set"


def _env_int(name: str, default: int, low: int, high: int) -> int:
    env = os.environ.get(name)
    value = default
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{name} must be an int, got {env!r}") from None
    if not low <= value <= high:
        raise ValueError(f"{name} (default {default}) must be in [{low}, {high}], got {value}")
    return value


def block_size() -> int:
    """The tile side (<= 32: at most 1024 threads): ``FASTCONV_CUDA_BLOCK``, else :data:`BLOCK`."""
    return _env_int("FASTCONV_CUDA_BLOCK", BLOCK, 1, 32)


def _kernels(dtype):
    from . import _kernels as _cuda_kernels

    return _cuda_kernels, _cuda_kernels.build(block_size(), np.dtype(dtype).name)


def _launch(name, kernel, grid, block, shared, *args):
    last_launch[name] = (grid, block, shared)
    kernel[grid, block, 0, shared](*args)


def _grid(blocks: int) -> int:
    cap = _env_int("FASTCONV_CUDA_MAX_BLOCKS", MAX_BLOCKS, 1, 2**31 - 1)
    return max(1, min(int(blocks), cap))


# ----------------------------------------------------------------------------- arrays

_sim_array_type = None


def _sim_type():
    """FakeCUDAArray with ``__cuda_array_interface__`` (the simulator's own arrays lack it)."""
    global _sim_array_type
    if _sim_array_type is None:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        class SimDeviceArray(FakeCUDAArray):
            """A simulated device array that fastconv recognises as a device array."""

            @property
            def __cuda_array_interface__(self):
                ai = self._ary.__array_interface__
                return {"shape": ai["shape"], "strides": ai["strides"],
                        "typestr": ai["typestr"], "data": ai["data"], "version": 3}

        _sim_array_type = SimDeviceArray
    return _sim_array_type


class _HostView:
    """Exposes simulated 'device' memory (host memory) described by a CUDA array interface."""

    def __init__(self, owner, cai):
        self.owner = owner
        self.__array_interface__ = {"shape": tuple(cai["shape"]), "typestr": cai["typestr"],
                                    "data": cai["data"], "strides": cai.get("strides"),
                                    "version": 3}


def _wrap_device(a):
    """Device array ``a`` (numba's, or any ``__cuda_array_interface__`` object) for the kernels."""
    cuda = _cuda()
    if simulator_enabled():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        if isinstance(a, FakeCUDAArray):
            return a
        return _sim_type()(np.asarray(_HostView(a, a.__cuda_array_interface__)))
    if getattr(a, "__cuda_ndarray__", False):
        return a
    return cuda.as_cuda_array(a)


def to_device(a):
    """Copy host array ``a`` to the device: a numba device array fastconv accepts as one."""
    cuda = _cuda()
    dev = cuda.to_device(np.ascontiguousarray(a))
    if simulator_enabled():
        return _sim_type()(dev._ary)
    return dev


def _empty(shape, dtype):
    cuda = _cuda()
    dev = cuda.device_array(tuple(shape), dtype=np.dtype(dtype))
    if simulator_enabled():
        return _sim_type()(dev._ary)
    return dev


class _Arrays:
    """Device views of a call's arguments and how to hand results back."""

    def __init__(self, *arrays):
        self.on_host = isinstance(arrays[0], np.ndarray)
        if self.on_host:
            cuda = _cuda()
            self.dev = [None if a is None else cuda.to_device(a) for a in arrays]
        else:
            self.dev = [None if a is None else _wrap_device(a) for a in arrays]

    def out(self, a):
        """A result: copied to the host for host calls, else the device array itself."""
        if a is None:
            return None
        return a.copy_to_host() if self.on_host else a


# ----------------------------------------------------------------------------- conv


def _geometry(p):
    (sh, sw), (ph, pw), (dil_h, dil_w) = p.stride, p.padding, p.dilation
    return sh, sw, ph, pw, dil_h, dil_w


def conv2d(x, w, b, p):
    """Forward convolution (see ``fastconv.conv2d``); tiled shared-memory kernel when it fits."""
    arrays = _Arrays(x, w, b)
    xd, wd, bd = arrays.dev
    x, w = xd, wd  # numpy dtypes and shapes, whatever array type came in
    mod, k = _kernels(x.dtype)
    n, c_in = x.shape[0], x.shape[1]
    c_out = w.shape[0]
    ho, wo = p.out_hw
    y = _empty((n, c_out, ho, wo), x.dtype)
    has_bias = bd is not None
    if not has_bias:
        bd = _empty((1,), x.dtype)
    t = block_size()
    geo = _geometry(p)
    per_channel = mod.tiled_conv_shared_elems(t, p.kernel_hw, p.stride, p.dilation)
    per_channel *= x.dtype.itemsize
    # input channels staged per barrier: up to CIB, as many as fit in SHARED_LIMIT
    cib = min(mod.CIB, c_in // p.groups, SHARED_LIMIT // per_channel)
    if cib >= 1:
        chunks = math.ceil(c_out // p.groups / mod.COB)
        tiles_h, tiles_w = math.ceil(ho / t), math.ceil(wo / t)
        items = n * p.groups * chunks * tiles_h * tiles_w
        _launch("conv_forward_tiled", k.conv_forward_tiled, _grid(items), (t, t),
                cib * per_channel, xd, wd, bd, has_bias, y, *geo, cib, chunks, tiles_h, tiles_w)
        record_algorithm("conv2d", "cuda:tiled-smem")
    else:
        total = n * c_out * ho * wo
        _launch("conv_forward_direct", k.conv_forward_direct, _grid(math.ceil(total / t**2)),
                t * t, 0, xd, wd, bd, has_bias, y, *geo)
        record_algorithm("conv2d", "cuda:direct")
    return arrays.out(y)


def conv2d_backward(dy, x, w, p, needs):
    """Gradients (dx, dw, db) of :func:`conv2d`; ``None`` for those not in ``needs``.

    dx: gather kernel (one owner per element) with weights staged in shared memory; dw and db:
    one block per weight / channel, reduced in shared memory without atomics (deterministic).
    """
    arrays = _Arrays(dy, x, w)
    dyd, xd, wd = arrays.dev
    x, w = xd, wd
    mod, k = _kernels(x.dtype)
    t = block_size()
    geo = _geometry(p)
    algos = []
    dx = dw = db = None
    if "input" in needs:
        dx = _empty(x.shape, x.dtype)
        shared = mod.grad_input_shared_elems(p.kernel_hw) * x.dtype.itemsize
        h, w_ = x.shape[2], x.shape[3]
        if shared <= SHARED_LIMIT:
            tiles_h, tiles_w = math.ceil(h / t), math.ceil(w_ / t)
            items = x.shape[0] * x.shape[1] * tiles_h * tiles_w
            _launch("conv_grad_input_tiled", k.conv_grad_input_tiled, _grid(items), (t, t),
                    shared, dyd, wd, dx, *geo, tiles_h, tiles_w)
            algos.append("input:gather-smem")
        else:
            _launch("conv_grad_input_direct", k.conv_grad_input_direct,
                    _grid(math.ceil(math.prod(x.shape) / t**2)), t * t, 0, dyd, wd, dx, *geo)
            algos.append("input:gather-direct")
    if "weight" in needs:
        dw = _empty(w.shape, x.dtype)
        _launch("conv_grad_weight", k.conv_grad_weight, _grid(math.prod(w.shape)), t * t, 0,
                dyd, xd, dw, *geo)
        algos.append("weight:block-reduce")
    if "bias" in needs:
        db = _empty((w.shape[0],), x.dtype)
        _launch("conv_grad_bias", k.conv_grad_bias, _grid(w.shape[0]), t * t, 0, dyd, db)
        algos.append("bias:block-reduce")
    record_algorithm("conv2d_backward", "cuda:" + (" ".join(algos) or "nothing"))
    return arrays.out(dx), arrays.out(dw), arrays.out(db)


# ----------------------------------------------------------------------------- pool


def max_pool2d(x, p):
    """Max-pool forward with PyTorch's exact int64 indices (see ``fastconv.max_pool2d``)."""
    arrays = _Arrays(x)
    (xd,) = arrays.dev
    x = xd
    _, k = _kernels(x.dtype)
    n, c = x.shape[0], x.shape[1]
    shape = (n, c, *p.out_hw)
    y = _empty(shape, x.dtype)
    idx = _empty(shape, np.int64)
    t = block_size()
    total = n * c * p.out_hw[0] * p.out_hw[1]
    (kh, kw), (sh, sw), (ph, pw), (dil_h, dil_w) = p.kernel_hw, p.stride, p.padding, p.dilation
    _launch("pool_forward", k.pool_forward, _grid(math.ceil(total / t**2)), t * t, 0,
            xd, y, idx, kh, kw, sh, sw, ph, pw, dil_h, dil_w)
    record_algorithm("max_pool2d", "cuda:thread-per-output")
    return arrays.out(y), arrays.out(idx)


def max_pool2d_backward(dy, idx, input_shape):
    """Scatter-add of ``dy`` at ``idx`` into a zeroed ``input_shape`` array (atomics).

    Device-resident indices are range-checked on the device; an index outside ``[0, H*W)``
    raises ``ValueError`` (reading that flag back is the only host synchronisation).
    """
    arrays = _Arrays(dy, idx)
    dyd, idxd = arrays.dev
    dy = dyd
    _, k = _kernels(dy.dtype)
    t = block_size()
    dx = _empty(input_shape, dy.dtype)
    bad = _cuda().to_device(np.zeros(1, np.int32))
    size = math.prod(input_shape)
    _launch("fill_zero", k.fill_zero, _grid(math.ceil(size / t**2)), t * t, 0, dx)
    _launch("pool_backward", k.pool_backward, _grid(math.ceil(math.prod(dy.shape) / t**2)),
            t * t, 0, dyd, idxd, dx, bad)
    record_algorithm("max_pool2d_backward", "cuda:atomic-scatter")
    if int(bad.copy_to_host()[0]):
        h, w_ = input_shape[2], input_shape[3]
        raise ValueError(
            f"idx has values outside [0, {h * w_}) for input planes of {h}x{w_}"
        )
    return arrays.out(dx)
