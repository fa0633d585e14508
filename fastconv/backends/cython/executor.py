"""The ``cython`` backend: compiled, OpenMP-parallel CPU kernels that need no Numba.

An executor around the compiled kernels of this package (built at install time by ``setup.py``
from the template ``_kernels.pyx.tp``, one module per instruction-set variant, of which
``_variant.load`` picks the one this CPU runs): ``fastconv.backends._plan`` decides which algorithm runs for
a shape (the rules and the names recorded for ``fastconv.last_algorithm`` are there); this
module lays the arrays out for the chosen kernels (zero-padded NHWC or padded-pitch planes,
weights with the output channels innermost), allocates outputs and runs them. Arguments arrive
validated by ``fastconv._validate`` (the kernels run without bounds checks and trust them).

The kernels, by name:

* ``pointwise-gemm``: one matrix product per image in NCHW as it is (4 output channels x 64
  pixels register blocks).
* ``winograd-f2x2``: 4 tiles x 64 channels register blocks; at most 32 output channels: two
  tiles share a block.
* ``plane``: blocks of consecutive positions of the padded-pitch grid x 8 or 2 output
  channels, vectorized over positions; ``direct-nchw``: 16/10/8 columns x 16 channels read
  from NCHW, no layout copy; ``direct-blocked``: NHWC, 4 x 64 / 8 x 32 / 16 x 16 register
  blocks over the contiguous (kW, C_in) run, each task laying out its own input rows from
  NCHW; ``direct-nhwc``, ``direct-nchw-flat``,
  ``direct-nchw-rows``: the generic kernels (groups, column dilation).
* grad-input: the forward kernels on ``dy`` padded by ``dilation*(k-1) - padding`` with the
  flipped, transposed weights; strided (groups 1): one direct forward per stride phase
  (``direct-phases``), else on the zero-inserted ``dy``.
* ``plane-fused``: one task per fixed chunk of images copies each image's dy once into
  zero-padded planes held in cache, and computes from there dx (as the plane forward), dw (dot
  products over the planes, 3 kernel columns per pass) and db; dw and db as 32-lane partial
  sums per chunk, added in order over the chunks, then the lanes.
* ``c16-fused``: float32, 9-16 output channels, 5-16 input channels, stride 1: per chunk of
  images, each image's dy transposed once (channels innermost), then dx (7 or 5 columns x 2
  input channels, reduced over the output channels) and dw (5 taps x 16 channels), as the
  numba backend's ``c16`` kernels.
* grad-weight: ``direct-blocked`` (6 run rows x 64 channels, or 24/12 x 16 for at most 16
  output channels), ``flat-blocked`` (4 channels x 4 taps x 16 lanes over the padded-pitch
  grid), else ``gemm-nhwc``; the bias: ``sum``.
* max-pool: one task per (n, c) plane (2x2 stride 2 in vectorized blocks of 8 outputs);
  indices exactly as PyTorch's. Backward: a scatter-add per plane.

Every kernel's result is independent of the thread count (each task owns its output; partial
sums are over fixed chunks added in a fixed order).
"""

from __future__ import annotations

import os

import numpy as np

from ..._dispatch import record_algorithm
from ..._validate import pool_index_error
from .. import _plan
from .._openmp import forked_from_gnu_openmp_parent  # (sets OMP_WAIT_POLICY first)
from .._plan import chunks, padded_vector, round_up, sum_chunks
from .._winograd_transforms import (HALF, transform_weight, transform_weight_paired,
                                   weight_from_transformed)
from ._variant import VariantError, load as _load_kernels
# The ops fastconv.nn needs (the backend contract: see ``_host_ops``).
from .._host_ops import (COMPILED_ADAM, adam_update, dense, dense_backward,  # noqa: F401
                         dropout, dropout_backward, relu, relu_backward, sgd_update)


def _go_serial():
    global _serial_after_fork
    _serial_after_fork = True


# GNU libgomp's thread pool does not survive fork(): a forked child that enters a parallel
# region after its parent ran one hangs. Such children run the kernels serially (same results):
# forks after this import, and processes imported into after a fork from a parent that had
# libgomp loaded (e.g. by Numba's omp layer) before this module was ever imported.
_serial_after_fork = forked_from_gnu_openmp_parent()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_go_serial)

try:
    _k, VARIANT = _load_kernels()
except ImportError as e:  # not built (no compiler/Cython at install time), broken build, or
    _k, VARIANT = None, None  # FASTCONV_CYTHON_VARIANT names one that cannot run here
    _IMPORT_ERROR = e
