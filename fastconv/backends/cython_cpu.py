"""The ``cython`` backend: compiled, OpenMP-parallel CPU kernels that need no Numba.

A thin wrapper around the compiled kernels of ``fastconv.backends.cython`` (built from the
template ``_kernels.pyx.tp`` at install time by ``setup.py``, one module per instruction-set
variant; ``fastconv.backends.cython._variant`` picks the one this CPU runs; ``VARIANT`` names
it). Arguments arrive validated by ``fastconv._validate`` (the kernels run without bounds
checks and trust them); this module only arranges layouts (zero-padded NHWC or padded-pitch
planes, weights with the output channels innermost), allocates outputs and picks an
algorithm (the name recorded for ``fastconv.last_algorithm``):

* ``pointwise-gemm``: float32 1x1 convolutions, stride 1, no padding, groups 1, at least 64
  pixels: one matrix product per image in NCHW as it is (4 output channels x 64 pixels register
  blocks); dx the same with the weight transposed; dw the sum over images of x[n] @ dy[n].T in
  8 fixed image chunks (C_out >= 64, else the kernels below).
* ``winograd-f2x2``: float32 3x3 convolutions, stride and dilation 1, groups 1, C_in >= 16,
  C_out >= 32, W_out >= 7: Winograd F(2x2, 3x3), 2.25x fewer multiplications (4 tiles x 64
  channels register blocks; at most 32 output channels: two tiles share a block). dx is the
  same forward on padded dy with the flipped weight (padding <= 2, W >= 7); dw the transformed
  product summed over 8 fixed chunks of tile rows. Backward recorded as
  ``winograd(input:winograd,weight:winograd)``, with ``+<exact algorithm>`` appended for the
  gradients the kernels below computed: any inf, NaN or overflow inside the transforms is
  detected and that result recomputed exactly (a tile mixes 16 inputs, which would spread a
  non-finite value), as are dx of other paddings or widths.
* forward, groups 1: ``plane`` (stride 1 and one input channel or fewer than
  ``NCHW_MAX_COUT`` output channels: blocks of consecutive positions of the padded-pitch grid x
  8 or 2 output channels, vectorized over positions); ``direct-nchw`` (2 to 7 input channels,
  at most 16 output channels: 16/10/8 columns x 16 channels read from NCHW, no layout copy);
  else ``direct-blocked`` (NHWC, 4 x 64 / 8 x 32 / 16 x 16 register blocks over the contiguous
  (kW, C_in) run, unit column dilation). Groups or column dilation: ``direct-nhwc``,
  ``direct-nchw-flat`` or ``direct-nchw-rows`` (the generic kernels).
* grad-input: the forward kernels on ``dy`` padded by ``dilation*(k-1) - padding`` with the
  flipped, transposed weights; strided (groups 1): one direct forward per stride phase
  (``direct-phases``), else on the zero-inserted ``dy``.
* ``plane-fused(<gradients>)``: the backward of a first layer (stride 1, groups 1, at most
  ``FUSED_MAX_C_IN`` input channels) when dx is wanted: one task per fixed chunk of images
  copies each image's dy once into zero-padded planes held in cache, and computes from there
  dx (as the plane forward), dw (dot products over the planes, 3 kernel columns per pass)
  and db; dw and db as 32-lane partial sums per chunk, added in order over the chunks, then
  the lanes. dw only for a finite x (the dot products also meet the zero padding: 0 * inf),
  else the exact kernels below.
* grad-weight: ``direct-blocked`` (groups 1, unit column dilation: 6 run rows x 64 channels,
  or 24/12 x 16 for at most 16 output channels, over 8 fixed pixel chunks added in order);
  ``flat-blocked`` (stride 1, fewer than 8 input channels: 4 channels x 4 taps x 16 lanes over
  the padded-pitch grid; finite x only); else ``gemm-nhwc``.
* max-pool: one task per (n, c) plane (2x2 stride 2 in vectorized blocks of 8 outputs);
  indices exactly as PyTorch's. Backward: a scatter-add per plane.

Every kernel's result is independent of the thread count (each task owns its output; partial
sums are over fixed chunks added in a fixed order).
"""

from __future__ import annotations

import math
import os

import numpy as np

