"""Which algorithm runs for a shape, decided once for every CPU backend.

The compiled CPU backends (``numba``, ``cython``) share their planning here and only execute:
a plan names the algorithm of each pass, and the backend maps each name to its kernels. This
module holds no kernel and imports no compiler: NumPy arithmetic on shapes only.

Algorithm names follow one grammar, the one ``fastconv.last_algorithm`` records::

    forward:   <backend>:<algorithm>                       e.g. numba:winograd-f2x2
    backward:  <backend>:<grad>:<algorithm>[ <grad>:<algorithm>]...
                           e.g. cython:input:plane weight:flat-blocked bias:sum
    fallback:  <algorithm>><exact algorithm>               e.g. numba:winograd-f2x2>direct-nhwc-c64

``<grad>`` is ``input``, ``weight`` or ``bias`` (only those asked for, in that order);
``a>b`` says that ``a`` ran, met an inf, a NaN or an overflow inside its transforms, and ``b``
recomputed that result exactly (Winograd mixes a whole tile, which would spread a non-finite
value to outputs PyTorch keeps finite).

The rules (each backend's kernels differ in their register blocks, so the exact families are
chosen per backend where their measured crossovers differ; see docs/performance.md):

* ``pointwise-gemm``: float32 1x1, stride 1, no padding, groups 1, >= 64 pixels (backward:
  also C_out >= 64): one matrix product per image in NCHW as it is.
* ``winograd-f2x2``: float32 3x3, stride and dilation 1, groups 1, C_in >= 16, C_out >= 32,
  W_out >= 7. dx is the same forward on dy padded by 2 - padding (padding <= 2, W >= 7), else
  the exact family; dw is the transformed product over ``WEIGHT_CHUNKS`` chunks of tile rows.
* ``plane-fused``: the backward of a first layer (stride 1, groups 1, C_in <=
  ``FUSED_MAX_C_IN``) reads dy once for all gradients. Wanted when dx is (both backends) or dw
  is (numba: its fused kernel can skip dx, the cython one always computes it); dw only for a
  finite x (the plane dot products meet the zero padding: 0 * inf).
* the exact families: see :func:`numba_forward`, :func:`cython_forward` and the backward
  planners beside them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import numpy as np

#: Grad-weight partial sums are over this many fixed chunks (images, pixels or tile rows),
#: added serially in order: the result is the same for every thread count.
WEIGHT_CHUNKS = 8
#: Input channels up to which a stride-1, groups-1 backward takes the fused plane kernel.
FUSED_MAX_C_IN = 4
#: Input channels below which a float32 layer with 9-16 output channels takes the numba
#: kernels vectorized over output channels.
SMALL_MAX_C_IN = 17
#: The order gradients are named in.
GRADS = ("input", "weight", "bias")
#: Small work: a numba forward convolution of fewer multiply-adds than this, or a max-pool of
#: fewer input elements than ``SMALL_POOL_ELEMENTS``, runs its kernels on the calling thread
#: alone; waking the thread pool costs more than the other threads save there (measured:
#: docs/performance.md, section smallwork).
SMALL_CONV_MACS = 2_000_000
SMALL_POOL_ELEMENTS = 100_000
#: A zero-padded plane input of at most this many elements is laid out by NumPy, not a kernel.
SMALL_PAD_ELEMENTS = 4096


# ------------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class ConvPlan:
    """The forward algorithm, and the exact one that recomputes a non-finite Winograd result."""

    algorithm: str
    fallback: str | None = None


@dataclass(frozen=True)
class BackwardPlan:
    """The algorithm of each wanted gradient (``GRADS`` order).

    ``family`` is the executor pass that computes them together (``winograd-f2x2``,
    ``pointwise-gemm``, ``plane-fused``, or an exact family); gradients it leaves to the exact
    kernels (``input`` of a Winograd layer with padding > 2) are planned again by
    :func:`execute_backward`.
    """

    family: str
    parts: tuple[tuple[str, str], ...]

    def __getitem__(self, grad: str) -> str | None:
        return dict(self.parts).get(grad)

    @property
    def needs(self) -> tuple[str, ...]:
        return tuple(g for g, _ in self.parts)


@lru_cache(maxsize=1024)
def backward_name(backend: str, parts: tuple) -> str:
    """``<backend>:input:<a> weight:<b> ...`` of ``parts`` ((grad, algorithm) pairs)."""
    order = {g: i for i, g in enumerate(GRADS)}
    return f"{backend}:" + " ".join(f"{g}:{a}" for g, a in sorted(parts, key=lambda p: order[p[0]]))


def execute_backward(backend, plan: BackwardPlan, run, replan, needs):
    """(dx, dw, db) of ``plan`` through the executor ``run(plan) -> {grad: array or None}``.

    ``run`` may leave a planned gradient None (a non-finite value inside the Winograd
    transforms) or not compute one its family does not serve; those are computed by the exact
    plan ``replan(missing)`` and recorded as ``<planned>><exact>``. Returns the gradients and
    the name to record.
    """
    grads = run(plan)
    missing = [g for g in GRADS if g in needs and grads.get(g) is None]
    parts = dict(plan.parts)
    if missing:
        exact = replan(tuple(missing))
        more = run(exact)
        for g in missing:
            grads[g] = more[g]
            parts[g] = f"{parts[g]}>{exact[g]}" if g in parts else exact[g]
    name = backward_name(backend, tuple(parts.items()))
    return (grads.get("input"), grads.get("weight"), grads.get("bias")), name


# ------------------------------------------------------------------------------ shared rules


def pointwise_ok(p, dtype) -> bool:
    """1x1 float32, stride 1, no padding, groups 1, at least one 64-pixel register block per
    image: a matrix product per image, in NCHW as it is."""
    return (dtype == np.float32 and p.groups == 1 and p.kernel_hw == (1, 1)
            and p.stride == (1, 1) and p.padding == (0, 0) and p.out_hw[0] * p.out_hw[1] >= 64)


def winograd_ok(p, dtype, c_in: int, c_out: int) -> bool:
    """Winograd F(2x2, 3x3): float32 3x3, stride and dilation 1, groups 1, with enough channels
    that the 16 small products run at full register-block width, and at least one register
    block of tiles per tile row."""
    return (dtype == np.float32 and p.groups == 1 and p.kernel_hw == (3, 3)
            and p.stride == (1, 1) and p.dilation == (1, 1) and c_in >= 16 and c_out >= 32
            and winograd_wide_enough(p.out_hw[1]))


def winograd_wide_enough(width: int) -> bool:
    """At least one register block of 4 tiles (2 columns each) per tile row."""
    return width >= 7


def winograd_input_ok(p, in_w: int) -> bool:
    """dx by the Winograd forward on dy padded by 2 - padding (padding <= 2, W >= 7)."""
    return max(p.padding) <= 2 and winograd_wide_enough(in_w)


def _winograd_backward(p, x, needs) -> BackwardPlan:
    """dw by Winograd, dx too where :func:`winograd_input_ok` (else the exact family's), db as
    a sum."""
    parts = [("input", "winograd-f2x2")] if "input" in needs and \
        winograd_input_ok(p, x.shape[3]) else []
    parts += [(g, "winograd-f2x2" if g == "weight" else "sum")
              for g in ("weight", "bias") if g in needs]
    return BackwardPlan("winograd-f2x2", tuple(parts))


def fused_ok(p, c_in: int, needs, skips_input: bool) -> bool:
    """The fused plane backward of a first layer: stride 1, groups 1, C_in <= FUSED_MAX_C_IN,
    and dx wanted (or dw, where the kernel can skip dx): dy, the largest array there, is read
    once for every gradient instead of once per gradient."""
    wanted = "input" in needs or (skips_input and "weight" in needs)
    return p.groups == 1 and p.stride == (1, 1) and c_in <= FUSED_MAX_C_IN and wanted


class _Input(NamedTuple):
    """What the rules read of x: its shape, its dtype, and whether it is finite."""

    shape: tuple
    dtype: object
    is_finite: bool


def finite(x) -> bool:
    return x.is_finite if isinstance(x, _Input) else bool(np.isfinite(x).all())


def _by_finiteness(rules, p, x, c_out, needs, *args):
    """``rules(p, x, c_out, needs, *args)`` planned once per shape (cached) for a finite and a
    non-finite x; x is scanned for inf and NaN only where the two plans differ."""
    plans = _both(rules, p, x.shape, x.dtype, c_out, frozenset(needs), *args)
    return plans[0] if plans[0] == plans[1] or finite(x) else plans[1]


@lru_cache(maxsize=1024)
def _both(rules, p, shape, dtype, c_out, needs, *args):
    return tuple(rules(p, _Input(shape, dtype, ok), c_out, needs, *args) for ok in (True, False))


# ------------------------------------------------------------------------------ numba


def numba_plane_ok(p, c_in: int, c_out: int) -> bool:
    """The padded-plane kernels serve the few-channel layers, stride 1."""
    return p.groups == 1 and p.stride == (1, 1) and (c_in < 8 or c_out < 32)


def numba_direct_ok(p, c_out: int) -> bool:
    """The register-blocked kernels need groups 1, unit column dilation, and enough channels
    that padding them to a multiple of 64 wastes at most half the work."""
    return p.groups == 1 and p.dilation[1] == 1 and c_out >= 32


def numba_c16_ok(p, dtype, c_in: int, c_out: int) -> bool:
    """The 16-channel grad-weight blocks pay when they are mostly full: float32, 9 to 16
    output channels, a (kW, C_in) run of at least 12 rows, unit column dilation."""
    return dtype == np.float32 and 9 <= c_out <= 16 and p.kernel_hw[1] * c_in >= 12 \
        and p.dilation[1] == 1


def c16_ok(p, dtype, c_in: int, c_out: int) -> bool:
    """The kernels vectorized over 16 output channels (numba's ``_small``, cython's
    ``conv_bwd_c16``): float32, stride 1, groups 1,
    9 to 16 output channels, more input channels than a fused first layer and fewer than
    ``SMALL_MAX_C_IN``, padding within the dilated kernel's reach (dx reads dy shifted)."""
    return (dtype == np.float32 and p.groups == 1 and p.stride == (1, 1)
            and 9 <= c_out <= 16 and FUSED_MAX_C_IN < c_in < SMALL_MAX_C_IN
            and _flipped_padding_ok(p) and all(
                d * (k - 1) >= pad for d, k, pad in zip(p.dilation, p.kernel_hw,
                                                        p.pad_bottom_right())))


@lru_cache(maxsize=1024)
def numba_forward(p, dtype, c_in: int, c_out: int, wide: bool) -> ConvPlan:
    """The numba forward. ``wide``: Numba compiles for AVX-512 (the 4 x 64 register block),
    else the explicit 256-bit vector blocks (``-v256``)."""
    if pointwise_ok(p, dtype):
        return ConvPlan("pointwise-gemm")
    exact = _numba_forward_exact(p, c_in, c_out, wide, dtype)
    if winograd_ok(p, dtype, c_in, c_out):
        return ConvPlan("winograd-f2x2", exact)
    return ConvPlan(exact)


def _numba_forward_exact(p, c_in, c_out, wide, dtype=None) -> str:
    if c16_ok(p, dtype, c_in, c_out):
        return "c16"
    if numba_plane_ok(p, c_in, c_out):
        return "plane"
    if numba_direct_ok(p, c_out):
        return "direct-nhwc-c64" if wide else "direct-nhwc-v256"
    return "generic"


def numba_backward(p, x, c_out: int, needs, wide: bool, *, exact_only=False) -> BackwardPlan:
    """The numba backward for ``needs`` (x is read only for whether it is finite, and only
    where a rule depends on it). ``exact_only``: skip Winograd and the 1x1 products."""
    return _by_finiteness(_numba_backward, p, x, c_out, needs, wide, exact_only)


def _numba_backward(p, x, c_out, needs, wide, exact_only) -> BackwardPlan:
    c_in = x.shape[1]
    if not exact_only and winograd_ok(p, x.dtype, c_in, c_out):
        return _winograd_backward(p, x, needs)
    if not exact_only and pointwise_ok(p, x.dtype) and c_out >= 64:
        return _all("pointwise-gemm", needs, bias="sum")
    if c16_ok(p, x.dtype, c_in, c_out):
        return _all("c16-fused", needs)
    if numba_plane_ok(p, c_in, c_out):
        x_finite = "weight" not in needs or finite(x)
        if fused_ok(p, c_in, needs, skips_input=True) and x_finite:
            return _all("plane-fused", needs)
        parts = []
        if "input" in needs:
            parts.append(("input", "plane" if _flipped_padding_ok(p) else "generic"))
        if "weight" in needs:
            weight = "generic" if not x_finite else \
                "direct-c16" if numba_c16_ok(p, x.dtype, c_in, c_out) else "plane"
            parts.append(("weight", weight))
        if "bias" in needs:
            parts.append(("bias", "sum"))
        return BackwardPlan("plane", tuple(parts))
    if numba_direct_ok(p, c_out):
        parts = []
        if "input" in needs:
            if c_in % 64 and p.stride == (1, 1) and _flipped_padding_ok(p):
                # C_in not a multiple of the channel block: the plane kernel wastes none
                parts.append(("input", "plane"))
            elif c_in >= 32 and grad_input_phases(x.shape, (c_out, c_in, *p.kernel_hw), p):
                parts.append(("input", "direct-phases"))
            else:
                parts.append(("input", "generic"))
        if "weight" in needs:
            parts.append(("weight", "direct-c64" if wide else "direct-v256"))
        if "bias" in needs:
            parts.append(("bias", "sum"))
        return BackwardPlan("direct", tuple(parts))
    return _all("generic", needs)


def _all(algorithm, needs, bias=None) -> BackwardPlan:
    """Every wanted gradient by ``algorithm`` (the bias by ``bias`` where that is given)."""
    parts = tuple((g, bias if g == "bias" and bias else algorithm) for g in GRADS if g in needs)
    return BackwardPlan(algorithm, parts)


def _flipped_padding_ok(p) -> bool:
    """dx as a stride-1 forward of dy padded by dilation*(k-1) - padding: no padding beyond
    the dilated kernel (dy would need cropping)."""
    return all(d * (k - 1) >= pad for d, k, pad in zip(p.dilation, p.kernel_hw, p.padding))


# ------------------------------------------------------------------------------ cython

#: Output channels per group below which the cython forward uses its NCHW kernels.
NCHW_MAX_COUT = 16
#: Input channels below which a stride-1, groups-1 cython forward uses the padded-plane kernel
#: (it also serves every such layer with fewer than NCHW_MAX_COUT output channels).
PLANE_MAX_CIN = 2
#: Input channels below which a layer with 16 or fewer output channels reads NCHW directly.
NCHW_DIRECT_MAX_CIN = 8
#: Input channels per group below which a stride-1 cython grad-weight uses the flat kernel.
FLAT_WEIGHT_MAX_CIN = 8


@lru_cache(maxsize=1024)
def cython_forward(p, dtype, c_in: int, c_out: int) -> ConvPlan:
    """The cython forward (the exact family: :func:`cython_direct`)."""
    if pointwise_ok(p, dtype):
        return ConvPlan("pointwise-gemm")
    exact = cython_direct(p.groups, c_in, c_out, p.stride, (1, 1), p.dilation[1])
    if winograd_ok(p, dtype, c_in, c_out):
        return ConvPlan("winograd-f2x2", exact)
    return ConvPlan(exact)


@lru_cache(maxsize=1024)
def cython_direct(groups, c_in_g, c_out, stride, up, dil_w) -> str:
    """The cython kernel of a direct convolution of an input zero-inserted by ``up`` (dx as a
    forward: ``up`` = the forward's stride, ``stride`` = 1): ``plane`` (one input channel or
    few output channels), ``direct-nchw-flat`` (few output channels per group, stride 1),
    ``direct-nchw`` (2-7 input channels, <= 16 output channels), ``direct-blocked`` (NHWC
    register blocks, unit column dilation), else ``direct-nchw-rows`` / ``direct-nhwc``."""
    if groups == 1 and stride == (1, 1) and up == (1, 1) and (
            c_in_g < PLANE_MAX_CIN or c_out < NCHW_MAX_COUT):
        return "plane"
    few = c_out // groups < NCHW_MAX_COUT or c_in_g == 1
    if few and stride == (1, 1):
        return "direct-nchw-flat"
    if (groups == 1 and up == (1, 1) and c_out <= 16
            and PLANE_MAX_CIN <= c_in_g < NCHW_DIRECT_MAX_CIN):
        return "direct-nchw"
    if groups == 1 and dil_w == 1 and not few:
        return "direct-blocked"
    return "direct-nchw-rows" if few else "direct-nhwc"


def cython_backward(p, x, c_out: int, needs, *, exact_only=False) -> BackwardPlan:
    """The cython backward for ``needs`` (x read only for whether it is finite)."""
    return _by_finiteness(_cython_backward, p, x, c_out, needs, exact_only)


def _cython_backward(p, x, c_out, needs, exact_only) -> BackwardPlan:
    c_in_g = x.shape[1] // p.groups
    if not exact_only and winograd_ok(p, x.dtype, x.shape[1], c_out):
        return _winograd_backward(p, x, needs)
    if not exact_only and pointwise_ok(p, x.dtype) and c_out >= 64:
        return _all("pointwise-gemm", needs, bias="sum")
    if (not exact_only and fused_ok(p, x.shape[1], needs, skips_input=False)
            and ("weight" not in needs or finite(x))):
        return _all("plane-fused", needs)
    if c16_ok(p, x.dtype, x.shape[1], c_out):
        return _all("c16-fused", needs)
    g = p.groups
    kh, kw = p.kernel_hw
    parts = []
    if "input" in needs:
        phases = g == 1 and p.stride != (1, 1) and \
            grad_input_phases(x.shape, (c_out, c_in_g, kh, kw), p) is not None
        parts.append(("input", "direct-phases" if phases else cython_direct(
            g, c_out // g, x.shape[1], (1, 1), p.stride, p.dilation[1])))
    if "weight" in needs:
        # Layers with <= 16 output channels and a (kW, C_in) run of >= 12 rows take the
        # direct kernel's 16-channel blocks. The flat kernel also multiplies x by the zero dy
        # of the grid's dropped columns: an inf or NaN in x takes the exact kernels.
        direct16 = g == 1 and p.dilation[1] == 1 and c_out <= 16 and kw * c_in_g >= 12
        if (p.stride == (1, 1) and c_in_g < FLAT_WEIGHT_MAX_CIN and not direct16
                and finite(x)):
            parts.append(("weight", "flat-blocked"))
        elif g == 1 and p.dilation[1] == 1:
            parts.append(("weight", "direct-blocked"))
        else:
            parts.append(("weight", "gemm-nhwc"))
    if "bias" in needs:
        parts.append(("bias", "sum"))
    return BackwardPlan("exact", tuple(parts))


# ------------------------------------------------------------------------------ layouts


def round_up(c: int, unit: int) -> int:
    """c rounded up to a multiple of ``unit`` (channel padding of the register blocks)."""
    return -(-c // unit) * unit


def chunks(m: int) -> int:
    """Partial sums of a grad-weight over ``m`` images or pixels (at most WEIGHT_CHUNKS)."""
    return min(m, WEIGHT_CHUNKS)


def sum_chunks(part):
    """Sum partial results over axis 0 in a fixed serial order."""
    total = part[0].copy()
    for t in range(1, part.shape[0]):
        total += part[t]
    return total


def padded_hw(p, out_hw=None) -> tuple[int, int]:
    """(Hp, Wp) of the input a (dilated, strided) window grid of ``out_hw`` reads."""
    (ho, wo), (sh, sw), (dil_h, dil_w) = out_hw or p.out_hw, p.stride, p.dilation
    kh, kw = p.kernel_hw
    return (ho - 1) * sh + dil_h * (kh - 1) + 1, (wo - 1) * sw + dil_w * (kw - 1) + 1


def weight_gkkio(w, groups):
    """OIHW (C_out, C_in/G, kH, kW) -> (G, kH, kW, C_in/G, C_out/G), C-contiguous: output
    channels innermost."""
    c_out, c_in_g, kh, kw = w.shape
    g_w = w.reshape(groups, c_out // groups, c_in_g, kh, kw)
    return np.ascontiguousarray(g_w.transpose(0, 3, 4, 2, 1))


def weight_krc(w, cp):
    """OIHW (C_out, C, kH, kW) -> (kH, kW*C, cp): each kernel row's (kW, C) run, output
    channels innermost, zero-padded to ``cp``."""
    c_out, c, kh, kw = w.shape
    wk = np.zeros((kh, kw * c, cp), w.dtype)
    wk[:, :, :c_out] = w.transpose(2, 3, 1, 0).reshape(kh, kw * c, c_out)
    return wk


def flipped_weight(w):
    """The weight of dx as a forward (groups 1): w flipped in (kH, kW), channels swapped."""
    return np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))


def padded_vector(v, length, dtype=None):
    """v (or zeros, for None) zero-padded to ``length``."""
    out = np.zeros(length, dtype if v is None else v.dtype)
    if v is not None:
        out[: v.shape[0]] = v
    return out


def run_offsets(n, ho, wo, hp, wp, c_in, sh, sw):
    """Offset of each output pixel's (kW, C_in) run in kernel row 0 of x padded in NHWC
    (N, Hp, Wp, C_in): the ``xbase`` of the register-blocked grad-weight kernels."""
    return ((np.arange(n)[:, None, None] * hp + np.arange(ho)[None, :, None] * sh) * (wp * c_in)
            + np.arange(wo)[None, None, :] * (sw * c_in)).ravel()


# ------------------------------------------------------------------------------ stride phases


@dataclass(frozen=True)
class Phase:
    """One stride phase of dx along one axis: rows ``i = stride*a + residue - pad`` for
    ``a`` in ``first .. first + count - 1`` receive only ``taps`` (reversed, a stride-1
    correlation of dy at dilation ``step``); dy is read from ``top`` rows above."""

    residue: int
    first: int
    count: int
    taps: tuple[int, ...]
    top: int
    step: int


@dataclass(frozen=True)
class PhaseSplit:
    """dx of a strided convolution as one stride-1 forward per (row phase, column phase).

    ``live``: the phase pairs that some tap reaches; dy padded once by (``top``, ``left``)
    to (``hp``, ``wp``) serves them all (phase (a, b) starts at row top - a.top, column
    left - b.top); ``covered``: every row and column of dx receives a tap (else dx starts as
    zeros)."""

    live: tuple[tuple[Phase, Phase], ...]
    covered: bool
    top: int = 0
    left: int = 0
    hp: int = 0
    wp: int = 0


@lru_cache(maxsize=1024)  # planned, then asked again by each backward call
def grad_input_phases(x_shape, w_shape, p) -> PhaseSplit | None:
    """The stride-phase split of dx (groups 1), or None where it does not apply.

    Along one axis, dx[i] = sum over taps k and outputs o with o*s + k*d = i + pad of
    dy[o] * w[k]. The rows i with (i + pad) % s == r receive only the taps with k*d % s == r:
    a stride-1 correlation of dy with those taps reversed, whose dilation is d / gcd(d, s).
    Not for a column step other than 1, or a phase that would need dy cropped at the top or
    left.
    """
    axes = []
    for size, k, s, d, pad in zip(x_shape[2:], w_shape[2:], p.stride, p.dilation, p.padding):
        phases = []
        for r in range(s):
            a0 = -(-(pad - r) // s)  # first a with s*a + r - pad >= 0
            a1 = (size - 1 + pad - r) // s  # last a with s*a + r - pad < size
            if a1 < a0:
                continue
            taps = tuple(t for t in range(k) if (t * d - r) % s == 0)
            top = (taps[-1] * d - r) // s - a0 if taps else 0
            if top < 0:
                return None
            phases.append(Phase(r, a0, a1 - a0 + 1, taps, top, d // math.gcd(d, s)))
        axes.append(phases)
    if any(ph.step != 1 for ph in axes[1] if ph.taps):
        return None
    live = tuple((a, b) for a in axes[0] for b in axes[1] if a.taps and b.taps)
    covered = all(ph.taps for ax in axes for ph in ax)
    if not live:
        return PhaseSplit(live, covered)
    top = max(a.top for a, _ in live)
    left = max(b.top for _, b in live)
    hp = max(top - a.top + a.count + a.step * (len(a.taps) - 1) for a, _ in live)
    wp = max(left - b.top + b.count + len(b.taps) - 1 for _, b in live)
    return PhaseSplit(live, covered, top, left, hp, wp)


def phase_weight(w, a: Phase, b: Phase):
    """(C_out, C_in, th, tw): the taps of phase pair (a, b), reversed."""
    return w[:, :, list(a.taps[::-1])][:, :, :, list(b.taps[::-1])]