else:
    _IMPORT_ERROR = None

#: Whether the compiled extension was built with OpenMP (False when it is missing).
OPENMP: bool = bool(getattr(_k, "OPENMP", False))

#: Layout passes (padding, transposes) and the bias gradient over fewer elements than this
#: run serially.
SERIAL_MAX_ELEMENTS = 1 << 18
#: The scatter kernel range-checks the max-pool indices itself (``fastconv.max_pool2d_backward``
#: then skips its separate single-threaded pass over them).
CHECKS_POOL_INDICES = True

# Block sizes of the compiled kernels that the layouts here depend on (they vary by variant).
_SIZES = _k.BLOCK_SIZES if _k is not None else {}
_PW = _SIZES.get("PW")  # outputs per block of the flat NCHW kernel
_VL = _SIZES.get("VL")  # lanes of the flat grad-weight kernel
_FCB = _SIZES.get("FCB")  # output channels per block of the flat grad-weight kernel
# grad-input lanes of the fused kernel per dtype; lanes of its grad-weight dot products
_FXL = {np.dtype(np.float32): _SIZES.get("FXL32"), np.dtype(np.float64): _SIZES.get("FXL64")}
_FVL = _SIZES.get("FVL")
# taps, columns and input channels per register block of the 16-channel fused backward
_C16KW, _C16P, _C16C = (getattr(_k, "C16_BLOCKS", {}).get(k) for k in ("C16KW", "C16P", "C16C"))
_WCB = _SIZES.get("COB")  # output channels per Winograd register block (the padding unit of Cp)
_WTB = _SIZES.get("WTB")  # tiles per Winograd register block
_WGROUP = _SIZES.get("WGROUP")  # tiles per Winograd grad-weight group


def unavailable_reason() -> str | None:
    """None when the compiled extension imported; else why not and how to fix it."""
    if _k is not None:
        return None
    err = str(_IMPORT_ERROR)
    if isinstance(_IMPORT_ERROR, VariantError):
        return err
    if "No module named" in err or "cannot import name" in err:
        return (
            "extension fastconv.backends.cython._kernels_* not built (no C compiler or Cython "
            "at install time); reinstall with a C compiler and Cython>=3 (pip install -e .)"
        )
    return (
        f"extension fastconv.backends.cython._kernels_* failed to import ({err}); "
        "rebuild it with a C compiler (pip install -e . or python setup.py build_ext --inplace)"
    )


# ------------------------------------------------------------------------------ layouts


def _serial(*arrays) -> bool:
    """Whether a layout pass over ``arrays`` runs serially: after a fork, or when they are
    small (starting and joining a parallel region costs more than copying them, much more when
    the other cores are busy and a worker waits to be scheduled)."""
    return _serial_after_fork or sum(a.size for a in arrays) < SERIAL_MAX_ELEMENTS


def _padded_nhwc(x, top, left, up, hp, wp):
    out = np.empty((x.shape[0], hp, wp, x.shape[1]), x.dtype)
    _k.pad_nhwc(x, out, top, left, *up, serial=_serial(x, out))
    return out


def _padded_flat(x, top, left, up, hp, wp, length):
    out = np.empty((x.shape[0], x.shape[1], length), x.dtype)
    _k.pad_flat(x, out, top, left, *up, hp, wp, serial=_serial(x, out))
    return out


def _scratch_rows() -> int:
    """Rows of the per-thread scratch arrays (one per thread a parallel loop may use)."""
    return 1 if _serial_after_fork else max(1, _k.max_threads())


def _bias_sums(dy):
    db = np.empty(dy.shape[1], dy.dtype)
    _k.conv_grad_bias(dy.reshape(dy.shape[0], dy.shape[1], -1), db, serial=_serial(dy))
    return db


# ------------------------------------------------------------------------------ direct


