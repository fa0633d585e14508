"""numba.cuda kernels of the ``cuda`` backend (NCHW activations, OIHW weights).

Imported only by :mod:`fastconv.backends.cuda.executor` on first use, never by ``import fastconv``.
:func:`build` makes one set of kernels per (block size, dtype), from one factory per family
(conv forward, grad-input, grad-weight, pool): the block size fixes the static
shared-memory buffers and the dtype fixes the shared/local buffers and constants, so a float32
kernel never touches float64 arithmetic. ``cuda.jit`` compiles each kernel at its first launch.

Every kernel walks its work with a grid-stride loop whose bounds are the same for all threads of
a block, so every thread reaches every ``syncthreads``. The kernels trust their arguments
(``fastconv._validate`` checked the geometry), except :func:`pool_backward`'s indices, which may
live on the device and are range-checked here.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
from numba import cuda

# Output channels per thread in the tiled forward pass (register blocking: each staged input
# value is used COB times) and per weight chunk staged in shared memory for grad-input.
COB = 8
# Input channels the tiled forward pass stages per barrier (fewer where shared memory is short).
CIB = 4


def tiled_conv_shared_elems(block: int, kernel_hw, stride, dilation) -> int:
    """Shared-memory elements :func:`conv_forward_tiled` needs per staged input channel.

    One input patch (the ``block`` x ``block`` output tile's receptive field: tile + halo) and
    the COB kernels that read it.
    """
    ph = (block - 1) * stride[0] + (kernel_hw[0] - 1) * dilation[0] + 1
    pw = (block - 1) * stride[1] + (kernel_hw[1] - 1) * dilation[1] + 1
    return ph * pw + COB * kernel_hw[0] * kernel_hw[1]


def grad_input_shared_elems(kernel_hw) -> int:
    """Elements of dynamic shared memory :func:`conv_grad_input_tiled` needs: COB kernels."""
    return COB * kernel_hw[0] * kernel_hw[1]


class _Spec(NamedTuple):
    """What one set of kernels is specialised on (compile-time constants of their closures)."""

    block: int  # T: tiles are T x T threads
    half: int  # the largest power of two below T*T: the first step of a tree reduction
    nb_dtype: object
    zero: object
    neg_inf: object



@cuda.jit(device=True)
def nchw_of(i, c_, h_, w_):
    """(n, c, h, w) of flat index ``i`` into a C-contiguous (N, c_, h_, w_) array."""
    w = i % w_
    t = i // w_
    h = t % h_
    t //= h_
    return t // c_, t % c_, h, w


@functools.lru_cache(maxsize=None)
def build(block: int, dtype_name: str) -> SimpleNamespace:
    """The kernels for tiles of ``block`` x ``block`` threads and arrays of ``dtype_name``."""
    np_dtype = np.dtype(dtype_name)
    half = 1
    while half * 2 < block * block:
        half *= 2
    spec = _Spec(block, half, cuda.float32 if np_dtype == np.float32 else cuda.float64,
                 np_dtype.type(0), np_dtype.type(-np.inf))
    return SimpleNamespace(**_conv_forward(spec), **_conv_grad_input(spec),
                           **_conv_grad_weight(spec), **_pool(spec))



def _conv_forward(spec: _Spec) -> dict:
    """The kernels of the forward: tiled (shared memory, COB output channels in registers)
    and direct."""
    T = spec.block
    TT = spec.block * spec.block
    ZERO = spec.zero
    nb_dtype = spec.nb_dtype

    @cuda.jit
    def conv_forward_tiled(x, w, b, has_bias, y, sh, sw, ph, pw, dil_h, dil_w, cib, chunks, tiles_h,
                           tiles_w):
        """y (N, C_out, H_out, W_out) = x * w (+ b), one T x T output tile per work item.

        Work item = (n, group, chunk of COB output channels, tile row, tile column). Per chunk of
        ``cib`` input channels of the group the block stages, in dynamic shared memory, their
        input patches under its tile (tile + halo, zero outside the input) and the COB kernels
        of each; shared memory holds ``cib * tiled_conv_shared_elems(...)`` elements.
        """
        # Loop order: items (grid-stride) > chunks of cib input channels (staged, then barrier)
        # > channel > kernel rows > kernel columns > COB output channels in registers: one
        # staged input value feeds COB FMAs, one barrier pair serves cib channels.
        smem = cuda.shared.array(0, nb_dtype)
        acc = cuda.local.array(COB, nb_dtype)
        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tid = ty * T + tx
        c_in, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
        c_out, ho, wo = y.shape[1], y.shape[2], y.shape[3]
        cin_g, kh, kw = w.shape[1], w.shape[2], w.shape[3]
        groups = c_in // cin_g
        cout_g = c_out // groups
        khw = kh * kw
        patch_h = (T - 1) * sh + (kh - 1) * dil_h + 1
        patch_w = (T - 1) * sw + (kw - 1) * dil_w + 1
        npatch = patch_h * patch_w
        wbase = cib * npatch  # the kernels follow the cib patches
        items = x.shape[0] * groups * chunks * tiles_h * tiles_w
        item = cuda.blockIdx.x
        while item < items:
            t = item
            tile_x = t % tiles_w
            t //= tiles_w
            tile_y = t % tiles_h
            t //= tiles_h
            chunk = t % chunks
            t //= chunks
            g = t % groups
            n = t // groups
            co0 = g * cout_g + chunk * COB
            nco = min(COB, (g + 1) * cout_g - co0)
            oh = tile_y * T + ty
            ow = tile_x * T + tx
            ih0 = tile_y * T * sh - ph
            iw0 = tile_x * T * sw - pw
            for j in range(COB):
                acc[j] = ZERO
            for cig0 in range(0, cin_g, cib):
                ncb = min(cib, cin_g - cig0)
                ci0 = g * cin_g + cig0
                i = tid
                while i < ncb * npatch:
                    q = i // npatch
                    rem = i - q * npatch
                    r = rem // patch_w
                    ih = ih0 + r
                    iw = iw0 + rem - r * patch_w
                    v = ZERO
                    if ih >= 0 and ih < h_ and iw >= 0 and iw < w_:
                        v = x[n, ci0 + q, ih, iw]
                    smem[i] = v
                    i += TT
                i = tid
                while i < ncb * COB * khw:
                    q = i // (COB * khw)
                    rem = i - q * (COB * khw)
                    j = rem // khw
                    k = rem - j * khw
                    v = ZERO
                    if j < nco:
                        v = w[co0 + j, cig0 + q, k // kw, k % kw]
                    smem[wbase + i] = v
                    i += TT
                cuda.syncthreads()
                if oh < ho and ow < wo:
                    for q in range(ncb):
                        pbase = q * npatch + ty * sh * patch_w + tx * sw
                        kbase = wbase + q * COB * khw
                        for a in range(kh):
                            row = pbase + a * dil_h * patch_w
                            for c in range(kw):
                                v = smem[row + c * dil_w]
                                k = kbase + a * kw + c
                                for j in range(COB):
                                    acc[j] += v * smem[k + j * khw]
                cuda.syncthreads()
            if oh < ho and ow < wo:
                for j in range(COB):  # constant trip count: acc stays in registers
                    if j < nco:
                        v = acc[j]
                        if has_bias:
                            v += b[co0 + j]
                        y[n, co0 + j, oh, ow] = v
            item += cuda.gridDim.x

    @cuda.jit
    def conv_forward_direct(x, w, b, has_bias, y, sh, sw, ph, pw, dil_h, dil_w):
        """y = x * w (+ b), one thread per output element, no shared memory.

        The fallback when the tiled kernel's patch does not fit in shared memory (huge dilation,
        stride or kernel).
        """
        # Loop order: output elements (grid-stride, W_out fastest for coalesced writes) > input
        # channels of the group > kernel rows > kernel columns.
        c_in, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
        c_out, ho, wo = y.shape[1], y.shape[2], y.shape[3]
        cin_g, kh, kw = w.shape[1], w.shape[2], w.shape[3]
        cout_g = c_out // (c_in // cin_g)
        total = x.shape[0] * c_out * ho * wo
        i = cuda.grid(1)
        while i < total:
            n, co, oh, ow = nchw_of(i, c_out, ho, wo)
            ci0 = (co // cout_g) * cin_g
            acc = ZERO
            for cig in range(cin_g):
                for a in range(kh):
                    ih = oh * sh - ph + a * dil_h
                    if ih >= 0 and ih < h_:
                        for c in range(kw):
                            iw = ow * sw - pw + c * dil_w
                            if iw >= 0 and iw < w_:
                                acc += x[n, ci0 + cig, ih, iw] * w[co, cig, a, c]
            if has_bias:
                acc += b[co]
            y[n, co, oh, ow] = acc
            i += cuda.gridDim.x * cuda.blockDim.x

    return dict(conv_forward_tiled=conv_forward_tiled, conv_forward_direct=conv_forward_direct)


def _conv_grad_input(spec: _Spec) -> dict:
    """The kernels of grad-input: the gather kernels, tiled and direct."""
    T = spec.block
    TT = spec.block * spec.block
    ZERO = spec.zero
    nb_dtype = spec.nb_dtype

    @cuda.jit
    def conv_grad_input_tiled(dy, w, dx, sh, sw, ph, pw, dil_h, dil_w, tiles_h, tiles_w):
        """dx (N, C_in, H, W) = sum over the outputs each input element feeds, one owner each.

        Work item = (n, input channel, tile row, tile column) of T x T input elements. The
        kernels of COB output channels at a time are staged in dynamic shared memory; dy is read
        from global memory (adjacent threads read adjacent or equal dy elements).
        """
        # Loop order: items (grid-stride) > chunks of COB output channels (staged, barrier) >
        # channel > kernel rows > kernel columns; the gather (not a scatter) keeps it race-free
        # and deterministic.
        smem = cuda.shared.array(0, nb_dtype)
        ty = cuda.threadIdx.y
        tx = cuda.threadIdx.x
        tid = ty * T + tx
        c_out, ho, wo = dy.shape[1], dy.shape[2], dy.shape[3]
        c_in, h_, w_ = dx.shape[1], dx.shape[2], dx.shape[3]
        cin_g, kh, kw = w.shape[1], w.shape[2], w.shape[3]
        cout_g = c_out // (c_in // cin_g)
        khw = kh * kw
        items = dx.shape[0] * c_in * tiles_h * tiles_w
        item = cuda.blockIdx.x
        while item < items:
            t = item
            tile_x = t % tiles_w
            t //= tiles_w
            tile_y = t % tiles_h
            t //= tiles_h
            ci = t % c_in
            n = t // c_in
            g = ci // cin_g
            cig = ci - g * cin_g
            ih = tile_y * T + ty
            iw = tile_x * T + tx
            acc = ZERO
            for co0 in range(g * cout_g, (g + 1) * cout_g, COB):
                nco = min(COB, (g + 1) * cout_g - co0)
                i = tid
                while i < nco * khw:
                    j = i // khw
                    k = i - j * khw
                    smem[i] = w[co0 + j, cig, k // kw, k % kw]
                    i += TT
                cuda.syncthreads()
                if ih < h_ and iw < w_:
                    for j in range(nco):
                        for a in range(kh):
                            th = ih + ph - a * dil_h
                            if th >= 0 and th % sh == 0 and th // sh < ho:
                                oh = th // sh
                                for c in range(kw):
                                    tw = iw + pw - c * dil_w
                                    if tw >= 0 and tw % sw == 0 and tw // sw < wo:
                                        acc += dy[n, co0 + j, oh, tw // sw] * smem[
                                            j * khw + a * kw + c
                                        ]
                cuda.syncthreads()
            if ih < h_ and iw < w_:
                dx[n, ci, ih, iw] = acc
            item += cuda.gridDim.x

    @cuda.jit
    def conv_grad_input_direct(dy, w, dx, sh, sw, ph, pw, dil_h, dil_w):
        """dx as :func:`conv_grad_input_tiled`, one thread per input element, no shared memory."""
        # Loop order: input elements (grid-stride, W fastest) > output channels of the group >
        # kernel rows > kernel columns.
        c_out, ho, wo = dy.shape[1], dy.shape[2], dy.shape[3]
        c_in, h_, w_ = dx.shape[1], dx.shape[2], dx.shape[3]
        cin_g, kh, kw = w.shape[1], w.shape[2], w.shape[3]
        cout_g = c_out // (c_in // cin_g)
        total = dx.shape[0] * c_in * h_ * w_
        i = cuda.grid(1)
        while i < total:
            n, ci, ih, iw = nchw_of(i, c_in, h_, w_)
            g = ci // cin_g
            cig = ci - g * cin_g
            acc = ZERO
            for co in range(g * cout_g, (g + 1) * cout_g):
                for a in range(kh):
                    th = ih + ph - a * dil_h
                    if th >= 0 and th % sh == 0 and th // sh < ho:
                        for c in range(kw):
                            tw = iw + pw - c * dil_w
                            if tw >= 0 and tw % sw == 0 and tw // sw < wo:
                                acc += dy[n, co, th // sh, tw // sw] * w[co, cig, a, c]
            dx[n, ci, ih, iw] = acc
            i += cuda.gridDim.x * cuda.blockDim.x

    return dict(conv_grad_input_tiled=conv_grad_input_tiled,
                conv_grad_input_direct=conv_grad_input_direct)


def _conv_grad_weight(spec: _Spec) -> dict:
    """The kernels of grad-weight and grad-bias: one block reduces each weight / channel."""
    TT = spec.block * spec.block
    HALF = spec.half
    ZERO = spec.zero
    nb_dtype = spec.nb_dtype

    @cuda.jit(device=True)
    def block_sum(red, tid, v):
        """Sum of ``v`` over the block's TT threads (fixed tree order: deterministic)."""
        red[tid] = v
        cuda.syncthreads()
        s = HALF
        while s > 0:
            if tid < s and tid + s < TT:
                red[tid] += red[tid + s]
            cuda.syncthreads()
            s //= 2
        total = red[0]
        cuda.syncthreads()  # red is reused by the next call
        return total

    @cuda.jit
    def conv_grad_weight(dy, x, dw, sh, sw, ph, pw, dil_h, dil_w):
        """dw (C_out, C_in/groups, kH, kW): one block owns each weight and reduces it.

        Work item = one weight (co, ci_g, a, c); the block's threads stride over the output
        positions (oh, ow) (ow fastest: coalesced reads) and loop over the batch inside, then a
        shared-memory tree sums the per-thread partials and thread 0 writes. One owner, no
        atomics: deterministic.
        """
        # Loop order: weights (grid-stride over blocks) > (oh, ow) strided over threads > n
        # (the index arithmetic and bounds test are paid once per position, not per image) >
        # block tree reduction.
        red = cuda.shared.array(TT, nb_dtype)
        tid = cuda.threadIdx.x
        c_in, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
        c_out, ho, wo = dy.shape[1], dy.shape[2], dy.shape[3]
        cin_g, kh, kw = dw.shape[1], dw.shape[2], dw.shape[3]
        cout_g = c_out // (c_in // cin_g)
        n_ = dy.shape[0]
        positions = ho * wo
        items = c_out * cin_g * kh * kw
        item = cuda.blockIdx.x
        while item < items:
            t = item
            c = t % kw
            t //= kw
            a = t % kh
            t //= kh
            cig = t % cin_g
            co = t // cin_g
            ci = (co // cout_g) * cin_g + cig
            acc = ZERO
            r = tid
            while r < positions:
                oh = r // wo
                ow = r - oh * wo
                ih = oh * sh - ph + a * dil_h
                iw = ow * sw - pw + c * dil_w
                if ih >= 0 and ih < h_ and iw >= 0 and iw < w_:
                    for n in range(n_):
                        acc += dy[n, co, oh, ow] * x[n, ci, ih, iw]
                r += TT
            total = block_sum(red, tid, acc)
            if tid == 0:
                dw[co, cig, a, c] = total
            item += cuda.gridDim.x

    @cuda.jit
    def conv_grad_bias(dy, db):
        """db (C_out,) = dy summed over (N, H_out, W_out); one block owns each channel."""
        # Loop order: channels (grid-stride over blocks) > (oh, ow) over threads > n > tree.
        red = cuda.shared.array(TT, nb_dtype)
        tid = cuda.threadIdx.x
        n_, c_out, ho, wo = dy.shape[0], dy.shape[1], dy.shape[2], dy.shape[3]
        positions = ho * wo
        co = cuda.blockIdx.x
        while co < c_out:
            acc = ZERO
            r = tid
            while r < positions:
                oh = r // wo
                ow = r - oh * wo
                for n in range(n_):
                    acc += dy[n, co, oh, ow]
                r += TT
            total = block_sum(red, tid, acc)
            if tid == 0:
                db[co] = total
            co += cuda.gridDim.x

    return dict(conv_grad_weight=conv_grad_weight, conv_grad_bias=conv_grad_bias)


def _pool(spec: _Spec) -> dict:
    """The kernels of max-pool forward, and its backward scatter (range-checked indices)."""
    ZERO = spec.zero
    NEG_INF = spec.neg_inf

    @cuda.jit
    def pool_forward(x, y, idx, kh, kw, sh, sw, ph, pw, dil_h, dil_w):
        """y, idx (N, C, H_out, W_out) = max and flat argmax (h*W + w) of each window.

        PyTorch's rule exactly: windows are clipped to the input (padding is -inf), the argmax
        starts at the first in-bounds element, and an element replaces the running maximum when
        it is greater or NaN: ties keep the first maximum; with NaNs the output is NaN and idx
        points at the window's last NaN (as torch returns it).
        """
        # Loop order: output elements (grid-stride, W_out fastest) > window rows > columns, in
        # row-major order, the order that decides ties.
        c_, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
        ho, wo = y.shape[2], y.shape[3]
        total = x.shape[0] * c_ * ho * wo
        i = cuda.grid(1)
        while i < total:
            n, ch, oh, ow = nchw_of(i, c_, ho, wo)
            hs = oh * sh - ph
            he = min(hs + (kh - 1) * dil_h + 1, h_)
            while hs < 0:
                hs += dil_h
            ws = ow * sw - pw
            we = min(ws + (kw - 1) * dil_w + 1, w_)
            while ws < 0:
                ws += dil_w
            best = NEG_INF
            arg = hs * w_ + ws
            for ih in range(hs, he, dil_h):
                for iw in range(ws, we, dil_w):
                    v = x[n, ch, ih, iw]
                    if v > best or v != v:
                        best = v
                        arg = ih * w_ + iw
            y[n, ch, oh, ow] = best
            idx[n, ch, oh, ow] = arg
            i += cuda.gridDim.x * cuda.blockDim.x

    @cuda.jit
    def fill_zero(a):
        """a (N, C, H, W) = 0."""
        # Loop order: elements (grid-stride, W fastest).
        c_, h_, w_ = a.shape[1], a.shape[2], a.shape[3]
        total = a.shape[0] * c_ * h_ * w_
        i = cuda.grid(1)
        while i < total:
            n, ch, ih, iw = nchw_of(i, c_, h_, w_)
            a[n, ch, ih, iw] = ZERO
            i += cuda.gridDim.x * cuda.blockDim.x

    @cuda.jit
    def pool_backward(dy, idx, dx, bad):
        """dx (zeroed) [n, c, idx // W, idx % W] += dy for every output element.

        Overlapping windows send several dy elements to one dx element: atomics (float atomics
        commute only up to rounding, so sums of 3+ overlapping terms may differ in the last
        bit between runs). An index outside [0, H*W) is skipped and sets ``bad[0] = 1``.
        """
        # Loop order: dy elements (grid-stride, W_out fastest: coalesced reads of dy and idx).
        c_, ho, wo = dy.shape[1], dy.shape[2], dy.shape[3]
        h_, w_ = dx.shape[2], dx.shape[3]
        total = dy.shape[0] * c_ * ho * wo
        i = cuda.grid(1)
        while i < total:
            n, ch, oh, ow = nchw_of(i, c_, ho, wo)
            k = idx[n, ch, oh, ow]
            if k >= 0 and k < h_ * w_:
                cuda.atomic.add(dx, (n, ch, k // w_, k % w_), dy[n, ch, oh, ow])
            else:
                bad[0] = 1
            i += cuda.gridDim.x * cuda.blockDim.x

    return dict(pool_forward=pool_forward, fill_zero=fill_zero, pool_backward=pool_backward)