from .._dispatch import last_algorithm, record_algorithm
from .._validate import pool_index_error
from ._openmp import forked_from_gnu_openmp_parent  # (sets OMP_WAIT_POLICY first)
from ._winograd_transforms import (HALF, transform_weight, transform_weight_paired,
                                   weight_from_transformed)
from .cython._variant import VariantError


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
    from .cython._variant import load as _load_kernels

    _k, VARIANT = _load_kernels()
except ImportError as e:  # not built (no compiler/Cython at install time), broken build, or
    _k, VARIANT = None, None  # FASTCONV_CYTHON_VARIANT names one that cannot run here
    _IMPORT_ERROR = e
else:
    _IMPORT_ERROR = None

#: Whether the compiled extension was built with OpenMP (False when it is missing).
OPENMP: bool = bool(getattr(_k, "OPENMP", False))

#: Output channels per group below which the forward uses the NCHW kernels.
NCHW_MAX_COUT = 16
#: Input channels below which a stride-1, groups-1 forward uses the padded-plane kernel
#: (it also serves every layer with fewer than NCHW_MAX_COUT output channels).
PLANE_MAX_CIN = 2
#: Input channels below which a layer with 16 or fewer output channels reads NCHW directly.
NCHW_DIRECT_MAX_CIN = 8
# Block sizes of the compiled kernels that the layouts here depend on (they vary by variant).
_SIZES = _k.BLOCK_SIZES if _k is not None else {}
_PW = _SIZES.get("PW")  # outputs per block of the flat NCHW kernel
_VL = _SIZES.get("VL")  # lanes of the flat grad-weight kernel
_FCB = _SIZES.get("FCB")  # output channels per block of the flat grad-weight kernel
#: Input channels per group below which a stride-1 grad-weight uses the flat kernel.
FLAT_WEIGHT_MAX_CIN = 8
#: Layout passes (padding, transposes) and the bias gradient over fewer elements than this
#: run serially.
SERIAL_MAX_ELEMENTS = 1 << 18
#: Fixed number of pixel chunks of the direct grad-weight (partial sums added in order).
WEIGHT_CHUNKS = 8
#: The scatter kernel range-checks the max-pool indices itself (``fastconv.max_pool2d_backward``
#: then skips its separate single-threaded pass over them).
CHECKS_POOL_INDICES = True
#: Input channels up to which a stride-1, groups-1 backward that wants dx takes the fused
#: plane kernel (first layers: dy, the largest array there, is read once for dx, dw and db).
FUSED_MAX_C_IN = 4
# grad-input lanes of the fused kernel per dtype; lanes of its grad-weight dot products
_FXL = {np.dtype(np.float32): _SIZES.get("FXL32"), np.dtype(np.float64): _SIZES.get("FXL64")}
_FVL = _SIZES.get("FVL")


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


# ------------------------------------------------------------------------------ helpers


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