class _Direct:
    """``y = conv(pad(x), w) + bias`` of an input padded by (top, left) and zero-inserted by
    ``up`` (see :func:`_k.pad_nhwc`), with ``w`` OIHW and x, y NCHW: the geometry every
    direct kernel below shares."""

    __slots__ = ("x", "w", "groups", "out_hw", "top", "left", "up", "stride", "dilation", "wrap",
                 "hp", "wp", "bias", "y_shape")

    def __init__(self, x, w, bias, groups, out_hw, top, left, up, stride, dilation, wrap):
        self.x, self.w, self.groups, self.out_hw = x, w, groups, out_hw
        self.top, self.left, self.up, self.stride, self.dilation = top, left, up, stride, \
            dilation
        self.wrap = wrap
        c_out, _, kh, kw = w.shape
        (sh, sw), (dil_h, dil_w) = stride, dilation
        self.hp = (out_hw[0] - 1) * sh + dil_h * (kh - 1) + 1
        self.wp = (out_hw[1] - 1) * sw + dil_w * (kw - 1) + 1
        self.bias = np.zeros(c_out, x.dtype) if bias is None else bias
        self.y_shape = (x.shape[0], c_out, *out_hw)

    def flat(self, length, wp=None):
        return _padded_flat(self.x, self.top, self.left, self.up, self.hp, wp or self.wp, length)


def _direct(x, w, bias, groups, out_hw, top, left, up, stride, dilation, wrap=False):
    """(y, the kernel's name) of ``y = conv(pad(x), w) + bias`` (see :class:`_Direct`), by the
    kernel ``_plan.cython_direct`` chooses."""
    algo = _plan.cython_direct(groups, w.shape[1], w.shape[0], stride, up, dilation[1])
    return _DIRECT[algo](_Direct(x, w, bias, groups, out_hw, top, left, up, stride, dilation,
                                 wrap)), algo


def _direct_plane(d):
    c_out, c_in_g, kh, kw = d.w.shape
    (dil_h, dil_w), (ho, wo) = d.dilation, d.out_hw
    y = np.empty(d.y_shape, d.x.dtype)
    # ``wrap``: the grid pitch is the output width (no dropped columns): a window running past
    # the end of its row reads the next row's left padding, zeros (the caller checked
    # left >= dil_w*(kW-1) and that the row fits).
    wp = wo if d.wrap else d.wp
    # Slack after the planes: the last block of (at most 208) grid positions reads its taps
    # inside the buffer.
    xf = d.flat(max(d.hp * wp, ho * wp + 256 + dil_h * (kh - 1) * wp + dil_w * (kw - 1)), wp)
    cp = round_up(c_out, 8 if c_out >= 8 else 2)
    wt = np.zeros((c_in_g, kh, kw, cp), d.x.dtype)
    wt[..., :c_out] = d.w.transpose(1, 2, 3, 0)
    _k.conv_fwd_plane(xf, wt, padded_vector(d.bias, cp), y, wp, dil_h, dil_w,
                      serial=_serial_after_fork)
    return y


def _direct_nchw_flat(d):
    c_out, _, kh, kw = d.w.shape
    (dil_h, dil_w), (ho, wo), n = d.dilation, d.out_hw, d.x.shape[0]
    # Outputs on the padded-pitch grid, in blocks of PW; slack so the last block's taps stay
    # inside the buffer.
    lo = round_up(ho * d.wp, _PW)
    xf = d.flat(max(d.hp * d.wp, lo + dil_h * (kh - 1) * d.wp + dil_w * (kw - 1)))
    yf = np.empty((n, c_out, lo), d.x.dtype)
    _k.conv_fwd_flat(xf, d.w, d.bias, yf, d.groups, d.wp, dil_h, dil_w, serial=_serial_after_fork)
    return np.ascontiguousarray(yf[:, :, : ho * d.wp].reshape(n, c_out, ho, d.wp)[..., :wo])


def _direct_nchw(d):
    c_out, c_in_g, kh, kw = d.w.shape
    n = d.x.shape[0]
    y = np.empty(d.y_shape, d.x.dtype)
    if d.top == d.left == 0 and d.hp <= d.x.shape[2] and d.wp <= d.x.shape[3]:
        xn = d.x  # nothing to pad: the windows read x itself
    else:
        xn = d.flat(d.hp * d.wp).reshape(n, c_in_g, d.hp, d.wp)
    wk = np.zeros((kh, c_in_g * kw, 16), d.x.dtype)
    wk[:, :, :c_out] = d.w.transpose(2, 1, 3, 0).reshape(kh, c_in_g * kw, c_out)
    _k.conv_fwd_direct_nchw(xn, wk, padded_vector(d.bias, 16), y, *d.stride, *d.dilation,
                            serial=_serial_after_fork)
    return y


def _gather_scratch(c, kh, dil_h, wl, dtype):
    """Per-thread scratch of :func:`_k.conv_fwd_direct_gather`: (kH-1)*dh + 1 rows of Wl*C."""
    return np.empty((_scratch_rows(), (kh - 1) * dil_h + 1, wl * c), dtype)


