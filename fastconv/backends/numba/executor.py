"""The ``numba`` backend: parallel CPU kernels compiled by Numba, the fast path of fastconv.

An executor: ``fastconv.backends._plan`` decides which algorithm runs for a shape (the rules
and the names recorded for ``fastconv.last_algorithm`` are there); this module lays the arrays
out for the chosen kernels, runs them under the threading policy of ``_threading`` and
records the plan's name. Numba is imported when this module is first used, never by
``import fastconv``.

The kernels, by family:

* ``pointwise-gemm`` (``_gemm``): one matrix product per image in NCHW as it is (4
  output channels x 64 pixels register blocks); dx the same with the weight transposed; dw the
  sum over images of x[n] @ dy[n].T in fixed image chunks.
* ``winograd-f2x2`` (``_winograd``): Winograd F(2x2, 3x3), 2.25x fewer multiplications;
  dx the same forward on padded dy with the flipped weight; dw the transformed product.
* ``plane`` (``_plane``): vectorized over 48 consecutive output positions x 8 output
  channels (float32; 128 x 2 below 8 channels; float64 64 x 4); dx the same kernel on padded
  dy with the flipped weight; dw dot products over whole padded planes; ``plane-fused`` all
  three gradients in one pass over dy; ``direct-c16`` dw by 16-run-row x 16-channel blocks.
* ``c16`` (``_small``): float32, 9-16 output channels and 5-16 input channels, stride 1,
  vectorized over the 16 output channels (one 16-lane vector, or two of 8 with 256-bit
  blocks); ``c16-fused`` dx, dw and db of each image from one transposed copy of its dy, in
  one parallel region.
* ``direct-nhwc-c64`` (``_direct``): NHWC, a 4-column x 64-channel register block over
  the (kW, C_in) run, each task laying out its own input rows from NCHW x; dx one direct
  forward call per stride phase (``direct-phases``) on one padded NHWC copy of dy; dw 6-run-row x
  64-channel blocks of zmm vectors (``direct-c64``; float64: the 256-bit blocks), from NCHW x
  and dy in sub-chunks of rows.
* ``generic`` (``_generic``): NHWC loops vectorized over the group's output channels.
* Max-pool: ``k2s2`` (2x2, stride 2, no padding), ``parity-s2`` (column stride 2, vectorized
  over output columns), else ``generic`` (tap tables); backward ``scatter``. All follow
  PyTorch's index rules exactly.

Register blocks and the CPU: the block sizes above are for AVX-512 (32 vector registers of 16
float32), where LLVM vectorizes them. Where Numba does not compile for AVX-512 (AVX2: 16
registers of 8), those blocks spill, and the register-blocked stages (direct forward and
grad-weight, matrix products, Winograd products, plane forward) run instead as explicit 256-bit
vector blocks of 12 accumulators (``_simd``): 6 columns x 16 channels (direct), 6 rows x
16 columns (matrix products), 6 tiles x 16 channels (Winograd), 4 channels x 24 positions
(plane; 6 x 16 for 5-6 channels). The direct family is then named ``direct-nhwc-v256`` /
``direct-v256``. ``FASTCONV_NUMBA_VECTORS=512|256`` overrides the choice; both families are
correct on any CPU.

Every kernel gives the same result for every thread count (each parallel task owns its output;
partial sums are over a fixed number of chunks, added in a fixed order).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import NamedTuple

import numpy as np

from ..._dispatch import NUMBA_BROKEN_IMPORT, record_algorithm
from ..._validate import pool_index_error
from .. import _plan
from .._plan import chunks, round_up, sum_chunks
# The ops fastconv.nn needs (the backend contract: see ``_host_ops``).
from ._nn import (COMPILED_ADAM, adam_update, dense, dense_backward,  # noqa: F401
                  dropout, dropout_backward, relu, relu_backward, sgd_update)

#: The scatter kernel range-checks the max-pool indices itself (``fastconv.max_pool2d_backward``
#: then skips its separate single-threaded pass over them).
CHECKS_POOL_INDICES = True


def unavailable_reason():
    """None when Numba really imports here (nothing is compiled); else why not.

    Called once per process by the registry. ``import numba`` can raise more than ImportError
    (e.g. a numba built against another NumPy ABI), so any exception counts as unavailable.
    """
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba)"
    try:
        import numba  # noqa: F401
    except Exception as e:
        return f"{NUMBA_BROKEN_IMPORT}: {type(e).__name__}: {e}"
    return None


class Kernels(NamedTuple):
    """The kernel modules every call needs (imported, and so compiled, on first use)."""

    conv: object
    direct: object
    pool: object
    simd: object
    threading: object

    @property
    def run(self):
        """``_threading.run``: a kernel call under the threading policy."""
        return self.threading.run


@functools.lru_cache(maxsize=1)
def _kernels() -> Kernels:
    from . import _direct, _generic, _pool, _simd, _threading

    return Kernels(_generic, _direct, _pool, _simd, _threading)


class _OneThread:
    """A ``run`` that launches the kernel with numba's thread count set to 1 for the calling
    thread (numba keeps the count per thread), then restores it: the parallel region then runs
    inline on the caller, without waking the pool, which costs more than the threads save on
    small work (``_plan.SMALL_CONV_MACS``). Same compiled kernels, and the same results (every
    kernel's result is independent of the thread count). The plane forwards and the plane
    padding run their serial builds instead (``_serial``: no parallel region at all; one more
    cached specialization per such kernel that small work uses, compiled by ``fastconv
    warmup``)."""

    def __init__(self, threading):
        from numba.np.ufunc import parallel

        from . import _serial

        self._threading = threading
        self._parallel = parallel
        self._serial = _serial.build
        self._builds = {}  # kernel -> its serial build, or None (has none)

    def run(self, kernel, *args):
        # A kernel with a serial build (``_serial``) runs it: no parallel region at all (once
        # the pool has started: the first call starts it, as every other numba call).
        build = self._builds.get(kernel, False)
        if build is False:
            build = self._builds[kernel] = self._serial(kernel)
        if build is not None and self._threading._layer is not None:
            try:
                return build(*args)
            except Exception:  # a damaged cache file: the policy's retry (or the error again)
                return self._threading._call(build, args)
        threading, parallel = self._threading, self._parallel
        # Numba's raw per-thread setters (``numba.set_num_threads`` takes a lock: 3x the cost),
        # set once its pool has started; before that, or in a Numba without them, the
        # ordinary path.
        setter = getattr(parallel, "_set_num_threads", None)
        if threading.threading_layer() is None or setter is None:
            return threading.run(kernel, *args)
        old = parallel._get_num_threads()
        setter(1)
        try:
            return threading.run(kernel, *args)
        finally:
            setter(old)


@functools.lru_cache(maxsize=1)
def _small_kernels() -> Kernels:
    """``_kernels()`` whose ``run`` launches on one thread (:class:`_OneThread`)."""
    k = _kernels()
    return k._replace(threading=_OneThread(k.threading))


@functools.lru_cache(maxsize=None)
def _module(name: str):
    """The kernel module ``name`` of this package, imported on first use (a function-level
    ``from . import`` costs about a microsecond per call: small work notices)."""
    return importlib.import_module(f"{__package__}.{name}")


def _wide() -> bool:
    """Whether the register-blocked kernels are the LLVM-vectorized AVX-512 ones (else the
    explicit 256-bit vectors of ``_simd``, whose 32 registers those blocks need)."""
    return _kernels().simd.WIDE_VECTORS


# ------------------------------------------------------------------------------ layouts


def _plane_input(plane, run, x, pt, pl, ho, wo, kh, kw, dil_h, dil_w, wrap=False, sums=None):
    """x zero-padded into (N, C, Hx, Wp), Wp = W_out + dil_w*(kW-1), with rows to spare below.

    ``wrap``: Wp = W_out, for a layer whose left padding is the whole dilated kernel width and
    whose input rows end at W_out (a grad-input of an unpadded layer): each row's right padding
    is then the next row's left padding, and no computed column is dropped. With ``sums`` (a
    list), also appends x summed over (N, H, W)."""
    n, c = x.shape[:2]
    wp = wo + dil_w * (kw - 1)
    if wrap:
        assert pl == dil_w * (kw - 1) and x.shape[3] + pl == wo
        wp = wo
    lanes = round_up(ho * wp, plane.LANES)
    hx = -(-(lanes + dil_h * (kh - 1) * wp + dil_w * (kw - 1)) // wp)
    if (sums is None and pl >= 0 and n * c * hx * wp <= _plan.SMALL_PAD_ELEMENTS
            and not isinstance(getattr(run, "__self__", None), _OneThread)):
        # (on one thread, pad_plane's serial build costs less than NumPy's zeros and copy)
        return _pad_plane_host(x, np.zeros((n, c, hx, wp), x.dtype), pt, pl)
    planes = np.empty(n * c if sums is not None else 0, x.dtype)
    xp = run(plane.pad_plane, x, np.empty((n, c, hx, wp), x.dtype), pt, pl, planes)
    if sums is not None:
        sums.append(planes.reshape(n, c).sum(axis=0, dtype=np.float64).astype(x.dtype))
    return xp


def _pad_plane_host(x, xp, pt, pl):
    """``_plane.pad_plane`` (without sums) by NumPy into a zeroed xp, for planes so small that a
    kernel launch costs more than the copy: xp[n, c, pt + h, pl + w] = x[n, c, h, w] where it
    fits (pt may be negative: rows of x above the window grid are dropped; pl >= 0)."""
    h, w = x.shape[2:]
    hx, wp = xp.shape[2:]
    r0, r1, wmax = max(pt, 0), min(hx, pt + h), min(w, wp - pl)
    if r1 > r0 and wmax > 0:
        xp[:, :, r0:r1, pl:pl + wmax] = x[:, :, r0 - pt:r1 - pt, :wmax]
    return xp


def _plane_kernel(plane, dtype, c_out):
    """(kernel, output channels per block) of the plane forward for this CPU and dtype."""
    if not _wide():
        if dtype != np.float32:
            return plane.conv_forward_plane_vec64, plane.VEC_PCB
        if c_out in (5, 6):
            return plane.conv_forward_plane_vec32_6, 6
        if c_out > plane.VEC_FEW_PCB:
            return plane.conv_forward_plane_vec32, plane.VEC_PCB
        return plane.conv_forward_plane_vec32_few, plane.VEC_FEW_PCB
    if dtype != np.float32:
        return plane.conv_forward_plane64, plane.PCB64
    if c_out >= plane.PCB:
        return plane.conv_forward_plane, plane.PCB
    if c_out in (5, 6):
        return plane.conv_forward_plane6, 6
    return plane.conv_forward_plane_few, plane.FEW_PCB


def _plane_forward(plane, run, x, wt_oihw, bias, out, pt, pl, dil_h, dil_w, wrap=False,
                   sums=None, cache=None):
    """out = conv(x, wt_oihw) + bias with stride 1 and (top, left) padding (pt, pl) via the
    plane kernel; the bottom/right padding follows from out's size (``wrap``, ``sums``: see
    ``_plane_input``; ``cache``: see :func:`_reused`)."""
    c_out, c_in, kh, kw = wt_oihw.shape
    ho, wo = out.shape[2:]
    xp = _plane_input(plane, run, x, pt, pl, ho, wo, kh, kw, dil_h, dil_w, wrap, sums)
    kernel, pcb = _plane_kernel(plane, x.dtype, c_out)
    cp = round_up(c_out, pcb)

    def layout():
        wt = np.zeros((c_in, kh, kw, cp), x.dtype)
        wt[..., :c_out] = wt_oihw.transpose(1, 2, 3, 0)
        return wt

    if cache is None and wt_oihw.size <= _SMALL_WEIGHT:
        wt = _small_reused(("plane", cp), wt_oihw, layout)
        bias = _small_reused(("bias", cp), bias, lambda: _plan.padded_vector(bias, cp, x.dtype),
                             x.dtype)
    else:
        wt = _reused(cache, ("plane", cp), wt_oihw, layout)
        bias = _plan.padded_vector(bias, cp, x.dtype)
    return run(kernel, xp, wt, bias, out, dil_h, dil_w)


#: Weights of at most this many elements have their plane layout kept (:func:`_small_reused`).
_SMALL_WEIGHT = 4096
_SMALL_REUSED_MAX = 64
_small_layouts: dict = {}


def _small_reused(key, w, make, dtype=None):
    """``make()`` for a small array ``w`` (or None, then of ``dtype``), kept in a bounded
    module-wide dict keyed by w's shape, dtype and bytes: a repeated tiny call (the same weight,
    or a copy of it) skips laying it out again, and any change of w's values is a new key.
    Copying a weight this small costs less than laying it out. Kernels only read the result."""
    key = (key, dtype) if w is None else (key, w.shape, w.dtype, w.tobytes())
    value = _small_layouts.get(key)
    if value is None:
        value = make()
        if len(_small_layouts) >= _SMALL_REUSED_MAX:
            _small_layouts.clear()
        _small_layouts[key] = value
    return value


def _reused(cache, key, w, make):
    """``make()``, a weight laid out or transformed for a kernel from ``w``. With ``cache`` (a
    dict its caller owns: ``fastconv._conv2d_reusing_weights``), the result is kept there under
    ``key`` beside a copy of w's bytes and reused while w is unchanged byte for byte, so an
    in-place edit of w (an optimizer step) is always seen. Kernels only read the result."""
    if cache is None:
        return make()
    raw = w.tobytes()
    key = (key, w.shape, w.dtype)
    hit = cache.get(key)
    if hit is not None and hit[0] == raw:
        return hit[1]
    value = make()
    cache[key] = (raw, value)
    return value


def _nchw_strides(y, base=0):
    """(offset, N, C, H, W) element strides of a C-contiguous NCHW array, for the direct kernel."""
    n, c, h, w = y.shape
    return np.array([base, c * h * w, h * w, w, 1], np.int64)


def _direct_forward_kernel(direct, dtype):
    """(kernel, channel unit) of the register-blocked direct forward for this CPU: the
    LLVM-vectorized 4 x 64 block where Numba compiles for AVX-512, else the explicit 6-column
    block of 256-bit vectors (``_simd``: the 4 x 64 block spills there)."""
    if _wide():
        return direct.conv_forward_direct, direct.CB
    lanes = _kernels().simd.LANES[np.dtype(dtype)]
    kernel = direct.conv_forward_direct_vec32 if lanes == 8 else direct.conv_forward_direct_vec64
    return kernel, direct.VNV * lanes


def _winograd_input(wino, run, x, out_hw, pt, pl, sums=None):
    """x (N, C, H, W) laid out for the Winograd kernels (``pad_split``): padded by (pt, pl) at
    the top and left, to 2*TH + 2 rows and 2*TW + 2 columns for the TH x TW tiles of an output
    of ``out_hw``. With ``sums`` (a list), also appends the per-channel sums of x."""
    n, c = x.shape[:2]
    th, tw = -(-out_hw[0] // 2), -(-out_hw[1] // 2)
    xq = np.empty((n, 2 * th + 2, 2, tw + 1, c), x.dtype)
    return _pad_split(wino, run, x, xq, pt, pl, sums)


def _pad_split(wino, run, x, xq, pt, pl, sums=None):
    """``wino.pad_split`` of x into xq; with ``sums`` (a list), also appends x summed over
    (N, H, W), from the row sums the kernel leaves (in a fixed order: deterministic)."""
    rows = np.empty((xq.shape[0] * xq.shape[1] if sums is not None else 0, x.shape[1]), x.dtype)
    run(wino.pad_split, x, xq, pt, pl, rows)
    if sums is not None:
        sums.append(rows.sum(axis=0, dtype=np.float64).astype(x.dtype))
    return xq


def _winograd_forward(wino, run, x, w, b, y, pt, pl, xq=None, cache=None):
    """y = conv(x, w) + b (3x3, stride 1, padding (pt, pl)) by Winograd F(2x2, 3x3), from x or
    its ``_winograd_input`` layout ``xq`` (``cache``: the transformed weight, see
    :func:`_reused`). False if an input, weight or output was not finite: y is then to be
    recomputed exactly."""
    c_out = w.shape[0]
    if xq is None:
        xq = _winograd_input(wino, run, x, y.shape[2:], pt, pl)
    vec = not _wide()
    paired = not vec and c_out <= wino.HALF and xq.shape[3] - 1 >= 2 * wino.TB
    u = _reused(cache, ("winograd", paired, vec), w, lambda: (
        wino.transform_weight_paired(w) if paired else
        wino.transform_weight(w, round_up(c_out, wino.VCB if vec else wino.CB))))
    bias = np.zeros(c_out, x.dtype) if b is None else b
    check = np.empty(xq.shape[0] * ((xq.shape[1] - 2) // 2), x.dtype)
    run(wino.conv_forward_winograd, xq, u, bias, y, check, paired, vec)
    return not np.isnan(check).any()


def _pointwise(run, w2, a, bias, out_channels):
    """(N, out_channels, H*W) = w2 @ a[n] + bias for every image of a (N, C, H*W)."""
    from . import _gemm as gemm

    n = a.shape[0]
    bias = np.zeros(out_channels, a.dtype) if bias is None else bias
    part = np.empty((1, n, out_channels, a.shape[2]), a.dtype)
    return run(gemm.chunks_kernel(), w2, a, bias, part)[0]


def _padded_input(k: Kernels, x, p):
    """x zero-padded in NHWC (N, Hp, Wp, C) for the window grid of ``p``."""
    xp = np.empty((x.shape[0], *_plan.padded_hw(p), x.shape[1]), x.dtype)
    return k.run(k.conv.pad_nhwc, x, xp, p.padding[0], p.padding[1])


def _nhwc(k: Kernels, a):
    return k.run(k.conv.nchw_to_nhwc, a, np.empty((a.shape[0], *a.shape[2:], a.shape[1]),
                                                    a.dtype))


def _bias_sums(k: Kernels, dy):
    """db: dy summed over (N, H, W) in fixed image chunks."""
    from . import _plane as plane

    n, c_out = dy.shape[:2]
    part = np.empty((chunks(n), c_out), dy.dtype)
    return sum_chunks(k.run(plane.plane_sums, dy.reshape(n, c_out, -1), part))


# ------------------------------------------------------------------------------ forward


#: ``conv2d`` takes ``weight_cache`` (see ``fastconv._conv2d_reusing_weights``).
REUSES_WEIGHTS = True


def conv2d(x, w, b, p, weight_cache=None):
    """y (N, C_out, H_out, W_out) = conv2d(x, w) + b; see ``fastconv.conv2d``. With
    ``weight_cache`` (a dict the caller owns), the Winograd and plane forwards keep their
    transformed weight there and reuse it while w is unchanged (:func:`_reused`)."""
    small = p.macs(x.shape[0], x.shape[1], w.shape[0]) < _plan.SMALL_CONV_MACS
    k = _small_kernels() if small else _kernels()
    plan = _plan.numba_forward(p, x.dtype, w.shape[1], w.shape[0], _wide())
    if weight_cache is not None and plan.algorithm in _REUSING:
        y = _FORWARD[plan.algorithm](k, x, w, b, p, weight_cache)
    else:
        y = _FORWARD[plan.algorithm](k, x, w, b, p)
    name = plan.algorithm
    if y is None:  # a non-finite value inside the Winograd transforms
        y = _FORWARD[plan.fallback](k, x, w, b, p)
        name += ">" + plan.fallback
    record_algorithm("conv2d", f"numba:{name}")
    return y


def _forward_pointwise(k, x, w, b, p):
    n, (c_out, c_in) = x.shape[0], w.shape[:2]
    y = _pointwise(k.run, w.reshape(c_out, c_in), x.reshape(n, c_in, -1), b, c_out)
    return y.reshape(n, c_out, *p.out_hw)


def _forward_winograd(k, x, w, b, p, cache=None):
    wino = _module("_winograd")
    y = np.empty((x.shape[0], w.shape[0], *p.out_hw), x.dtype)
    return y if _winograd_forward(wino, k.run, x, w, b, y, *p.padding, cache=cache) else None


def _forward_plane(k, x, w, b, p, cache=None):
    plane = _module("_plane")
    y = np.empty((x.shape[0], w.shape[0], *p.out_hw), x.dtype)
    return _plane_forward(plane, k.run, x, w, b, y, *p.padding, *p.dilation, cache=cache)


def _forward_direct(k, x, w, b, p):
    """The direct forward straight from NCHW x: each task pads its own input rows (no pass
    over x beforehand)."""
    direct = k.direct
    c_out = w.shape[0]
    y = np.empty((x.shape[0], c_out, *p.out_hw), x.dtype)
    _, unit = _direct_forward_kernel(direct, x.dtype)
    kernel = _direct_nchw_kernel(direct, x.dtype)
    cp = round_up(c_out, unit)
    bias = _plan.padded_vector(b, cp, x.dtype)
    k.run(kernel, x, _plan.weight_krc(w, cp), bias, y.reshape(-1), _nchw_strides(y), c_out,
          *p.out_hw, *p.stride, p.dilation[0], *p.padding)
    return y


def _direct_nchw_kernel(direct, dtype):
    """The direct forward from NCHW input (``conv_forward_direct*_nchw``) for this CPU."""
    if _wide():
        return direct.conv_forward_direct_nchw
    return direct.conv_forward_direct_vec32_nchw if dtype == np.float32 else \
        direct.conv_forward_direct_vec64_nchw


def _forward_generic(k, x, w, b, p):
    y = np.empty((x.shape[0], w.shape[0], *p.out_hw), x.dtype)
    bias = np.zeros(w.shape[0], x.dtype) if b is None else b
    k.run(k.conv.conv_forward_generic, _padded_input(k, x, p), _plan.weight_gkkio(w, p.groups),
          bias, y, *p.stride, *p.dilation)
    return y


def _c16_scratch(x_shape, w_shape, p, p_cols, kwb):
    """(Hp, WX, WT): the scratch planes of ``_small`` (its module docstring)."""
    h, w_ = x_shape[2:]
    kh, kw = w_shape[2:]
    ho, wo = p.out_hw
    (dil_h, dil_w), (pt, pl) = p.dilation, p.padding
    hp = max(ho + dil_h * (kh - 1), pt + h)
    reach = dil_w * (kw - 1)
    wx = max(max(wo, p_cols) + reach, wo + dil_w * (round_up(kw, kwb) - 1), pl + w_)
    wt = max(w_, p_cols) + reach
    return hp, wx, wt


def _forward_c16(k, x, w, b, p):
    from . import _small as small

    c_out, c_in, kh, kw = w.shape
    y = np.empty((x.shape[0], c_out, *p.out_hw), x.dtype)
    wf = np.zeros((c_in, kh, kw, small.C16), x.dtype)
    wf[..., :c_out] = w.transpose(1, 2, 3, 0)
    vw = 16 if _wide() else 8
    fwd_cols, _, _, taps = small.BLOCKS[vw]
    hp, wx, _ = _c16_scratch(x.shape, w.shape, p, fwd_cols, taps)
    return k.run(small.KERNELS[vw][0], x, wf, _plan.padded_vector(b, small.C16, x.dtype), y,
                 *p.padding, *p.dilation, hp, wx)


_FORWARD = {
    "pointwise-gemm": _forward_pointwise,
    "winograd-f2x2": _forward_winograd,
    "plane": _forward_plane,
    "c16": _forward_c16,
    "direct-nhwc-c64": _forward_direct,
    "direct-nhwc-v256": _forward_direct,
    "generic": _forward_generic,
}
#: The forwards that take a ``cache`` for their prepared weight.
_REUSING = frozenset({"winograd-f2x2", "plane"})


# ------------------------------------------------------------------------------ backward


def conv2d_backward(dy, x, w, p, needs):
    """(dx, dw, db) of conv2d, ``None`` for the gradients not in ``needs``."""
    k = _kernels()
    wide = _wide()
    plan = _plan.numba_backward(p, x, w.shape[0], needs, wide)
    grads, name = _plan.execute_backward(
        "numba", plan, lambda pl: _BACKWARD[pl.family](k, pl, dy, x, w, p),
        lambda missing: _plan.numba_backward(p, x, w.shape[0], missing, wide, exact_only=True),
        needs)
    record_algorithm("conv2d_backward", name)
    return grads


def _backward_pointwise(k, plan, dy, x, w, p):
    """dx[n] = w.T @ dy[n]; dw.T = sum over n of x[n] @ dy[n].T, in fixed image chunks added
    in order."""
    from . import _gemm as gemm

    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    hw = dy.shape[2] * dy.shape[3]
    grads = {}
    if plan["input"]:
        dx = _pointwise(k.run, w.reshape(c_out, c_in).T, dy.reshape(n, c_out, hw), None, c_in)
        grads["input"] = dx.reshape(x.shape)
    if plan["weight"]:
        dyt = k.run(gemm.transpose, dy.reshape(n, c_out, hw), np.empty((n, hw, c_out), dy.dtype))
        part = np.empty((chunks(n), c_in, c_out), x.dtype)
        k.run(gemm.sum_kernel(), x.reshape(n, c_in, hw), dyt, part)
        grads["weight"] = np.ascontiguousarray(sum_chunks(part).T).reshape(w.shape)
    if plan["bias"]:
        grads["bias"] = _bias_sums(k, dy)
    return grads


def _backward_winograd(k, plan, dy, x, w, p):
    """{grad: value, or None where the transforms met a non-finite value}; db is summed by
    whichever pass lays dy out first (else by plane sums)."""
    from . import _winograd as wino

    run = k.run
    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    ho, wo = p.out_hw
    pt, pl = p.padding
    grads = {}
    cp = round_up(c_out, wino.CB)
    dyq = None  # dy padded by 2 - padding: the input of the dx pass, reused by the dw pass
    db = [] if plan["bias"] else None
    if plan["input"]:
        # dx = dy correlated with the flipped kernel, channels swapped, padded by 2 - padding
        dx = np.empty_like(x)
        dyq = _winograd_input(wino, run, dy, x.shape[2:], 2 - pt, 2 - pl, db)
        ok = _winograd_forward(wino, run, dy, _plan.flipped_weight(w), None, dx, 2 - pt,
                               2 - pl, dyq)
        grads["input"] = dx if ok else None
    if plan["weight"]:
        if dyq is not None and c_out == cp:
            dq, dr, ds = dyq, 2 - pt, 2 - pl
        else:
            th, tw = -(-ho // 2), -(-wo // 2)
            unsummed = db is not None and not db  # bias wanted, and no dx pass summed dy
            dq = _pad_split(wino, run, dy, np.empty((n, 2 * th, 2, tw, cp), dy.dtype), 0, 0,
                            db if unsummed else None)
            dr = ds = 0
        xq = _winograd_input(wino, run, x, (ho, wo), pt, pl)
        part = np.empty((chunks(n * -(-ho // 2)), 16, c_in, cp), x.dtype)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite: checked just below
            du = sum_chunks(run(wino.conv_grad_weight_winograd, xq, dq, dr, ds, part,
                                not _wide()))
        grads["weight"] = wino.weight_from_transformed(du, c_out) if np.isfinite(du).all() \
            else None
    if plan["bias"]:
        grads["bias"] = db[0] if db else _bias_sums(k, dy)
    return grads


def _backward_fused(k, plan, dy, x, w, p):
    """All wanted gradients of a stride-1 first layer in one pass over dy."""
    from . import _plane as plane

    n, c_in, h, _ = x.shape
    c_out, _, kh, kw = w.shape
    ho, wo = p.out_hw
    (dil_h, dil_w), (pt, pl) = p.dilation, p.padding
    ry, rx = dil_h * (kh - 1), dil_w * (kw - 1)
    if x.dtype == np.float32:
        kernel, lanes = plane.conv_backward_plane_fused, plane.FUSED_LANES
    else:
        kernel, lanes = plane.conv_backward_plane_fused64, plane.FUSED_LANES64
    wd = wo + 2 * rx
    reach = round_up(h * wd, lanes) + pt * wd + pl + ry * wd + rx  # furthest dx read + 1
    hd = max(-(-reach // wd) + 1, ry + ho)  # dx's reads, and dy's own rows (padding > reach)
    hq = ho + 2 * ry + 1
    want = np.array([bool(plan[g]) for g in _plan.GRADS])
    dx = np.empty(x.shape if want[0] else (0, 0, 0, 0), x.dtype)
    pdw = np.empty((chunks(n), c_out, c_in, kh, kw), x.dtype)
    pdb = np.empty((chunks(n), c_out), x.dtype)
    k.run(kernel, x, dy, _plan.flipped_weight(w), dx, pdw, pdb, pt, pl, dil_h, dil_w, hd, wd, hq,
          want)
    return {"input": dx if want[0] else None,
            "weight": sum_chunks(pdw) if want[1] else None,
            "bias": sum_chunks(pdb) if want[2] else None}


def _backward_c16(k, plan, dy, x, w, p):
    """All wanted gradients of a stride-1 layer with 9-16 output channels in one region
    (``_small.conv_backward_c16``)."""
    from . import _small as small

    n, c_in = x.shape[:2]
    c_out, _, kh, kw = w.shape
    vw = 16 if _wide() else 8
    _, dx_cols, dx_channels, taps = small.BLOCKS[vw]
    cip = round_up(c_in, dx_channels)
    kwp = round_up(kw, taps)
    wx = np.zeros((kh, kw, cip, small.C16), x.dtype)
    wx[:, :, :c_in, :c_out] = w.transpose(2, 3, 1, 0)
    hp, wxs, wt = _c16_scratch(x.shape, w.shape, p, dx_cols, taps)
    want = np.array([bool(plan[g]) for g in _plan.GRADS])
    dx = np.empty(x.shape if want[0] else (0, 0, 0, 0), x.dtype)
    pdw = np.empty((chunks(n), c_in, kh, kwp, small.C16), x.dtype)
    pdb = np.empty((chunks(n), small.C16), x.dtype)
    k.run(small.KERNELS[vw][1], x, dy, wx, dx, pdw, pdb, *p.padding, *p.dilation, hp, wxs,
          wt, want)
    dw = sum_chunks(pdw)[:, :, :kw, :c_out].transpose(3, 0, 1, 2) if want[1] else None
    return {"input": dx if want[0] else None,
            "weight": np.ascontiguousarray(dw) if want[1] else None,
            "bias": sum_chunks(pdb)[:c_out].copy() if want[2] else None}


def _grad_input_plane(k, dy, w, x_shape, p, sums=None):
    """dx (stride 1) as the plane forward of dy padded by dilation*(k-1) - padding with the
    flipped, transposed weight. With ``sums`` (a list), also appends db, summed while dy is
    laid out."""
    from . import _plane as plane

    kh, kw = w.shape[2:]
    (dil_h, dil_w), (pt, pl) = p.dilation, p.padding
    dx = np.empty(x_shape, dy.dtype)
    wrap = pl == 0 and p.pad_bottom_right()[1] == 0  # the rows tile a pitch of W exactly
    return _plane_forward(plane, k.run, dy, _plan.flipped_weight(w), None, dx,
                          dil_h * (kh - 1) - pt, dil_w * (kw - 1) - pl, dil_h, dil_w, wrap, sums)


def _grad_input_generic(k, dy, w, x, p):
    """dx by the generic kernel: dy in NHWC scattered through the (G, kH, kW, C_in/G, C_out/G)
    weight into padded dx, then cropped."""
    n = x.shape[0]
    dxp = np.zeros((n, *_plan.padded_hw(p), x.shape[1]), x.dtype)  # all C_in
    k.run(k.conv.conv_grad_input_generic, _nhwc(k, dy), _plan.weight_gkkio(w, p.groups), dxp,
          *p.stride, *p.dilation)
    return k.run(k.conv.crop_nhwc_to_nchw, dxp, np.empty_like(x), *p.padding)


def _grad_input_phases(k, dy, w, x_shape, p):
    """dx through the direct forward kernel, one call per stride phase of
    ``_plan.grad_input_phases``, each writing straight into its rows and columns of dx."""
    n, c_in, h, w_ = x_shape
    c_out = w.shape[0]
    split = _plan.grad_input_phases(x_shape, w.shape, p)
    dx = (np.empty if split.covered else np.zeros)(x_shape, dy.dtype)
    if not split.live:
        return dx  # no tap reaches any row and column: dx is zeros
    kernel, unit = _direct_forward_kernel(k.direct, dy.dtype)
    cp = round_up(c_in, unit)
    zeros = np.zeros(cp, dy.dtype)
    (sh, sw), (ph, pw) = p.stride, p.padding
    dyp = k.run(k.conv.pad_nhwc, dy, np.empty((n, split.hp, split.wp, c_out), dy.dtype),
                split.top, split.left)
    dyp2 = dyp.reshape(n, split.hp, -1)
    for a, b in split.live:
        wk = _plan.weight_krc(_plan.phase_weight(w, a, b).transpose(1, 0, 2, 3), cp)
        base = (sh * a.first + a.residue - ph) * w_ + (sw * b.first + b.residue - pw)
        ys = np.array([base, c_in * h * w_, h * w_, sh * w_, sw], np.int64)
        x0 = ((split.top - a.top) * split.wp + (split.left - b.top)) * c_out
        k.run(kernel, dyp2, wk, zeros, dx.reshape(-1), ys, c_in, a.count, b.count, c_out, 1, 1,
              a.step, x0)
    return dx


def _grad_weight_generic(k, dy, x, w, p, with_bias=False):
    """dw (and db) by the generic kernel: it visits only the real output positions, so a NaN or
    inf in x reaches exactly the weights PyTorch's would."""
    wr = _plan.weight_gkkio(w, p.groups)
    part = np.zeros((chunks(x.shape[0]), *wr.shape), x.dtype)
    partb = np.zeros((chunks(x.shape[0]), w.shape[0]), x.dtype)
    k.run(k.conv.conv_grad_weight_generic, _padded_input(k, x, p), _nhwc(k, dy), part, partb,
          *p.stride, *p.dilation)
    dw = np.ascontiguousarray(sum_chunks(part).transpose(0, 4, 3, 1, 2)).reshape(w.shape)
    return (dw, sum_chunks(partb)) if with_bias else dw


