"""The ``cython`` backend: compiled, OpenMP-parallel CPU kernels that need no Numba.

A thin wrapper around ``fastconv.backends._cython_kernels`` (compiled from
``_cython_kernels.pyx`` at install time by ``setup.py``). Arguments arrive validated by
``fastconv._validate`` (the kernels run without bounds checks and trust them); this module
only arranges layouts (zero-padded NHWC input, weights as (G, kH, kW, C_in/G, C_out/G)),
allocates outputs and picks an algorithm:

* forward ``direct-nhwc``: blocks of output columns x output channels, innermost loop over
  contiguous output channels. When a group has fewer than ``NCHW_MAX_COUT`` output channels
  or a single input channel:
  ``direct-nchw-flat`` (stride 1: blocks of consecutive outputs on the padded-pitch grid x up
  to 4 channels, vectorized over outputs) or ``direct-nchw-rows`` (strided).
* grad-input: the forward kernel on ``dy`` (zero-inserted by the stride, padded by
  ``dilation*(k-1) - padding``) with flipped, transposed weights.
* grad-weight: a blocked GEMM reducing over all output pixels, one task per weight block
  (``gemm-nhwc``); for stride 1 and few input channels, per-lane partial sums over the
  padded-pitch grid (``flat-lanes``).
* max-pool: one task per (n, c) plane; indices exactly as PyTorch's.
"""

from __future__ import annotations

import os

import numpy as np

from .._dispatch import record_algorithm
from ._openmp import forked_from_gnu_openmp_parent  # (sets OMP_WAIT_POLICY first)


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
    from . import _cython_kernels as _k
except ImportError as e:  # not built (no compiler/Cython at install time) or broken build
    _k = None
    _IMPORT_ERROR = e
else:
    _IMPORT_ERROR = None

#: Whether the compiled extension was built with OpenMP (False when it is missing).
OPENMP: bool = bool(getattr(_k, "OPENMP", False))

#: Output channels per group below which the forward uses the NCHW kernels.
NCHW_MAX_COUT = 16
_PW = 64  # outputs per block of the flat NCHW kernel (PW in the .pyx)
_VL = 16  # lanes of the flat grad-weight kernel (VL in the .pyx)
#: Input channels per group below which a stride-1 grad-weight uses the flat kernel.
FLAT_WEIGHT_MAX_CIN = 8


def unavailable_reason() -> str | None:
    """None when the compiled extension imported; else why not and how to fix it."""
    if _k is not None:
        return None
    err = str(_IMPORT_ERROR)
    if "No module named" in err or "cannot import name" in err:
        return (
            "extension fastconv.backends._cython_kernels not built (no C compiler or Cython "
            "at install time); reinstall with a C compiler and Cython>=3 (pip install -e .)"
        )
    return (
        f"extension fastconv.backends._cython_kernels failed to import ({err}); "
        "rebuild it with a C compiler (pip install -e . or python setup.py build_ext --inplace)"
    )


# ------------------------------------------------------------------------------ helpers


def _padded_nhwc(x, top, left, up, hp, wp):
    out = np.empty((x.shape[0], hp, wp, x.shape[1]), x.dtype)
    _k.pad_nhwc(x, out, top, left, *up, serial=_serial_after_fork)
    return out


def _padded_flat(x, top, left, up, hp, wp, length):
    out = np.empty((x.shape[0], x.shape[1], length), x.dtype)
    _k.pad_flat(x, out, top, left, *up, hp, wp, serial=_serial_after_fork)
    return out


def _direct(x, w, bias, groups, out_hw, top, left, up, stride, dilation):
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
    y = np.empty((n, c_out, *out_hw), x.dtype)
    if few:
        xf = _padded_flat(x, top, left, up, hp, wp, hp * wp)
        _k.conv_fwd_rows(xf, w, bias, y, groups, wp, sh, sw, dh, dw, serial=_serial_after_fork)
        return y, "direct-nchw-rows"
    xp = _padded_nhwc(x, top, left, up, hp, wp)
    _k.conv_fwd_nhwc(xp, _weights_gkkio(w, groups), bias, y, sh, sw, dh, dw,
                     serial=_serial_after_fork)
    return y, "direct-nhwc"


def _weights_gkkio(w, groups):
    """OIHW -> (G, kH, kW, C_in/G, C_out/G), C-contiguous."""
    c_out, c_in_g, kh, kw = w.shape
    g_w = w.reshape(groups, c_out // groups, c_in_g, kh, kw)
    return np.ascontiguousarray(g_w.transpose(0, 3, 4, 2, 1))


# ------------------------------------------------------------------------------ conv


def conv2d(x, w, b, p):
    """Forward convolution; see ``fastconv.conv2d``."""
    y, algo = _direct(x, w, b, p.groups, p.out_hw, *p.padding, (1, 1), p.stride, p.dilation)
    record_algorithm("conv2d", f"cython:{algo}")
    return y


def conv2d_backward(dy, x, w, p, needs):
    """Gradients ``(dx, dw, db)``; see ``fastconv.conv2d_backward``."""
    dx = dw = db = None
    algos = []
    c_out, c_in_g, kh, kw = w.shape
    g = p.groups
    (sh, sw), (dh, dwl) = p.stride, p.dilation
    if "input" in needs:
        # dx = conv(zero-insert(dy, stride), flip(w)^T), stride 1, same dilation.
        wf = w[:, :, ::-1, ::-1].reshape(g, c_out // g, c_in_g, kh, kw)
        wf = np.ascontiguousarray(wf.transpose(0, 2, 1, 3, 4)).reshape(g * c_in_g, c_out // g,
                                                                       kh, kw)
        top = dh * (kh - 1) - p.padding[0]
        left = dwl * (kw - 1) - p.padding[1]
        dx, algo = _direct(dy, wf, None, g, p.in_hw, top, left, (sh, sw), (1, 1), p.dilation)
        algos.append(f"input={algo}")
    if "weight" in needs and p.stride == (1, 1) and c_in_g < FLAT_WEIGHT_MAX_CIN:
        ho, wo = p.out_hw
        hp, wp = ho + dh * (kh - 1), wo + dwl * (kw - 1)
        lo = -(-ho * wp // _VL) * _VL
        xf = _padded_flat(x, *p.padding, (1, 1), hp, wp, lo + dh * (kh - 1) * wp + dwl * (kw - 1))
        dyf = _padded_flat(dy, 0, 0, (1, 1), ho, wp, lo)
        dw = np.empty(w.shape, x.dtype)
        _k.conv_grad_weight_flat(xf, dyf, dw, g, wp, dh, dwl, serial=_serial_after_fork)
        algos.append("weight=flat-lanes")
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
        _k.conv_grad_bias(dy, db, serial=_serial_after_fork)
    record_algorithm("conv2d_backward", "cython:" + ",".join(algos or ["bias"]))
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
    """Scatter-add of ``dy`` at ``idx``; see ``fastconv.max_pool2d_backward``."""
    n, c, h, w = input_shape
    dx = np.empty((n * c, h * w), dy.dtype)
    _k.max_pool_bwd(dy, idx, dx, serial=_serial_after_fork)
    record_algorithm("max_pool2d_backward", "cython:scatter")
    return dx.reshape(input_shape)