def _direct_blocked(d):
    c_out, c_in_g, kh, kw = d.w.shape
    y = np.empty(d.y_shape, d.x.dtype)
    cw = round_up(c_out, 16)
    if d.up == (1, 1):  # straight from NCHW x: each task pads its own rows
        buf = _gather_scratch(c_in_g, kh, d.dilation[0], d.wp, d.x.dtype)
        _k.conv_fwd_direct_gather(d.x, _plan.weight_krc(d.w, cw), padded_vector(d.bias, cw), y,
                                  *d.stride, d.dilation[0], d.top, d.left, buf,
                                  serial=_serial_after_fork)
        return y
    xp = _padded_nhwc(d.x, d.top, d.left, d.up, d.hp, d.wp)
    _k.conv_fwd_direct(xp.reshape(d.x.shape[0], d.hp, d.wp * c_in_g), _plan.weight_krc(d.w, cw),
                       padded_vector(d.bias, cw), y, c_in_g, *d.stride, d.dilation[0],
                       serial=_serial_after_fork)
    return y


def _direct_nchw_rows(d):
    y = np.empty(d.y_shape, d.x.dtype)
    _k.conv_fwd_rows(d.flat(d.hp * d.wp), d.w, d.bias, y, d.groups, d.wp, *d.stride,
                     *d.dilation, serial=_serial_after_fork)
    return y


def _direct_nhwc(d):
    y = np.empty(d.y_shape, d.x.dtype)
    xp = _padded_nhwc(d.x, d.top, d.left, d.up, d.hp, d.wp)
    _k.conv_fwd_nhwc(xp, _plan.weight_gkkio(d.w, d.groups), d.bias, y, *d.stride, *d.dilation,
                     serial=_serial_after_fork)
    return y


_DIRECT = {
    "plane": _direct_plane,
    "direct-nchw-flat": _direct_nchw_flat,
    "direct-nchw": _direct_nchw,
    "direct-blocked": _direct_blocked,
    "direct-nchw-rows": _direct_nchw_rows,
    "direct-nhwc": _direct_nhwc,
}


# ------------------------------------------------------------------------------ forward


def conv2d(x, w, b, p):
    """Forward convolution; see ``fastconv.conv2d``."""
    c_out, c_in = w.shape[:2]
    plan = _plan.cython_forward(p, x.dtype, c_in, c_out)
    name = plan.algorithm
    if name == "pointwise-gemm":
        n = x.shape[0]
        y = _pointwise(w.reshape(c_out, c_in), x.reshape(n, c_in, -1), b, c_out)
        y = y.reshape(n, c_out, *p.out_hw)
    elif name == "winograd-f2x2":
        y = np.empty((x.shape[0], c_out, *p.out_hw), x.dtype)
        if not _winograd_forward(x, w, b, y, *p.padding):  # a non-finite value: exactly
            y, algo = _direct(x, w, b, p.groups, p.out_hw, *p.padding, (1, 1), p.stride,
                              p.dilation)
            name += ">" + algo
    else:
        y, name = _direct(x, w, b, p.groups, p.out_hw, *p.padding, (1, 1), p.stride, p.dilation)
    record_algorithm("conv2d", f"cython:{name}")
    return y


# ------------------------------------------------------------------------------ backward


def conv2d_backward(dy, x, w, p, needs):
    """Gradients ``(dx, dw, db)``; see ``fastconv.conv2d_backward``."""
    plan = _plan.cython_backward(p, x, w.shape[0], needs)
    grads, name = _plan.execute_backward(
        "cython", plan, lambda pl: _BACKWARD.get(pl.family, _backward_exact)(pl, dy, x, w, p),
        lambda missing: _plan.cython_backward(p, x, w.shape[0], missing, exact_only=True),
        needs)
    record_algorithm("conv2d_backward", name)
    return grads


