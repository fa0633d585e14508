"""The ``numba`` backend: parallel CPU kernels compiled by Numba, the fast path of fastconv.

The five backend functions (see ``fastconv._dispatch``) choose a kernel per shape, call it under
the threading policy of ``_numba_threading`` and record which algorithm ran. Numba is imported
when this module is first used, never by ``import fastconv``.

Algorithms (the name recorded for ``fastconv.last_algorithm``):

* ``numba:pointwise-gemm`` (``_numba_gemm``): float32 1x1 convolutions, stride 1, no padding, at
  least 64 pixels: one matrix product per image in NCHW as it is (4 output channels x 64 pixels
  register blocks); dx the same with the weight transposed; dw the sum over images of
  x[n] @ dy[n].T in 8 fixed image chunks (C_out >= 64, else the kernels below).
* ``numba:winograd-f2x2`` (``_numba_winograd``): float32 3x3 convolutions, stride and dilation
  1, groups 1, C_in >= 16, C_out >= 32, W_out >= 7: Winograd F(2x2, 3x3), 2.25x fewer
  multiplications. dx is the same forward on padded dy with the flipped weight (padding <= 2);
  dw is the transformed product summed over 8 fixed chunks of tile rows. Any inf, NaN or
  overflow inside the transforms is detected and that result recomputed by the kernels below
  (a tile mixes 16 inputs, which would spread a non-finite value).
* ``numba:plane`` (``_numba_plane``): groups 1, stride 1, and few channels (C_in < 8 or
  C_out < 32): the first layers. Vectorized over 48 consecutive output positions x 8 output
  channels (float32; 128 x 2 below 8 channels; float64 64 x 4); grad-input is the same kernel
  on padded dy with the flipped weight; grad-weight is dot products over whole padded planes,
  in 8 fixed image chunks summed serially (for an x with NaN or inf: the generic kernel, since
  the planes' dropped columns would multiply them by 0), or, float32 with 9-16 output channels
  and a (kW, C_in) run of >= 12 rows (shape D), 16-run-row x 16-channel register blocks
  (``weight:direct-c16``, ``_numba_direct.conv_grad_weight_c16``).
* ``numba:direct-nhwc-c64`` (``_numba_direct``): groups 1, unit column dilation, C_out >= 32.
  NHWC, a 4-column x 64-channel register block over the (kW, C_in) run. Grad-input: the plane
  kernel (stride 1 and C_in not a multiple of 64), else one direct forward call per stride
  phase; grad-weight: 6-run-row (float64: 4) x 64-channel register blocks, each reducing over
  one of 8 fixed pixel chunks (partial sums added in order).
* ``numba:generic`` (``_numba_conv``): everything else (groups, depthwise, column dilation,
  strided few-channel layers): NHWC loops vectorized over the group's output channels.
* Max-pool: ``numba:k2s2`` (2x2, stride 2, no padding), ``numba:parity-s2`` (column stride 2,
  vectorized over output columns), else ``numba:generic`` (tap tables); backward
  ``numba:scatter``. All follow PyTorch's index rules exactly.

Register blocks and the CPU: the block sizes above are for AVX-512 (32 vector registers of 16
float32), where LLVM vectorizes them. Where Numba does not compile for AVX-512 (AVX2: 16
registers of 8), those blocks spill, and the register-blocked stages (direct forward and
grad-weight, matrix products, Winograd products, plane forward) run instead as explicit 256-bit
vector blocks of 12 accumulators (``_numba_simd``): 6 columns x 16 channels (direct), 6 rows x
16 columns (matrix products), 6 tiles x 16 channels (Winograd), 4 channels x 24 positions
(plane; 6 x 16 for 5-6 channels). The direct path is then recorded as
``numba:direct-nhwc-v256``. ``FASTCONV_NUMBA_VECTORS=512|256`` overrides the choice; both
families are correct on any CPU.

Every kernel gives the same result for every thread count (each parallel task owns its output;
partial sums are over a fixed number of chunks, added in a fixed order).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np

from .._dispatch import last_algorithm, record_algorithm
from .._validate import pool_index_error

# Fixed number of grad-weight partial sums (images are split into this many chunks, summed
# serially): the result is the same for every thread count.
WEIGHT_CHUNKS = 8
#: The scatter kernel range-checks the max-pool indices itself (``fastconv.max_pool2d_backward``
#: then skips its separate single-threaded pass over them).
CHECKS_POOL_INDICES = True


#: The start of the reason when Numba is installed but raises at import (a NumPy it was not
#: built for, a broken llvmlite): automatic selection then warns once (``fastconv._dispatch``).
BROKEN_IMPORT = "numba is installed but failed to import"


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
        return f"{BROKEN_IMPORT}: {type(e).__name__}: {e}"
    return None


def _kernels():
    from . import _numba_conv, _numba_direct, _numba_pool, _numba_threading

    return _numba_conv, _numba_direct, _numba_pool, _numba_threading


def _plane_ok(p, c_in: int, c_out: int) -> bool:
    """The padded-plane kernels (``_numba_plane``) serve the few-channel layers, stride 1."""
    return p.groups == 1 and p.stride == (1, 1) and (c_in < 8 or c_out < 32)


def _plane_input(plane, run, x, pt, pl, ho, wo, kh, kw, dh, dw, wrap=False, sums=None):
    """x zero-padded into (N, C, Hx, Wp), Wp = W_out + dw*(kW-1), with rows to spare below.

    ``wrap``: Wp = W_out, for a layer whose left padding is the whole dilated kernel width and
    whose input rows end at W_out (a grad-input of an unpadded layer): each row's right padding
    is then the next row's left padding, and no computed column is dropped. With ``sums`` (a
    list), also appends x summed over (N, H, W)."""
    n, c = x.shape[:2]
    wp = wo + dw * (kw - 1)
    if wrap:
        assert pl == dw * (kw - 1) and x.shape[3] + pl == wo
        wp = wo
    lanes = -(-ho * wp // plane.LANES) * plane.LANES
    hx = -(-(lanes + dh * (kh - 1) * wp + dw * (kw - 1)) // wp)
    planes = np.empty(n * c if sums is not None else 0, x.dtype)
    xp = run(plane.pad_plane, x, np.empty((n, c, hx, wp), x.dtype), pt, pl, planes)
    if sums is not None:
        sums.append(planes.reshape(n, c).sum(axis=0, dtype=np.float64).astype(x.dtype))
    return xp


def _plane_forward(plane, run, x, wt_oihw, bias, out, pt, pl, dh, dw, wrap=False, sums=None):
    """out = conv(x, wt_oihw) + bias with stride 1 and (top, left) padding (pt, pl) via the
    plane kernel; the bottom/right padding follows from out's size (``wrap``, ``sums``: see
    ``_plane_input``)."""
    c_out, c_in, kh, kw = wt_oihw.shape
    ho, wo = out.shape[2:]
    xp = _plane_input(plane, run, x, pt, pl, ho, wo, kh, kw, dh, dw, wrap, sums)
    if _explicit_vectors():
        if x.dtype != np.float32:
            kernel, pcb = plane.conv_forward_plane_vec64, plane.VEC_PCB
        elif c_out in (5, 6):
            kernel, pcb = plane.conv_forward_plane_vec32_6, 6
        elif c_out > plane.VEC_FEW_PCB:
            kernel, pcb = plane.conv_forward_plane_vec32, plane.VEC_PCB
        else:
            kernel, pcb = plane.conv_forward_plane_vec32_few, plane.VEC_FEW_PCB
    elif x.dtype != np.float32:
        kernel, pcb = plane.conv_forward_plane64, plane.PCB64
    elif c_out >= plane.PCB:
        kernel, pcb = plane.conv_forward_plane, plane.PCB
    elif c_out in (5, 6):
        kernel, pcb = plane.conv_forward_plane6, 6
    else:
        kernel, pcb = plane.conv_forward_plane_few, plane.FEW_PCB
    cp = -(-c_out // pcb) * pcb
    wt = np.zeros((c_in, kh, kw, cp), x.dtype)
    wt[..., :c_out] = wt_oihw.transpose(1, 2, 3, 0)
    b = np.zeros(cp, x.dtype)
    if bias is not None:
        b[:c_out] = bias
    return run(kernel, xp, wt, b, out, dh, dw)


def _nchw_strides(y, base=0):
    """(offset, N, C, H, W) element strides of a C-contiguous NCHW array, for the direct kernel."""
    n, c, h, w = y.shape
    return np.array([base, c * h * w, h * w, w, 1], np.int64)


def _padded_channels(c: int, unit: int = 64) -> int:
    return -(-c // unit) * unit


def _direct_forward_kernel(direct, dtype):
    """(kernel, channel unit, name) of the register-blocked direct forward for this CPU: the
    LLVM-vectorized 4 x 64 block where Numba compiles for AVX-512, else the explicit 6-column
    block of 256-bit vectors (``_numba_simd``: the 4 x 64 block spills there)."""
    from . import _numba_simd as simd

    if simd.WIDE_VECTORS:
        return direct.conv_forward_direct, direct.CB, f"c{direct.CB}"
    lanes = simd.LANES[np.dtype(dtype)]
    kernel = direct.conv_forward_direct_vec32 if lanes == 8 else direct.conv_forward_direct_vec64
    return kernel, direct.VNV * lanes, "v256"


def _direct_ok(p, c_out: int) -> bool:
    """The register-blocked kernels need groups=1, unit column dilation, and enough channels
    that zero-padding them to a multiple of 64 wastes at most half the work."""
    return p.groups == 1 and p.dilation[1] == 1 and c_out >= 32


def _winograd_ok(p, dtype, c_in: int, c_out: int) -> bool:
    """Winograd F(2x2, 3x3) (``_numba_winograd``): float32 3x3 convolutions, stride and dilation
    1, groups 1, with enough channels that the 16 small products run at full register-block
    width, and at least 4 tiles (7 output columns) per tile row."""
    return (dtype == np.float32 and p.groups == 1 and p.kernel_hw == (3, 3)
            and p.stride == (1, 1) and p.dilation == (1, 1) and c_in >= 16 and c_out >= 32
            and _winograd_wide_enough(p.out_hw[1]))


def _winograd_wide_enough(out_w: int) -> bool:
    """At least one register block of tiles (TB = 4, 2 columns each) per tile row."""
    return out_w >= 7


def _explicit_vectors() -> bool:
    """Whether the register-blocked kernels run as explicit 256-bit vectors (``_numba_simd``):
    where Numba does not compile for AVX-512, whose 32 registers the LLVM-vectorized blocks
    need."""
    from . import _numba_simd as simd

    return not simd.WIDE_VECTORS


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


def _winograd_forward(wino, run, x, w, b, y, pt, pl, xq=None):
    """y = conv(x, w) + b (3x3, stride 1, padding (pt, pl)) by Winograd F(2x2, 3x3), from x or
    its ``_winograd_input`` layout ``xq``. False if an input, weight or output was not finite:
    y is then to be recomputed exactly."""
    c_out = w.shape[0]
    if xq is None:
        xq = _winograd_input(wino, run, x, y.shape[2:], pt, pl)
    vec = _explicit_vectors()
    paired = not vec and c_out <= wino.HALF and xq.shape[3] - 1 >= 2 * wino.TB
    u = wino.transform_weight_paired(w) if paired else \
        wino.transform_weight(w, _padded_channels(c_out, wino.VCB if vec else 64))
    bias = np.zeros(c_out, x.dtype) if b is None else b
    check = np.empty(xq.shape[0] * ((xq.shape[1] - 2) // 2), x.dtype)
    run(wino.conv_forward_winograd, xq, u, bias, y, check, paired, vec)
    return not np.isnan(check).any()


def _pointwise_ok(p, dtype, out_hw) -> bool:
    """1x1 float32 convolutions, stride 1, no padding, groups 1, with at least one 64-column
    register block of pixels per image: a matrix product per image, in NCHW as it is
    (``_numba_gemm``), with no layout change."""
    return (dtype == np.float32 and p.groups == 1 and p.kernel_hw == (1, 1)
            and p.stride == (1, 1) and p.padding == (0, 0) and out_hw[0] * out_hw[1] >= 64)


def _pointwise(run, w2, a, bias, out_channels):
    """(N, out_channels, H*W) = w2 @ a[n] + bias for every image of a (N, C, H*W)."""
    from . import _numba_gemm as gemm

    n = a.shape[0]
    bias = np.zeros(out_channels, a.dtype) if bias is None else bias
    part = np.empty((1, n, out_channels, a.shape[2]), a.dtype)
    return run(gemm.chunks_kernel(), w2, a, bias, part)[0]


# ------------------------------------------------------------------------------------ conv


def _padded_input(conv, run, x, p):
    n, c, h, w = x.shape
    (sh, sw), (dh, dw) = p.stride, p.dilation
    (kh, kw), (ho, wo) = p.kernel_hw, p.out_hw
    hp = (ho - 1) * sh + dh * (kh - 1) + 1
    wp = (wo - 1) * sw + dw * (kw - 1) + 1
    xp = np.empty((n, hp, wp, c), x.dtype)
    return run(conv.pad_nhwc, x, xp, p.padding[0], p.padding[1])


def _weight_gkkio(w, groups):
    """(C_out, C_in/G, kH, kW) -> (G, kH, kW, C_in/G, C_out/G), output channels innermost."""
    co, cg, kh, kw = w.shape
    w6 = w.reshape(groups, co // groups, cg, kh, kw)
    return np.ascontiguousarray(w6.transpose(0, 3, 4, 2, 1))


def conv2d(x, w, b, p):
    """y (N, C_out, H_out, W_out) = conv2d(x, w) + b; see ``fastconv.conv2d``."""
    conv, direct, _, thr = _kernels()
    run = thr.run
    c_out, c_in, kh, kw = w.shape
    if _pointwise_ok(p, x.dtype, p.out_hw):
        n = x.shape[0]
        y = _pointwise(run, w.reshape(c_out, c_in), x.reshape(n, c_in, -1), b, c_out)
        record_algorithm("conv2d", "numba:pointwise-gemm")
        return y.reshape(n, c_out, *p.out_hw)
    y = np.empty((x.shape[0], c_out, *p.out_hw), x.dtype)
    if _winograd_ok(p, x.dtype, c_in, c_out):
        from . import _numba_winograd as wino

        if _winograd_forward(wino, run, x, w, b, y, *p.padding):
            record_algorithm("conv2d", "numba:winograd-f2x2")
            return y
    if _plane_ok(p, c_in, c_out):
        from . import _numba_plane as plane

        _plane_forward(plane, run, x, w, b, y, *p.padding, *p.dilation)
        record_algorithm("conv2d", "numba:plane")
        return y
    xp = _padded_input(conv, run, x, p)
    if _direct_ok(p, c_out):
        kernel, unit, name = _direct_forward_kernel(direct, x.dtype)
        cp = _padded_channels(c_out, unit)
        wk = np.zeros((kh, kw * c_in, cp), x.dtype)
        wk[:, :, :c_out] = w.transpose(2, 3, 1, 0).reshape(kh, kw * c_in, c_out)
        bias = np.zeros(cp, x.dtype)
        if b is not None:
            bias[:c_out] = b
        xp2 = xp.reshape(xp.shape[0], xp.shape[1], -1)
        run(kernel, xp2, wk, bias, y.reshape(-1), _nchw_strides(y), c_out, *p.out_hw, c_in,
            p.stride[0], p.stride[1], p.dilation[0], 0)
        record_algorithm("conv2d", f"numba:direct-nhwc-{name}")
        return y
    wr = _weight_gkkio(w, p.groups)
    bias = np.zeros(c_out, x.dtype) if b is None else b
    run(conv.conv_forward_generic, xp, wr, bias, y, *p.stride, *p.dilation)
    record_algorithm("conv2d", "numba:generic")
    return y


def conv2d_backward(dy, x, w, p, needs):
    """(dx, dw, db) of conv2d, ``None`` for the gradients not in ``needs``."""
    conv, direct, _, thr = _kernels()
    run = thr.run
    c_out, c_in, kh, kw = w.shape
    if _winograd_ok(p, x.dtype, c_in, c_out):
        grads, algos = _conv2d_backward_winograd(run, dy, x, w, p, needs)
        rest = [k for k in needs if grads.get(k, "missing") is None]
        name = "numba:winograd(" + ",".join(algos) + ")"
        if rest:  # a non-finite value, or dx of another padding or width: by the kernels below
            exact = dict(zip(("input", "weight", "bias"),
                             _conv2d_backward_exact(dy, x, w, p, rest)))
            grads.update((k, exact[k]) for k in rest)
            name += "+" + last_algorithm("conv2d_backward")
        record_algorithm("conv2d_backward", name)
        return grads.get("input"), grads.get("weight"), grads.get("bias")
    if _pointwise_ok(p, x.dtype, p.out_hw) and c_out >= 64:
        return _conv2d_backward_pointwise(run, dy, x, w, needs)
    return _conv2d_backward_exact(dy, x, w, p, needs)


def _conv2d_backward_pointwise(run, dy, x, w, needs):
    """conv2d_backward of a 1x1 convolution (``_pointwise_ok``, C_out >= 64) as matrix
    products per image: dx[n] = w.T @ dy[n]; dw.T = sum over n of x[n] @ dy[n].T, in
    WEIGHT_CHUNKS fixed image chunks added in order."""
    from . import _numba_gemm as gemm
    from . import _numba_plane as plane

    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    hw = dy.shape[2] * dy.shape[3]
    dx = dw = db = None
    if "input" in needs:
        dx = _pointwise(run, w.reshape(c_out, c_in).T, dy.reshape(n, c_out, hw), None, c_in)
        dx = dx.reshape(x.shape)
    if "weight" in needs:
        dyt = run(gemm.transpose, dy.reshape(n, c_out, hw), np.empty((n, hw, c_out), dy.dtype))
        part = np.empty((min(n, WEIGHT_CHUNKS), c_in, c_out), x.dtype)
        run(gemm.sum_kernel(), x.reshape(n, c_in, hw), dyt, part)
        dw = np.ascontiguousarray(_sum_chunks(part).T).reshape(w.shape)
    if "bias" in needs:
        part = np.empty((min(n, WEIGHT_CHUNKS), c_out), dy.dtype)
        db = _sum_chunks(run(plane.plane_sums, dy.reshape(n, c_out, hw), part))
    record_algorithm("conv2d_backward", "numba:pointwise-gemm")
    return dx, dw, db


def _conv2d_backward_exact(dy, x, w, p, needs):
    """conv2d_backward by the kernels that sum exactly the products of the definition."""
    conv, direct, _, thr = _kernels()
    run = thr.run
    c_out, c_in, kh, kw = w.shape
    if _plane_ok(p, c_in, c_out):
        return _conv2d_backward_plane(run, dy, x, w, p, needs)
    if _direct_ok(p, c_out):
        return _conv2d_backward_direct(conv, direct, run, dy, x, w, p, needs)
    n, ho, wo = dy.shape[0], dy.shape[2], dy.shape[3]
    dyt = run(conv.nchw_to_nhwc, dy, np.empty((n, ho, wo, c_out), dy.dtype))
    wr = _weight_gkkio(w, p.groups)
    dx = dw = db = None
    if "input" in needs:
        (sh, sw), (dh, dwl) = p.stride, p.dilation
        hp = (ho - 1) * sh + dh * (kh - 1) + 1
        wp = (wo - 1) * sw + dwl * (kw - 1) + 1
        dxp = np.zeros((n, hp, wp, x.shape[1]), x.dtype)  # all C_in (w has C_in/groups)
        run(conv.conv_grad_input_generic, dyt, wr, dxp, *p.stride, *p.dilation)
        dx = run(conv.crop_nhwc_to_nchw, dxp, np.empty_like(x), p.padding[0], p.padding[1])
    if "weight" in needs or "bias" in needs:
        dw, db = _grad_weight_generic(conv, run, dyt, x, wr, w.shape, p)
        dw = dw if "weight" in needs else None
        db = db if "bias" in needs else None
    record_algorithm("conv2d_backward", "numba:generic")
    return dx, dw, db


def _conv2d_backward_winograd(run, dy, x, w, p, needs):
    """({name: gradient, or None where the exact kernels must compute it: a non-finite value,
    or dx of a padding above 2 or an input narrower than 7}, algorithms) by Winograd
    F(2x2, 3x3) (see ``_winograd_ok``)."""
    from . import _numba_plane as plane
    from . import _numba_winograd as wino

    n, c_in = x.shape[:2]
    c_out = w.shape[0]
    ho, wo = p.out_hw
    pt, pl = p.padding
    grads, algos = {}, []
    cp = _padded_channels(c_out)
    dyq = None  # dy padded by 2 - padding: the input of the dx pass, reused by the dw pass
    db = [] if "bias" in needs else None  # summed by whichever pass lays dy out first
    if "input" in needs and max(pt, pl) <= 2 and _winograd_wide_enough(x.shape[3]):
        # dx = dy correlated with the flipped kernel, channels swapped, padded by 2 - padding
        dx = np.empty_like(x)
        wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        dyq = _winograd_input(wino, run, dy, x.shape[2:], 2 - pt, 2 - pl, db)
        ok = _winograd_forward(wino, run, dy, wflip, None, dx, 2 - pt, 2 - pl, dyq)
        grads["input"] = dx if ok else None
        algos.append("input:winograd")
    elif "input" in needs:
        grads["input"] = None  # by the exact kernels
    if "weight" in needs:
        if dyq is not None and c_out == cp:
            dq, dr, ds = dyq, 2 - pt, 2 - pl
        else:
            th, tw = -(-ho // 2), -(-wo // 2)
            unsummed = db is not None and not db  # bias wanted, and no dx pass summed dy
            dq = _pad_split(wino, run, dy, np.empty((n, 2 * th, 2, tw, cp), dy.dtype), 0, 0,
                            db if unsummed else None)
            dr = ds = 0
        xq = _winograd_input(wino, run, x, (ho, wo), pt, pl)
        part = np.empty((min(n * -(-ho // 2), WEIGHT_CHUNKS), 16, c_in, cp), x.dtype)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite: checked just below
            du = _sum_chunks(run(wino.conv_grad_weight_winograd, xq, dq, dr, ds, part,
                                  _explicit_vectors()))
        grads["weight"] = wino.weight_from_transformed(du, c_out) if np.isfinite(du).all() \
            else None
        algos.append("weight:winograd")
    if db:
        grads["bias"] = db[0]
    elif "bias" in needs:
        part = np.empty((min(n, WEIGHT_CHUNKS), c_out), dy.dtype)
        grads["bias"] = _sum_chunks(run(plane.plane_sums, dy.reshape(n, c_out, ho * wo), part))
    return grads, algos


def _grad_weight_generic(conv, run, dyt, x, wr, w_shape, p):
    """(dw, db) by the generic kernel, from dy in NHWC (``dyt``) and the weight in its layout
    (``wr``, from :func:`_weight_gkkio`): it visits only the real output positions, so a NaN
    or inf in x reaches exactly the weights PyTorch's would."""
    chunks = min(x.shape[0], WEIGHT_CHUNKS)
    xp = _padded_input(conv, run, x, p)
    part = np.zeros((chunks, *wr.shape), x.dtype)
    partb = np.zeros((chunks, w_shape[0]), x.dtype)
    run(conv.conv_grad_weight_generic, xp, dyt, part, partb, *p.stride, *p.dilation)
    dw = np.ascontiguousarray(_sum_chunks(part).transpose(0, 4, 3, 1, 2)).reshape(w_shape)
    return dw, _sum_chunks(partb)


