"""Validation and normalisation of every public argument: the only place that raises for user input.

The wrapper validates, the kernel trusts. Every public entry point in ``fastconv`` runs its
arguments through one of the ``*_args`` functions below before any backend sees them, so a
compiled kernel built without bounds checks can rely on:

* arrays are 4-D, C-contiguous, of one dtype (float32 or float64);
* every size, stride, padding and dilation is consistent, and the output is at least 1×1;
* pooling indices lie in ``[0, H*W)``.

Errors name the argument, the value and what was expected. ``ValueError`` for bad values and
shapes, ``TypeError`` for bad types and dtypes; never ``assert``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_DTYPE_NAMES = "float32 or float64"
CONV_NEEDS = ("input", "weight", "bias")


@dataclass(frozen=True)
class ConvParams:
    """Normalised geometry of one 2-D convolution.

    ``padding`` is the (top, left) zero padding. The bottom/right padding can differ from it
    (``padding="same"`` with an even kernel pads one more row at the bottom, as PyTorch does) and
    follows from ``out_hw``: see :meth:`pad_bottom_right`.

    Output size, per axis: ``out = (in + pad_lo + pad_hi - dilation*(k-1) - 1) // stride + 1``.
    """

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    in_hw: tuple[int, int]
    kernel_hw: tuple[int, int]
    out_hw: tuple[int, int]

    def pad_bottom_right(self) -> tuple[int, int]:
        """Rows/columns of padding needed after the input so that every window fits.

        Can be negative: trailing input rows/columns that no window reaches.
        """
        return tuple(
            (o - 1) * s + d * (k - 1) + 1 - i - p
            for o, s, d, k, i, p in zip(
                self.out_hw, self.stride, self.dilation, self.kernel_hw, self.in_hw, self.padding
            )
        )

    def macs(self, n: int, c_in: int, c_out: int) -> int:
        """Multiply-accumulates of the forward pass for batch ``n``."""
        kh, kw = self.kernel_hw
        ho, wo = self.out_hw
        return n * c_out * ho * wo * (c_in // self.groups) * kh * kw


@dataclass(frozen=True)
class PoolParams:
    """Normalised geometry of one 2-D max-pool.

    Windows are padded with -inf by ``padding`` on every side. Output size per axis:
    ``out = floor_or_ceil((in + 2*pad - dilation*(k-1) - 1) / stride) + 1``; with ``ceil_mode`` a
    last window that would start in the right padding is dropped (PyTorch's rule).
    """

    kernel_hw: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]


# ----------------------------------------------------------------------------------- helpers


def is_device_array(a) -> bool:
    """True for CUDA device arrays (numba device arrays, CuPy, torch CUDA tensors, ...)."""
    return not isinstance(a, np.ndarray) and hasattr(a, "__cuda_array_interface__")


# ------------------------------------------------------------------------- repeated geometries
#
# A layer calls the same op with the same shapes, dtypes and parameters again and again: the
# parameters normalised for one such call are kept, keyed by everything the checks read, and a
# repeated call only re-checks what the key cannot hold (the array types; contiguity is made as
# before). Only exact ``numpy.ndarray`` arrays and "plain" parameters (int, str, an (int, int)
# tuple, None, bool for ``ceil_mode``) take this path: ``True == 1`` and ``hash(True) ==
# hash(1)``, so a bool (or an int subclass) must never meet a key made from an int. Every
# other call, and every first call, runs the full checks, which alone raise.

_GEOMETRY_CACHE_MAX = 256
_conv_cache: dict = {}
_conv_backward_cache: dict = {}
_pool_cache: dict = {}


def _plain(v) -> bool:
    t = type(v)
    return t is int or t is str or (
        t is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int)


def _remember(cache: dict, key, value):
    if len(cache) >= _GEOMETRY_CACHE_MAX:
        cache.clear()  # many distinct geometries: start over (bounded memory)
    cache[key] = value
    return value


def _check_array(name: str, a, ndim: int | None = 4):
    """Check that ``a`` is an array of ndim ``ndim`` with a supported float dtype."""
    if a is None or not (isinstance(a, np.ndarray) or is_device_array(a)):
        raise TypeError(
            f"{name} must be a numpy.ndarray or a CUDA device array, got {type(a).__name__}"
        )
    dtype = np.dtype(a.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {dtype}, expected {_DTYPE_NAMES}")
    if ndim is not None and len(a.shape) != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D, got {len(a.shape)}-D array of shape {tuple(a.shape)}"
        )
    return a


def _same_dtype(named: dict):
    """All given arrays share one dtype; return it."""
    dtypes = {name: np.dtype(a.dtype) for name, a in named.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} is {d}" for n, d in dtypes.items())
        raise TypeError(f"mixed dtypes: {listing}; all arrays must share one dtype")
    return next(iter(dtypes.values()))


def _same_kind(named: dict):
    """Either all host arrays or all device arrays, never a mix."""
    kinds = {name: is_device_array(a) for name, a in named.items() if a is not None}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{n} is {'device' if k else 'host'}" for n, k in kinds.items())
        raise TypeError(f"mixed host and device arrays: {listing}")


def contiguous(a):
    """C-contiguous host array (one copy when needed); device arrays are left as they are."""
    if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
        return np.ascontiguousarray(a)
    return a


def _int(name: str, v, minimum: int) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v!r}")
    return int(v)


def pair(name: str, v, minimum: int) -> tuple[int, int]:
    """Normalise an int or an (h, w) pair of ints, each ``>= minimum``."""
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or an (h, w) pair, got {v!r}")
        try:
            return (_int(name, v[0], minimum), _int(name, v[1], minimum))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (in {name}={tuple(v)!r})") from None
    return (_int(name, v, minimum),) * 2


# ----------------------------------------------------------------------------------- conv


def _conv_geometry(x_shape, w_shape, stride, padding, dilation, groups) -> ConvParams:
    n, c_in, h, w_ = x_shape
    c_out, c_in_g, kh, kw = w_shape
    stride = pair("stride", stride, 1)
    dilation = pair("dilation", dilation, 1)
    groups = _int("groups", groups, 1)
    if c_in == 0:
        raise ValueError(f"x has 0 channels (shape {tuple(x_shape)}); expected at least 1")
    if h == 0 or w_ == 0:
        raise ValueError(f"x has an empty spatial dimension (shape {tuple(x_shape)})")
    if c_out == 0 or kh == 0 or kw == 0:
        raise ValueError(f"w has an empty dimension (shape {tuple(w_shape)})")
    if c_in % groups:
        raise ValueError(f"x has {c_in} channels, which groups={groups} does not divide")
    if c_out % groups:
        raise ValueError(f"w has {c_out} output channels, which groups={groups} does not divide")
    if c_in_g * groups != c_in:
        raise ValueError(
            f"x has {c_in} channels but w expects {c_in_g * groups} "
            f"(w.shape[1]={c_in_g}, groups={groups})"
        )
    eff = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    if isinstance(padding, str):
        if padding == "valid":
            lo = hi = (0, 0)
        elif padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride={stride}")
            total = (eff[0] - 1, eff[1] - 1)
            lo = (total[0] // 2, total[1] // 2)
            hi = (total[0] - lo[0], total[1] - lo[1])
        else:
            raise ValueError(f"padding must be an int, an (h, w) pair, 'same' or 'valid', got {padding!r}")
    else:
        lo = hi = pair("padding", padding, 0)
    padded = (h + lo[0] + hi[0], w_ + lo[1] + hi[1])
    if eff[0] > padded[0] or eff[1] > padded[1]:
        raise ValueError(
            f"kernel of effective size {eff} (kernel {(kh, kw)}, dilation {dilation}) is larger "
            f"than the padded input {padded} (input {(h, w_)}, padding {padding!r})"
        )
    out = tuple((padded[i] - eff[i]) // stride[i] + 1 for i in range(2))
    return ConvParams(stride, lo, dilation, groups, (h, w_), (kh, kw), out)


def conv2d_args(x, w, b, stride, padding, dilation, groups):
    """Validate ``fastconv.conv2d`` arguments.

    Returns ``(x, w, b, params)`` with host arrays made C-contiguous.
    """
    key = None
    if (type(x) is np.ndarray and type(w) is np.ndarray and _plain(stride) and _plain(padding)
            and _plain(dilation) and type(groups) is int):
        if b is None:
            key = (x.shape, w.shape, x.dtype, w.dtype, stride, padding, dilation, groups)
        elif type(b) is np.ndarray:
            key = (x.shape, w.shape, x.dtype, w.dtype, stride, padding, dilation, groups,
                   b.shape, b.dtype)
        p = _conv_cache.get(key)
        if p is not None:
            return contiguous(x), contiguous(w), (None if b is None else contiguous(b)), p
    _check_array("x", x)
    _check_array("w", w)
    if b is not None:
        _check_array("b", b, ndim=1)
    _same_kind({"x": x, "w": w, "b": b})
    _same_dtype({"x": x, "w": w, "b": b})
    p = _conv_geometry(x.shape, w.shape, stride, padding, dilation, groups)
    if b is not None and b.shape[0] != w.shape[0]:
        raise ValueError(f"b has length {b.shape[0]} but w has {w.shape[0]} output channels")
    if key is not None:
        _remember(_conv_cache, key, p)
    return contiguous(x), contiguous(w), (None if b is None else contiguous(b)), p


def conv2d_backward_args(dy, x, w, stride, padding, dilation, groups, needs):
    """Validate ``fastconv.conv2d_backward`` arguments.

    Returns ``(dy, x, w, params, needs)`` with ``needs`` a frozenset drawn from
    ``{"input", "weight", "bias"}``.
    """
    key = None
    if (type(dy) is np.ndarray and type(x) is np.ndarray and type(w) is np.ndarray
            and _plain(stride) and _plain(padding) and _plain(dilation) and type(groups) is int
            and type(needs) is tuple and all(type(v) is str for v in needs)):
        key = (dy.shape, x.shape, w.shape, dy.dtype, x.dtype, w.dtype, stride, padding,
               dilation, groups, needs)
        hit = _conv_backward_cache.get(key)
        if hit is not None:
            return (contiguous(dy), contiguous(x), contiguous(w)) + hit
    _check_array("dy", dy)
    _check_array("x", x)
    _check_array("w", w)
    _same_kind({"dy": dy, "x": x, "w": w})
    _same_dtype({"dy": dy, "x": x, "w": w})
    p = _conv_geometry(x.shape, w.shape, stride, padding, dilation, groups)
    expected = (x.shape[0], w.shape[0], *p.out_hw)
    if tuple(dy.shape) != expected:
        raise ValueError(f"dy has shape {tuple(dy.shape)}, expected {expected} (the output shape)")
    if isinstance(needs, str):
        needs = (needs,)
    try:
        needs_set = frozenset(needs)
    except TypeError:
        raise TypeError(f"needs must be a collection of {CONV_NEEDS}, got {needs!r}") from None
    unknown = needs_set - set(CONV_NEEDS)
    if unknown:
        raise ValueError(
            f"needs has unknown entries {sorted(unknown, key=repr)}; expected some of {CONV_NEEDS}"
        )
    if key is not None:
        _remember(_conv_backward_cache, key, (p, needs_set))
    return contiguous(dy), contiguous(x), contiguous(w), p, needs_set


# ----------------------------------------------------------------------------------- pool


def pool_output_size(size, k, s, p, d, ceil_mode) -> int:
    """PyTorch's pooling output size for one axis (may be < 1 for bad input)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1  # the last window would start in the right padding
    return out


def max_pool2d_args(x, kernel_size, stride, padding, dilation, ceil_mode):
    """Validate ``fastconv.max_pool2d`` arguments. Returns ``(x, params)``."""
    key = None
    if (type(x) is np.ndarray and _plain(kernel_size) and (stride is None or _plain(stride))
            and _plain(padding) and _plain(dilation) and type(ceil_mode) is bool):
        key = (x.shape, x.dtype, kernel_size, stride, padding, dilation, ceil_mode)
        params = _pool_cache.get(key)
        if params is not None:
            return contiguous(x), params
    _check_array("x", x)
    k = pair("kernel_size", kernel_size, 1)
    s = k if stride is None else pair("stride", stride, 1)
    p = pair("padding", padding, 0)
    d = pair("dilation", dilation, 1)
    if not isinstance(ceil_mode, (bool, np.bool_)):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    for i in range(2):
        if 2 * p[i] > k[i]:
            raise ValueError(
                f"padding={p} must be at most half of kernel_size={k} (got {p[i]} > {k[i]}/2)"
            )
    if 0 in tuple(x.shape[1:]):
        raise ValueError(f"x has an empty channel or spatial dimension (shape {tuple(x.shape)})")
    h, w_ = x.shape[2], x.shape[3]
    out = tuple(
        pool_output_size((h, w_)[i], k[i], s[i], p[i], d[i], bool(ceil_mode)) for i in range(2)
    )
    if out[0] < 1 or out[1] < 1:
        eff = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
        raise ValueError(
            f"kernel of effective size {eff} (kernel_size {k}, dilation {d}) is larger than the "
            f"padded input {(h + 2 * p[0], w_ + 2 * p[1])} (input {(h, w_)}, padding {p})"
        )
    for axis, size in enumerate((h, w_)):
        if not _every_window_hits_input(size, k[axis], s[axis], p[axis], d[axis], out[axis]):
            raise ValueError(
                f"with kernel_size={k}, stride={s}, padding={p}, dilation={d} some pooling "
                f"window of the {(h, w_)} input lies entirely in the padding; reduce padding "
                "or dilation"
            )
    params = PoolParams(k, s, p, d, bool(ceil_mode), (h, w_), out)
    if key is not None:
        _remember(_pool_cache, key, params)
    return contiguous(x), params


def _every_window_hits_input(size, k, s, p, d, out) -> bool:
    """True when every one of the ``out`` windows of one axis reads at least one input element.

    With dilation a window can straddle the input and read only padding, which PyTorch answers
    with -inf and an index outside the plane; fastconv refuses that geometry instead.
    """
    taps = (np.arange(out) * s - p)[:, None] + np.arange(k) * d
    return bool(((taps >= 0) & (taps < size)).any(axis=1).all())


def max_pool2d_backward_args(dy, idx, input_shape, check_range=True):
    """Validate ``fastconv.max_pool2d_backward`` arguments.

    Returns ``(dy, idx, input_shape)`` with ``idx`` int64 and ``input_shape`` a 4-tuple of ints.
    Indices of host arrays are range-checked here (:func:`check_pool_indices`) so the scatter
    kernels never write out of bounds, unless ``check_range`` is False: for a backend whose
    scatter kernel checks each index itself (``CHECKS_POOL_INDICES``), which saves a
    single-threaded pass over idx. The CUDA backend checks
    device-resident indices on the device.
    """
    _check_array("dy", dy)
    if idx is None or not (isinstance(idx, np.ndarray) or is_device_array(idx)):
        raise TypeError(f"idx must be an array of int64 indices, got {type(idx).__name__}")
    _same_kind({"dy": dy, "idx": idx})
    if not np.issubdtype(np.dtype(idx.dtype), np.integer):
        raise TypeError(f"idx has dtype {np.dtype(idx.dtype)}, expected int64")
    try:
        shape = tuple(_int("input_shape", v, 0) for v in input_shape)
    except TypeError:
        raise TypeError(f"input_shape must be a tuple of 4 ints, got {input_shape!r}") from None
    if len(shape) != 4:
        raise ValueError(f"input_shape must have 4 entries (N, C, H, W), got {input_shape!r}")
    if tuple(idx.shape) != tuple(dy.shape):
        raise ValueError(f"idx has shape {tuple(idx.shape)} but dy has shape {tuple(dy.shape)}")
    if tuple(dy.shape[:2]) != shape[:2]:
        raise ValueError(
            f"dy has shape {tuple(dy.shape)} but input_shape {shape} has (N, C) = {shape[:2]}"
        )
    if isinstance(idx, np.ndarray):
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        if check_range:
            check_pool_indices(idx, shape)
    elif np.dtype(idx.dtype) != np.int64:
        raise TypeError(f"device idx has dtype {np.dtype(idx.dtype)}, expected int64")
    return contiguous(dy), idx, shape


def check_pool_indices(idx, shape):
    """ValueError unless every entry of the int64 host array ``idx`` lies in [0, H*W)."""
    plane = shape[2] * shape[3]
    # One pass: as uint64 a negative index is >= 2**63, so the maximum catches both ends.
    if idx.size and idx.view(np.uint64).max() >= plane:
        raise pool_index_error(idx, shape)


def pool_index_error(idx, shape):
    """The ValueError for out-of-range max-pool indices ``idx`` of input planes ``shape[2:]``."""
    return ValueError(
        f"idx has values in [{idx.min()}, {idx.max()}], expected [0, {shape[2] * shape[3]}) "
        f"for input planes of {shape[2]}x{shape[3]}"
    )


def check_finite_scalar(name: str, v) -> float:
    """A finite real number (used by the layer API for learning rates and the like)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)