def _backward_fused(plan, dy, x, w, p):
    """All wanted gradients of a first layer in one pass over dy
    (:func:`_k.conv_bwd_plane_fused`; it always computes dx). dw only for a finite x (the
    plan checked)."""
    n, c_in, h, _ = x.shape
    c_out, _, kh, kw = w.shape
    ho, wo = p.out_hw
    (dil_h, dil_w), (pt, pl) = p.dilation, p.padding
    ry, rx = dil_h * (kh - 1), dil_w * (kw - 1)
    wd = wo + 2 * rx
    lanes = _FXL[x.dtype]
    grid = round_up(ho * wd, _FVL)  # dw and db sum over whole FVL blocks of dy's grid
    # Plane lengths: the furthest dx block's furthest tap, and dy's grid (dy lies inside it;
    # with padding past the kernel's reach its rows go below the ones dx reads).
    pd = max(round_up(h * wd, lanes) + (pt + ry) * wd + pl + rx, ry * wd + grid)
    pq = 2 * ry * wd + rx + grid
    rows = _scratch_rows()
    want_dw, want_db = bool(plan["weight"]), bool(plan["bias"])
    dx = np.empty_like(x)
    pdw = np.empty((chunks(n), c_out, c_in, kh, kw, _FVL), x.dtype)
    pdb = np.empty((chunks(n), c_out, _FVL), x.dtype)
    dyp = np.empty((rows, c_out, pd), x.dtype)
    xq = np.empty((rows, c_in, pq) if want_dw else (1, 1, 1), x.dtype)
    _k.conv_bwd_plane_fused(x, dy, _plan.flipped_weight(w), dx, pdw, pdb, dyp, xq, pt, pl, dil_h,
                            dil_w, wd, want_dw, want_db, serial=_serial_after_fork)
    return {"input": dx if plan["input"] else None,
            "weight": sum_chunks(pdw).sum(axis=-1) if want_dw else None,  # then the lanes
            "bias": sum_chunks(pdb).sum(axis=-1) if want_db else None}


def _backward_c16(plan, dy, x, w, p):
    """All wanted gradients of a stride-1 layer with 9-16 output channels in one region
    (:func:`_k.conv_bwd_c16`)."""
    n, c_in, h, w_ = x.shape
    c_out, _, kh, kw = w.shape
    ho, wo = p.out_hw
    (dil_h, dil_w), (pt, pl) = p.dilation, p.padding
    reach = dil_w * (kw - 1)
    cip, kwp = round_up(c_in, _C16C), round_up(kw, _C16KW)
    hp = max(ho + dil_h * (kh - 1), pt + h)
    wx = max(wo + dil_w * (kwp - 1), pl + w_)
    wt = max(w_, _C16P) + reach
    wk = np.zeros((kh, kw, cip, 16), x.dtype)
    wk[:, :, :c_in, :c_out] = w.transpose(2, 3, 1, 0)
    rows = _scratch_rows()
    want_dx, want_dw = bool(plan["input"]), bool(plan["weight"])
    dx = np.empty(x.shape if want_dx else (0, c_in, h, w_), x.dtype)
    pdw = np.empty((chunks(n), c_in, kh, kwp, 16), x.dtype)
    pdb = np.empty((chunks(n), 16), x.dtype)
    xs = np.zeros((rows, c_in * hp * wx if want_dw else 1), x.dtype)
    dyt = np.zeros((rows, ho * wt * 16), x.dtype)
    _k.conv_bwd_c16(x, dy, wk, dx, pdw, pdb, xs, dyt, pt, pl, dil_h, dil_w, hp, wx, wt, want_dx,
                    want_dw, serial=_serial_after_fork)
    dw = sum_chunks(pdw)[:, :, :kw, :c_out].transpose(3, 0, 1, 2) if want_dw else None
    return {"input": dx if want_dx else None,
            "weight": np.ascontiguousarray(dw) if want_dw else None,
            "bias": sum_chunks(pdb)[:c_out].copy() if plan["bias"] else None}