def _grad_input_plane(plane, run, dy, w, x_shape, p, sums=None):
    """dx (stride 1) as the plane forward of padded dy with the flipped, transposed weight;
    None when the padding exceeds the dilated kernel (dy would need cropping). With ``sums`` (a
    list), also appends db, summed while dy is laid out."""
    kh, kw = w.shape[2:]
    (dh, dw_), (pt, pl) = p.dilation, p.padding
    gt, gl = dh * (kh - 1) - pt, dw_ * (kw - 1) - pl
    if p.stride != (1, 1) or gt < 0 or gl < 0:
        return None
    dx = np.empty(x_shape, dy.dtype)
    wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    wrap = pl == 0 and p.pad_bottom_right()[1] == 0  # D: 252 -> 196 positions per plane
    return _plane_forward(plane, run, dy, wflip, None, dx, gt, gl, dh, dw_, wrap, sums)


def _conv2d_backward_plane(run, dy, x, w, p, needs):
    """conv2d_backward through the padded-plane kernels (see ``_plane_ok``)."""
    from . import _numba_plane as plane

    n, c_in, h, w_ = x.shape
    c_out, _, kh, kw = w.shape
    ho, wo = p.out_hw
    (dh, dw_), (pt, pl) = p.dilation, p.padding
    dx = dwt = db = None
    algos = []
    # dw by products over padded planes (0 * inf) needs a finite x; else the exact kernels
    x_finite = "weight" not in needs or bool(np.isfinite(x).all())
    if _fused_ok(c_in, needs) and x_finite:
        return _conv2d_backward_fused(plane, run, dy, x, w, p, needs)
    db_sums = [] if "bias" in needs else None
    if "input" in needs:
        dx = _grad_input_plane(plane, run, dy, w, x.shape, p, db_sums)
        if dx is not None:
            algos.append("input:plane")
        else:
            dx = np.empty_like(x)
            conv = _kernels()[0]
            dyt = run(conv.nchw_to_nhwc, dy, np.empty((n, ho, wo, c_out), dy.dtype))
            dxp = np.zeros((n, ho + dh * (kh - 1), wo + dw_ * (kw - 1), c_in), x.dtype)
            run(conv.conv_grad_input_generic, dyt, _weight_gkkio(w, 1), dxp, 1, 1, dh, dw_)
            run(conv.crop_nhwc_to_nchw, dxp, dx, pt, pl)
            algos.append("input:generic")
    if "weight" in needs and not x_finite:
        # The plane dot products also run over the dropped columns, where dy is 0: 0 * inf or
        # NaN there would reach weights PyTorch keeps finite. Rare input, exact path.
        conv = _kernels()[0]
        dyt = run(conv.nchw_to_nhwc, dy, np.empty((n, ho, wo, c_out), dy.dtype))
        dwt = _grad_weight_generic(conv, run, dyt, x, _weight_gkkio(w, 1), w.shape, p)[0]
        algos.append("weight:generic")
    elif "weight" in needs and _c16_ok(x.dtype, c_in, c_out, kw, dw_):
        dwt = _grad_weight_c16(run, dy, x, p)
        algos.append("weight:direct-c16")
    elif "weight" in needs:
        xp = _plane_input(plane, run, x, pt, pl, ho, wo, kh, kw, dh, dw_)
        wp = xp.shape[3]
        dyq = run(plane.pad_plane, dy, np.empty((n, c_out, ho, wp), dy.dtype), 0, 0,
                  np.empty(0, dy.dtype))
        chunks = min(n, WEIGHT_CHUNKS)
        part = np.empty((chunks, c_out, c_in, kh, kw), x.dtype)
        run(plane.conv_grad_weight_plane, xp, dyq.reshape(n, c_out, ho * wp), part, dh, dw_)
        dwt = _sum_chunks(part)
        algos.append("weight:plane")
    if db_sums:
        db = db_sums[0]
    elif "bias" in needs:
        part = np.empty((min(n, WEIGHT_CHUNKS), c_out), dy.dtype)
        db = _sum_chunks(run(plane.plane_sums, dy.reshape(n, c_out, ho * wo), part))
    record_algorithm("conv2d_backward", "numba:plane(" + ",".join(algos) + ")")
    return dx, dwt, db