def _grad_weight_plane(k, dy, x, w, p):
    """dw by dot products over whole padded planes, in fixed image chunks summed serially."""
    from . import _plane as plane

    n, c_in = x.shape[:2]
    c_out, _, kh, kw = w.shape
    ho, wo = p.out_hw
    (dil_h, dil_w), (pt, pl) = p.dilation, p.padding
    xp = _plane_input(plane, k.run, x, pt, pl, ho, wo, kh, kw, dil_h, dil_w)
    wp = xp.shape[3]
    dyq = k.run(plane.pad_plane, dy, np.empty((n, c_out, ho, wp), dy.dtype), 0, 0,
                np.empty(0, dy.dtype))
    part = np.empty((chunks(n), c_out, c_in, kh, kw), x.dtype)
    k.run(plane.conv_grad_weight_plane, xp, dyq.reshape(n, c_out, ho * wp), part, dil_h, dil_w)
    return sum_chunks(part)


def _grad_weight_c16(k, dy, x, w, p):
    """dw of a stride-1 float32 layer with C_out <= 16 and unit column dilation: the
    16-channel register blocks of ``_direct.conv_grad_weight_c16`` (with 256-bit vectors:
    :func:`_grad_weight_direct_vec`, whose blocks are 16 channels wide anyway)."""
    direct = k.direct
    if not _wide():
        return _grad_weight_direct_vec(k, dy, x, w, p)
    n, c_in = x.shape[:2]
    c_out = dy.shape[1]
    (kh, kw), (ho, wo), dil_h = p.kernel_hw, p.out_hw, p.dilation[0]
    hp, wp = ho + dil_h * (kh - 1), wo + kw - 1
    xbase = _plan.run_offsets(n, ho, wo, hp, wp, c_in, 1, 1)
    r = kw * c_in
    size = n * hp * wp * c_in
    flat = np.zeros(size + direct.RUN16, x.dtype)  # spare zeros for the padded run rows
    k.run(k.conv.pad_nhwc, x, flat[:size].reshape(n, hp, wp, c_in), *p.padding)
    dy4 = k.run(direct.nchw_to_nhwc_padded, dy, np.empty((n, ho, wo, 64), dy.dtype), direct.C16)
    part = np.empty((chunks(n * ho * wo), kh, round_up(r, direct.RUN16), direct.C16), x.dtype)
    k.run(direct.conv_grad_weight_c16, flat, wp * c_in, hp, xbase, dy4.reshape(-1, 64), part, dil_h)
    dwk = sum_chunks(part)[:, :r, :c_out]
    return np.ascontiguousarray(dwk.reshape(kh, kw, c_in, c_out).transpose(3, 2, 0, 1))