def _backward_exact(plan, dy, x, w, p):
    """Gradients by the kernels that sum exactly the products of the definition."""
    grads = {}
    c_out, c_in_g, kh, kw = w.shape
    g = p.groups
    (sh, sw), (dil_h, dil_w) = p.stride, p.dilation
    if plan["input"] == "direct-phases":
        grads["input"] = _grad_input_phases(dy, w, p)
    elif plan["input"]:
        # dx = conv(zero-insert(dy, stride), flip(w)^T), stride 1, same dilation.
        wf = w[:, :, ::-1, ::-1].reshape(g, c_out // g, c_in_g, kh, kw)
        wf = np.ascontiguousarray(wf.transpose(0, 2, 1, 3, 4)).reshape(g * c_in_g, c_out // g,
                                                                       kh, kw)
        top = dil_h * (kh - 1) - p.padding[0]
        left = dil_w * (kw - 1) - p.padding[1]
        # No column padding in the forward: dy's rows and their left padding tile a pitch of
        # W exactly (the plane kernel then computes no dropped columns).
        wrap = p.stride == (1, 1) and p.padding[1] == 0 and p.pad_bottom_right()[1] == 0
        grads["input"] = _DIRECT[plan["input"]](_Direct(dy, wf, None, g, p.in_hw, top, left,
                                                        (sh, sw), (1, 1), p.dilation, wrap))
    if plan["weight"]:
        grads["weight"] = _WEIGHT[plan["weight"]](dy, x, w, p)
    if plan["bias"]:
        grads["bias"] = _bias_sums(dy)
    return grads


def _grad_weight_flat(dy, x, w, p):
    """dw (stride 1, few input channels) by :func:`_k.conv_grad_weight_flat`: 4 channels x 4
    taps x 16 lanes over the padded-pitch grid (finite x only: it also multiplies x by the
    zero dy of the grid's dropped columns)."""
    g = p.groups
    c_out, _, kh, kw = w.shape
    (dil_h, dil_w), (ho, wo) = p.dilation, p.out_hw
    hp, wp = ho + dil_h * (kh - 1), wo + dil_w * (kw - 1)
    lo = round_up(ho * wp, _VL)
    xf = _padded_flat(x, *p.padding, (1, 1), hp, wp, lo + dil_h * (kh - 1) * wp + dil_w * (kw - 1))
    # zero channels after the last group's: its last block of _FCB channels reads them
    cog = c_out // g
    dyf = np.empty((dy.shape[0], (g - 1) * cog + round_up(cog, _FCB), lo), dy.dtype)
    _k.pad_flat(dy, dyf, 0, 0, 1, 1, ho, wp, serial=_serial(dy, dyf))
    dw = np.empty(w.shape, x.dtype)
    _k.conv_grad_weight_flat(xf, dyf, dw, g, wp, dil_h, dil_w, serial=_serial_after_fork)
    return dw


def _grad_weight_gemm(dy, x, w, p):
    """dw by :func:`_k.conv_grad_weight` over x and dy in NHWC (any groups and dilation)."""
    c_out, c_in_g, kh, kw = w.shape
    xp = _padded_nhwc(x, *p.padding, (1, 1), *_plan.padded_hw(p))
    dyn = _padded_nhwc(dy, 0, 0, (1, 1), *p.out_hw)
    dwt = np.empty((p.groups, kh, kw, c_in_g, c_out // p.groups), x.dtype)
    _k.conv_grad_weight(xp, dyn, dwt, *p.stride, *p.dilation, serial=_serial_after_fork)
    return np.ascontiguousarray(dwt.transpose(0, 4, 3, 1, 2)).reshape(w.shape)


def _grad_input_phases(dy, w, p):
    """dx of a strided convolution (groups 1) as one :func:`_k.conv_fwd_direct` call per
    stride phase of ``_plan.grad_input_phases``, each writing straight into its rows and
    columns of dx (a strided view), all reading one padded copy of dy."""
    n, c_out = dy.shape[:2]
    c_in = w.shape[1]
    split = _plan.grad_input_phases((n, c_in, *p.in_hw), w.shape, p)
    dx = (np.empty if split.covered else np.zeros)((n, c_in, *p.in_hw), dy.dtype)
    if not split.live:
        return dx
    dyp = _padded_nhwc(dy, split.top, split.left, (1, 1), split.hp, split.wp)
    dyp = dyp.reshape(n, split.hp, split.wp * c_out)
    cw = round_up(c_in, 16)
    zeros = np.zeros(cw, dy.dtype)
    (sh, sw), (ph, pw) = p.stride, p.padding
    for a, b in split.live:
        i0, j0 = sh * a.first + a.residue - ph, sw * b.first + b.residue - pw
        view = dx[:, :, i0: i0 + sh * (a.count - 1) + 1: sh, j0: j0 + sw * (b.count - 1) + 1: sw]
        wk = _plan.weight_krc(_plan.phase_weight(w, a, b).transpose(1, 0, 2, 3), cw)
        _k.conv_fwd_direct(dyp, wk, zeros, view, c_out, 1, 1, a.step, split.top - a.top,
                           (split.left - b.top) * c_out, serial=_serial_after_fork)
    return dx


def _grad_weight_direct(dy, x, w, p):
    """dw (groups 1, unit column dilation) through :func:`_k.conv_grad_weight_direct`: partial
    sums over fixed pixel chunks, added in order (thread-count independent)."""
    n, c_in = x.shape[:2]
    c_out, _, kh, kw = w.shape
    ho, wo = p.out_hw
    (sh, sw), dil_h = p.stride, p.dilation[0]
    hp, wp = _plan.padded_hw(p)
    xp = _padded_nhwc(x, *p.padding, (1, 1), hp, wp)
    cp = 16 if c_out <= 16 else round_up(c_out, 64)
    dyt = np.empty((n, ho, wo, cp), dy.dtype)
    _k.pad_nhwc(dy, dyt, 0, 0, 1, 1, serial=_serial(dy, dyt))
    xbase = _plan.run_offsets(n, ho, wo, hp, wp, c_in, sh, sw)
    m = n * ho * wo
    part = np.empty((chunks(m), kh, kw * c_in, cp), x.dtype)
    _k.conv_grad_weight_direct(xp.reshape(-1), dyt.reshape(m, cp), xbase, part, wp * c_in, dil_h,
                               serial=_serial_after_fork)
    return np.ascontiguousarray(
        sum_chunks(part).reshape(kh, kw, c_in, cp)[..., :c_out].transpose(3, 2, 0, 1))


_WEIGHT = {"flat-blocked": _grad_weight_flat, "direct-blocked": _grad_weight_direct,
           "gemm-nhwc": _grad_weight_gemm}


# ------------------------------------------------------------------------------ Winograd


def _winograd_input(x, out_hw, pt, pl):
    """x (N, C, H, W) laid out for the Winograd kernels (:func:`_k.pad_split`): padded by
    (pt, pl) at the top and left, to 2*TH + 2 rows and 2*TW + 2 columns for the TH x TW tiles
    of an output of ``out_hw``."""
    n, c = x.shape[:2]
    th, tw = -(-out_hw[0] // 2), -(-out_hw[1] // 2)
    xq = np.empty((n, 2 * th + 2, 2, tw + 1, c), x.dtype)
    _k.pad_split(x, xq.reshape(-1), 2 * th + 2, tw + 1, c, pt, pl, serial=_serial(x, xq))
    return xq


def _winograd_forward(x, w, b, y, pt, pl, xq=None):
    """y = conv(x, w) + b (3x3, stride 1, padding (pt, pl)) by Winograd F(2x2, 3x3), from x or
    its :func:`_winograd_input` layout ``xq``. False if an input, weight or transformed output
    was not finite: y is then to be recomputed exactly."""
    c_out = w.shape[0]
    if xq is None:
        xq = _winograd_input(x, y.shape[2:], pt, pl)
    n, hp, _, wq, c = xq.shape
    tw = wq - 1
    paired = c_out <= HALF and tw >= 2 * _WTB
    cp = round_up(c_out, _WCB)
    u = transform_weight_paired(w) if paired else transform_weight(w, cp)
    cp, cm = (64, HALF) if paired else (cp, cp)
    bias = np.zeros(c_out, x.dtype) if b is None else b
    check = np.empty(n * ((hp - 2) // 2), x.dtype)
    rows = _scratch_rows()
    v = np.empty((rows, 16 * tw * c), x.dtype)
    m = np.empty((rows, 16 * tw * cm), x.dtype)
    r = np.empty((rows, 4 * tw * cm), x.dtype)
    _k.conv_fwd_winograd(xq.reshape(-1), u.reshape(-1), bias, y, check, v, m, r, hp, wq, c, cp,
                         paired, serial=_serial_after_fork)
    return not np.isnan(check).any()


def _backward_winograd(plan, dy, x, w, p):
    """{grad: value, or None where the transforms met a non-finite value} by Winograd
    F(2x2, 3x3)."""
    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    ho, wo = p.out_hw
    pt, pl = p.padding
    grads = {}
    cp = round_up(c_out, _WCB)
    dyq = None  # dy padded by 2 - padding: the input of the dx pass, reused by the dw pass
    if plan["input"]:
        # dx = dy correlated with the flipped kernel, channels swapped, padded by 2 - padding
        dx = np.empty_like(x)
        dyq = _winograd_input(dy, x.shape[2:], 2 - pt, 2 - pl)
        ok = _winograd_forward(dy, _plan.flipped_weight(w), None, dx, 2 - pt, 2 - pl, dyq)
        grads["input"] = dx if ok else None
    if plan["weight"]:
        if dyq is not None and c_out == cp:
            dq, dr, ds = dyq, 2 - pt, 2 - pl
        else:
            th, tw = -(-ho // 2), -(-wo // 2)
            dq = np.empty((n, 2 * th, 2, tw, cp), dy.dtype)
            _k.pad_split(dy, dq.reshape(-1), 2 * th, tw, cp, 0, 0, serial=_serial(dy, dq))
            dr = ds = 0
        xq = _winograd_input(x, (ho, wo), pt, pl)
        _, hp, _, wq, _ = xq.shape
        tw = wq - 1
        group = max(1, _WGROUP // tw)
        rows = _scratch_rows()
        part = np.empty((chunks(n * -(-ho // 2)), 16 * c_in * cp), x.dtype)
        v = np.empty((rows, 16 * group * tw * c_in), x.dtype)
        m = np.empty((rows, 16 * group * tw * cp), x.dtype)
        _k.conv_grad_weight_winograd(xq.reshape(-1), dq.reshape(-1), part, v, m, n, hp, wq, c_in,
                                     dq.shape[1], dq.shape[3], cp, dr, ds,
                                     serial=_serial_after_fork)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite: checked just below
            du = sum_chunks(part).reshape(16, c_in, cp)
        grads["weight"] = weight_from_transformed(du, c_out) if np.isfinite(du).all() else None
    if plan["bias"]:
        grads["bias"] = _bias_sums(dy)
    return grads


# ------------------------------------------------------------------------------ 1x1 as GEMM


def _pointwise(w2, a, bias, out_channels):
    """(N, out_channels, H*W) = w2 @ a[n] + bias for every image of a (N, C, H*W)."""
    n, k, hw = a.shape
    bias = np.zeros(out_channels, a.dtype) if bias is None else bias
    out = np.empty((n, out_channels, hw), a.dtype)
    _k.gemm_batched(np.ascontiguousarray(w2), a.reshape(-1), bias, out.reshape(-1), n, k, hw,
                    serial=_serial_after_fork)
    return out


def _backward_pointwise(plan, dy, x, w, p):
    """A 1x1 convolution's gradients as matrix products per image: dx[n] = w.T @ dy[n];
    dw.T = sum over n of x[n] @ dy[n].T, in fixed image chunks added in order."""
    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    ho, wo = dy.shape[2:]
    hw = ho * wo
    grads = {}
    if plan["input"]:
        dx = _pointwise(w.reshape(c_out, c_in).T, dy.reshape(n, c_out, hw), None, c_in)
        grads["input"] = dx.reshape(x.shape)
    if plan["weight"]:
        dyt = np.empty((n, ho, wo, c_out), dy.dtype)
        _k.pad_nhwc(dy, dyt, 0, 0, 1, 1, serial=_serial(dy, dyt))
        part = np.empty((chunks(n), c_in * c_out), x.dtype)
        _k.gemm_sum(x.reshape(-1), dyt.reshape(-1), part, n, c_in, hw, c_out,
                    serial=_serial_after_fork)
        grads["weight"] = np.ascontiguousarray(
            sum_chunks(part).reshape(c_in, c_out).T).reshape(w.shape)
    if plan["bias"]:
        grads["bias"] = _bias_sums(dy)
    return grads


_BACKWARD = {
    "pointwise-gemm": _backward_pointwise,
    "winograd-f2x2": _backward_winograd,
    "plane-fused": _backward_fused,
    "c16-fused": _backward_c16,
}


# ------------------------------------------------------------------------------ pool


def max_pool2d(x, p):
    """Max-pool with int64 indices; see ``fastconv.max_pool2d``."""
    n, c = x.shape[:2]
    y = np.empty((n, c, *p.out_hw), x.dtype)
    idx = np.empty((n, c, *p.out_hw), np.int64)
    path = _k.max_pool_fwd(x, y, idx, *p.kernel_hw, *p.stride, *p.padding, *p.dilation,
                           serial=_serial_after_fork)
    record_algorithm("max_pool2d", "cython:" + path)
    return y, idx


def max_pool2d_backward(dy, idx, input_shape):
    """Scatter-add of ``dy`` at ``idx``; see ``fastconv.max_pool2d_backward``. The kernel
    range-checks every index (``CHECKS_POOL_INDICES``): a ValueError, and no write, for any
    outside its plane."""
    n, c, h, w = input_shape
    dx = np.empty((n * c, h * w), dy.dtype)
    bad = np.zeros(n * c, np.uint8)
    _k.max_pool_bwd(dy, idx, dx, bad, serial=_serial_after_fork)
    if bad.any():
        raise pool_index_error(idx, input_shape)
    record_algorithm("max_pool2d_backward", "cython:scatter")
    return dx.reshape(input_shape)