FUSED_MAX_C_IN = 4


def _fused_ok(c_in, needs) -> bool:
    """The fused plane backward serves first layers (C_in <= 4) when dx or dw is wanted: dy, the
    largest array there, is then read once for all of them instead of once per gradient. (In
    training a first layer needs only dw and db: A 0.78 -> 0.63 ms, C 0.31 -> 0.26 ms.)"""
    return c_in <= FUSED_MAX_C_IN and ("input" in needs or "weight" in needs)


def _conv2d_backward_fused(plane, run, dy, x, w, p, needs):
    """conv2d_backward of a stride-1 first layer in one pass over dy (see ``_fused_ok``)."""
    n, c_in, h, w_ = x.shape
    c_out, _, kh, kw = w.shape
    ho, wo = p.out_hw
    (dh, dw_), (pt, pl) = p.dilation, p.padding
    ry, rx = dh * (kh - 1), dw_ * (kw - 1)
    if x.dtype == np.float32:
        kernel, lanes = plane.conv_backward_plane_fused, plane.FUSED_LANES
    else:
        kernel, lanes = plane.conv_backward_plane_fused64, plane.FUSED_LANES64
    wd = wo + 2 * rx
    reach = -(-h * wd // lanes) * lanes + pt * wd + pl + ry * wd + rx  # furthest dx read + 1
    hd = max(-(-reach // wd) + 1, ry + ho)  # dx's reads, and dy's own rows (padding > reach)
    hq = ho + 2 * ry + 1
    chunks = min(n, WEIGHT_CHUNKS)
    wf = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
    dx = np.empty(x.shape if "input" in needs else (0, 0, 0, 0), x.dtype)
    pdw = np.empty((chunks, c_out, c_in, kh, kw), x.dtype)
    pdb = np.empty((chunks, c_out), x.dtype)
    want = np.array(["input" in needs, "weight" in needs, "bias" in needs])
    run(kernel, x, dy, wf, dx, pdw, pdb, pt, pl, dh, dw_, hd, wd, hq, want)
    dx = dx if "input" in needs else None
    dwt = _sum_chunks(pdw) if "weight" in needs else None
    db = _sum_chunks(pdb) if "bias" in needs else None
    algos = [a for a in ("input", "weight", "bias") if a in needs]
    record_algorithm("conv2d_backward", "numba:plane-fused(" + ",".join(algos) + ")")
    return dx, dwt, db


def _c16_ok(dtype, c_in, c_out, kw, dil_w) -> bool:
    """The 16-channel grad-weight blocks pay when they are mostly full: float32, 9 to 16
    output channels, a (kW, C_in) run of at least 12 rows, unit column dilation (shape D:
    0.78 -> 0.35 ms; on shape C, 6 channels and a 5-row run, the plane kernel stays 2x
    faster)."""
    return dtype == np.float32 and 9 <= c_out <= 16 and kw * c_in >= 12 and dil_w == 1


def _run_offsets(n, ho, wo, hp, wp, c_in, sh, sw):
    """Offset of each output pixel's (kW, C_in) run in kernel row 0 of x padded in NHWC
    (N, Hp, Wp, C_in): the ``xbase`` of the register-blocked grad-weight kernels."""
    return ((np.arange(n)[:, None, None] * hp + np.arange(ho)[None, :, None] * sh) * (wp * c_in)
            + np.arange(wo)[None, None, :] * (sw * c_in)).ravel()


def _grad_weight_c16(run, dy, x, p):
    """dw of a stride-1 float32 layer with C_out <= 16 and unit column dilation: the
    16-channel register blocks of ``_numba_direct.conv_grad_weight_c16`` (with 256-bit vectors:
    :func:`_grad_weight_direct_vec`, whose blocks are 16 channels wide anyway)."""
    from . import _numba_conv as conv
    from . import _numba_direct as direct

    if _explicit_vectors():
        return _grad_weight_direct_vec(conv, direct, run, dy, x, p)
    n, c_in, h, w_ = x.shape
    c_out = dy.shape[1]
    (kh, kw), (ho, wo), dh = p.kernel_hw, p.out_hw, p.dilation[0]
    hp = ho + dh * (kh - 1)
    wp = wo + kw - 1
    xbase = _run_offsets(n, ho, wo, hp, wp, c_in, 1, 1)
    r = kw * c_in
    size = n * hp * wp * c_in
    flat = np.zeros(size + direct.RUN16, x.dtype)  # spare zeros for the padded run rows
    run(conv.pad_nhwc, x, flat[:size].reshape(n, hp, wp, c_in), *p.padding)
    dy4 = run(direct.nchw_to_nhwc_padded, dy, np.empty((n, ho, wo, 64), dy.dtype), direct.C16)
    part = np.empty((min(n * ho * wo, WEIGHT_CHUNKS), kh, -(-r // direct.RUN16) * direct.RUN16,
                     direct.C16), x.dtype)
    run(direct.conv_grad_weight_c16, flat, wp * c_in, hp, xbase, dy4.reshape(-1, 64), part, dh)
    dwk = _sum_chunks(part)[:, :r, :c_out]
    return np.ascontiguousarray(dwk.reshape(kh, kw, c_in, c_out).transpose(3, 2, 0, 1))


def _grad_weight_direct_vec(conv, direct, run, dy, x, p):
    """dw (groups 1, unit column dilation) by the 256-bit vector blocks of
    ``conv_grad_weight_direct_vec*``: dy in blocks of 16 (float64: 8) channels, partial sums
    over WEIGHT_CHUNKS pixel chunks added in order."""
    from . import _numba_simd as simd

    n, c_in = x.shape[:2]
    c_out, (kh, kw), (ho, wo) = dy.shape[1], p.kernel_hw, p.out_hw
    lanes = simd.LANES[x.dtype]
    unit = direct.VNV * lanes
    cp = _padded_channels(c_out, unit)
    dyb = run(direct.nchw_to_channel_blocks, dy, np.empty((cp // unit, n, ho, wo, unit), dy.dtype))
    xp = _padded_input(conv, run, x, p)
    hp, wp = xp.shape[1], xp.shape[2]
    xbase = _run_offsets(n, ho, wo, hp, wp, c_in, *p.stride)
    part = np.empty((min(n * ho * wo, WEIGHT_CHUNKS), kh, kw * c_in, cp), x.dtype)
    kernel = direct.conv_grad_weight_direct_vec32 if lanes == 8 else \
        direct.conv_grad_weight_direct_vec64
    run(kernel, xp.reshape(n, hp, -1), dyb.reshape(cp // unit, -1, unit), xbase, part, c_in,
        p.dilation[0])
    dwk = _sum_chunks(part)
    return np.ascontiguousarray(dwk.reshape(kh, kw, c_in, cp)[..., :c_out].transpose(3, 2, 0, 1))


def _conv2d_backward_direct(conv, direct, run, dy, x, w, p, needs):
    """conv2d_backward through the register-blocked kernels (see ``_direct_ok``)."""
    n, c_in, h, w_ = x.shape
    c_out, _, kh, kw = w.shape
    ho, wo = p.out_hw
    algos = []
    dx = dw = db = None
    if "input" in needs and c_in % direct.CB and p.stride == (1, 1):
        # C_in is not a multiple of the channel block: the plane kernel wastes no channels
        from . import _numba_plane as plane

        dx = _grad_input_plane(plane, run, dy, w, x.shape, p)
        if dx is not None:
            algos.append("input:plane")
    if "input" in needs and dx is None:
        dx = _grad_input_as_forward(conv, direct, run, dy, w, x.shape, p)
        algos.append("input:direct" if dx is not None else "input:generic")
        if dx is None:
            dyt = run(conv.nchw_to_nhwc, dy, np.empty((n, ho, wo, c_out), dy.dtype))
            hp = (ho - 1) * p.stride[0] + p.dilation[0] * (kh - 1) + 1
            wp = (wo - 1) * p.stride[1] + p.dilation[1] * (kw - 1) + 1
            dxp = np.zeros((n, hp, wp, c_in), x.dtype)
            run(conv.conv_grad_input_generic, dyt, _weight_gkkio(w, 1), dxp, *p.stride,
                *p.dilation)
            dx = run(conv.crop_nhwc_to_nchw, dxp, np.empty_like(x), *p.padding)
    if _explicit_vectors():  # dy in channel blocks for dw; db from dy as it is
        from . import _numba_plane as plane

        if "weight" in needs:
            dw = _grad_weight_direct_vec(conv, direct, run, dy, x, p)
            algos.append("weight:direct")
        if "bias" in needs:
            part = np.empty((min(n, WEIGHT_CHUNKS), c_out), dy.dtype)
            db = _sum_chunks(run(plane.plane_sums, dy.reshape(n, c_out, ho * wo), part))
    elif "weight" in needs or "bias" in needs:
        kernel = (direct.conv_grad_weight_direct if x.dtype == np.float32
                  else direct.conv_grad_weight_direct64)
        cp = _padded_channels(c_out)
        dyt = run(direct.nchw_to_nhwc_padded, dy, np.empty((n, ho, wo, cp), dy.dtype), cp)
        dyt = dyt.reshape(n * ho * wo, cp)
        if "weight" in needs:
            xp = _padded_input(conv, run, x, p)
            hp, wp = xp.shape[1], xp.shape[2]
            xbase = _run_offsets(n, ho, wo, hp, wp, c_in, *p.stride)
            chunks = min(dyt.shape[0], WEIGHT_CHUNKS)
            part = np.empty((chunks, kh, kw * c_in, cp), x.dtype)
            run(kernel, xp.reshape(n, hp, -1), dyt, xbase, part, c_in,
                p.dilation[0])
            dwk = _sum_chunks(part)
            dw = np.ascontiguousarray(
                dwk.reshape(kh, kw, c_in, cp)[..., :c_out].transpose(3, 2, 0, 1))
            algos.append("weight:direct")
        if "bias" in needs:
            part = np.empty((min(dyt.shape[0], WEIGHT_CHUNKS), cp), dy.dtype)
            db = _sum_chunks(run(direct.column_sums, dyt, part))[:c_out].copy()
    record_algorithm("conv2d_backward", "numba:direct-nhwc(" + ",".join(algos) + ")")
    return dx, dw, db


def _grad_input_as_forward(conv, direct, run, dy, w, x_shape, p):
    """dx through the direct forward kernel, one stride phase at a time.

    Along one axis, dx[i] = sum over taps k and outputs o with o*s + k*d = i + pad of
    dy[o] * w[k]. The rows i with (i + pad) % s == r receive only the taps with k*d % s == r:
    a stride-1 correlation of dy with those taps reversed, whose dilation is d / gcd(d, s). So
    each of the s_h*s_w phases is one forward call writing straight into its rows and columns
    of dx (strided output). Returns None where that does not apply (C_in < 32, a column step
    other than 1, or a phase that would need dy cropped at the top or left).
    """
    n, c_in, h, w_ = x_shape
    c_out, _, kh, kw = w.shape
    if c_in < 32:
        return None
    axes = []
    for size, k, s, d, pad in zip((h, w_), (kh, kw), p.stride, p.dilation, p.padding):
        phases = []
        for r in range(s):
            taps = [t for t in range(k) if (t * d - r) % s == 0]
            a0 = -(-(pad - r) // s)  # first a with s*a + r - pad >= 0
            a1 = (size - 1 + pad - r) // s  # last a with s*a + r - pad < size
            if a1 < a0:
                continue
            if not taps:
                phases.append((r, a0, a1 - a0 + 1, [], 0, 1))
                continue
            step = d // math.gcd(d, s)
            ms = [(t * d - r) // s for t in taps]
            top = ms[-1] - a0
            if top < 0:
                return None
            phases.append((r, a0, a1 - a0 + 1, taps, top, step))
        axes.append(phases)
    if any(ph[5] != 1 for ph in axes[1] if ph[3]):
        return None
    dx = np.zeros(x_shape, dy.dtype) if any(not ph[3] for ax in axes for ph in ax) else \
        np.empty(x_shape, dy.dtype)
    kernel, unit, _ = _direct_forward_kernel(direct, dy.dtype)
    cp = _padded_channels(c_in, unit)
    zeros = np.zeros(cp, dy.dtype)
    (sh, sw), (ph_, pw_) = p.stride, p.padding
    # dy is padded once, for all phases: phase (top_h, top_w) starts at row th0 - top_h and
    # column tw0 - top_w of it.
    live = [(a, b) for a in axes[0] for b in axes[1] if a[3] and b[3]]
    if not live:
        return dx  # no tap reaches any row and column: dx is zeros
    th0 = max(a[4] for a, _ in live)
    tw0 = max(b[4] for _, b in live)
    hp = max(th0 - a[4] + a[2] + a[5] * (len(a[3]) - 1) for a, _ in live)
    wp = max(tw0 - b[4] + b[2] + len(b[3]) - 1 for _, b in live)
    dyp = run(conv.pad_nhwc, dy, np.empty((n, hp, wp, c_out), dy.dtype), th0, tw0)
    dyp2 = dyp.reshape(n, hp, -1)
    for (rh, ah, nh, tap_h, top_h, step_h), (rw, aw, nw, tap_w, top_w, _) in live:
        sub = w[:, :, tap_h[::-1]][:, :, :, tap_w[::-1]]  # (C_out, C_in, th, tw), reversed
        th, tw = len(tap_h), len(tap_w)
        wk = np.zeros((th, tw * c_out, cp), dy.dtype)
        wk[:, :, :c_in] = sub.transpose(2, 3, 0, 1).reshape(th, tw * c_out, c_in)
        base = (sh * ah + rh - ph_) * w_ + (sw * aw + rw - pw_)
        ys = np.array([base, c_in * h * w_, h * w_, sh * w_, sw], np.int64)
        x0 = ((th0 - top_h) * wp + (tw0 - top_w)) * c_out
        run(kernel, dyp2, wk, zeros, dx.reshape(-1), ys, c_in, nh, nw, c_out, 1, 1, step_h, x0)
    return dx


def _sum_chunks(part):
    """Sum partial results over axis 0 in a fixed serial order."""
    total = part[0].copy()
    for t in range(1, part.shape[0]):
        total += part[t]
    return total


# ------------------------------------------------------------------------------------ pool


def max_pool2d(x, p):
    """(y, idx) of max_pool2d with PyTorch's indices; see ``fastconv.max_pool2d``."""
    _, _, pool, thr = _kernels()
    n, c, h, w = x.shape
    ho, wo = p.out_hw
    y = np.empty((n, c, ho, wo), x.dtype)
    idx = np.empty((n, c, ho, wo), np.int64)
    if (p.kernel_hw == (2, 2) and p.stride == (2, 2) and p.padding == (0, 0)
            and p.dilation == (1, 1) and 2 * ho <= h and 2 * wo <= w):
        thr.run(pool.max_pool_forward_k2s2, x, y, idx)
        record_algorithm("max_pool2d", "numba:k2s2")
    else:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = p.kernel_hw, p.stride, p.padding, p.dilation
        h0, hn = _pool_taps(h, ho, kh, sh, ph, dh)
        w0, wn = _pool_taps(w, wo, kw, sw, pw, dw)
        if sw == 2 and h * w < 2**31 - 4 * (w + kw * dw + pw) - 64:  # int32 indices
            wv = -(-wo // pool.VB) * pool.VB
            hp = max(wv + dw * (kw - 1) // 2 + 1, (w + pw) // 2 + 2)
            thr.run(pool.max_pool_forward_s2, x, y, idx, h0, hn, w0, kw, pw, dh, dw, hp)
            record_algorithm("max_pool2d", "numba:parity-s2")
        else:
            thr.run(pool.max_pool_forward, x, y, idx, h0, hn, w0, wn, dh, dw)
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
    _, _, pool, thr = _kernels()
    dx = np.empty(input_shape, dy.dtype)
    bad = np.zeros(dy.shape[0] * dy.shape[1], np.uint8)
    thr.run(pool.max_pool_backward, dy, idx, dx, dx.nbytes >= pool.STREAM_MIN_BYTES, bad)
    if bad.any():
        raise pool_index_error(idx, input_shape)
    record_algorithm("max_pool2d_backward", "numba:scatter")
    return dx
