"""Register-blocked float32 matrix products for ``nn.Dense`` beside the numba backend.

Why not NumPy's BLAS: OpenBLAS's own threads and numba's compete for the same cores inside a
training step (see ``fastconv._cli.blas``), so ``fastconv train`` runs BLAS on one thread. These
kernels run on numba's threads instead, like the conv kernels around them.

``matmul_chunks`` computes ``a @ b`` for a C-contiguous ``b`` (K, N), or a batch of them, and an
any-strided ``a`` (M, K) (the numba backend's 1x1 convolutions use it too, one image per b):
the register block is RB rows of ``a`` x CB columns of ``b`` (4 x 64: sixteen 512-bit float32
accumulators): per step of the inner dimension, RB broadcasts of ``a`` and CB contiguous values
of ``b``. The inner dimension may be split into a fixed number of chunks (partial products the
caller adds in order), so the result does not depend on the thread count. Without AVX-512 that
block spills; ``*_vec`` are the same products in explicit 256-bit vector blocks (6 x 16), and
:func:`chunks_kernel` / :func:`sum_kernel` pick the kernel for this CPU.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from . import _simd as simd
from ._options import PARALLEL, U
from ._simd import vfma, vload, vsplat, vstore, vzero
from ._stack import prefer_wide_vectors, stack_array
from ._zmm import vload16, vsplat16, vstore16, vzero16

RB = 4  # rows of a per register block
CB = 64  # columns of b per register block (N must be at least this)
ACC = RB * CB
TILE = 64  # transpose block


@njit(**PARALLEL)
def matmul_chunks(a, b, bias, part):
    """part[t, i] (M, N) = a[:, K_t] @ b[i, K_t, :] (+ bias[:, None] in chunk 0) for every
    matrix b[i] of the batch b (B, K, N) and the chunks K_t = [t*K//T, (t+1)*K//T) of the inner
    dimension, T = part.shape[0]. ``a`` (M, K) any strides; ``b`` C-contiguous, N >= CB."""
    # Loop order: one task per (chunk, matrix, block of CB columns), owning part[t, i, :,
    # columns]. Inside: blocks of RB rows of a, then k (the CB-column strip of b, K_t x CB,
    # stays in L1/L2 for every row block), then the RB x CB accumulators. Rows past the last
    # full block go one at a time. The N % CB columns past the last full block are a task of
    # their own, in strips of one 512-bit vector (``_matmul_tail``), so a 196-column matrix
    # computes 208 columns, not 256.
    m_, k_ = a.shape
    nb, _, n_ = b.shape
    t_ = part.shape[0]
    nfull = n_ // CB
    nblk = nfull + (1 if n_ % CB else 0)
    b1 = b.ravel()
    p1 = part.ravel()
    for task in prange(t_ * nb * nblk):
        t = task // (nb * nblk)
        i_b = task // nblk % nb
        k0 = t * k_ // t_
        k1 = (t + 1) * k_ // t_
        bb = i_b * k_ * n_
        pb = (t * nb + i_b) * m_ * n_
        if task % nblk == nfull:
            _matmul_tail(a, b1, bias, p1, nfull * CB, n_, m_, k0, k1, bb, pb, t)
            continue
        own = (task % nblk) * CB  # first column this task writes
        j0 = own
        acc = stack_array(ACC, part.dtype)
        for i0 in range(0, m_ - RB + 1, RB):
            for r in range(RB):
                start = bias[U(i0 + r)] if t == 0 else bias[0] * 0
                for o in range(CB):
                    acc[U(r * CB + o)] = start
            for k in range(k0, k1):
                for r in range(RB):
                    av = a[U(i0 + r), U(k)]
                    for o in range(CB):
                        acc[U(r * CB + o)] += av * b1[U(bb + k * n_ + j0 + o)]
            for r in range(RB):
                for o in range(own - j0, CB):
                    p1[U(pb + (i0 + r) * n_ + j0 + o)] = acc[U(r * CB + o)]
        for i in range(m_ - m_ % RB, m_):
            start = bias[U(i)] if t == 0 else bias[0] * 0
            for o in range(CB):
                acc[o] = start
            for k in range(k0, k1):
                av = a[U(i), U(k)]
                for o in range(CB):
                    acc[U(o)] += av * b1[U(bb + k * n_ + j0 + o)]
            for o in range(own - j0, CB):
                p1[U(pb + i * n_ + j0 + o)] = acc[U(o)]
    return part


TR = 16  # rows of a per tail block: 16 accumulators of one 512-bit vector each
TACC = TR * 16


@njit(inline="always")
def _matmul_tail(a, b1, bias, p1, own, n_, m_, k0, k1, bb, pb, t):
    """Columns [own, N) of one matmul_chunks product (fewer than CB), in strips of one
    512-bit vector, the last strip shifted left to end at N (it recomputes some columns and
    writes only its own); blocks of TR rows (the last shifted up to end at M, fewer than TR
    rows as one block whose unused rows read row 0)."""
    vl = 64 // p1.itemsize  # lanes of one 512-bit vector (acc keeps a stride of 16: constant)
    acc = stack_array(TACC, p1.dtype)
    nrb = (m_ + TR - 1) // TR
    for j in range(own, n_, vl):
        j0 = min(j, n_ - vl)
        for rb in range(nrb):
            i0 = min(rb * TR, m_ - TR) if m_ >= TR else 0
            for r in range(TR):
                row = i0 + r if i0 + r < m_ else 0
                vstore16(acc, r * 16, vsplat16(bias[U(row)]) if t == 0 else vzero16(p1))
            for k in range(k0, k1):
                bv = vload16(b1, U(bb + k * n_ + j0))
                for r in range(TR):
                    row = i0 + r if i0 + r < m_ else 0
                    av = vsplat16(a[U(row), U(k)])
                    vstore16(acc, r * 16, vfma(av, bv, vload16(acc, r * 16)))
            for r in range(max(rb * TR - i0, 0), min(TR, m_)):
                for o in range(max(j - j0, 0), vl):
                    p1[U(pb + (i0 + r) * n_ + j0 + o)] = acc[U(r * 16 + o)]


@njit(**PARALLEL)
def matmul_sum(a, b, part):
    """part[t] (M, N) = sum over the matrices i of chunk t of a[i] @ b[i], for a (B, M, K) and
    b (B, K, N), both C-contiguous, N >= CB; chunk t holds [t*B//T, (t+1)*B//T), T =
    part.shape[0] (the caller adds part in order)."""
    # Loop order: one task per (chunk, block of CB columns), owning part[t, :, columns] (the
    # last block shifted left, as in matmul_chunks). Inside: blocks of RB rows, then the
    # chunk's matrices and their k, then the RB x CB accumulators.
    nb, m_, k_ = a.shape
    n_ = b.shape[2]
    t_ = part.shape[0]
    nblk = (n_ + CB - 1) // CB
    a1 = a.ravel()
    b1 = b.ravel()
    p1 = part.ravel()
    for task in prange(t_ * nblk):
        t = task // nblk
        own = (task % nblk) * CB
        j0 = min(own, n_ - CB)
        pb = t * m_ * n_
        acc = stack_array(ACC, part.dtype)
        for i0 in range(0, m_, RB):
            rows = min(RB, m_ - i0)
            for i in range(ACC):
                acc[i] = 0
            for i_b in range(t * nb // t_, (t + 1) * nb // t_):
                ab = (i_b * m_ + i0) * k_
                bb = i_b * k_ * n_ + j0
                if rows == RB:
                    for k in range(k_):
                        for r in range(RB):
                            av = a1[U(ab + r * k_ + k)]
                            for o in range(CB):
                                acc[U(r * CB + o)] += av * b1[U(bb + k * n_ + o)]
                else:  # the rows past the last full block, one at a time
                    for r in range(rows):
                        for k in range(k_):
                            av = a1[U(ab + r * k_ + k)]
                            for o in range(CB):
                                acc[U(r * CB + o)] += av * b1[U(bb + k * n_ + o)]
            for r in range(rows):
                for o in range(own - j0, CB):
                    p1[U(pb + (i0 + r) * n_ + j0 + o)] = acc[U(r * CB + o)]
    return part


@njit(**PARALLEL)
def transpose(a, out):
    """out[i] (K, M) = a[i] (M, K).T for a batch a (B, M, K), both C-contiguous."""
    # Loop order: one task per (matrix, TILE-row strip of out); inside, TILE x TILE blocks:
    # contiguous reads of a's rows, writes strided by M within the block (in L1).
    prefer_wide_vectors()
    nb, m_, k_ = a.shape
    a1 = a.ravel()
    o1 = out.ravel()
    nkb = (k_ + TILE - 1) // TILE
    for task in prange(nb * nkb):
        base = task // nkb * m_ * k_
        k0 = task % nkb * TILE
        k1 = min(k0 + TILE, k_)
        for i0 in range(0, m_, TILE):
            for i in range(i0, min(i0 + TILE, m_)):
                for k in range(k0, k1):
                    o1[U(base + k * m_ + i)] = a1[U(base + i * k_ + k)]
    return out


# ----------------------------------------------------------- 256-bit register blocks (AVX2)

VRB = 6  # rows of a per block of the explicit-vector kernels
VL = simd.LANES[np.dtype(np.float32)]  # float32 lanes of a 256-bit vector
VCB = 2 * VL  # columns of b per block: 6 x 2 accumulators + 2 vectors of b + 1 broadcast
VACC = VRB * VCB


@njit(**PARALLEL)
def matmul_chunks_vec(a, b, bias, part):
    """:func:`matmul_chunks` (same contract, N >= VCB) with explicit VRB x VCB blocks of 256-bit
    vectors (``_simd``), for CPUs without AVX-512."""
    # Loop order: as matmul_chunks. The last row block is shifted up to end at M, like the
    # last column block (it recomputes rows and writes only its own); fewer than VRB rows run
    # as one block whose unused rows read row 0.
    m_, k_ = a.shape
    nb, _, n_ = b.shape
    t_ = part.shape[0]
    nblk = (n_ + VCB - 1) // VCB
    nrb = (m_ + VRB - 1) // VRB
    b1 = b.ravel()
    p1 = part.ravel()
    for task in prange(t_ * nb * nblk):
        t = task // (nb * nblk)
        i_b = task // nblk % nb
        own = (task % nblk) * VCB
        j0 = min(own, n_ - VCB)
        k0 = t * k_ // t_
        k1 = (t + 1) * k_ // t_
        bb = i_b * k_ * n_ + j0
        pb = (t * nb + i_b) * m_ * n_
        acc = stack_array(VACC, part.dtype)
        for rb in range(nrb):
            i0 = min(rb * VRB, m_ - VRB) if m_ >= VRB else 0
            for r in range(VRB):
                start = bias[U(i0 + r)] if t == 0 and i0 + r < m_ else bias[0] * 0
                for o in range(VCB):
                    acc[U(r * VCB + o)] = start
            for k in range(k0, k1):
                ba = vload(b1, U(bb + k * n_))
                bz = vload(b1, U(bb + k * n_ + VL))
                for r in range(VRB):
                    av = vsplat(a[U(i0 + r if i0 + r < m_ else 0), U(k)])
                    vstore(acc, 2 * r * VL, vfma(av, ba, vload(acc, 2 * r * VL)))
                    vstore(acc, (2 * r + 1) * VL, vfma(av, bz, vload(acc, (2 * r + 1) * VL)))
            for r in range(max(rb * VRB - i0, 0), min(VRB, m_)):
                for o in range(own - j0, VCB):
                    p1[U(pb + (i0 + r) * n_ + j0 + o)] = acc[U(r * VCB + o)]
    return part


@njit(**PARALLEL)
def matmul_sum_vec(a, b, part):
    """:func:`matmul_sum` (same contract, N >= VCB) with explicit VRB x VCB blocks of 256-bit
    vectors, for CPUs without AVX-512."""
    # Loop order: as matmul_sum; row blocks as in matmul_chunks_vec.
    nb, m_, k_ = a.shape
    n_ = b.shape[2]
    t_ = part.shape[0]
    nblk = (n_ + VCB - 1) // VCB
    nrb = (m_ + VRB - 1) // VRB
    a1 = a.ravel()
    b1 = b.ravel()
    p1 = part.ravel()
    for task in prange(t_ * nblk):
        t = task // nblk
        own = (task % nblk) * VCB
        j0 = min(own, n_ - VCB)
        pb = t * m_ * n_
        acc = stack_array(VACC, part.dtype)
        for rb in range(nrb):
            i0 = min(rb * VRB, m_ - VRB) if m_ >= VRB else 0
            for i in range(VRB * 2):
                vstore(acc, i * VL, vzero(acc))
            for i_b in range(t * nb // t_, (t + 1) * nb // t_):
                ab = i_b * m_ * k_
                bb = i_b * k_ * n_ + j0
                for k in range(k_):
                    ba = vload(b1, U(bb + k * n_))
                    bz = vload(b1, U(bb + k * n_ + VL))
                    for r in range(VRB):
                        row = i0 + r if i0 + r < m_ else 0
                        av = vsplat(a1[U(ab + row * k_ + k)])
                        vstore(acc, 2 * r * VL, vfma(av, ba, vload(acc, 2 * r * VL)))
                        vstore(acc, (2 * r + 1) * VL, vfma(av, bz, vload(acc, (2 * r + 1) * VL)))
            for r in range(max(rb * VRB - i0, 0), min(VRB, m_)):
                for o in range(own - j0, VCB):
                    p1[U(pb + (i0 + r) * n_ + j0 + o)] = acc[U(r * VCB + o)]
    return part


def chunks_kernel():
    """:func:`matmul_chunks` where Numba compiles for AVX-512, else :func:`matmul_chunks_vec`
    (the 4 x 64 block spills without AVX-512's 32 registers)."""
    return matmul_chunks if simd.WIDE_VECTORS else matmul_chunks_vec


def sum_kernel():
    """:func:`matmul_sum` or :func:`matmul_sum_vec`, as :func:`chunks_kernel` chooses."""
    return matmul_sum if simd.WIDE_VECTORS else matmul_sum_vec