def _direct(x, w, bias, groups, out_hw, top, left, up, stride, dilation, wrap=False):
    """``y = conv(pad(x), w) + bias`` with the padding/zero-insertion of :func:`_k.pad_nhwc`.

    ``w`` is OIHW; the input ``x`` is NCHW; returns NCHW (N, C_out, *out_hw) and the name of the
    kernel that ran.
    """
    n = x.shape[0]
    c_out, c_in_g, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    hp = (out_hw[0] - 1) * sh + dh * (kh - 1) + 1
    wp = (out_hw[1] - 1) * sw + dw * (kw - 1) + 1
    if bias is None:
        bias = np.zeros(c_out, x.dtype)
    if groups == 1 and sh == sw == 1 and up == (1, 1) and (c_in_g < PLANE_MAX_CIN
                                                           or c_out < NCHW_MAX_COUT):
        # (A run of several input channels makes the direct kernel faster from 16 output
        # channels on: D forward 0.32 vs 0.42 ms, it computes no dropped grid columns.)
        y = np.empty((n, c_out, *out_hw), x.dtype)
        if wrap:
            # The grid pitch is the output width (no dropped columns): a window running past
            # the end of its row reads the next row's left padding, zeros (the caller checked
            # left >= dw*(kW-1) and that the row fits).
            wp = out_hw[1]
        # Slack after the planes: the last block of (at most 208) grid positions reads its taps
        # inside the buffer.
        xf = _padded_flat(x, top, left, up, hp, wp,
                          max(hp * wp, out_hw[0] * wp + 256 + dh * (kh - 1) * wp + dw * (kw - 1)))
        cp = _round_up(c_out, 8 if c_out >= 8 else 2)
        wt = np.zeros((c_in_g, kh, kw, cp), x.dtype)
        wt[..., :c_out] = w.transpose(1, 2, 3, 0)
        _k.conv_fwd_plane(xf, wt, _padded_vector(bias, cp), y, wp, dh, dw,
                          serial=_serial_after_fork)
        return y, "plane"
    few = c_out // groups < NCHW_MAX_COUT or c_in_g == 1
    if few and sh == sw == 1:
        # Outputs on the padded-pitch grid, in blocks of PW; slack so the last block's taps
        # stay inside the buffer.
        lo = -(-out_hw[0] * wp // _PW) * _PW
        xf = _padded_flat(x, top, left, up, hp, wp,
                          max(hp * wp, lo + dh * (kh - 1) * wp + dw * (kw - 1)))
        yf = np.empty((n, c_out, lo), x.dtype)
        _k.conv_fwd_flat(xf, w, bias, yf, groups, wp, dh, dw, serial=_serial_after_fork)
        y = yf[:, :, : out_hw[0] * wp].reshape(n, c_out, out_hw[0], wp)[..., : out_hw[1]]
        return np.ascontiguousarray(y), "direct-nchw-flat"
    if (groups == 1 and up == (1, 1) and c_out <= 16
            and PLANE_MAX_CIN <= c_in_g < NCHW_DIRECT_MAX_CIN):
        y = np.empty((n, c_out, *out_hw), x.dtype)
        if top == left == 0 and hp <= x.shape[2] and wp <= x.shape[3]:
            xn = x  # nothing to pad: the windows read x itself
        else:
            xn = _padded_flat(x, top, left, up, hp, wp, hp * wp).reshape(n, c_in_g, hp, wp)
        wk = np.zeros((kh, c_in_g * kw, 16), x.dtype)
        wk[:, :, :c_out] = w.transpose(2, 1, 3, 0).reshape(kh, c_in_g * kw, c_out)
        _k.conv_fwd_direct_nchw(xn, wk, _padded_vector(bias, 16), y, sh, sw, dh, dw,
                                serial=_serial_after_fork)
        return y, "direct-nchw"
    if groups == 1 and dw == 1 and not few:
        y = np.empty((n, c_out, *out_hw), x.dtype)
        xp = _padded_nhwc(x, top, left, up, hp, wp)
        cw = _round_up(c_out, 16)
        _k.conv_fwd_direct(xp.reshape(n, hp, wp * c_in_g), _direct_weights(w, cw),
                           _padded_vector(bias, cw), y, c_in_g, sh, sw, dh,
                           serial=_serial_after_fork)
        return y, "direct-blocked"
    y = np.empty((n, c_out, *out_hw), x.dtype)
    if few:
        xf = _padded_flat(x, top, left, up, hp, wp, hp * wp)
        _k.conv_fwd_rows(xf, w, bias, y, groups, wp, sh, sw, dh, dw, serial=_serial_after_fork)
        return y, "direct-nchw-rows"
    xp = _padded_nhwc(x, top, left, up, hp, wp)
    _k.conv_fwd_nhwc(xp, _weights_gkkio(w, groups), bias, y, sh, sw, dh, dw,
                     serial=_serial_after_fork)
    return y, "direct-nhwc"


def _round_up(c, unit):
    return -(-c // unit) * unit


def _direct_weights(w, cw):
    """OIHW (C_out, C, kH, kW) -> (kH, kW*C, cw), output channels innermost, zero-padded."""
    c_out, c, kh, kw = w.shape
    wk = np.zeros((kh, kw * c, cw), w.dtype)
    wk[:, :, :c_out] = w.transpose(2, 3, 1, 0).reshape(kh, kw * c, c_out)
    return wk


def _padded_vector(v, length):
    out = np.zeros(length, v.dtype)
    out[: v.shape[0]] = v
    return out


def _weights_gkkio(w, groups):
    """OIHW -> (G, kH, kW, C_in/G, C_out/G), C-contiguous."""
    c_out, c_in_g, kh, kw = w.shape
    g_w = w.reshape(groups, c_out // groups, c_in_g, kh, kw)
    return np.ascontiguousarray(g_w.transpose(0, 3, 4, 2, 1))


# ------------------------------------------------------------------------------ conv


def conv2d(x, w, b, p):
    """Forward convolution; see ``fastconv.conv2d``."""
    c_out, c_in = w.shape[:2]
    if _pointwise_ok(p, x.dtype, p.out_hw):
        n = x.shape[0]
        y = _pointwise(w.reshape(c_out, c_in), x.reshape(n, c_in, -1), b, c_out)
        record_algorithm("conv2d", "cython:pointwise-gemm")
        return y.reshape(n, c_out, *p.out_hw)
    if _winograd_ok(p, x.dtype, c_in, c_out):
        y = np.empty((x.shape[0], c_out, *p.out_hw), x.dtype)
        if _winograd_forward(x, w, b, y, *p.padding):
            record_algorithm("conv2d", "cython:winograd-f2x2")
            return y
    y, algo = _direct(x, w, b, p.groups, p.out_hw, *p.padding, (1, 1), p.stride, p.dilation)
    record_algorithm("conv2d", f"cython:{algo}")
    return y


def conv2d_backward(dy, x, w, p, needs):
    """Gradients ``(dx, dw, db)``; see ``fastconv.conv2d_backward``."""
    c_out, c_in = w.shape[:2]
    if _winograd_ok(p, x.dtype, c_in, c_out):
        grads, algos = _conv2d_backward_winograd(dy, x, w, p, needs)
        rest = [k for k in needs if grads.get(k, "missing") is None]
        name = "cython:winograd(" + ",".join(algos) + ")"
        if rest:  # a non-finite value, or dx of another padding or width: the exact kernels
            exact = dict(zip(("input", "weight", "bias"),
                             _conv2d_backward_exact(dy, x, w, p, rest)))
            grads.update((k, exact[k]) for k in rest)
            name += "+" + last_algorithm("conv2d_backward")
        record_algorithm("conv2d_backward", name)
        return grads.get("input"), grads.get("weight"), grads.get("bias")
    if _pointwise_ok(p, x.dtype, p.out_hw) and c_out >= 64:
        return _conv2d_backward_pointwise(dy, x, w, needs)
    if _fused_ok(p, c_in, needs) and ("weight" not in needs or np.isfinite(x).all()):
        return _conv2d_backward_fused(dy, x, w, p, needs)
    return _conv2d_backward_exact(dy, x, w, p, needs)


def _fused_ok(p, c_in, needs) -> bool:
    """The fused plane backward serves first layers (stride 1, groups 1, C_in <= 4) when dx is
    wanted: dy is then read once for dx, dw and db instead of once per gradient (and padded
    twice)."""
    return (p.groups == 1 and p.stride == (1, 1) and c_in <= FUSED_MAX_C_IN
            and "input" in needs)


def _conv2d_backward_fused(dy, x, w, p, needs):
    """conv2d_backward of a first layer in one pass over dy (:func:`_k.conv_bwd_plane_fused`).
    dw is computed only for a finite x (the caller checks)."""
    n, c_in, h, w_ = x.shape
    c_out, _, kh, kw = w.shape
    ho, wo = p.out_hw
    (dh, dw_), (pt, pl) = p.dilation, p.padding
    ry, rx = dh * (kh - 1), dw_ * (kw - 1)
    wd = wo + 2 * rx
    lanes = _FXL[x.dtype]
    grid = _round_up(ho * wd, _FVL)  # dw and db sum over whole FVL blocks of dy's grid
    # Plane lengths: the furthest dx block's furthest tap, and dy's grid (dy lies inside it;
    # with padding past the kernel's reach its rows go below the ones dx reads).
    pd = max(_round_up(h * wd, lanes) + (pt + ry) * wd + pl + rx, ry * wd + grid)
    pq = 2 * ry * wd + rx + grid
    rows = _scratch_rows()
    want_dw, want_db = "weight" in needs, "bias" in needs
    chunks = min(n, WEIGHT_CHUNKS)
    wf = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    dx = np.empty_like(x)
    pdw = np.empty((chunks, c_out, c_in, kh, kw, _FVL), x.dtype)
    pdb = np.empty((chunks, c_out, _FVL), x.dtype)
    dyp = np.empty((rows, c_out, pd), x.dtype)
    xq = np.empty((rows, c_in, pq) if want_dw else (1, 1, 1), x.dtype)
    _k.conv_bwd_plane_fused(x, dy, wf, dx, pdw, pdb, dyp, xq, pt, pl, dh, dw_, wd, want_dw,
                            want_db, serial=_serial_after_fork)
    dwt = _sum_chunks(pdw).sum(axis=-1) if want_dw else None  # then the lanes
    db = _sum_chunks(pdb).sum(axis=-1) if want_db else None
    algos = [g for g in ("input", "weight", "bias") if g in needs]
    record_algorithm("conv2d_backward", "cython:plane-fused(" + ",".join(algos) + ")")
    return dx, dwt, db


def _conv2d_backward_exact(dy, x, w, p, needs):
    """Gradients by the kernels that sum exactly the products of the definition."""
    dx = dw = db = None
    algos = []
    c_out, c_in_g, kh, kw = w.shape
    g = p.groups
    (sh, sw), (dh, dwl) = p.stride, p.dilation
    if "input" in needs and g == 1 and p.stride != (1, 1):
        dx = _grad_input_phases(dy, w, p)
        if dx is not None:
            algos.append("input=direct-phases")
    if "input" in needs and dx is None:
        # dx = conv(zero-insert(dy, stride), flip(w)^T), stride 1, same dilation.
        wf = w[:, :, ::-1, ::-1].reshape(g, c_out // g, c_in_g, kh, kw)
        wf = np.ascontiguousarray(wf.transpose(0, 2, 1, 3, 4)).reshape(g * c_in_g, c_out // g,
                                                                       kh, kw)
        top = dh * (kh - 1) - p.padding[0]
        left = dwl * (kw - 1) - p.padding[1]
        # No column padding in the forward: dy's rows and their left padding tile a pitch of
        # W exactly (the plane kernel then computes no dropped columns: D 252 -> 196 positions).
        wrap = p.stride == (1, 1) and p.padding[1] == 0 and p.pad_bottom_right()[1] == 0
        dx, algo = _direct(dy, wf, None, g, p.in_hw, top, left, (sh, sw), (1, 1), p.dilation,
                           wrap)
        algos.append(f"input={algo}")
    # The flat kernel also multiplies x by the zero dy of the grid's dropped columns: an inf or
    # NaN in x must not reach weights PyTorch keeps finite, so such input takes the exact
    # kernels (they visit only real outputs).
    # (Layers with at most 16 output channels and a run kW*C_in of 12 or more take the direct
    # kernel's 16-channel blocks: D 0.65 -> 0.41 ms.)
    direct16 = g == 1 and dwl == 1 and c_out <= 16 and kw * c_in_g >= 12
    if ("weight" in needs and p.stride == (1, 1) and c_in_g < FLAT_WEIGHT_MAX_CIN
            and not direct16 and np.isfinite(x).all()):
        ho, wo = p.out_hw
        hp, wp = ho + dh * (kh - 1), wo + dwl * (kw - 1)
        lo = -(-ho * wp // _VL) * _VL
        xf = _padded_flat(x, *p.padding, (1, 1), hp, wp, lo + dh * (kh - 1) * wp + dwl * (kw - 1))
        # zero channels after the last group's: its last block of _FCB channels reads them
        cog = c_out // g
        dyf = np.empty((dy.shape[0], (g - 1) * cog + _round_up(cog, _FCB), lo), dy.dtype)
        _k.pad_flat(dy, dyf, 0, 0, 1, 1, ho, wp, serial=_serial(dy, dyf))
        dw = np.empty(w.shape, x.dtype)
        _k.conv_grad_weight_flat(xf, dyf, dw, g, wp, dh, dwl, serial=_serial_after_fork)
        algos.append("weight=flat-blocked")
    elif "weight" in needs and g == 1 and dwl == 1:
        dw = _grad_weight_direct(dy, x, w, p)
        algos.append("weight=direct-blocked")
    elif "weight" in needs:
        ho, wo = p.out_hw
        hp = (ho - 1) * sh + dh * (kh - 1) + 1
        wp = (wo - 1) * sw + dwl * (kw - 1) + 1
        xp = _padded_nhwc(x, *p.padding, (1, 1), hp, wp)
        dyn = _padded_nhwc(dy, 0, 0, (1, 1), ho, wo)
        dwt = np.empty((g, kh, kw, c_in_g, c_out // g), x.dtype)
        _k.conv_grad_weight(xp, dyn, dwt, sh, sw, dh, dwl, serial=_serial_after_fork)
        dw = np.ascontiguousarray(dwt.transpose(0, 4, 3, 1, 2)).reshape(w.shape)
        algos.append("weight=gemm-nhwc")
    if "bias" in needs:
        db = np.empty(c_out, dy.dtype)
        _k.conv_grad_bias(dy.reshape(dy.shape[0], c_out, -1), db, serial=_serial(dy))
    record_algorithm("conv2d_backward", "cython:" + ",".join(algos or ["bias"]))
    return dx, dw, db


def _grad_input_phases(dy, w, p):
    """dx of a strided convolution (groups 1) as one direct forward per stride phase.

    Along one axis, dx[i] = sum over taps k and outputs o with o*s + k*d = i + pad of
    dy[o] * w[k]. The rows i = s*a + r - pad of phase r receive only the taps with
    k*d = r (mod s): a stride-1 correlation of dy with those taps reversed, at a dilation of
    d / gcd(d, s). Each phase is one :func:`_k.conv_fwd_direct` call writing straight into
    its rows and columns of dx (a strided view), reading one padded copy of dy shared by all
    phases (phase (top_h, top_w) starts at row th0 - top_h, column tw0 - top_w). Returns
    None where that does not apply: a column step other than 1, or a phase that would need
    dy cropped at the top or left.
    """
    n, c_out, ho, wo = dy.shape
    _, c_in, kh, kw = w.shape
    axes = []
    for size, k, s, d, pad in zip(p.in_hw, (kh, kw), p.stride, p.dilation, p.padding):
        phases = []
        for r in range(s):
            a0 = -(-(pad - r) // s)  # first a with s*a + r - pad >= 0
            a1 = (size - 1 + pad - r) // s  # last a with s*a + r - pad < size
            if a1 < a0:
                continue
            taps = [t for t in range(k) if (t * d - r) % s == 0]
            top = (taps[-1] * d - r) // s - a0 if taps else 0
            if top < 0:
                return None
            phases.append((r, a0, a1 - a0 + 1, taps, top, d // math.gcd(d, s)))
        axes.append(phases)
    if any(ph[5] != 1 for ph in axes[1] if ph[3]):
        return None
    live = [(a, b) for a in axes[0] for b in axes[1] if a[3] and b[3]]
    covered = all(ph[3] for ax in axes for ph in ax)
    dx = (np.empty if covered else np.zeros)((n, c_in, *p.in_hw), dy.dtype)
    if not live:
        return dx
    th0 = max(a[4] for a, _ in live)
    tw0 = max(b[4] for _, b in live)
    hp = max(th0 - a[4] + a[2] + a[5] * (len(a[3]) - 1) for a, _ in live)
    wp = max(tw0 - b[4] + b[2] + len(b[3]) - 1 for _, b in live)
    dyp = _padded_nhwc(dy, th0, tw0, (1, 1), hp, wp).reshape(n, hp, wp * c_out)
    cw = _round_up(c_in, 16)
    zeros = np.zeros(cw, dy.dtype)
    (sh, sw), (ph, pw) = p.stride, p.padding
    for (rh, ah, nh, tap_h, top_h, step_h), (rw, aw, nw, tap_w, top_w, _) in live:
        sub = w[:, :, tap_h[::-1]][:, :, :, tap_w[::-1]]  # (C_out, C_in, th, tw), reversed
        i0, j0 = sh * ah + rh - ph, sw * aw + rw - pw
        view = dx[:, :, i0: i0 + sh * (nh - 1) + 1: sh, j0: j0 + sw * (nw - 1) + 1: sw]
        _k.conv_fwd_direct(dyp, _direct_weights(sub.transpose(1, 0, 2, 3), cw), zeros, view,
                           c_out, 1, 1, step_h, th0 - top_h, (tw0 - top_w) * c_out,
                           serial=_serial_after_fork)
    return dx


def _grad_weight_direct(dy, x, w, p):
    """dw (groups 1, unit column dilation) through :func:`_k.conv_grad_weight_direct`: partial
    sums over WEIGHT_CHUNKS fixed pixel chunks, added in order (thread-count independent)."""
    n, c_in = x.shape[:2]
    c_out, _, kh, kw = w.shape
    ho, wo = p.out_hw
    (sh, sw), dh = p.stride, p.dilation[0]
    hp = (ho - 1) * sh + dh * (kh - 1) + 1
    wp = (wo - 1) * sw + kw
    xp = _padded_nhwc(x, *p.padding, (1, 1), hp, wp)
    cp = 16 if c_out <= 16 else _round_up(c_out, 64)
    dyt = np.empty((n, ho, wo, cp), dy.dtype)
    _k.pad_nhwc(dy, dyt, 0, 0, 1, 1, serial=_serial(dy, dyt))
    xbase = ((np.arange(n)[:, None, None] * hp + np.arange(ho)[None, :, None] * sh) * (wp * c_in)
             + np.arange(wo)[None, None, :] * (sw * c_in)).ravel()
    m = n * ho * wo
    part = np.empty((min(m, WEIGHT_CHUNKS), kh, kw * c_in, cp), x.dtype)
    _k.conv_grad_weight_direct(xp.reshape(-1), dyt.reshape(m, cp), xbase, part, wp * c_in, dh,
                               serial=_serial_after_fork)
    return np.ascontiguousarray(
        _sum_chunks(part).reshape(kh, kw, c_in, cp)[..., :c_out].transpose(3, 2, 0, 1))


# ------------------------------------------------------------------------------ Winograd

_WCB = _SIZES.get("COB")  # output channels per Winograd register block (the padding unit of Cp)
_WTB = _SIZES.get("WTB")  # tiles per register block
_WGROUP = _SIZES.get("WGROUP")  # tiles per grad-weight group


def _winograd_ok(p, dtype, c_in: int, c_out: int) -> bool:
    """Winograd F(2x2, 3x3): float32 3x3 convolutions, stride and dilation 1, groups 1, with
    enough channels that the 16 small products run at full register-block width, and at least
    one register block of tiles (7 output columns) per tile row."""
    return (dtype == np.float32 and p.groups == 1 and p.kernel_hw == (3, 3)
            and p.stride == (1, 1) and p.dilation == (1, 1) and c_in >= 16 and c_out >= 32
            and p.out_hw[1] >= 2 * _WTB - 1)


def _scratch_rows() -> int:
    """Rows of the per-thread scratch arrays (one per thread a parallel loop may use)."""
    return 1 if _serial_after_fork else max(1, _k.max_threads())


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
    cp = _round_up(c_out, _WCB)
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


def _conv2d_backward_winograd(dy, x, w, p, needs):
    """({name: gradient, or None where the exact kernels must compute it}, algorithms) by
    Winograd F(2x2, 3x3) (see :func:`_winograd_ok`)."""
    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    ho, wo = p.out_hw
    pt, pl = p.padding
    grads, algos = {}, []
    cp = _round_up(c_out, _WCB)
    dyq = None  # dy padded by 2 - padding: the input of the dx pass, reused by the dw pass
    if "input" in needs and max(pt, pl) <= 2 and x.shape[3] >= 2 * _WTB - 1:
        # dx = dy correlated with the flipped kernel, channels swapped, padded by 2 - padding
        dx = np.empty_like(x)
        wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        dyq = _winograd_input(dy, x.shape[2:], 2 - pt, 2 - pl)
        ok = _winograd_forward(dy, wflip, None, dx, 2 - pt, 2 - pl, dyq)
        grads["input"] = dx if ok else None
        algos.append("input:winograd")
    elif "input" in needs:
        grads["input"] = None  # by the exact kernels
    if "weight" in needs:
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
        part = np.empty((min(n * -(-ho // 2), WEIGHT_CHUNKS), 16 * c_in * cp), x.dtype)
        v = np.empty((rows, 16 * group * tw * c_in), x.dtype)
        m = np.empty((rows, 16 * group * tw * cp), x.dtype)
        _k.conv_grad_weight_winograd(xq.reshape(-1), dq.reshape(-1), part, v, m, n, hp, wq, c_in,
                                     dq.shape[1], dq.shape[3], cp, dr, ds,
                                     serial=_serial_after_fork)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite: checked just below
            du = _sum_chunks(part).reshape(16, c_in, cp)
        grads["weight"] = weight_from_transformed(du, c_out) if np.isfinite(du).all() else None
        algos.append("weight:winograd")
    if "bias" in needs:
        db = np.empty(c_out, dy.dtype)
        _k.conv_grad_bias(dy.reshape(n, c_out, -1), db, serial=_serial(dy))
        grads["bias"] = db
    return grads, algos


def _sum_chunks(part):
    """Sum partial results over axis 0 in a fixed serial order."""
    total = part[0].copy()
    for t in range(1, part.shape[0]):
        total += part[t]
    return total


# ------------------------------------------------------------------------------ 1x1 as GEMM


def _pointwise_ok(p, dtype, out_hw) -> bool:
    """1x1 float32 convolutions, stride 1, no padding, groups 1, with at least one 64-column
    register block of pixels per image: a matrix product per image, in NCHW as it is."""
    return (dtype == np.float32 and p.groups == 1 and p.kernel_hw == (1, 1)
            and p.stride == (1, 1) and p.padding == (0, 0) and out_hw[0] * out_hw[1] >= 64)


def _pointwise(w2, a, bias, out_channels):
    """(N, out_channels, H*W) = w2 @ a[n] + bias for every image of a (N, C, H*W)."""
    n, k, hw = a.shape
    bias = np.zeros(out_channels, a.dtype) if bias is None else bias
    out = np.empty((n, out_channels, hw), a.dtype)
    _k.gemm_batched(np.ascontiguousarray(w2), a.reshape(-1), bias, out.reshape(-1), n, k, hw,
                    serial=_serial_after_fork)
    return out


def _conv2d_backward_pointwise(dy, x, w, needs):
    """conv2d_backward of a 1x1 convolution (:func:`_pointwise_ok`, C_out >= 64) as matrix
    products per image: dx[n] = w.T @ dy[n]; dw.T = sum over n of x[n] @ dy[n].T, in
    WEIGHT_CHUNKS fixed image chunks added in order."""
    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    ho, wo = dy.shape[2:]
    hw = ho * wo
    dx = dw = db = None
    if "input" in needs:
        dx = _pointwise(w.reshape(c_out, c_in).T, dy.reshape(n, c_out, hw), None, c_in)
        dx = dx.reshape(x.shape)
    if "weight" in needs:
        dyt = np.empty((n, ho, wo, c_out), dy.dtype)
        _k.pad_nhwc(dy, dyt, 0, 0, 1, 1, serial=_serial(dy, dyt))
        part = np.empty((min(n, WEIGHT_CHUNKS), c_in * c_out), x.dtype)
        _k.gemm_sum(x.reshape(-1), dyt.reshape(-1), part, n, c_in, hw, c_out,
                    serial=_serial_after_fork)
        dw = np.ascontiguousarray(_sum_chunks(part).reshape(c_in, c_out).T).reshape(w.shape)
    if "bias" in needs:
        db = np.empty(c_out, dy.dtype)
        _k.conv_grad_bias(dy.reshape(n, c_out, -1), db, serial=_serial(dy))
    record_algorithm("conv2d_backward", "cython:pointwise-gemm")
    return dx, dw, db


# ------------------------------------------------------------------------------ pool


def max_pool2d(x, p):
    """Max-pool with int64 indices; see ``fastconv.max_pool2d``."""
    n, c = x.shape[:2]
    y = np.empty((n, c, *p.out_hw), x.dtype)
    idx = np.empty((n, c, *p.out_hw), np.int64)
    _k.max_pool_fwd(x, y, idx, *p.kernel_hw, *p.stride, *p.padding, *p.dilation,
                    serial=_serial_after_fork)
    record_algorithm("max_pool2d", "cython:direct")
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