def _grad_weight_direct_vec(k, dy, x, w, p):
    """dw (groups 1, unit column dilation) by the 256-bit vector blocks of
    ``conv_grad_weight_direct_vec*``: dy in blocks of 16 (float64: 8) channels, partial sums
    over fixed pixel chunks added in order."""
    from . import _simd as simd

    direct = k.direct
    n, c_in = x.shape[:2]
    c_out, (kh, kw), (ho, wo) = dy.shape[1], p.kernel_hw, p.out_hw
    lanes = simd.LANES[x.dtype]
    unit = direct.VNV * lanes
    cp = round_up(c_out, unit)
    dyb = k.run(direct.nchw_to_channel_blocks, dy,
                np.empty((cp // unit, n, ho, wo, unit), dy.dtype))
    xp = _padded_input(k, x, p)
    hp, wp = xp.shape[1], xp.shape[2]
    xbase = _plan.run_offsets(n, ho, wo, hp, wp, c_in, *p.stride)
    part = np.empty((chunks(n * ho * wo), kh, kw * c_in, cp), x.dtype)
    kernel = direct.conv_grad_weight_direct_vec32 if lanes == 8 else \
        direct.conv_grad_weight_direct_vec64
    k.run(kernel, xp.reshape(n, hp, -1), dyb.reshape(cp // unit, -1, unit), xbase, part, c_in,
          p.dilation[0])
    dwk = sum_chunks(part)
    return np.ascontiguousarray(dwk.reshape(kh, kw, c_in, cp)[..., :c_out].transpose(3, 2, 0, 1))


def _grad_weight_nchw(k, dy, x, p):
    """dw (groups 1, unit column dilation) by the register blocks of
    ``conv_grad_weight_direct_*nchw`` (AVX-512 float32: 6 x 64; else 256-bit vectors: 6 x 16,
    float64 6 x 8),
    straight from NCHW x and dy: partial sums over fixed chunks of output rows, added in order."""
    direct = k.direct
    n, c_in = x.shape[:2]
    c_out, (kh, kw), (ho, wo) = dy.shape[1], p.kernel_hw, p.out_hw
    f32 = x.dtype == np.float32
    if _wide() and f32:
        kernel, unit = direct.conv_grad_weight_direct_nchw, direct.CB
    else:  # float64 takes the 256-bit blocks on every CPU
        kernel = direct.conv_grad_weight_direct_vec32_nchw if f32 else \
            direct.conv_grad_weight_direct_vec64_nchw
        unit = direct.VNV * k.simd.LANES[x.dtype]
    cp = round_up(c_out, unit)
    r = kw * c_in
    part = np.empty((chunks(n * ho), kh, round_up(r, kernel.rbk), cp), x.dtype)
    k.run(kernel, x, dy, part, kw, *p.stride, p.dilation[0], *p.padding,
          direct._weight_sub_rows(wo))
    dwk = sum_chunks(part[:, :, :r])
    return np.ascontiguousarray(dwk.reshape(kh, kw, c_in, cp)[..., :c_out].transpose(3, 2, 0, 1))


def _backward_exact(k, plan, dy, x, w, p):
    """The plane, direct and generic families: each gradient by its planned algorithm."""
    if plan.family == "generic":
        grads = {}
        if plan["input"]:
            grads["input"] = _grad_input_generic(k, dy, w, x, p)
        if plan["weight"] or plan["bias"]:
            dw, db = _grad_weight_generic(k, dy, x, w, p, True)
            grads.update(weight=dw if plan["weight"] else None, bias=db if plan["bias"] else None)
        return grads
    grads = {}
    db_sums = [] if plan["bias"] and plan.family == "plane" else None
    algo = plan["input"]
    if algo == "plane":
        grads["input"] = _grad_input_plane(k, dy, w, x.shape, p, db_sums)
    elif algo == "direct-phases":
        grads["input"] = _grad_input_phases(k, dy, w, x.shape, p)
    elif algo == "generic":
        grads["input"] = _grad_input_generic(k, dy, w, x, p)
    algo = plan["weight"]
    if algo in ("direct-c64", "direct-v256"):
        grads["weight"] = _grad_weight_nchw(k, dy, x, p)
    elif algo:
        grads["weight"] = _WEIGHT[algo](k, dy, x, w, p)
    if plan["bias"] and grads.get("bias") is None:
        if db_sums:
            grads["bias"] = db_sums[0]
        else:
            grads["bias"] = _bias_sums(k, dy)
    return grads


_WEIGHT = {"generic": _grad_weight_generic, "direct-c16": _grad_weight_c16,
           "plane": _grad_weight_plane}
_BACKWARD = {
    "pointwise-gemm": _backward_pointwise,
    "winograd-f2x2": _backward_winograd,
    "plane-fused": _backward_fused,
    "c16-fused": _backward_c16,
    "plane": _backward_exact,
    "direct": _backward_exact,
    "generic": _backward_exact,
}


# ------------------------------------------------------------------------------ pool


def max_pool2d(x, p):
    """(y, idx) of max_pool2d with PyTorch's indices; see ``fastconv.max_pool2d``."""
    k = _small_kernels() if x.size < _plan.SMALL_POOL_ELEMENTS else _kernels()
    pool = k.pool
    n, c, h, w = x.shape
    ho, wo = p.out_hw
    y = np.empty((n, c, ho, wo), x.dtype)
    idx = np.empty((n, c, ho, wo), np.int64)
    if (p.kernel_hw == (2, 2) and p.stride == (2, 2) and p.padding == (0, 0)
            and p.dilation == (1, 1) and 2 * ho <= h and 2 * wo <= w):
        k.run(pool.max_pool_forward_k2s2, x, y, idx)
        record_algorithm("max_pool2d", "numba:k2s2")
    else:
        (kh, kw), (sh, sw), (ph, pw), (dil_h, dil_w) = p.kernel_hw, p.stride, p.padding, p.dilation
        h0, hn = _pool_taps(h, ho, kh, sh, ph, dil_h)
        w0, wn = _pool_taps(w, wo, kw, sw, pw, dil_w)
        if sw == 2 and h * w < 2**31 - 4 * (w + kw * dil_w + pw) - 64:  # int32 indices
            wv = -(-wo // pool.VB) * pool.VB
            hp = max(wv + dil_w * (kw - 1) // 2 + 1, (w + pw) // 2 + 2)
            k.run(pool.max_pool_forward_s2, x, y, idx, h0, hn, w0, kw, pw, dil_h, dil_w, hp)
            record_algorithm("max_pool2d", "numba:parity-s2")
        else:
            k.run(pool.max_pool_forward, x, y, idx, h0, hn, w0, wn, dil_h, dil_w)
            record_algorithm("max_pool2d", "numba:generic")
    return y, idx


def _pool_taps(size, out, k, s, pad, d):
    """First in-bounds tap and tap count of each window along one axis, as PyTorch clips them:
    start = o*s - pad, end = min(start + d*(k-1) + 1, size), start raised by d while < 0."""
    start = np.arange(out, dtype=np.int64) * s - pad
    end = np.minimum(start + d * (k - 1) + 1, size)
    neg = start < 0
    start[neg] += -(start[neg] // d) * d  # the smallest start + m*d >= 0
    count = np.maximum(0, -(-(end - start) // d))
    return start, count


def max_pool2d_backward(dy, idx, input_shape):
    """dx of max_pool2d: each dy element added at its index in its input plane. The kernel
    range-checks every index (``CHECKS_POOL_INDICES``): a ValueError, and no write, for any
    outside its plane."""
    k = _kernels()
    pool = k.pool
    dx = np.empty(input_shape, dy.dtype)
    bad = np.zeros(dy.shape[0] * dy.shape[1], np.uint8)
    k.run(pool.max_pool_backward, dy, idx, dx, dx.nbytes >= pool.STREAM_MIN_BYTES, bad)
    if bad.any():
        raise pool_index_error(idx, input_shape)
    record_algorithm("max_pool2d_backward", "numba:scatter")
    return dx
