# Compiled kernels of the ``cython`` backend (wrapped by ``fastconv.backends.cython_cpu``).
#
# These kernels TRUST their inputs: every public entry point runs ``fastconv._validate`` first
# (4-D C-contiguous arrays of one float dtype, consistent sizes, pool indices in range), and
# ``cython_cpu`` allocates every output with the shape the kernels expect. The build turns
# bounds checks off (``setup.py``, set once there); ``FASTCONV_CYTHON_DEBUG=1`` turns them back
# on, so that any out-of-bounds access raises ``IndexError``: that is why the inner loops index
# memoryviews instead of raw pointers.
#
# Parallelism: every ``prange`` task (dynamic schedule: a thread that the OS descheduled does
# not hold up the others) owns a disjoint part of the output (an output row, a
# weight block, an (n, c) plane), so results are race-free and do not depend on the thread
# count or schedule. Kernels with one task per output row or plane hand them out one image at
# a time (chunksize): neighbouring rows share cache lines of the NCHW output, and two threads
# writing them in turn made B's forward 1.5x slower on 2 threads. Each task calls a ``nogil``
# helper whose local accumulator arrays live on that thread's stack. Helpers are ``except -1``
# (not ``noexcept``) so that in the debug build an IndexError propagates out of the ``prange``
# instead of being printed and ignored; in the release build nothing can raise and the check
# is one compare per call.

cimport cython
from cython.parallel cimport prange, threadid
from libc.math cimport isnan, INFINITY
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memset

cdef extern from *:
    """
    #ifdef _OPENMP
    #define FASTCONV_HAVE_OPENMP 1
    #else
    #define FASTCONV_HAVE_OPENMP 0
    #endif
    #ifndef FASTCONV_CYTHON_DEBUG
    #define FASTCONV_CYTHON_DEBUG 0
    #endif
    /* GCC's -O3 unroll-and-jam fused two pixels of the grad-weight register block, which
       sent its accumulators to memory and its input broadcasts through gathers (4x slower). */
    #if defined(__GNUC__) && !defined(__clang__) && !defined(__INTEL_COMPILER)
    #pragma GCC optimize ("no-loop-unroll-and-jam")
    #endif
    """
    int FASTCONV_HAVE_OPENMP
    int FASTCONV_CYTHON_DEBUG

#: True when this extension was compiled with OpenMP (``prange`` runs in parallel).
OPENMP = bool(FASTCONV_HAVE_OPENMP)
#: True when this extension was compiled with bounds checks (``FASTCONV_CYTHON_DEBUG=1``).
BOUNDSCHECK = bool(FASTCONV_CYTHON_DEBUG)

ctypedef fused real:
    float
    double

cdef enum:
    OWB = 4     # output columns per accumulator block (forward)
    COB = 64    # output channels per accumulator block (forward, grad-weight)
    CIB = 4     # input channels per accumulator block (grad-weight)
    CIS = 32    # input channels per grad-weight task
    ROWB = 256  # output columns per row chunk (strided NCHW forward, max-pool)
    PW = 64     # consecutive outputs per register block (stride-1 NCHW forward)
    VL = 16     # lanes of the partial sums (stride-1 grad-weight for few input channels)
    FCB = 4     # output channels per register block (stride-1 grad-weight, few channels)
    FTB = 4     # kernel taps per register block (same kernel; both unrolled by hand)
    DWB = 16    # the most output columns per register block (direct forward)
    RB32 = 6    # run rows per grad-weight register block, float32 (24 zmm accumulators)
    MCHUNK = 256  # output pixels per grad-weight slab (64 KiB of dy: stays in L2)
    PACC = 416  # accumulators of the plane forward block (208 x 2 is the largest)
    PCBMAX = 8  # output channels per plane forward block, at most
    PB = 8      # outputs per block of the 2x2 stride-2 max-pool


cdef inline Py_ssize_t _min(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


cdef inline Py_ssize_t _ceil_div(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


# ------------------------------------------------------------------------------ layout


cdef int _pad_nhwc_row(const real[:, :, :, ::1] x, real[:, :, :, ::1] out, Py_ssize_t n,
                        Py_ssize_t r, Py_ssize_t top, Py_ssize_t left, Py_ssize_t uph,
                        Py_ssize_t upw) except -1 nogil:
    cdef Py_ssize_t C = x.shape[1], H = x.shape[2], W = x.shape[3], Wp = out.shape[2]
    cdef Py_ssize_t i, j, j0, j1, c, c0
    memset(&out[n, r, 0, 0], 0, Wp * out.shape[3] * sizeof(real))
    if r < top or (r - top) % uph != 0 or (r - top) // uph >= H:
        return 0
    i = (r - top) // uph
    j0 = 0 if left >= 0 else _ceil_div(-left, upw)
    j1 = 0 if Wp - 1 - left < 0 else _min(W, (Wp - 1 - left) // upw + 1)
    # Blocks of 16 channels: per column, one contiguous 16-channel write, its 16 reads from 16
    # rows of x that stay in L1 across the columns (c outer, j inner wrote one cache line per
    # element when C is large).
    for c0 in range(0, C - C % 16, 16):
        for j in range(j0, j1):
            for c in range(16):
                out[n, r, left + j * upw, c0 + c] = x[n, c0 + c, i, j]
    for c in range(C - C % 16, C):
        for j in range(j0, j1):
            out[n, r, left + j * upw, c] = x[n, c, i, j]


def pad_nhwc(const real[:, :, :, ::1] x, real[:, :, :, ::1] out, Py_ssize_t top,
             Py_ssize_t left, Py_ssize_t uph, Py_ssize_t upw, bint serial=False):
    """NCHW ``x`` -> zero-padded NHWC ``out``:
    ``out[n, top + i*uph, left + j*upw, c] = x[n, c, i, j]``.

    Every other element of ``out`` is zero (also the channels c >= C when ``out`` has more);
    ``up > 1`` inserts zeros between elements (the transposed convolution of a strided one);
    negative ``top``/``left`` crop.
    """
    cdef Py_ssize_t N = out.shape[0], Hp = out.shape[1], t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(N * Hp):
                _pad_nhwc_row(x, out, t // Hp, t % Hp, top, left, uph, upw)
        else:
            for t in prange(N * Hp, schedule="dynamic", chunksize=Hp):
                _pad_nhwc_row(x, out, t // Hp, t % Hp, top, left, uph, upw)


cdef int _pad_flat_plane(const real[:, :, :, ::1] x, real[:, :, ::1] out, Py_ssize_t n,
                         Py_ssize_t c, Py_ssize_t top, Py_ssize_t left, Py_ssize_t uph,
                         Py_ssize_t upw, Py_ssize_t Hp, Py_ssize_t Wp) except -1 nogil:
    cdef Py_ssize_t H = x.shape[2], W = x.shape[3], L = out.shape[2]
    cdef Py_ssize_t r, i, j, j0, j1
    j0 = 0 if left >= 0 else _ceil_div(-left, upw)
    j1 = 0 if Wp - 1 - left < 0 else _min(W, (Wp - 1 - left) // upw + 1)
    memset(&out[n, c, 0], 0, L * sizeof(real))
    if c >= x.shape[1]:  # zero channels past x's
        return 0
    for r in range(Hp):
        if r < top or (r - top) % uph != 0 or (r - top) // uph >= H:
            continue
        i = (r - top) // uph
        for j in range(j0, j1):
            out[n, c, r * Wp + left + j * upw] = x[n, c, i, j]
    return 0


def pad_flat(const real[:, :, :, ::1] x, real[:, :, ::1] out, Py_ssize_t top, Py_ssize_t left,
             Py_ssize_t uph, Py_ssize_t upw, Py_ssize_t Hp, Py_ssize_t Wp, bint serial=False):
    """NCHW ``x`` -> zero-padded planes ``out`` (N, C', L) of Hp rows of pitch Wp (L >= Hp*Wp,
    zero slack after; planes c >= C all zero), with the placement rule of :func:`pad_nhwc`."""
    cdef Py_ssize_t N = out.shape[0], C = out.shape[1], t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(N * C):
                _pad_flat_plane(x, out, t // C, t % C, top, left, uph, upw, Hp, Wp)
        else:
            for t in prange(N * C, schedule="dynamic", chunksize=C):
                _pad_flat_plane(x, out, t // C, t % C, top, left, uph, upw, Hp, Wp)


# ------------------------------------------------------------------------------ forward


cdef inline int _fwd_block(const real[:, :, :, ::1] xp, const real[:, :, :, :, ::1] wt,
                            const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                            Py_ssize_t oh, Py_ssize_t g, Py_ssize_t c0, Py_ssize_t w0,
                            Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw,
                            Py_ssize_t nc) except -1 nogil:
    # A full block: OWB (= 4, unrolled by hand) output columns x nc output channels. Every call
    # site passes nc as a literal (64, 32 or 16): after inlining, the accumulator block has a
    # compile-time shape, the co loop is fully vectorized and the block stays in registers.
    cdef Py_ssize_t KH = wt.shape[1], KW = wt.shape[2], CIG = wt.shape[3], COG = wt.shape[4]
    cdef real acc[OWB * COB]
    cdef real x0, x1, x2, x3, wv
    cdef Py_ssize_t kh, kw, ci, co, ih, iw, cx
    for co in range(nc):
        acc[co] = bias[g * COG + c0 + co]
        acc[COB + co] = acc[co]
        acc[2 * COB + co] = acc[co]
        acc[3 * COB + co] = acc[co]
    for kh in range(KH):
        ih = oh * sh + kh * dh
        for kw in range(KW):
            iw = w0 * sw + kw * dw
            for ci in range(CIG):
                cx = g * CIG + ci
                x0 = xp[n, ih, iw, cx]
                x1 = xp[n, ih, iw + sw, cx]
                x2 = xp[n, ih, iw + 2 * sw, cx]
                x3 = xp[n, ih, iw + 3 * sw, cx]
                for co in range(nc):
                    wv = wt[g, kh, kw, ci, c0 + co]
                    acc[co] += x0 * wv
                    acc[COB + co] += x1 * wv
                    acc[2 * COB + co] += x2 * wv
                    acc[3 * COB + co] += x3 * wv
    for co in range(nc):
        y[n, g * COG + c0 + co, oh, w0] = acc[co]
        y[n, g * COG + c0 + co, oh, w0 + 1] = acc[COB + co]
        y[n, g * COG + c0 + co, oh, w0 + 2] = acc[2 * COB + co]
        y[n, g * COG + c0 + co, oh, w0 + 3] = acc[3 * COB + co]


cdef int _fwd_block_tail(const real[:, :, :, ::1] xp, const real[:, :, :, :, ::1] wt,
                          const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                          Py_ssize_t oh, Py_ssize_t g, Py_ssize_t c0, Py_ssize_t w0,
                          Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw,
                          Py_ssize_t nc, Py_ssize_t nw) except -1 nogil:
    # Any block of nw <= OWB columns x nc <= COB channels (tails, odd channel counts).
    cdef Py_ssize_t KH = wt.shape[1], KW = wt.shape[2], CIG = wt.shape[3], COG = wt.shape[4]
    cdef real acc[OWB * COB]
    cdef real xv
    cdef Py_ssize_t kh, kw, ci, j, co, ih, cx
    for j in range(nw):
        for co in range(nc):
            acc[j * COB + co] = bias[g * COG + c0 + co]
    for kh in range(KH):
        ih = oh * sh + kh * dh
        for kw in range(KW):
            for ci in range(CIG):
                cx = g * CIG + ci
                for j in range(nw):
                    xv = xp[n, ih, (w0 + j) * sw + kw * dw, cx]
                    for co in range(nc):
                        acc[j * COB + co] += xv * wt[g, kh, kw, ci, c0 + co]
    for co in range(nc):
        for j in range(nw):
            y[n, g * COG + c0 + co, oh, w0 + j] = acc[j * COB + co]


cdef int _fwd_nhwc_row(const real[:, :, :, ::1] xp, const real[:, :, :, :, ::1] wt,
                        const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                        Py_ssize_t oh, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh,
                        Py_ssize_t dw) except -1 nogil:
    cdef Py_ssize_t G = wt.shape[0], COG = wt.shape[4], Wo = y.shape[3]
    cdef Py_ssize_t g, cb, c0, nc, wb, w0, nw
    for g in range(G):
        for cb in range(_ceil_div(COG, COB)):
            c0 = cb * COB
            nc = _min(COB, COG - c0)
            for wb in range(_ceil_div(Wo, OWB)):
                w0 = wb * OWB
                nw = _min(OWB, Wo - w0)
                if nw < OWB and Wo >= OWB:
                    # Column tail: recompute an overlapping full block (same values written
                    # twice) rather than run the slow tail kernel.
                    w0 = Wo - OWB
                    nw = OWB
                if nw == OWB and nc == 64:
                    _fwd_block(xp, wt, bias, y, n, oh, g, c0, w0, sh, sw, dh, dw, 64)
                elif nw == OWB and nc == 32:
                    _fwd_block(xp, wt, bias, y, n, oh, g, c0, w0, sh, sw, dh, dw, 32)
                elif nw == OWB and nc == 16:
                    _fwd_block(xp, wt, bias, y, n, oh, g, c0, w0, sh, sw, dh, dw, 16)
                else:
                    _fwd_block_tail(xp, wt, bias, y, n, oh, g, c0, w0, sh, sw, dh, dw, nc, nw)


def conv_fwd_nhwc(const real[:, :, :, ::1] xp, const real[:, :, :, :, ::1] wt,
                  const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t sh, Py_ssize_t sw,
                  Py_ssize_t dh, Py_ssize_t dw, bint serial=False):
    """Direct convolution of padded NHWC ``xp`` (N, Hp, Wp, C_in) with ``wt``
    (G, kH, kW, C_in/G, C_out/G) into NCHW ``y`` (N, C_out, H_out, W_out), plus ``bias``.

    Loop order: one task per (image, output row); inside, blocks of OWB output columns x COB
    output channels accumulate over (kh, kw, c_in) with the innermost loop running over
    contiguous output channels of ``wt`` (a broadcast input value times a weight vector).
    """
    cdef Py_ssize_t N = y.shape[0], Ho = y.shape[2], t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(N * Ho):
                _fwd_nhwc_row(xp, wt, bias, y, t // Ho, t % Ho, sh, sw, dh, dw)
        else:
            for t in prange(N * Ho, schedule="dynamic", chunksize=Ho):
                _fwd_nhwc_row(xp, wt, bias, y, t // Ho, t % Ho, sh, sw, dh, dw)


cdef inline int _flat_block(const real[:, :, ::1] xf, const real[:, :, :, ::1] w,
                            const real[::1] bias, real[:, :, ::1] yf, Py_ssize_t n,
                            Py_ssize_t co0, Py_ssize_t p0, Py_ssize_t cx0, Py_ssize_t Wp,
                            Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t nb) except -1 nogil:
    # PW (= 64) consecutive outputs of the padded-pitch grid x nb output channels (a literal:
    # 4, 2 or 1), accumulated over every tap (c_in, kh, kw) in registers: per tap PW
    # contiguous inputs times nb broadcast weights.
    cdef Py_ssize_t CIG = w.shape[1], KH = w.shape[2], KW = w.shape[3], ci, kh, kw, v, b, off
    cdef real acc[4 * PW]
    cdef real xv
    for b in range(nb):
        for v in range(PW):
            acc[b * PW + v] = bias[co0 + b]
    for ci in range(CIG):
        for kh in range(KH):
            for kw in range(KW):
                off = p0 + kh * dh * Wp + kw * dw
                for v in range(PW):
                    xv = xf[n, cx0 + ci, off + v]
                    for b in range(nb):
                        acc[b * PW + v] += xv * w[co0 + b, ci, kh, kw]
    for b in range(nb):
        for v in range(PW):
            yf[n, co0 + b, p0 + v] = acc[b * PW + v]
    return 0


cdef int _fwd_flat_task(const real[:, :, ::1] xf, const real[:, :, :, ::1] w,
                        const real[::1] bias, real[:, :, ::1] yf, Py_ssize_t n, Py_ssize_t g,
                        Py_ssize_t G, Py_ssize_t Wp, Py_ssize_t dh,
                        Py_ssize_t dw) except -1 nogil:
    cdef Py_ssize_t COG = yf.shape[1] // G, CIG = w.shape[1], Lo = yf.shape[2]
    cdef Py_ssize_t co, nb, pb, p0
    for pb in range(Lo // PW):
        p0 = pb * PW
        co = g * COG
        while co < (g + 1) * COG:
            nb = (g + 1) * COG - co
            if nb >= 4:
                _flat_block(xf, w, bias, yf, n, co, p0, g * CIG, Wp, dh, dw, 4)
                co += 4
            elif nb >= 2:
                _flat_block(xf, w, bias, yf, n, co, p0, g * CIG, Wp, dh, dw, 2)
                co += 2
            else:
                _flat_block(xf, w, bias, yf, n, co, p0, g * CIG, Wp, dh, dw, 1)
                co += 1
    return 0


def conv_fwd_flat(const real[:, :, ::1] xf, const real[:, :, :, ::1] w, const real[::1] bias,
                  real[:, :, ::1] yf, Py_ssize_t groups, Py_ssize_t Wp, Py_ssize_t dh,
                  Py_ssize_t dw, bint serial=False):
    """Stride-1 convolution for few output channels per group: padded planes ``xf`` (N, C_in, L)
    of pitch Wp (see :func:`pad_flat`), OIHW ``w`` -> ``yf`` (N, C_out, Lo), the outputs on the
    padded-pitch grid (row oh at ``oh*Wp``; columns >= W_out are garbage the caller drops).

    Loop order: one task per (image, group); blocks of PW consecutive grid outputs x up to 4
    output channels accumulate over all taps in registers, the innermost loop over contiguous
    inputs (every output row is a contiguous run of the padded input shifted by the tap).
    """
    cdef Py_ssize_t N = yf.shape[0], t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(N * groups):
                _fwd_flat_task(xf, w, bias, yf, t // groups, t % groups, groups, Wp, dh, dw)
        else:
            for t in prange(N * groups, schedule="dynamic"):
                _fwd_flat_task(xf, w, bias, yf, t // groups, t % groups, groups, Wp, dh, dw)


# Register blocks of the plane forward: lanes consecutive positions of the padded-pitch grid
# x pcb output channels (float32 48 x 8, 128 x 2 or 208 x 2, float64 half the lanes), in
# registers over every tap (c_in, kh, kw): per tap, lanes contiguous inputs times pcb broadcast
# weights. One function per shape (see _direct_block_4x64).


cdef inline int _plane_block_48x8(const real[:, :, ::1] xf, const real[:, :, :, ::1] wt,
                                  const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                                  Py_ssize_t q0, Py_ssize_t cb, Py_ssize_t Wp, Py_ssize_t dh,
                                  Py_ssize_t dw) except -1 nogil:
    # 48 grid positions x 8 output channels (see above).
    cdef Py_ssize_t CI = xf.shape[1], KH = wt.shape[1], KW = wt.shape[2]
    cdef Py_ssize_t C_out = y.shape[1], Ho = y.shape[2], Wo = y.shape[3]
    cdef Py_ssize_t ci, kh, kw, co, j, xo, oh, oh1, a, b, src
    cdef real acc[PACC]
    cdef real wv[PCBMAX]
    cdef real xv, bv
    for j in range(48 * 8):
        acc[j] = 0
    for ci in range(CI):
        for kh in range(KH):
            for kw in range(KW):
                xo = q0 + kh * dh * Wp + kw * dw
                for co in range(8):
                    wv[co] = wt[ci, kh, kw, cb + co]
                for j in range(48):
                    xv = xf[n, ci, xo + j]
                    for co in range(8):
                        acc[co * 48 + j] += xv * wv[co]
    # Row segments of the block into the NCHW output (the padded-pitch columns >= W_out drop).
    oh1 = _min((q0 + 48 - 1) // Wp, Ho - 1)
    for co in range(_min(8, C_out - cb)):
        bv = bias[cb + co]
        for oh in range(q0 // Wp, oh1 + 1):
            a = q0 - oh * Wp if q0 > oh * Wp else 0
            b = _min(Wo, q0 + 48 - oh * Wp)
            src = co * 48 + oh * Wp - q0
            for j in range(a, b):
                y[n, cb + co, oh, j] = acc[src + j] + bv
    return 0


cdef inline int _plane_block_128x2(const real[:, :, ::1] xf, const real[:, :, :, ::1] wt,
                                   const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                                   Py_ssize_t q0, Py_ssize_t cb, Py_ssize_t Wp, Py_ssize_t dh,
                                   Py_ssize_t dw) except -1 nogil:
    # 128 grid positions x 2 output channels (see above).
    cdef Py_ssize_t CI = xf.shape[1], KH = wt.shape[1], KW = wt.shape[2]
    cdef Py_ssize_t C_out = y.shape[1], Ho = y.shape[2], Wo = y.shape[3]
    cdef Py_ssize_t ci, kh, kw, co, j, xo, oh, oh1, a, b, src
    cdef real acc[PACC]
    cdef real wv[PCBMAX]
    cdef real xv, bv
    for j in range(128 * 2):
        acc[j] = 0
    for ci in range(CI):
        for kh in range(KH):
            for kw in range(KW):
                xo = q0 + kh * dh * Wp + kw * dw
                for co in range(2):
                    wv[co] = wt[ci, kh, kw, cb + co]
                for j in range(128):
                    xv = xf[n, ci, xo + j]
                    for co in range(2):
                        acc[co * 128 + j] += xv * wv[co]
    # Row segments of the block into the NCHW output (the padded-pitch columns >= W_out drop).
    oh1 = _min((q0 + 128 - 1) // Wp, Ho - 1)
    for co in range(_min(2, C_out - cb)):
        bv = bias[cb + co]
        for oh in range(q0 // Wp, oh1 + 1):
            a = q0 - oh * Wp if q0 > oh * Wp else 0
            b = _min(Wo, q0 + 128 - oh * Wp)
            src = co * 128 + oh * Wp - q0
            for j in range(a, b):
                y[n, cb + co, oh, j] = acc[src + j] + bv
    return 0


cdef inline int _plane_block_208x2(const real[:, :, ::1] xf, const real[:, :, :, ::1] wt,
                                   const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                                   Py_ssize_t q0, Py_ssize_t cb, Py_ssize_t Wp, Py_ssize_t dh,
                                   Py_ssize_t dw) except -1 nogil:
    # 208 grid positions x 2 output channels (see above).
    cdef Py_ssize_t CI = xf.shape[1], KH = wt.shape[1], KW = wt.shape[2]
    cdef Py_ssize_t C_out = y.shape[1], Ho = y.shape[2], Wo = y.shape[3]
    cdef Py_ssize_t ci, kh, kw, co, j, xo, oh, oh1, a, b, src
    cdef real acc[PACC]
    cdef real wv[PCBMAX]
    cdef real xv, bv
    for j in range(208 * 2):
        acc[j] = 0
    for ci in range(CI):
        for kh in range(KH):
            for kw in range(KW):
                xo = q0 + kh * dh * Wp + kw * dw
                for co in range(2):
                    wv[co] = wt[ci, kh, kw, cb + co]
                for j in range(208):
                    xv = xf[n, ci, xo + j]
                    for co in range(2):
                        acc[co * 208 + j] += xv * wv[co]
    # Row segments of the block into the NCHW output (the padded-pitch columns >= W_out drop).
    oh1 = _min((q0 + 208 - 1) // Wp, Ho - 1)
    for co in range(_min(2, C_out - cb)):
        bv = bias[cb + co]
        for oh in range(q0 // Wp, oh1 + 1):
            a = q0 - oh * Wp if q0 > oh * Wp else 0
            b = _min(Wo, q0 + 208 - oh * Wp)
            src = co * 208 + oh * Wp - q0
            for j in range(a, b):
                y[n, cb + co, oh, j] = acc[src + j] + bv
    return 0


cdef inline int _plane_block_104x2(const real[:, :, ::1] xf, const real[:, :, :, ::1] wt,
                                   const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                                   Py_ssize_t q0, Py_ssize_t cb, Py_ssize_t Wp, Py_ssize_t dh,
                                   Py_ssize_t dw) except -1 nogil:
    # 104 grid positions x 2 output channels (see above).
    cdef Py_ssize_t CI = xf.shape[1], KH = wt.shape[1], KW = wt.shape[2]
    cdef Py_ssize_t C_out = y.shape[1], Ho = y.shape[2], Wo = y.shape[3]
    cdef Py_ssize_t ci, kh, kw, co, j, xo, oh, oh1, a, b, src
    cdef real acc[PACC]
    cdef real wv[PCBMAX]
    cdef real xv, bv
    for j in range(104 * 2):
        acc[j] = 0
    for ci in range(CI):
        for kh in range(KH):
            for kw in range(KW):
                xo = q0 + kh * dh * Wp + kw * dw
                for co in range(2):
                    wv[co] = wt[ci, kh, kw, cb + co]
                for j in range(104):
                    xv = xf[n, ci, xo + j]
                    for co in range(2):
                        acc[co * 104 + j] += xv * wv[co]
    # Row segments of the block into the NCHW output (the padded-pitch columns >= W_out drop).
    oh1 = _min((q0 + 104 - 1) // Wp, Ho - 1)
    for co in range(_min(2, C_out - cb)):
        bv = bias[cb + co]
        for oh in range(q0 // Wp, oh1 + 1):
            a = q0 - oh * Wp if q0 > oh * Wp else 0
            b = _min(Wo, q0 + 104 - oh * Wp)
            src = co * 104 + oh * Wp - q0
            for j in range(a, b):
                y[n, cb + co, oh, j] = acc[src + j] + bv
    return 0


cdef inline int _plane_block_24x8(const real[:, :, ::1] xf, const real[:, :, :, ::1] wt,
                                  const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                                  Py_ssize_t q0, Py_ssize_t cb, Py_ssize_t Wp, Py_ssize_t dh,
                                  Py_ssize_t dw) except -1 nogil:
    # 24 grid positions x 8 output channels (see above).
    cdef Py_ssize_t CI = xf.shape[1], KH = wt.shape[1], KW = wt.shape[2]
    cdef Py_ssize_t C_out = y.shape[1], Ho = y.shape[2], Wo = y.shape[3]
    cdef Py_ssize_t ci, kh, kw, co, j, xo, oh, oh1, a, b, src
    cdef real acc[PACC]
    cdef real wv[PCBMAX]
    cdef real xv, bv
    for j in range(24 * 8):
        acc[j] = 0
    for ci in range(CI):
        for kh in range(KH):
            for kw in range(KW):
                xo = q0 + kh * dh * Wp + kw * dw
                for co in range(8):
                    wv[co] = wt[ci, kh, kw, cb + co]
                for j in range(24):
                    xv = xf[n, ci, xo + j]
                    for co in range(8):
                        acc[co * 24 + j] += xv * wv[co]
    # Row segments of the block into the NCHW output (the padded-pitch columns >= W_out drop).
    oh1 = _min((q0 + 24 - 1) // Wp, Ho - 1)
    for co in range(_min(8, C_out - cb)):
        bv = bias[cb + co]
        for oh in range(q0 // Wp, oh1 + 1):
            a = q0 - oh * Wp if q0 > oh * Wp else 0
            b = _min(Wo, q0 + 24 - oh * Wp)
            src = co * 24 + oh * Wp - q0
            for j in range(a, b):
                y[n, cb + co, oh, j] = acc[src + j] + bv
    return 0


cdef inline int _plane_block_64x2(const real[:, :, ::1] xf, const real[:, :, :, ::1] wt,
                                  const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                                  Py_ssize_t q0, Py_ssize_t cb, Py_ssize_t Wp, Py_ssize_t dh,
                                  Py_ssize_t dw) except -1 nogil:
    # 64 grid positions x 2 output channels (see above).
    cdef Py_ssize_t CI = xf.shape[1], KH = wt.shape[1], KW = wt.shape[2]
    cdef Py_ssize_t C_out = y.shape[1], Ho = y.shape[2], Wo = y.shape[3]
    cdef Py_ssize_t ci, kh, kw, co, j, xo, oh, oh1, a, b, src
    cdef real acc[PACC]
    cdef real wv[PCBMAX]
    cdef real xv, bv
    for j in range(64 * 2):
        acc[j] = 0
    for ci in range(CI):
        for kh in range(KH):
            for kw in range(KW):
                xo = q0 + kh * dh * Wp + kw * dw
                for co in range(2):
                    wv[co] = wt[ci, kh, kw, cb + co]
                for j in range(64):
                    xv = xf[n, ci, xo + j]
                    for co in range(2):
                        acc[co * 64 + j] += xv * wv[co]
    # Row segments of the block into the NCHW output (the padded-pitch columns >= W_out drop).
    oh1 = _min((q0 + 64 - 1) // Wp, Ho - 1)
    for co in range(_min(2, C_out - cb)):
        bv = bias[cb + co]
        for oh in range(q0 // Wp, oh1 + 1):
            a = q0 - oh * Wp if q0 > oh * Wp else 0
            b = _min(Wo, q0 + 64 - oh * Wp)
            src = co * 64 + oh * Wp - q0
            for j in range(a, b):
                y[n, cb + co, oh, j] = acc[src + j] + bv
    return 0


cdef int _plane_task(const real[:, :, ::1] xf, const real[:, :, :, ::1] wt,
                     const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t t, Py_ssize_t Wp,
                     Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t lanes) except -1 nogil:
    cdef bint many = y.shape[1] >= 8
    cdef Py_ssize_t pcb = 8 if many else 2, Ho = y.shape[2], i, cb
    cdef Py_ssize_t nq = _ceil_div(Ho * Wp, lanes), n = t // nq, q0 = (t % nq) * lanes
    for i in range(wt.shape[3] // pcb):
        cb = i * pcb
        if real is float:
            if many:
                _plane_block_48x8(xf, wt, bias, y, n, q0, cb, Wp, dh, dw)
            elif lanes == 208:
                _plane_block_208x2(xf, wt, bias, y, n, q0, cb, Wp, dh, dw)
            else:
                _plane_block_128x2(xf, wt, bias, y, n, q0, cb, Wp, dh, dw)
        else:
            if many:
                _plane_block_24x8(xf, wt, bias, y, n, q0, cb, Wp, dh, dw)
            elif lanes == 104:
                _plane_block_104x2(xf, wt, bias, y, n, q0, cb, Wp, dh, dw)
            else:
                _plane_block_64x2(xf, wt, bias, y, n, q0, cb, Wp, dh, dw)
    return 0


def conv_fwd_plane(const real[:, :, ::1] xf, const real[:, :, :, ::1] wt, const real[::1] bias,
                   real[:, :, :, ::1] y, Py_ssize_t Wp, Py_ssize_t dh, Py_ssize_t dw,
                   bint serial=False):
    """Stride-1, groups-1 convolution for few channels: padded planes ``xf`` (N, C_in, L) of
    pitch Wp (see :func:`pad_flat`; L >= H_out*Wp + 256 + the kernel reach), ``wt``
    (C_in, kH, kW, Cp) with output channels innermost, zero-padded to a multiple of 8 (of 2
    below 8 output channels), ``bias`` (Cp,) -> NCHW ``y`` (N, C_out, H_out, W_out).

    Output (oh, ow) sits at grid position q = oh*Wp + ow and reads q + kh*dh*Wp + kw*dw: every
    tap is a constant shift, so blocks of consecutive q vectorize whatever the channel counts.
    Loop order: one task per (image, block of q), owning those pixels of every channel;
    channel blocks, then the taps, the innermost loop over contiguous q.
    """
    cdef Py_ssize_t G = y.shape[2] * Wp, t, tasks, lanes, wide, chunk
    cdef bint many = y.shape[1] >= 8
    if real is float:
        lanes, wide = (48 if many else 128), 208
    else:
        lanes, wide = (24 if many else 64), 104
    # Below 8 channels, the wider block where it leaves fewer unused positions in the last
    # block of the grid (D's grad-input: 196 positions, 208 instead of 256).
    if not many and _ceil_div(G, wide) * wide < _ceil_div(G, lanes) * lanes:
        lanes = wide
    chunk = _ceil_div(G, lanes)  # the tasks of one image
    tasks = y.shape[0] * chunk
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(tasks):
                _plane_task(xf, wt, bias, y, t, Wp, dh, dw, lanes)
        else:
            for t in prange(tasks, schedule="dynamic", chunksize=chunk):
                _plane_task(xf, wt, bias, y, t, Wp, dh, dw, lanes)


cdef int _fwd_rows_plane(const real[:, :, ::1] xf, const real[:, :, :, ::1] w,
                         const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                         Py_ssize_t co, Py_ssize_t G, Py_ssize_t Wp, Py_ssize_t sh,
                         Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    cdef Py_ssize_t CIG = w.shape[1], KH = w.shape[2], KW = w.shape[3]
    cdef Py_ssize_t Ho = y.shape[2], Wo = y.shape[3], COG = y.shape[1] // G
    cdef Py_ssize_t g = co // COG
    cdef real acc[ROWB]
    cdef real wv
    cdef Py_ssize_t oh, wb, w0, nw, ci, kh, kw, j, base
    for oh in range(Ho):
        for wb in range(_ceil_div(Wo, ROWB)):
            w0 = wb * ROWB
            nw = _min(ROWB, Wo - w0)
            for j in range(nw):
                acc[j] = bias[co]
            for ci in range(CIG):
                for kh in range(KH):
                    for kw in range(KW):
                        wv = w[co, ci, kh, kw]
                        base = (oh * sh + kh * dh) * Wp + w0 * sw + kw * dw
                        for j in range(nw):
                            acc[j] += wv * xf[n, g * CIG + ci, base + j * sw]
            for j in range(nw):
                y[n, co, oh, w0 + j] = acc[j]
    return 0


def conv_fwd_rows(const real[:, :, ::1] xf, const real[:, :, :, ::1] w, const real[::1] bias,
                  real[:, :, :, ::1] y, Py_ssize_t groups, Py_ssize_t Wp, Py_ssize_t sh,
                  Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw, bint serial=False):
    """Strided convolution for few output channels per group: padded planes ``xf`` (N, C_in, L)
    of pitch Wp, OIHW ``w`` -> NCHW ``y``. Loop order: one task per (image, output channel);
    the innermost loop runs over a chunk of an output row, accumulating in a local array.
    """
    cdef Py_ssize_t N = y.shape[0], C = y.shape[1], t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(N * C):
                _fwd_rows_plane(xf, w, bias, y, t // C, t % C, groups, Wp, sh, sw, dh, dw)
        else:
            for t in prange(N * C, schedule="dynamic"):
                _fwd_rows_plane(xf, w, bias, y, t // C, t % C, groups, Wp, sh, sw, dh, dw)


# ------------------------------------------------------------------------------ direct (groups 1)
#
# The register-blocked kernels of the common layers (groups 1, unit column dilation, at least
# 16 output channels). Layouts: the input as ``xp2`` (N, Hp, Wp*C), so that the window of an
# output column in one kernel row is one contiguous run of R = kW*C elements (taps kw, then
# channels); weights ``wk`` (kH, R, Cw) with output channels innermost, zero-padded to Cw, a
# multiple of 16, so that every channel block below is full.


# Register blocks of the direct forward: nw output columns x nc output channels (4 x 64,
# 8 x 32, 16 / 10 / 8 / 1 x 16). The block has a compile-time shape, the co loop is vectorized,
# the j loops unroll, and the nw*nc accumulators stay in registers over the whole run of every
# kernel row (one broadcast input per column times nc weights). One function per shape
# (literal sizes in the body, not arguments): with the sizes as arguments of one shared
# function, GCC's constant propagation gave up at six shapes and left one of them in scalar
# code with the accumulators in memory (B grad-input 19 -> 280 ms).


cdef inline int _direct_block_4x64(const real[:, :, ::1] xp2, const real[:, :, ::1] wk,
                                   const real[::1] bias, real[:, :, :, :] y, Py_ssize_t n,
                                   Py_ssize_t oh, Py_ssize_t c0, Py_ssize_t w0, Py_ssize_t cs,
                                   Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t row0,
                                   Py_ssize_t col0) except -1 nogil:
    # 4 output columns x 64 output channels (see above).
    cdef Py_ssize_t KH = wk.shape[0], R = wk.shape[1], C_out = y.shape[1]
    cdef Py_ssize_t kh, r, j, co, ih, xb, step = sw * cs, ncw = _min(64, C_out - c0)
    cdef real acc[OWB * COB]
    cdef real xs[DWB]
    cdef real wv
    for j in range(4):
        for co in range(64):
            acc[j * 64 + co] = 0
    for kh in range(KH):
        ih = row0 + oh * sh + kh * dh
        xb = col0 + w0 * step
        for r in range(R):
            for j in range(4):
                xs[j] = xp2[n, ih, xb + j * step + r]
            for co in range(64):
                wv = wk[kh, r, c0 + co]
                for j in range(4):
                    acc[j * 64 + co] += xs[j] * wv
    for co in range(ncw):
        for j in range(4):
            y[n, c0 + co, oh, w0 + j] = acc[j * 64 + co] + bias[c0 + co]
    return 0


cdef inline int _direct_block_8x32(const real[:, :, ::1] xp2, const real[:, :, ::1] wk,
                                   const real[::1] bias, real[:, :, :, :] y, Py_ssize_t n,
                                   Py_ssize_t oh, Py_ssize_t c0, Py_ssize_t w0, Py_ssize_t cs,
                                   Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t row0,
                                   Py_ssize_t col0) except -1 nogil:
    # 8 output columns x 32 output channels (see above).
    cdef Py_ssize_t KH = wk.shape[0], R = wk.shape[1], C_out = y.shape[1]
    cdef Py_ssize_t kh, r, j, co, ih, xb, step = sw * cs, ncw = _min(32, C_out - c0)
    cdef real acc[OWB * COB]
    cdef real xs[DWB]
    cdef real wv
    for j in range(8):
        for co in range(32):
            acc[j * 32 + co] = 0
    for kh in range(KH):
        ih = row0 + oh * sh + kh * dh
        xb = col0 + w0 * step
        for r in range(R):
            for j in range(8):
                xs[j] = xp2[n, ih, xb + j * step + r]
            for co in range(32):
                wv = wk[kh, r, c0 + co]
                for j in range(8):
                    acc[j * 32 + co] += xs[j] * wv
    for co in range(ncw):
        for j in range(8):
            y[n, c0 + co, oh, w0 + j] = acc[j * 32 + co] + bias[c0 + co]
    return 0


cdef inline int _direct_block_16x16(const real[:, :, ::1] xp2, const real[:, :, ::1] wk,
                                    const real[::1] bias, real[:, :, :, :] y, Py_ssize_t n,
                                    Py_ssize_t oh, Py_ssize_t c0, Py_ssize_t w0, Py_ssize_t cs,
                                    Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t row0,
                                    Py_ssize_t col0) except -1 nogil:
    # 16 output columns x 16 output channels (see above).
    cdef Py_ssize_t KH = wk.shape[0], R = wk.shape[1], C_out = y.shape[1]
    cdef Py_ssize_t kh, r, j, co, ih, xb, step = sw * cs, ncw = _min(16, C_out - c0)
    cdef real acc[OWB * COB]
    cdef real xs[DWB]
    cdef real wv
    for j in range(16):
        for co in range(16):
            acc[j * 16 + co] = 0
    for kh in range(KH):
        ih = row0 + oh * sh + kh * dh
        xb = col0 + w0 * step
        for r in range(R):
            for j in range(16):
                xs[j] = xp2[n, ih, xb + j * step + r]
            for co in range(16):
                wv = wk[kh, r, c0 + co]
                for j in range(16):
                    acc[j * 16 + co] += xs[j] * wv
    for co in range(ncw):
        for j in range(16):
            y[n, c0 + co, oh, w0 + j] = acc[j * 16 + co] + bias[c0 + co]
    return 0


cdef inline int _direct_block_10x16(const real[:, :, ::1] xp2, const real[:, :, ::1] wk,
                                    const real[::1] bias, real[:, :, :, :] y, Py_ssize_t n,
                                    Py_ssize_t oh, Py_ssize_t c0, Py_ssize_t w0, Py_ssize_t cs,
                                    Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t row0,
                                    Py_ssize_t col0) except -1 nogil:
    # 10 output columns x 16 output channels (see above).
    cdef Py_ssize_t KH = wk.shape[0], R = wk.shape[1], C_out = y.shape[1]
    cdef Py_ssize_t kh, r, j, co, ih, xb, step = sw * cs, ncw = _min(16, C_out - c0)
    cdef real acc[OWB * COB]
    cdef real xs[DWB]
    cdef real wv
    for j in range(10):
        for co in range(16):
            acc[j * 16 + co] = 0
    for kh in range(KH):
        ih = row0 + oh * sh + kh * dh
        xb = col0 + w0 * step
        for r in range(R):
            for j in range(10):
                xs[j] = xp2[n, ih, xb + j * step + r]
            for co in range(16):
                wv = wk[kh, r, c0 + co]
                for j in range(10):
                    acc[j * 16 + co] += xs[j] * wv
    for co in range(ncw):
        for j in range(10):
            y[n, c0 + co, oh, w0 + j] = acc[j * 16 + co] + bias[c0 + co]
    return 0


cdef inline int _direct_block_8x16(const real[:, :, ::1] xp2, const real[:, :, ::1] wk,
                                   const real[::1] bias, real[:, :, :, :] y, Py_ssize_t n,
                                   Py_ssize_t oh, Py_ssize_t c0, Py_ssize_t w0, Py_ssize_t cs,
                                   Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t row0,
                                   Py_ssize_t col0) except -1 nogil:
    # 8 output columns x 16 output channels (see above).
    cdef Py_ssize_t KH = wk.shape[0], R = wk.shape[1], C_out = y.shape[1]
    cdef Py_ssize_t kh, r, j, co, ih, xb, step = sw * cs, ncw = _min(16, C_out - c0)
    cdef real acc[OWB * COB]
    cdef real xs[DWB]
    cdef real wv
    for j in range(8):
        for co in range(16):
            acc[j * 16 + co] = 0
    for kh in range(KH):
        ih = row0 + oh * sh + kh * dh
        xb = col0 + w0 * step
        for r in range(R):
            for j in range(8):
                xs[j] = xp2[n, ih, xb + j * step + r]
            for co in range(16):
                wv = wk[kh, r, c0 + co]
                for j in range(8):
                    acc[j * 16 + co] += xs[j] * wv
    for co in range(ncw):
        for j in range(8):
            y[n, c0 + co, oh, w0 + j] = acc[j * 16 + co] + bias[c0 + co]
    return 0


cdef inline int _direct_block_1x16(const real[:, :, ::1] xp2, const real[:, :, ::1] wk,
                                   const real[::1] bias, real[:, :, :, :] y, Py_ssize_t n,
                                   Py_ssize_t oh, Py_ssize_t c0, Py_ssize_t w0, Py_ssize_t cs,
                                   Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t row0,
                                   Py_ssize_t col0) except -1 nogil:
    # 1 output columns x 16 output channels (see above).
    cdef Py_ssize_t KH = wk.shape[0], R = wk.shape[1], C_out = y.shape[1]
    cdef Py_ssize_t kh, r, j, co, ih, xb, step = sw * cs, ncw = _min(16, C_out - c0)
    cdef real acc[OWB * COB]
    cdef real xs[DWB]
    cdef real wv
    for j in range(1):
        for co in range(16):
            acc[j * 16 + co] = 0
    for kh in range(KH):
        ih = row0 + oh * sh + kh * dh
        xb = col0 + w0 * step
        for r in range(R):
            for j in range(1):
                xs[j] = xp2[n, ih, xb + j * step + r]
            for co in range(16):
                wv = wk[kh, r, c0 + co]
                for j in range(1):
                    acc[j * 16 + co] += xs[j] * wv
    for co in range(ncw):
        for j in range(1):
            y[n, c0 + co, oh, w0 + j] = acc[j * 16 + co] + bias[c0 + co]
    return 0


cdef int _direct_row(const real[:, :, ::1] xp2, const real[:, :, ::1] wk,
                     const real[::1] bias, real[:, :, :, :] y, Py_ssize_t n, Py_ssize_t oh,
                     Py_ssize_t cs, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh,
                     Py_ssize_t row0, Py_ssize_t col0) except -1 nogil:
    cdef Py_ssize_t Cw = wk.shape[2], Wo = y.shape[3], c0 = 0, nc, w0, nw
    while c0 < Cw:
        nc = 64 if Cw - c0 >= 64 else (32 if Cw - c0 >= 32 else 16)
        # Column blocks; the last one is shifted left to end at W_out (it recomputes a few
        # columns with the same result) rather than leaving single columns.
        nw = 4 if nc == 64 else (8 if nc == 32 else 16)
        if nc == 16 and 8 <= Wo < 16:
            nw = 10 if Wo >= 10 else 8  # narrow rows (e.g. 10: one exact block)
        elif Wo < nw:
            nw = 1
        w0 = 0
        while w0 < Wo:
            if w0 + nw > Wo:
                w0 = Wo - nw
            if nw == 1:
                _direct_block_1x16(xp2, wk, bias, y, n, oh, c0, w0, cs, sh, sw, dh, row0, col0)
                if nc > 16:
                    _direct_block_1x16(xp2, wk, bias, y, n, oh, c0 + 16, w0, cs, sh, sw, dh, row0,
                                       col0)
                if nc > 32:
                    _direct_block_1x16(xp2, wk, bias, y, n, oh, c0 + 32, w0, cs, sh, sw, dh, row0,
                                       col0)
                    _direct_block_1x16(xp2, wk, bias, y, n, oh, c0 + 48, w0, cs, sh, sw, dh, row0,
                                       col0)
            elif nc == 64:
                _direct_block_4x64(xp2, wk, bias, y, n, oh, c0, w0, cs, sh, sw, dh, row0, col0)
            elif nc == 32:
                _direct_block_8x32(xp2, wk, bias, y, n, oh, c0, w0, cs, sh, sw, dh, row0, col0)
            elif nw == 16:
                _direct_block_16x16(xp2, wk, bias, y, n, oh, c0, w0, cs, sh, sw, dh, row0, col0)
            elif nw == 10:
                _direct_block_10x16(xp2, wk, bias, y, n, oh, c0, w0, cs, sh, sw, dh, row0, col0)
            else:
                _direct_block_8x16(xp2, wk, bias, y, n, oh, c0, w0, cs, sh, sw, dh, row0, col0)
            w0 += nw
        c0 += nc
    return 0


def conv_fwd_direct(const real[:, :, ::1] xp2, const real[:, :, ::1] wk, const real[::1] bias,
                    real[:, :, :, :] y, Py_ssize_t cs, Py_ssize_t sh, Py_ssize_t sw,
                    Py_ssize_t dh, Py_ssize_t row0=0, Py_ssize_t col0=0, bint serial=False):
    """``y[n, co, oh, ow] = bias[co] + sum over kh, r of
    xp2[n, row0 + oh*sh + kh*dh, col0 + ow*sw*cs + r] * wk[kh, r, co]`` for co < C_out.

    ``xp2`` (N, Hp, Wp*cs): a zero-padded NHWC input of cs channels, rows flattened; ``wk``
    (kH, R, Cw): R = kW*cs, output channels innermost, zero-padded to Cw (a multiple of 16,
    >= C_out); ``bias`` (Cw,). ``y`` (N, C_out, H_out, W_out) may have any strides (a stride
    phase of a larger array: grad-input of a strided convolution).

    Loop order: one task per (image, output row), owning y[n, :, oh, :]; channel blocks (the
    weight slab stays in cache), column blocks, then the register block accumulates over the
    kernel rows and the contiguous run of each.
    """
    cdef Py_ssize_t N = y.shape[0], Ho = y.shape[2], t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(N * Ho):
                _direct_row(xp2, wk, bias, y, t // Ho, t % Ho, cs, sh, sw, dh, row0, col0)
        else:
            for t in prange(N * Ho, schedule="dynamic", chunksize=Ho):
                _direct_row(xp2, wk, bias, y, t // Ho, t % Ho, cs, sh, sw, dh, row0, col0)


# Register blocks of the NCHW direct forward: nw (16, 10, 8 or 1) output columns x 16 output
# channels, as _direct_block_* but reading the NCHW input: the run is (c_in, kw), every tap nw
# broadcast inputs of one row. One function per width (see _direct_block_4x64).


cdef inline int _dnchw_block_16(const real[:, :, :, ::1] xn, const real[:, :, ::1] wk,
                                const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                                Py_ssize_t oh, Py_ssize_t w0, Py_ssize_t sh, Py_ssize_t sw,
                                Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    # 16 output columns x 16 output channels (see above).
    cdef Py_ssize_t KH = wk.shape[0], C = xn.shape[1], KW = wk.shape[1] // C
    cdef Py_ssize_t C_out = y.shape[1], kh, ci, kw, j, co, ih, iw
    cdef real acc[16 * 16]
    cdef real xs[16]
    cdef real wv
    for j in range(16 * 16):
        acc[j] = 0
    for kh in range(KH):
        ih = oh * sh + kh * dh
        for ci in range(C):
            for kw in range(KW):
                iw = w0 * sw + kw * dw
                for j in range(16):
                    xs[j] = xn[n, ci, ih, iw + j * sw]
                for co in range(16):
                    wv = wk[kh, ci * KW + kw, co]
                    for j in range(16):
                        acc[j * 16 + co] += xs[j] * wv
    for co in range(C_out):
        for j in range(16):
            y[n, co, oh, w0 + j] = acc[j * 16 + co] + bias[co]
    return 0


cdef inline int _dnchw_block_10(const real[:, :, :, ::1] xn, const real[:, :, ::1] wk,
                                const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                                Py_ssize_t oh, Py_ssize_t w0, Py_ssize_t sh, Py_ssize_t sw,
                                Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    # 10 output columns x 16 output channels (see above).
    cdef Py_ssize_t KH = wk.shape[0], C = xn.shape[1], KW = wk.shape[1] // C
    cdef Py_ssize_t C_out = y.shape[1], kh, ci, kw, j, co, ih, iw
    cdef real acc[16 * 16]
    cdef real xs[16]
    cdef real wv
    for j in range(10 * 16):
        acc[j] = 0
    for kh in range(KH):
        ih = oh * sh + kh * dh
        for ci in range(C):
            for kw in range(KW):
                iw = w0 * sw + kw * dw
                for j in range(10):
                    xs[j] = xn[n, ci, ih, iw + j * sw]
                for co in range(16):
                    wv = wk[kh, ci * KW + kw, co]
                    for j in range(10):
                        acc[j * 16 + co] += xs[j] * wv
    for co in range(C_out):
        for j in range(10):
            y[n, co, oh, w0 + j] = acc[j * 16 + co] + bias[co]
    return 0


cdef inline int _dnchw_block_8(const real[:, :, :, ::1] xn, const real[:, :, ::1] wk,
                               const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                               Py_ssize_t oh, Py_ssize_t w0, Py_ssize_t sh, Py_ssize_t sw,
                               Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    # 8 output columns x 16 output channels (see above).
    cdef Py_ssize_t KH = wk.shape[0], C = xn.shape[1], KW = wk.shape[1] // C
    cdef Py_ssize_t C_out = y.shape[1], kh, ci, kw, j, co, ih, iw
    cdef real acc[16 * 16]
    cdef real xs[16]
    cdef real wv
    for j in range(8 * 16):
        acc[j] = 0
    for kh in range(KH):
        ih = oh * sh + kh * dh
        for ci in range(C):
            for kw in range(KW):
                iw = w0 * sw + kw * dw
                for j in range(8):
                    xs[j] = xn[n, ci, ih, iw + j * sw]
                for co in range(16):
                    wv = wk[kh, ci * KW + kw, co]
                    for j in range(8):
                        acc[j * 16 + co] += xs[j] * wv
    for co in range(C_out):
        for j in range(8):
            y[n, co, oh, w0 + j] = acc[j * 16 + co] + bias[co]
    return 0


cdef inline int _dnchw_block_1(const real[:, :, :, ::1] xn, const real[:, :, ::1] wk,
                               const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                               Py_ssize_t oh, Py_ssize_t w0, Py_ssize_t sh, Py_ssize_t sw,
                               Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    # 1 output columns x 16 output channels (see above).
    cdef Py_ssize_t KH = wk.shape[0], C = xn.shape[1], KW = wk.shape[1] // C
    cdef Py_ssize_t C_out = y.shape[1], kh, ci, kw, j, co, ih, iw
    cdef real acc[16 * 16]
    cdef real xs[16]
    cdef real wv
    for j in range(1 * 16):
        acc[j] = 0
    for kh in range(KH):
        ih = oh * sh + kh * dh
        for ci in range(C):
            for kw in range(KW):
                iw = w0 * sw + kw * dw
                for j in range(1):
                    xs[j] = xn[n, ci, ih, iw + j * sw]
                for co in range(16):
                    wv = wk[kh, ci * KW + kw, co]
                    for j in range(1):
                        acc[j * 16 + co] += xs[j] * wv
    for co in range(C_out):
        for j in range(1):
            y[n, co, oh, w0 + j] = acc[j * 16 + co] + bias[co]
    return 0


cdef inline int _dnchw_block_16s1(const real[:, :, :, ::1] xn, const real[:, :, ::1] wk,
                                  const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                                  Py_ssize_t oh, Py_ssize_t w0, Py_ssize_t sh,
                                  Py_ssize_t dh) except -1 nogil:
    # 16 output columns x 16 output channels, column stride and dilation 1 (constant
    # offsets of the broadcast inputs).
    cdef Py_ssize_t KH = wk.shape[0], C = xn.shape[1], KW = wk.shape[1] // C
    cdef Py_ssize_t C_out = y.shape[1], kh, ci, kw, j, co, ih, iw
    cdef real acc[16 * 16]
    cdef real xs[16]
    cdef real wv
    for j in range(16 * 16):
        acc[j] = 0
    for kh in range(KH):
        ih = oh * sh + kh * dh
        for ci in range(C):
            for kw in range(KW):
                iw = w0 + kw
                for j in range(16):
                    xs[j] = xn[n, ci, ih, iw + j]
                for co in range(16):
                    wv = wk[kh, ci * KW + kw, co]
                    for j in range(16):
                        acc[j * 16 + co] += xs[j] * wv
    for co in range(C_out):
        for j in range(16):
            y[n, co, oh, w0 + j] = acc[j * 16 + co] + bias[co]
    return 0


cdef inline int _dnchw_block_10s1(const real[:, :, :, ::1] xn, const real[:, :, ::1] wk,
                                  const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                                  Py_ssize_t oh, Py_ssize_t w0, Py_ssize_t sh,
                                  Py_ssize_t dh) except -1 nogil:
    # 10 output columns x 16 output channels, column stride and dilation 1 (constant
    # offsets of the broadcast inputs).
    cdef Py_ssize_t KH = wk.shape[0], C = xn.shape[1], KW = wk.shape[1] // C
    cdef Py_ssize_t C_out = y.shape[1], kh, ci, kw, j, co, ih, iw
    cdef real acc[16 * 16]
    cdef real xs[16]
    cdef real wv
    for j in range(10 * 16):
        acc[j] = 0
    for kh in range(KH):
        ih = oh * sh + kh * dh
        for ci in range(C):
            for kw in range(KW):
                iw = w0 + kw
                for j in range(10):
                    xs[j] = xn[n, ci, ih, iw + j]
                for co in range(16):
                    wv = wk[kh, ci * KW + kw, co]
                    for j in range(10):
                        acc[j * 16 + co] += xs[j] * wv
    for co in range(C_out):
        for j in range(10):
            y[n, co, oh, w0 + j] = acc[j * 16 + co] + bias[co]
    return 0


cdef inline int _dnchw_block_8s1(const real[:, :, :, ::1] xn, const real[:, :, ::1] wk,
                                 const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n,
                                 Py_ssize_t oh, Py_ssize_t w0, Py_ssize_t sh,
                                 Py_ssize_t dh) except -1 nogil:
    # 8 output columns x 16 output channels, column stride and dilation 1 (constant
    # offsets of the broadcast inputs).
    cdef Py_ssize_t KH = wk.shape[0], C = xn.shape[1], KW = wk.shape[1] // C
    cdef Py_ssize_t C_out = y.shape[1], kh, ci, kw, j, co, ih, iw
    cdef real acc[16 * 16]
    cdef real xs[16]
    cdef real wv
    for j in range(8 * 16):
        acc[j] = 0
    for kh in range(KH):
        ih = oh * sh + kh * dh
        for ci in range(C):
            for kw in range(KW):
                iw = w0 + kw
                for j in range(8):
                    xs[j] = xn[n, ci, ih, iw + j]
                for co in range(16):
                    wv = wk[kh, ci * KW + kw, co]
                    for j in range(8):
                        acc[j * 16 + co] += xs[j] * wv
    for co in range(C_out):
        for j in range(8):
            y[n, co, oh, w0 + j] = acc[j * 16 + co] + bias[co]
    return 0


cdef int _dnchw_row(const real[:, :, :, ::1] xn, const real[:, :, ::1] wk,
                    const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t n, Py_ssize_t oh,
                    Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    cdef Py_ssize_t Wo = y.shape[3], w0 = 0
    cdef Py_ssize_t nw = 16 if Wo >= 16 else (10 if Wo >= 10 else (8 if Wo >= 8 else 1))
    while w0 < Wo:  # the last block shifted left to end at W_out
        if w0 + nw > Wo:
            w0 = Wo - nw
        if nw == 16 and sw == dw == 1:
            _dnchw_block_16s1(xn, wk, bias, y, n, oh, w0, sh, dh)
        elif nw == 10 and sw == dw == 1:
            _dnchw_block_10s1(xn, wk, bias, y, n, oh, w0, sh, dh)
        elif nw == 8 and sw == dw == 1:
            _dnchw_block_8s1(xn, wk, bias, y, n, oh, w0, sh, dh)
        elif nw == 16:
            _dnchw_block_16(xn, wk, bias, y, n, oh, w0, sh, sw, dh, dw)
        elif nw == 10:
            _dnchw_block_10(xn, wk, bias, y, n, oh, w0, sh, sw, dh, dw)
        elif nw == 8:
            _dnchw_block_8(xn, wk, bias, y, n, oh, w0, sh, sw, dh, dw)
        else:
            _dnchw_block_1(xn, wk, bias, y, n, oh, w0, sh, sw, dh, dw)
        w0 += nw
    return 0


def conv_fwd_direct_nchw(const real[:, :, :, ::1] xn, const real[:, :, ::1] wk,
                         const real[::1] bias, real[:, :, :, ::1] y, Py_ssize_t sh,
                         Py_ssize_t sw, Py_ssize_t dh, Py_ssize_t dw, bint serial=False):
    """:func:`conv_fwd_direct` for at most 16 output channels reading the NCHW input ``xn``
    (N, C_in, Hp, Wp) itself, zero-padded (or x as it is when nothing is padded): no NHWC
    copy, which costs as much as the convolution for few channels. ``wk`` (kH, C_in*kW, 16):
    the run is (c_in, kw); ``bias`` (16,).

    Loop order: one task per (image, output row), owning y[n, :, oh, :]; column blocks, then
    the register block over the kernel rows, input channels and taps.
    """
    cdef Py_ssize_t N = y.shape[0], Ho = y.shape[2], t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(N * Ho):
                _dnchw_row(xn, wk, bias, y, t // Ho, t % Ho, sh, sw, dh, dw)
        else:
            for t in prange(N * Ho, schedule="dynamic", chunksize=Ho):
                _dnchw_row(xn, wk, bias, y, t // Ho, t % Ho, sh, sw, dh, dw)


cdef inline int _dwd_block6(const real[::1] x1, const real[:, ::1] dyt,
                            const int64_t[::1] xbase, real[:, :, :, ::1] part, Py_ssize_t t,
                            Py_ssize_t kh, Py_ssize_t c0, Py_ssize_t r0, Py_ssize_t koff,
                            Py_ssize_t m0, Py_ssize_t m1) except -1 nogil:
    # RB32 (= 6, unrolled by hand: GCC otherwise vectorized the pixel loop with gathers) run
    # rows x COB output channels, accumulated in registers over the pixels m0..m1: per pixel
    # 6 broadcast inputs times COB contiguous dy values.
    cdef Py_ssize_t m, co, xb
    cdef real acc[RB32 * COB]
    cdef real x0, x1_, x2, x3, x4, x5, dv
    for co in range(RB32 * COB):
        acc[co] = 0
    for m in range(m0, m1):
        xb = xbase[m] + koff + r0
        x0 = x1[xb]
        x1_ = x1[xb + 1]
        x2 = x1[xb + 2]
        x3 = x1[xb + 3]
        x4 = x1[xb + 4]
        x5 = x1[xb + 5]
        for co in range(COB):
            dv = dyt[m, c0 + co]
            acc[co] += x0 * dv
            acc[COB + co] += x1_ * dv
            acc[2 * COB + co] += x2 * dv
            acc[3 * COB + co] += x3 * dv
            acc[4 * COB + co] += x4 * dv
            acc[5 * COB + co] += x5 * dv
    for m in range(RB32):
        for co in range(COB):
            part[t, kh, r0 + m, c0 + co] += acc[m * COB + co]
    return 0


cdef inline int _dwd_block1(const real[::1] x1, const real[:, ::1] dyt,
                            const int64_t[::1] xbase, real[:, :, :, ::1] part, Py_ssize_t t,
                            Py_ssize_t kh, Py_ssize_t c0, Py_ssize_t r, Py_ssize_t koff,
                            Py_ssize_t m0, Py_ssize_t m1, Py_ssize_t nc) except -1 nogil:
    # One run row x nc (a literal, COB or 16) channels (the tail of the run; every row in
    # float64, where six rows of 64 doubles would not fit in registers).
    cdef Py_ssize_t m, co
    cdef real acc[COB]
    cdef real xv
    for co in range(nc):
        acc[co] = 0
    for m in range(m0, m1):
        xv = x1[xbase[m] + koff + r]
        for co in range(nc):
            acc[co] += xv * dyt[m, c0 + co]
    for co in range(nc):
        part[t, kh, r, c0 + co] += acc[co]
    return 0


# Grad-weight register blocks for layers with at most 16 output channels (_dwd_task with
# Cp = 16): nr run rows x 16 channels accumulated over the pixels m0..m1, per pixel one dy
# vector times nr broadcast inputs (24 rows: 24 zmm accumulators; 12 for the rest of the run;
# single rows last). Unrolled by hand: GCC turned a loop over the rows into shuffles.


cdef inline int _dwd16_24(const real[::1] x1, const real[:, ::1] dyt,
                          const int64_t[::1] xbase, real[:, :, :, ::1] part, Py_ssize_t t,
                          Py_ssize_t kh, Py_ssize_t r0, Py_ssize_t koff, Py_ssize_t m0,
                          Py_ssize_t m1, Py_ssize_t skip) except -1 nogil:
    # 24 run rows from r0 (unrolled by hand) x 16 output channels; the first skip rows are
    # not added (a block shifted back over rows already done).
    cdef Py_ssize_t m, i, co, xb
    cdef real acc[24 * 16]
    cdef real v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11
    cdef real v12, v13, v14, v15, v16, v17, v18, v19, v20, v21, v22, v23, dv
    for i in range(24 * 16):
        acc[i] = 0
    for m in range(m0, m1):
        xb = xbase[m] + koff + r0
        v0 = x1[xb + 0]
        v1 = x1[xb + 1]
        v2 = x1[xb + 2]
        v3 = x1[xb + 3]
        v4 = x1[xb + 4]
        v5 = x1[xb + 5]
        v6 = x1[xb + 6]
        v7 = x1[xb + 7]
        v8 = x1[xb + 8]
        v9 = x1[xb + 9]
        v10 = x1[xb + 10]
        v11 = x1[xb + 11]
        v12 = x1[xb + 12]
        v13 = x1[xb + 13]
        v14 = x1[xb + 14]
        v15 = x1[xb + 15]
        v16 = x1[xb + 16]
        v17 = x1[xb + 17]
        v18 = x1[xb + 18]
        v19 = x1[xb + 19]
        v20 = x1[xb + 20]
        v21 = x1[xb + 21]
        v22 = x1[xb + 22]
        v23 = x1[xb + 23]
        for co in range(16):
            dv = dyt[m, co]
            acc[0 + co] += v0 * dv
            acc[16 + co] += v1 * dv
            acc[32 + co] += v2 * dv
            acc[48 + co] += v3 * dv
            acc[64 + co] += v4 * dv
            acc[80 + co] += v5 * dv
            acc[96 + co] += v6 * dv
            acc[112 + co] += v7 * dv
            acc[128 + co] += v8 * dv
            acc[144 + co] += v9 * dv
            acc[160 + co] += v10 * dv
            acc[176 + co] += v11 * dv
            acc[192 + co] += v12 * dv
            acc[208 + co] += v13 * dv
            acc[224 + co] += v14 * dv
            acc[240 + co] += v15 * dv
            acc[256 + co] += v16 * dv
            acc[272 + co] += v17 * dv
            acc[288 + co] += v18 * dv
            acc[304 + co] += v19 * dv
            acc[320 + co] += v20 * dv
            acc[336 + co] += v21 * dv
            acc[352 + co] += v22 * dv
            acc[368 + co] += v23 * dv
    for i in range(skip, 24):
        for co in range(16):
            part[t, kh, r0 + i, co] += acc[i * 16 + co]
    return 0


cdef inline int _dwd16_12(const real[::1] x1, const real[:, ::1] dyt,
                          const int64_t[::1] xbase, real[:, :, :, ::1] part, Py_ssize_t t,
                          Py_ssize_t kh, Py_ssize_t r0, Py_ssize_t koff, Py_ssize_t m0,
                          Py_ssize_t m1, Py_ssize_t skip) except -1 nogil:
    # 12 run rows from r0 (unrolled by hand) x 16 output channels; the first skip rows are
    # not added (a block shifted back over rows already done).
    cdef Py_ssize_t m, i, co, xb
    cdef real acc[12 * 16]
    cdef real v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, dv
    for i in range(12 * 16):
        acc[i] = 0
    for m in range(m0, m1):
        xb = xbase[m] + koff + r0
        v0 = x1[xb + 0]
        v1 = x1[xb + 1]
        v2 = x1[xb + 2]
        v3 = x1[xb + 3]
        v4 = x1[xb + 4]
        v5 = x1[xb + 5]
        v6 = x1[xb + 6]
        v7 = x1[xb + 7]
        v8 = x1[xb + 8]
        v9 = x1[xb + 9]
        v10 = x1[xb + 10]
        v11 = x1[xb + 11]
        for co in range(16):
            dv = dyt[m, co]
            acc[0 + co] += v0 * dv
            acc[16 + co] += v1 * dv
            acc[32 + co] += v2 * dv
            acc[48 + co] += v3 * dv
            acc[64 + co] += v4 * dv
            acc[80 + co] += v5 * dv
            acc[96 + co] += v6 * dv
            acc[112 + co] += v7 * dv
            acc[128 + co] += v8 * dv
            acc[144 + co] += v9 * dv
            acc[160 + co] += v10 * dv
            acc[176 + co] += v11 * dv
    for i in range(skip, 12):
        for co in range(16):
            part[t, kh, r0 + i, co] += acc[i * 16 + co]
    return 0


cdef int _dwd_task(const real[::1] x1, const real[:, ::1] dyt, const int64_t[::1] xbase,
                   real[:, :, :, ::1] part, Py_ssize_t task, Py_ssize_t xw,
                   Py_ssize_t dh) except -1 nogil:
    cdef Py_ssize_t T = part.shape[0], KH = part.shape[1], R = part.shape[2]
    cdef Py_ssize_t ncb = _ceil_div(part.shape[3], COB), M = dyt.shape[0]
    cdef Py_ssize_t t = task // (KH * ncb), kh = (task // ncb) % KH, c0 = (task % ncb) * COB
    cdef Py_ssize_t koff = kh * dh * xw, me = (t + 1) * M // T, m0, m1, r0, r, co
    cdef Py_ssize_t rb = RB32 if real is float else R + 1
    for r in range(R):
        for co in range(_min(COB, part.shape[3] - c0)):
            part[t, kh, r, c0 + co] = 0
    m0 = t * M // T
    while m0 < me and part.shape[3] == 16:  # 16 channels: 24-, 12- and 1-row blocks
        m1 = _min(m0 + MCHUNK, me)
        r0 = 0
        while r0 + 24 <= R and real is float:  # (24 x 16 doubles would not fit in registers)
            _dwd16_24(x1, dyt, xbase, part, t, kh, r0, koff, m0, m1, 0)
            r0 += 24
        while r0 + 12 <= R:
            _dwd16_12(x1, dyt, xbase, part, t, kh, r0, koff, m0, m1, 0)
            r0 += 12
        if r0 < R and R >= 12:  # the last rows: a 12-row block shifted back
            _dwd16_12(x1, dyt, xbase, part, t, kh, R - 12, koff, m0, m1, r0 - (R - 12))
        elif r0 < R:  # a run shorter than 12: one row at a time
            while r0 < R:
                _dwd_block1(x1, dyt, xbase, part, t, kh, 0, r0, koff, m0, m1, 16)
                r0 += 1
        m0 = m1
    while m0 < me:
        m1 = _min(m0 + MCHUNK, me)
        r0 = 0
        while r0 + rb <= R:
            _dwd_block6(x1, dyt, xbase, part, t, kh, c0, r0, koff, m0, m1)
            r0 += rb
        while r0 < R:  # the last, partial block of run rows: one row at a time
            _dwd_block1(x1, dyt, xbase, part, t, kh, c0, r0, koff, m0, m1, COB)
            r0 += 1
        m0 = m1
    return 0


def conv_grad_weight_direct(const real[::1] x1, const real[:, ::1] dyt,
                            const int64_t[::1] xbase, real[:, :, :, ::1] part, Py_ssize_t xw,
                            Py_ssize_t dh, bint serial=False):
    """Partial weight gradients ``part[t]`` (kH, R, Cp) = sum over the pixels m of chunk t of
    ``x1[xbase[m] + kh*dh*xw + r] * dyt[m, co]``.

    ``x1``: the zero-padded NHWC input, flat, whose rows are xw = Wp*C_in long; ``xbase[m]``
    the offset of output pixel m's run (R = kW*C_in) in kernel row 0; ``dyt`` (M, Cp): dy in
    NHWC, channels zero-padded to Cp, a multiple of COB. Chunk t covers the pixels
    [t*M//T, (t+1)*M//T); the caller adds the T partial sums in order, so the result does not
    depend on the thread count. Cp is 16 (layers with at most 16 output channels) or a multiple
    of COB.

    Loop order: one task per (chunk, kernel row, block of COB channels), owning
    part[t, kh, :, block]; slabs of MCHUNK pixels (that dy slab stays in L2 while every block
    of run rows uses it), blocks of RB32 run rows, then the pixels: RB32 broadcast inputs
    times COB contiguous dy values into RB32 x COB register accumulators.
    """
    cdef Py_ssize_t tasks = part.shape[0] * part.shape[1] * _ceil_div(part.shape[3], COB), t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(tasks):
                _dwd_task(x1, dyt, xbase, part, t, xw, dh)
        else:
            for t in prange(tasks, schedule="dynamic"):
                _dwd_task(x1, dyt, xbase, part, t, xw, dh)


# ------------------------------------------------------------------------------ backward


cdef inline int _dw_block(const real[:, :, :, ::1] xp, const real[:, :, :, ::1] dyn,
                           real[:, :, :, :, ::1] dwt, Py_ssize_t n, Py_ssize_t oh,
                           Py_ssize_t g, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t ci0,
                           Py_ssize_t c0, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh,
                           Py_ssize_t dw, Py_ssize_t nc) except -1 nogil:
    # CIB (= 4, unrolled by hand) input channels x nc output channels of dwt, accumulated over
    # one output row. nc is a literal at every call site (64, 32, 16): see _fwd_block.
    cdef Py_ssize_t CIG = dwt.shape[3], COG = dwt.shape[4], Wo = dyn.shape[2]
    cdef Py_ssize_t ih = oh * sh + kh * dh, cx = g * CIG + ci0, ow, iw, co
    cdef real acc[CIB * COB]
    cdef real x0, x1, x2, x3, dv
    for co in range(nc):
        acc[co] = dwt[g, kh, kw, ci0, c0 + co]
        acc[COB + co] = dwt[g, kh, kw, ci0 + 1, c0 + co]
        acc[2 * COB + co] = dwt[g, kh, kw, ci0 + 2, c0 + co]
        acc[3 * COB + co] = dwt[g, kh, kw, ci0 + 3, c0 + co]
    for ow in range(Wo):
        iw = ow * sw + kw * dw
        x0 = xp[n, ih, iw, cx]
        x1 = xp[n, ih, iw, cx + 1]
        x2 = xp[n, ih, iw, cx + 2]
        x3 = xp[n, ih, iw, cx + 3]
        for co in range(nc):
            dv = dyn[n, oh, ow, g * COG + c0 + co]
            acc[co] += x0 * dv
            acc[COB + co] += x1 * dv
            acc[2 * COB + co] += x2 * dv
            acc[3 * COB + co] += x3 * dv
    for co in range(nc):
        dwt[g, kh, kw, ci0, c0 + co] = acc[co]
        dwt[g, kh, kw, ci0 + 1, c0 + co] = acc[COB + co]
        dwt[g, kh, kw, ci0 + 2, c0 + co] = acc[2 * COB + co]
        dwt[g, kh, kw, ci0 + 3, c0 + co] = acc[3 * COB + co]


cdef int _dw_block_tail(const real[:, :, :, ::1] xp, const real[:, :, :, ::1] dyn,
                         real[:, :, :, :, ::1] dwt, Py_ssize_t n, Py_ssize_t oh,
                         Py_ssize_t g, Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t ci0,
                         Py_ssize_t c0, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh,
                         Py_ssize_t dw, Py_ssize_t nc, Py_ssize_t nci) except -1 nogil:
    # Any block of nci <= CIB input channels x nc <= COB output channels.
    cdef Py_ssize_t CIG = dwt.shape[3], COG = dwt.shape[4], Wo = dyn.shape[2]
    cdef Py_ssize_t ih = oh * sh + kh * dh, cx = g * CIG + ci0, ow, iw, co, i
    cdef real acc[CIB * COB]
    cdef real xv
    for i in range(nci):
        for co in range(nc):
            acc[i * COB + co] = dwt[g, kh, kw, ci0 + i, c0 + co]
    for ow in range(Wo):
        iw = ow * sw + kw * dw
        for i in range(nci):
            xv = xp[n, ih, iw, cx + i]
            for co in range(nc):
                acc[i * COB + co] += xv * dyn[n, oh, ow, g * COG + c0 + co]
    for i in range(nci):
        for co in range(nc):
            dwt[g, kh, kw, ci0 + i, c0 + co] = acc[i * COB + co]


cdef int _dw_task(const real[:, :, :, ::1] xp, const real[:, :, :, ::1] dyn,
                   real[:, :, :, :, ::1] dwt, Py_ssize_t t, Py_ssize_t sh, Py_ssize_t sw,
                   Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    cdef Py_ssize_t KH = dwt.shape[1], KW = dwt.shape[2], CIG = dwt.shape[3], COG = dwt.shape[4]
    cdef Py_ssize_t N = dyn.shape[0], Ho = dyn.shape[1]
    cdef Py_ssize_t n_cs = _ceil_div(CIG, CIS), n_cb = _ceil_div(COG, COB)
    cdef Py_ssize_t cb = t % n_cb, cs = (t // n_cb) % n_cs, kw = (t // (n_cb * n_cs)) % KW
    cdef Py_ssize_t kh = (t // (n_cb * n_cs * KW)) % KH, g = t // (n_cb * n_cs * KW * KH)
    cdef Py_ssize_t c0 = cb * COB, nc = _min(COB, COG - c0)
    cdef Py_ssize_t s0 = cs * CIS, s1 = _min(CIG, s0 + CIS)
    cdef Py_ssize_t n, oh, ib, ci0, nci, ci, co
    for ci in range(s0, s1):
        for co in range(nc):
            dwt[g, kh, kw, ci, c0 + co] = 0
    for n in range(N):
        for oh in range(Ho):
            for ib in range(_ceil_div(s1 - s0, CIB)):
                ci0 = s0 + ib * CIB
                nci = _min(CIB, s1 - ci0)
                if nci == CIB and nc == 64:
                    _dw_block(xp, dyn, dwt, n, oh, g, kh, kw, ci0, c0, sh, sw, dh, dw, 64)
                elif nci == CIB and nc == 32:
                    _dw_block(xp, dyn, dwt, n, oh, g, kh, kw, ci0, c0, sh, sw, dh, dw, 32)
                elif nci == CIB and nc == 16:
                    _dw_block(xp, dyn, dwt, n, oh, g, kh, kw, ci0, c0, sh, sw, dh, dw, 16)
                else:
                    _dw_block_tail(xp, dyn, dwt, n, oh, g, kh, kw, ci0, c0, sh, sw, dh, dw,
                                   nc, nci)


def conv_grad_weight(const real[:, :, :, ::1] xp, const real[:, :, :, ::1] dyn,
                     real[:, :, :, :, ::1] dwt, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t dh,
                     Py_ssize_t dw, bint serial=False):
    """Weight gradient ``dwt`` (G, kH, kW, C_in/G, C_out/G) from padded NHWC ``xp`` and NHWC
    ``dyn`` (N, H_out, W_out, C_out): a GEMM reducing over every output pixel.

    Loop order: one task per (group, kh, kw, block of CIS input channels, block of COB output
    channels), which owns its block of ``dwt``; it walks the output rows in order and, per row,
    accumulates CIB x COB blocks over the row's pixels with the innermost loop over contiguous
    output channels of ``dyn`` (the dy row stays in L1 across the input-channel blocks).
    """
    cdef Py_ssize_t G = dwt.shape[0], KH = dwt.shape[1], KW = dwt.shape[2]
    cdef Py_ssize_t tasks = (G * KH * KW * _ceil_div(dwt.shape[3], CIS)
                             * _ceil_div(dwt.shape[4], COB))
    cdef Py_ssize_t t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(tasks):
                _dw_task(xp, dyn, dwt, t, sh, sw, dh, dw)
        else:
            for t in prange(tasks, schedule="dynamic"):
                _dw_task(xp, dyn, dwt, t, sh, sw, dh, dw)


cdef inline int _dw_flat_block(const real[:, :, ::1] xf, const real[:, :, ::1] dyf,
                               real[:, :, :, ::1] dwo, Py_ssize_t co0, Py_ssize_t co1,
                               Py_ssize_t cx, Py_ssize_t ci, Py_ssize_t t0, Py_ssize_t Wp,
                               Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    # 4 output channels x 4 taps from tap t0 (unrolled by hand), VL lanes each: 16 vector
    # accumulators that stay in registers over every image's grid (per VL positions: 4 dy
    # vectors, 4 shifted x vectors, 16 FMAs). Taps past the last compute on offset 0 and are
    # dropped; so are the channels co >= co1 (zero padding, or the next group's).
    cdef Py_ssize_t KW = dwo.shape[3], T = dwo.shape[2] * KW
    cdef Py_ssize_t N = dyf.shape[0], Lo = dyf.shape[2], n, pb, p0, v, a, b, tap
    cdef Py_ssize_t o[4]
    cdef Py_ssize_t o0, o1, o2, o3
    cdef real acc[16 * VL]
    cdef real d0, d1, d2, d3, x0, x1, x2, x3, s
    for b in range(4):
        tap = t0 + b
        o[b] = (tap // KW) * dh * Wp + (tap % KW) * dw if tap < T else 0
    o0, o1, o2, o3 = o[0], o[1], o[2], o[3]
    for v in range(16 * VL):
        acc[v] = 0
    for n in range(N):
        for pb in range(Lo // VL):
            p0 = pb * VL
            for v in range(VL):
                d0 = dyf[n, co0, p0 + v]
                d1 = dyf[n, co0 + 1, p0 + v]
                d2 = dyf[n, co0 + 2, p0 + v]
                d3 = dyf[n, co0 + 3, p0 + v]
                x0 = xf[n, cx, p0 + o0 + v]
                x1 = xf[n, cx, p0 + o1 + v]
                x2 = xf[n, cx, p0 + o2 + v]
                x3 = xf[n, cx, p0 + o3 + v]
                acc[v] += d0 * x0
                acc[VL + v] += d0 * x1
                acc[2 * VL + v] += d0 * x2
                acc[3 * VL + v] += d0 * x3
                acc[4 * VL + v] += d1 * x0
                acc[5 * VL + v] += d1 * x1
                acc[6 * VL + v] += d1 * x2
                acc[7 * VL + v] += d1 * x3
                acc[8 * VL + v] += d2 * x0
                acc[9 * VL + v] += d2 * x1
                acc[10 * VL + v] += d2 * x2
                acc[11 * VL + v] += d2 * x3
                acc[12 * VL + v] += d3 * x0
                acc[13 * VL + v] += d3 * x1
                acc[14 * VL + v] += d3 * x2
                acc[15 * VL + v] += d3 * x3
    for a in range(4):
        if co0 + a >= co1:
            break
        for b in range(4):
            tap = t0 + b
            if tap >= T:
                break
            s = 0
            for v in range(VL):
                s += acc[(a * 4 + b) * VL + v]
            dwo[co0 + a, ci, tap // KW, tap % KW] = s
    return 0


cdef int _dw_flat_task(const real[:, :, ::1] xf, const real[:, :, ::1] dyf,
                       real[:, :, :, ::1] dwo, Py_ssize_t t, Py_ssize_t G, Py_ssize_t Wp,
                       Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    cdef Py_ssize_t CIG = dwo.shape[1], T = dwo.shape[2] * dwo.shape[3]
    cdef Py_ssize_t COG = dwo.shape[0] // G, nb = _ceil_div(COG, FCB)
    cdef Py_ssize_t g = t // (nb * CIG), co0 = g * COG + (t // CIG % nb) * FCB, ci = t % CIG, tb
    for tb in range(_ceil_div(T, FTB)):
        _dw_flat_block(xf, dyf, dwo, co0, (g + 1) * COG, g * CIG + ci, ci, tb * FTB, Wp, dh, dw)
    return 0


def conv_grad_weight_flat(const real[:, :, ::1] xf, const real[:, :, ::1] dyf,
                          real[:, :, :, ::1] dwo, Py_ssize_t groups, Py_ssize_t Wp,
                          Py_ssize_t dh, Py_ssize_t dw, bint serial=False):
    """Stride-1 weight gradient for few input channels: OIHW ``dwo`` from padded planes ``xf``
    (N, C_in, L) and ``dyf`` (N, C_out, Lo), both of pitch Wp (dy zero outside its H_out x
    W_out, see :func:`pad_flat`). The products over the grid's dropped columns are 0 * x: the
    caller uses this kernel only for a finite x.

    ``dyf`` has (groups - 1)*C_out/groups + C_out/groups rounded up to a multiple of FCB
    channels: the last block of a group reads up to FCB - 1 channels past it (zeros, or the
    next group's), whose results are dropped.

    Loop order: one task per (group, block of FCB output channels, input channel), owning
    dwo[block, ci]; blocks of FTB taps, each walking every image's grid in VL-wide vectors with
    one partial sum per lane, channel and tap in registers; the lanes are added in order.
    """
    cdef Py_ssize_t G = groups, COG = dwo.shape[0] // groups
    cdef Py_ssize_t tasks = G * _ceil_div(COG, FCB) * dwo.shape[1], t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(tasks):
                _dw_flat_task(xf, dyf, dwo, t, groups, Wp, dh, dw)
        else:
            for t in prange(tasks, schedule="dynamic"):
                _dw_flat_task(xf, dyf, dwo, t, groups, Wp, dh, dw)


cdef int _db_channel(const real[:, :, ::1] dy, real[::1] db, Py_ssize_t c) except -1 nogil:
    # VL lane partial sums over each contiguous plane (a single running sum would be one
    # dependent add per element), the lanes added in order at the end.
    cdef Py_ssize_t N = dy.shape[0], P = dy.shape[2], n, i, v, pv = P - P % VL
    cdef real lanes[VL]
    cdef real s = 0
    for v in range(VL):
        lanes[v] = 0
    for n in range(N):
        for i in range(pv // VL):
            for v in range(VL):
                lanes[v] += dy[n, c, i * VL + v]
        for i in range(pv, P):
            lanes[i - pv] += dy[n, c, i]
    for v in range(VL):
        s += lanes[v]
    db[c] = s


def conv_grad_bias(const real[:, :, ::1] dy, real[::1] db, bint serial=False):
    """``db[c] = sum(dy[:, c])`` for ``dy`` (N, C, H*W); one task per channel."""
    cdef Py_ssize_t c
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for c in range(dy.shape[1]):
                _db_channel(dy, db, c)
        else:
            for c in prange(dy.shape[1], schedule="dynamic"):
                _db_channel(dy, db, c)


# ------------------------------------------------------------------------------ fused backward
#
# The stride-1, groups-1 backward of a first layer (C_in <= 4; a port of the numba backend's
# ``conv_backward_plane_fused``): one task per chunk of images, which copies each image's dy
# ONCE into a zero-padded plane per output channel (per-thread scratch, in cache) and then
# computes from there dx (blocks of consecutive positions of the padded-pitch grid x one input
# channel, as the plane forward), dw (vectorized dot products over the plane, up to 3 kernel
# columns per pass so that dy is loaded once for them) and db (lane sums over the plane).
# Layouts, per thread: ``dyp`` (C_out, Pd): dy at row ry = dh*(kH-1), column rx = dw*(kW-1) of
# a plane of pitch wd = W_out + 2*rx, zeros elsewhere; ``xq`` (C_in, Pq): x at row ry + pt,
# column rx + pl, same pitch. Input pixel (h, w) sits at q = (h + pt)*wd + w + pl of dyp's
# grid, and dx there reads q + kh*dh*wd + kw*dw of dyp with the flipped weight; output pixel
# (oh, ow) of dyp, at q = (ry + oh)*wd + rx + ow, meets x of tap (kh, kw) at q + kh*dh*wd +
# kw*dw of xq.

cdef enum:
    FXL32 = 128  # grad-input positions per register block, float32 (8 zmm accumulators)
    FXL64 = 64   # ... float64
    FVL = 32     # lanes of each fused grad-weight dot product (and of the bias sums)


cdef inline int _fused_dx_128(const real[:, :, ::1] dyp, const real[:, :, :, ::1] wf,
                              real[:, :, :, ::1] dx, Py_ssize_t tid, Py_ssize_t n,
                              Py_ssize_t ci, Py_ssize_t q0, Py_ssize_t wd, Py_ssize_t base,
                              Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    # 128 grid positions of dx channel ci: per (output channel, tap), one broadcast flipped
    # weight times 128 contiguous dy values of the padded plane.
    cdef Py_ssize_t C_out = wf.shape[1], KH = wf.shape[2], KW = wf.shape[3]
    cdef Py_ssize_t H = dx.shape[2], W = dx.shape[3], co, kh, kw, j, src, h, a, b, d
    cdef real acc[FXL32]
    cdef real wv
    for j in range(128):
        acc[j] = 0
    for co in range(C_out):
        for kh in range(KH):
            for kw in range(KW):
                wv = wf[ci, co, kh, kw]
                src = base + q0 + kh * dh * wd + kw * dw
                for j in range(128):
                    acc[j] += wv * dyp[tid, co, src + j]
    # Row segments of the block into NCHW dx (the grid columns >= W drop).
    for h in range(q0 // wd, _min((q0 + 128 - 1) // wd + 1, H)):
        a = q0 - h * wd if q0 > h * wd else 0
        b = _min(W, q0 + 128 - h * wd)
        d = h * wd - q0
        for j in range(a, b):
            dx[n, ci, h, j] = acc[d + j]
    return 0


cdef inline int _fused_dx_64(const real[:, :, ::1] dyp, const real[:, :, :, ::1] wf,
                             real[:, :, :, ::1] dx, Py_ssize_t tid, Py_ssize_t n,
                             Py_ssize_t ci, Py_ssize_t q0, Py_ssize_t wd, Py_ssize_t base,
                             Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    # 64 grid positions of dx channel ci (see _fused_dx_128).
    cdef Py_ssize_t C_out = wf.shape[1], KH = wf.shape[2], KW = wf.shape[3]
    cdef Py_ssize_t H = dx.shape[2], W = dx.shape[3], co, kh, kw, j, src, h, a, b, d
    cdef real acc[FXL64]
    cdef real wv
    for j in range(64):
        acc[j] = 0
    for co in range(C_out):
        for kh in range(KH):
            for kw in range(KW):
                wv = wf[ci, co, kh, kw]
                src = base + q0 + kh * dh * wd + kw * dw
                for j in range(64):
                    acc[j] += wv * dyp[tid, co, src + j]
    for h in range(q0 // wd, _min((q0 + 64 - 1) // wd + 1, H)):
        a = q0 - h * wd if q0 > h * wd else 0
        b = _min(W, q0 + 64 - h * wd)
        d = h * wd - q0
        for j in range(a, b):
            dx[n, ci, h, j] = acc[d + j]
    return 0


# Fused grad-weight passes: 3, 2 or 1 consecutive kernel columns (kw, kw + 1, ...) of one
# (co, ci, kh), over nb blocks of FVL grid positions from q0 (dy loaded once per block for all
# of them), FVL lane partial sums each, added to the task's lanes pdw[t, co, ci, kh, kw, :]
# (the caller adds the lanes: one reduction per weight, not per pass and image).

cdef inline int _fused_dw3(const real[:, :, ::1] dyp, const real[:, :, ::1] xq,
                           real[:, :, :, :, :, ::1] pdw, Py_ssize_t tid, Py_ssize_t t,
                           Py_ssize_t co, Py_ssize_t ci, Py_ssize_t kh, Py_ssize_t kw,
                           Py_ssize_t q0, Py_ssize_t xo, Py_ssize_t nb,
                           Py_ssize_t dw) except -1 nogil:
    cdef Py_ssize_t i, v, p
    cdef real acc[3 * FVL]
    cdef real d
    for v in range(FVL):
        acc[v] = pdw[t, co, ci, kh, kw, v]
        acc[FVL + v] = pdw[t, co, ci, kh, kw + 1, v]
        acc[2 * FVL + v] = pdw[t, co, ci, kh, kw + 2, v]
    for i in range(nb):
        p = q0 + i * FVL
        for v in range(FVL):
            d = dyp[tid, co, p + v]
            acc[v] += d * xq[tid, ci, xo + p + v]
            acc[FVL + v] += d * xq[tid, ci, xo + dw + p + v]
            acc[2 * FVL + v] += d * xq[tid, ci, xo + 2 * dw + p + v]
    for v in range(FVL):
        pdw[t, co, ci, kh, kw, v] = acc[v]
        pdw[t, co, ci, kh, kw + 1, v] = acc[FVL + v]
        pdw[t, co, ci, kh, kw + 2, v] = acc[2 * FVL + v]
    return 0


cdef inline int _fused_dw2(const real[:, :, ::1] dyp, const real[:, :, ::1] xq,
                           real[:, :, :, :, :, ::1] pdw, Py_ssize_t tid, Py_ssize_t t,
                           Py_ssize_t co, Py_ssize_t ci, Py_ssize_t kh, Py_ssize_t kw,
                           Py_ssize_t q0, Py_ssize_t xo, Py_ssize_t nb,
                           Py_ssize_t dw) except -1 nogil:
    cdef Py_ssize_t i, v, p
    cdef real acc[2 * FVL]
    cdef real d
    for v in range(FVL):
        acc[v] = pdw[t, co, ci, kh, kw, v]
        acc[FVL + v] = pdw[t, co, ci, kh, kw + 1, v]
    for i in range(nb):
        p = q0 + i * FVL
        for v in range(FVL):
            d = dyp[tid, co, p + v]
            acc[v] += d * xq[tid, ci, xo + p + v]
            acc[FVL + v] += d * xq[tid, ci, xo + dw + p + v]
    for v in range(FVL):
        pdw[t, co, ci, kh, kw, v] = acc[v]
        pdw[t, co, ci, kh, kw + 1, v] = acc[FVL + v]
    return 0


cdef inline int _fused_dw1(const real[:, :, ::1] dyp, const real[:, :, ::1] xq,
                           real[:, :, :, :, :, ::1] pdw, Py_ssize_t tid, Py_ssize_t t,
                           Py_ssize_t co, Py_ssize_t ci, Py_ssize_t kh, Py_ssize_t kw,
                           Py_ssize_t q0, Py_ssize_t xo, Py_ssize_t nb) except -1 nogil:
    cdef Py_ssize_t i, v, p
    cdef real acc[FVL]
    for v in range(FVL):
        acc[v] = pdw[t, co, ci, kh, kw, v]
    for i in range(nb):
        p = q0 + i * FVL
        for v in range(FVL):
            acc[v] += dyp[tid, co, p + v] * xq[tid, ci, xo + p + v]
    for v in range(FVL):
        pdw[t, co, ci, kh, kw, v] = acc[v]
    return 0


cdef inline int _fused_db(const real[:, :, ::1] dyp, real[:, :, ::1] pdb, Py_ssize_t tid,
                          Py_ssize_t t, Py_ssize_t co, Py_ssize_t q0,
                          Py_ssize_t nb) except -1 nogil:
    # pdb[t, co, :] += FVL lane sums of dy's plane (its zero padding included).
    cdef Py_ssize_t i, v
    cdef real acc[FVL]
    for v in range(FVL):
        acc[v] = pdb[t, co, v]
    for i in range(nb):
        for v in range(FVL):
            acc[v] += dyp[tid, co, q0 + i * FVL + v]
    for v in range(FVL):
        pdb[t, co, v] = acc[v]
    return 0


cdef int _fused_task(const real[:, :, :, ::1] x, const real[:, :, :, ::1] dy,
                     const real[:, :, :, ::1] wf, real[:, :, :, ::1] dx,
                     real[:, :, :, :, :, ::1] pdw, real[:, :, ::1] pdb, real[:, :, ::1] dyp,
                     real[:, :, ::1] xq, Py_ssize_t tid, Py_ssize_t t, Py_ssize_t pt,
                     Py_ssize_t pl, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t wd, bint want_dw,
                     bint want_db) except -1 nogil:
    cdef Py_ssize_t N = x.shape[0], C_in = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t C_out = dy.shape[1], Ho = dy.shape[2], Wo = dy.shape[3]
    cdef Py_ssize_t KH = wf.shape[2], KW = wf.shape[3], T = pdw.shape[0]
    cdef Py_ssize_t ry = dh * (KH - 1), rx = dw * (KW - 1), base = pt * wd + pl
    cdef Py_ssize_t lanes = FXL32 if real is float else FXL64, nq = _ceil_div(H * wd, lanes)
    cdef Py_ssize_t nb = _ceil_div(Ho * wd, FVL), q0 = ry * wd
    cdef Py_ssize_t n, co, ci, kh, kw, oh, h, j, dst, qb, xo
    # Scratch of this thread: zero once per task; only the dy and x pixels change per image.
    memset(&dyp[tid, 0, 0], 0, dyp.shape[1] * dyp.shape[2] * sizeof(real))
    if want_dw:
        memset(&xq[tid, 0, 0], 0, xq.shape[1] * xq.shape[2] * sizeof(real))
    memset(&pdw[t, 0, 0, 0, 0, 0], 0, C_out * C_in * KH * KW * FVL * sizeof(real))
    memset(&pdb[t, 0, 0], 0, C_out * FVL * sizeof(real))
    for n in range(t * N // T, (t + 1) * N // T):
        for co in range(C_out):
            for oh in range(Ho):
                dst = (ry + oh) * wd + rx
                for j in range(Wo):
                    dyp[tid, co, dst + j] = dy[n, co, oh, j]
            if want_db:
                _fused_db(dyp, pdb, tid, t, co, q0, nb)
        for ci in range(C_in):
            for qb in range(nq):
                if real is float:
                    _fused_dx_128(dyp, wf, dx, tid, n, ci, qb * FXL32, wd, base, dh, dw)
                else:
                    _fused_dx_64(dyp, wf, dx, tid, n, ci, qb * FXL64, wd, base, dh, dw)
        if not want_dw:
            continue
        for ci in range(C_in):
            for h in range(H):
                dst = (ry + pt + h) * wd + rx + pl
                for j in range(W):
                    xq[tid, ci, dst + j] = x[n, ci, h, j]
        for co in range(C_out):
            for ci in range(C_in):
                for kh in range(KH):
                    kw = 0
                    while kw < KW:
                        xo = kh * dh * wd + kw * dw
                        if kw + 3 <= KW:
                            _fused_dw3(dyp, xq, pdw, tid, t, co, ci, kh, kw, q0, xo, nb, dw)
                            kw += 3
                        elif kw + 2 <= KW:
                            _fused_dw2(dyp, xq, pdw, tid, t, co, ci, kh, kw, q0, xo, nb, dw)
                            kw += 2
                        else:
                            _fused_dw1(dyp, xq, pdw, tid, t, co, ci, kh, kw, q0, xo, nb)
                            kw += 1
    return 0


def conv_bwd_plane_fused(const real[:, :, :, ::1] x, const real[:, :, :, ::1] dy,
                         const real[:, :, :, ::1] wf, real[:, :, :, ::1] dx,
                         real[:, :, :, :, :, ::1] pdw, real[:, :, ::1] pdb,
                         real[:, :, ::1] dyp, real[:, :, ::1] xq, Py_ssize_t pt,
                         Py_ssize_t pl, Py_ssize_t dh, Py_ssize_t dw, Py_ssize_t wd,
                         bint want_dw, bint want_db, bint serial=False):
    """dx, and per-chunk partial sums ``pdw[t]`` (C_out, C_in, kH, kW, FVL) of dw and
    ``pdb[t]`` (C_out, FVL) of db, of a stride-1, groups-1 convolution in one pass over dy
    (see above), in FVL lanes each (dw and db are their sums over t and the lanes).

    ``wf`` (C_in, C_out, kH, kW): the weight flipped in both taps. ``dyp`` (nt, C_out, Pd) and
    ``xq`` (nt, C_in, Pq): per-thread scratch (nt = :func:`max_threads`, 1 when ``serial``)
    with Pd >= max(ceil(H*wd/L)*L + (pt + ry)*wd + pl + rx, ry*wd + ceil(H_out*wd/FVL)*FVL)
    and Pq >= 2*ry*wd + rx + ceil(H_out*wd/FVL)*FVL (L = 128 float32, 64 float64; wd =
    W_out + 2*rx): every block of L or FVL positions reads inside its plane. The dot products
    run over the whole padded grid, dropped columns included (0 * x there): the caller asks
    for dw only when x is finite. Chunk t covers images [t*N//T, (t+1)*N//T); the caller sums
    pdw and pdb over t in order (and then the lanes), so the result does not depend on the
    thread count.
    ``want_dw``/``want_db``: whether dw and db are computed (else pdw/pdb hold zeros; xq may
    then be any (nt, 1, 1) array).

    Loop order: one task per chunk of images, owning dx of its images and pdw[t], pdb[t]; per
    image: dy into the padded planes (db lane sums on the way), dx per input channel and block
    of L grid positions, x into its padded planes, then dw per (co, ci, kh, up to 3 kw).
    """
    cdef Py_ssize_t T = pdw.shape[0], t
    cdef int nt = dyp.shape[0]
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(T):
                _fused_task(x, dy, wf, dx, pdw, pdb, dyp, xq, 0, t, pt, pl, dh, dw, wd,
                            want_dw, want_db)
        else:
            for t in prange(T, schedule="dynamic", num_threads=nt):
                _fused_task(x, dy, wf, dx, pdw, pdb, dyp, xq, threadid(), t, pt, pl, dh, dw,
                            wd, want_dw, want_db)


# ------------------------------------------------------------------------------ max-pool


cdef inline int _pool_one(const real[:, :, :, ::1] x, real[:, :, :, ::1] y,
                          int64_t[:, :, :, ::1] idx, Py_ssize_t n, Py_ssize_t c, Py_ssize_t oh,
                          Py_ssize_t ow, Py_ssize_t h0, Py_ssize_t h1, Py_ssize_t kw,
                          Py_ssize_t sw, Py_ssize_t pw, Py_ssize_t dh,
                          Py_ssize_t dw) except -1 nogil:
    # One window, columns clipped to the input (border outputs). Rows h0..h1 come clipped.
    cdef Py_ssize_t W = x.shape[3], w0, w1, ih, iw, best
    cdef real v, m = -INFINITY
    w0 = ow * sw - pw
    w1 = _min(w0 + (kw - 1) * dw + 1, W)
    while w0 < 0:
        w0 += dw
    best = h0 * W + w0
    ih = h0
    while ih < h1:
        iw = w0
        while iw < w1:
            v = x[n, c, ih, iw]
            # Strictly greater: the first maximum wins; a NaN always takes over, so the output
            # is NaN and the index points at the last NaN of the window (PyTorch's rule).
            if v > m or isnan(v):
                m = v
                best = ih * W + iw
            iw += dw
        ih += dh
    y[n, c, oh, ow] = m
    idx[n, c, oh, ow] = best
    return 0


cdef inline int _pool_row_full(const real[:, :, :, ::1] x, real[:, :, :, ::1] y,
                               int64_t[:, :, :, ::1] idx, Py_ssize_t n, Py_ssize_t c,
                               Py_ssize_t oh, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t h0,
                               Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sw, Py_ssize_t pw,
                               Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    # Interior outputs lo..hi of a row whose windows are entirely inside the input. The window
    # loops are innermost; the call sites pass kh, kw, sw (and dh = dw = 1) as literals for the
    # common pools, so they unroll and the loop over output columns vectorizes.
    cdef Py_ssize_t W = x.shape[3], ow, a, b, col, pos, best
    cdef real v, m
    cdef bint take
    for ow in range(lo, hi):
        col = ow * sw - pw
        m = -INFINITY
        best = h0 * W + col
        for a in range(kh):
            for b in range(kw):
                pos = (h0 + a * dh) * W + col + b * dw
                v = x[n, c, h0 + a * dh, col + b * dw]
                take = (v > m) | (v != v)  # the NaN/first-maximum rule of _pool_one
                m = v if take else m
                best = pos if take else best
        y[n, c, oh, ow] = m
        idx[n, c, oh, ow] = best
    return 0


cdef inline int _pool_chunk(const real[:, :, :, ::1] x, real[:, :, :, ::1] y,
                            int64_t[:, :, :, ::1] idx, Py_ssize_t n, Py_ssize_t c,
                            Py_ssize_t oh, Py_ssize_t ow0, Py_ssize_t nw, Py_ssize_t h0,
                            Py_ssize_t h1, Py_ssize_t kw, Py_ssize_t sw, Py_ssize_t pw,
                            Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    # nw <= ROWB interior outputs of row oh (no column clipping). sw is a literal (1, 2) at the
    # common call sites so that the strided loads vectorize.
    cdef Py_ssize_t W = x.shape[3], ih, b, j, col
    cdef real m[ROWB]
    cdef int64_t best[ROWB]
    cdef real v
    cdef bint take
    for j in range(nw):
        m[j] = -INFINITY
        best[j] = h0 * W + (ow0 + j) * sw - pw
    ih = h0
    while ih < h1:
        for b in range(kw):
            col = ow0 * sw - pw + b * dw
            for j in range(nw):
                v = x[n, c, ih, col + j * sw]
                take = (v > m[j]) | (v != v)  # the NaN/first-maximum rule of _pool_one
                m[j] = v if take else m[j]
                best[j] = (ih * W + col + j * sw) if take else best[j]
        ih += dh
    for j in range(nw):
        y[n, c, oh, ow0 + j] = m[j]
        idx[n, c, oh, ow0 + j] = best[j]
    return 0


cdef int _pool_plane(const real[:, :, :, ::1] x, real[:, :, :, ::1] y,
                     int64_t[:, :, :, ::1] idx, Py_ssize_t n, Py_ssize_t c, Py_ssize_t kh,
                     Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph, Py_ssize_t pw,
                     Py_ssize_t dh, Py_ssize_t dw) except -1 nogil:
    # Loop order: output rows; border columns (windows clipped by the -inf padding) one by one;
    # interior columns in chunks, visiting the window offsets in PyTorch's row-major order with
    # the innermost loop over output columns (branch-free select, vectorized).
    cdef Py_ssize_t H = x.shape[2], W = x.shape[3], Ho = y.shape[2], Wo = y.shape[3]
    cdef Py_ssize_t lo = _ceil_div(pw, sw)
    cdef Py_ssize_t hi = Wo
    cdef Py_ssize_t oh, ow, h0, h1, cb, ow0, nw
    if W - 1 - (kw - 1) * dw + pw < 0:
        hi = 0
    else:
        hi = _min(Wo, (W - 1 - (kw - 1) * dw + pw) // sw + 1)
    if hi < lo:
        hi = lo
    if lo > Wo:
        lo = hi = Wo
    for oh in range(Ho):
        h0 = oh * sh - ph
        h1 = _min(h0 + (kh - 1) * dh + 1, H)
        while h0 < 0:
            h0 += dh
        for ow in range(lo):
            _pool_one(x, y, idx, n, c, oh, ow, h0, h1, kw, sw, pw, dh, dw)
        for ow in range(hi, Wo):
            _pool_one(x, y, idx, n, c, oh, ow, h0, h1, kw, sw, pw, dh, dw)
        if h0 == oh * sh - ph and h1 - h0 == (kh - 1) * dh + 1:  # no row clipped
            if kh == 2 and kw == 2 and sw == 2 and dh == 1 and dw == 1:
                _pool_row_full(x, y, idx, n, c, oh, lo, hi, h0, 2, 2, 2, pw, 1, 1)
            elif kh == 3 and kw == 3 and sw == 2 and dh == 1 and dw == 1:
                _pool_row_full(x, y, idx, n, c, oh, lo, hi, h0, 3, 3, 2, pw, 1, 1)
            else:
                _pool_row_full(x, y, idx, n, c, oh, lo, hi, h0, kh, kw, sw, pw, dh, dw)
            continue
        for cb in range(_ceil_div(hi - lo, ROWB)):
            ow0 = lo + cb * ROWB
            nw = _min(ROWB, hi - ow0)
            if sw == 2:
                _pool_chunk(x, y, idx, n, c, oh, ow0, nw, h0, h1, kw, 2, pw, dh, dw)
            elif sw == 1:
                _pool_chunk(x, y, idx, n, c, oh, ow0, nw, h0, h1, kw, 1, pw, dh, dw)
            else:
                _pool_chunk(x, y, idx, n, c, oh, ow0, nw, h0, h1, kw, sw, pw, dh, dw)
    return 0


cdef inline int _pool_k2s2_run(const real[:, :, :, ::1] x, real[:, :, :, ::1] y,
                               int64_t[:, :, :, ::1] idx, Py_ssize_t n, Py_ssize_t c,
                               Py_ssize_t oh, Py_ssize_t ow0, Py_ssize_t nw) except -1 nogil:
    # nw outputs of row oh from ow0 (PB, a literal, at the main call site: the loop vectorizes
    # completely, with no scalar tail whose data-dependent branches mispredict). The four taps
    # in row-major order with the rule of _pool_one, as selects.
    cdef Py_ssize_t W = x.shape[3], r = 2 * oh, ow, col
    cdef real m, v
    cdef Py_ssize_t best
    cdef bint take
    for ow in range(ow0, ow0 + nw):
        col = 2 * ow
        m = x[n, c, r, col]
        best = r * W + col
        v = x[n, c, r, col + 1]
        take = (v > m) | (v != v)
        m = v if take else m
        best = r * W + col + 1 if take else best
        v = x[n, c, r + 1, col]
        take = (v > m) | (v != v)
        m = v if take else m
        best = (r + 1) * W + col if take else best
        v = x[n, c, r + 1, col + 1]
        take = (v > m) | (v != v)
        m = v if take else m
        best = (r + 1) * W + col + 1 if take else best
        y[n, c, oh, ow] = m
        idx[n, c, oh, ow] = best
    return 0


cdef int _pool_plane_k2s2(const real[:, :, :, ::1] x, real[:, :, :, ::1] y,
                          int64_t[:, :, :, ::1] idx, Py_ssize_t n,
                          Py_ssize_t c) except -1 nogil:
    # 2x2 windows, stride 2, no padding, every window inside the input. Rows in blocks of PB
    # outputs, the last block shifted left to end at W_out (it recomputes a few outputs, with
    # the same result).
    cdef Py_ssize_t Ho = y.shape[2], Wo = y.shape[3], oh, ow0
    for oh in range(Ho):
        if Wo < PB:
            _pool_k2s2_run(x, y, idx, n, c, oh, 0, Wo)
            continue
        ow0 = 0
        while ow0 < Wo:
            _pool_k2s2_run(x, y, idx, n, c, oh, _min(ow0, Wo - PB), PB)
            ow0 += PB
    return 0


def max_pool_fwd(const real[:, :, :, ::1] x, real[:, :, :, ::1] y, int64_t[:, :, :, ::1] idx,
                 Py_ssize_t kh, Py_ssize_t kw, Py_ssize_t sh, Py_ssize_t sw, Py_ssize_t ph,
                 Py_ssize_t pw, Py_ssize_t dh, Py_ssize_t dw, bint serial=False):
    """Max-pool NCHW ``x`` into ``y`` with int64 flat indices ``idx``; one task per plane."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], t
    cdef bint k2s2 = (kh == kw == sh == sw == 2 and ph == pw == 0 and dh == dw == 1
                      and 2 * y.shape[2] <= x.shape[2] and 2 * y.shape[3] <= x.shape[3])
    with nogil:
        if k2s2 and serial:
            for t in range(N * C):
                _pool_plane_k2s2(x, y, idx, t // C, t % C)
        elif k2s2:
            for t in prange(N * C, schedule="static"):
                _pool_plane_k2s2(x, y, idx, t // C, t % C)
        elif serial:  # see _serial_after_fork in cython_cpu
            for t in range(N * C):
                _pool_plane(x, y, idx, t // C, t % C, kh, kw, sh, sw, ph, pw, dh, dw)
        else:
            for t in prange(N * C, schedule="dynamic", chunksize=C):
                _pool_plane(x, y, idx, t // C, t % C, kh, kw, sh, sw, ph, pw, dh, dw)


cdef int _unpool_plane(const real[:, :, :, ::1] dy, const int64_t[:, :, :, ::1] idx,
                        real[:, ::1] dx, unsigned char[::1] bad, Py_ssize_t n,
                        Py_ssize_t c) except -1 nogil:
    cdef Py_ssize_t Ho = dy.shape[2], Wo = dy.shape[3], P = dx.shape[1], t = n * dy.shape[1] + c
    cdef Py_ssize_t oh, ow
    cdef int64_t at
    if P > 0:
        memset(&dx[t, 0], 0, P * sizeof(real))
    for oh in range(Ho):
        for ow in range(Wo):
            at = idx[n, c, oh, ow]
            if <uint64_t>at >= <uint64_t>P:  # as unsigned, a negative index is huge too
                bad[t] = 1
            else:
                dx[t, at] += dy[n, c, oh, ow]
    return 0


def max_pool_bwd(const real[:, :, :, ::1] dy, const int64_t[:, :, :, ::1] idx,
                 real[:, ::1] dx, unsigned char[::1] bad, bint serial=False):
    """Scatter-add ``dy`` into ``dx`` (N*C, H*W) at ``idx``; one task per plane. An index
    outside [0, H*W) is not written and sets ``bad[n*C + c]`` (the caller raises)."""
    cdef Py_ssize_t N = dy.shape[0], C = dy.shape[1], t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(N * C):
                _unpool_plane(dy, idx, dx, bad, t // C, t % C)
        else:
            for t in prange(N * C, schedule="dynamic", chunksize=C):
                _unpool_plane(dy, idx, dx, bad, t // C, t % C)


# ------------------------------------------------------------------------------ Winograd
#
# Winograd F(2x2, 3x3) for float32 3x3 stride-1 convolutions (a port of the numba backend's
# ``_numba_winograd``; see its docstring for the algorithm and the layouts). A 2x2 output tile
# is A^T [(G g G^T) * (B^T d B)] A for its 4x4 input tile d: per tile position xi (16 of them)
# the channel sums are small matrix products M[xi] = V[xi] (tiles x C_in) @ U[xi] (C_in x Cp),
# in 4-tile x 64-channel register blocks (sixteen 512-bit accumulators, as _direct_block_4x64).
#
# Layouts: the input ``xq`` (N, Hp, 2, Wq, Cq) is zero-padded NHWC with the columns split by
# parity (:func:`pad_split`), so that column 2*t + k of the padded input (k in 0..3) lies at
# parity k % 2, index t + k // 2: for a fixed k, one contiguous run per tile row. Transformed
# weights ``u`` (16, C, Cp), output channels innermost, zero-padded to Cp (a multiple of 64).
# Scratch buffers (V, M and the output rows of a tile row) are per thread: rows of arrays the
# caller allocates, ``max_threads()`` rows, indexed by ``threadid()``.
#
# Non-finite values: a tile mixes its 16 inputs, so one inf or NaN would reach outputs that the
# direct sum keeps finite. The forward kernel reports, per tile row, whether any output before
# the bias was non-finite (``check``: 0, else NaN); the grad-weight sums are checked by the
# caller; either way the caller then recomputes with the exact kernels.

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int fastconv_max_threads(void) { return omp_get_max_threads(); }
    #else
    static int fastconv_max_threads(void) { return 1; }
    #endif
    /* B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]: row k is
       e[a[k]] + sign[k] * e[b[k]]. A = [[1, 0], [1, 1], [1, -1], [0, -1]]. */
    static const int fastconv_bt_a[4] = {0, 1, 2, 1};
    static const int fastconv_bt_b[4] = {2, 2, 1, 3};
    static const int fastconv_bt_sign[4] = {-1, 1, -1, -1};
    static const int fastconv_wa[4][2] = {{1, 0}, {1, 1}, {1, -1}, {0, -1}};
    """
    int fastconv_max_threads() noexcept nogil
    const int fastconv_bt_a[4]
    const int fastconv_bt_b[4]
    const int fastconv_bt_sign[4]
    const int fastconv_wa[4][2]


cdef enum:
    WTB = 4      # tiles per Winograd register block (x COB = 64 output channels)
    WHALF = 32   # channels per tile when two tiles share a register block (paired)
    WGROUP = 64  # tiles transformed together by the grad-weight kernel (V and M stay in L2)
    WRB = 4      # input channels per grad-weight register block (4 x 64: 16 accumulators)
    GRB = 4      # rows of a per matrix-product register block (x COB columns)


def max_threads():
    """Threads a ``prange`` of this extension may run on (1 without OpenMP): the number of
    rows of the per-thread scratch arrays of the Winograd kernels."""
    return fastconv_max_threads()


cdef int _pad_split_row(const float[:, :, :, ::1] x, float[::1] q1, Py_ssize_t t,
                        Py_ssize_t Hp, Py_ssize_t Wq, Py_ssize_t Cq, Py_ssize_t pt,
                        Py_ssize_t pl) except -1 nogil:
    cdef Py_ssize_t C = x.shape[1], H = x.shape[2], W = x.shape[3]
    cdef Py_ssize_t n = t // Hp, h = t % Hp - pt, plane = Wq * Cq, row = t * 2 * plane
    cdef Py_ssize_t w, wp, c, c0, dst, w1 = _min(W, 2 * Wq - pl)
    memset(&q1[row], 0, 2 * plane * sizeof(float))
    if h < 0 or h >= H:
        return 0
    # Blocks of 16 channels: per column one contiguous write, reads from 16 rows of x that stay
    # in L1 across the columns (as _pad_nhwc_row).
    for c0 in range(0, C - C % 16, 16):
        for w in range(w1):
            wp = w + pl
            dst = row + (wp % 2) * plane + (wp // 2) * Cq + c0
            for c in range(16):
                q1[dst + c] = x[n, c0 + c, h, w]
    for c in range(C - C % 16, C):
        for w in range(w1):
            wp = w + pl
            q1[row + (wp % 2) * plane + (wp // 2) * Cq + c] = x[n, c, h, w]
    return 0


def pad_split(const float[:, :, :, ::1] x, float[::1] q1, Py_ssize_t Hp, Py_ssize_t Wq,
              Py_ssize_t Cq, Py_ssize_t pt, Py_ssize_t pl, bint serial=False):
    """``xq[n, pt + h, (pl + w) % 2, (pl + w) // 2, c] = x[n, c, h, w]``, the rest of ``xq``
    zero; ``q1`` is xq (N, Hp, 2, Wq, Cq) flattened, Cq >= C. One task per padded row."""
    cdef Py_ssize_t N = x.shape[0], t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(N * Hp):
                _pad_split_row(x, q1, t, Hp, Wq, Cq, pt, pl)
        else:
            for t in prange(N * Hp, schedule="dynamic", chunksize=Hp):
                _pad_split_row(x, q1, t, Hp, Wq, Cq, pt, pl)


cdef inline int _wino_input_tiles(const float[::1] x1, Py_ssize_t xb, Py_ssize_t xw,
                                  Py_ssize_t plane, Py_ssize_t C, Py_ssize_t ntile,
                                  float[:, ::1] v, Py_ssize_t tid, Py_ssize_t vbase,
                                  Py_ssize_t vstride) except -1 nogil:
    # v[tid, vbase + xi*vstride + t*C + c] = (B^T d B)[xi] for the tiles t < ntile and channels
    # c of the tile row whose padded rows start at x1[xb] (row length xw, parity planes
    # ``plane`` apart). Per position xi one contiguous run over (tile, channel).
    cdef Py_ssize_t run = ntile * C, xi, i, j, k, ca, cb, p00, p01, p10, p11, o
    cdef float f, g, top, bot
    for xi in range(16):
        i = xi // 4
        j = xi % 4
        ca = (fastconv_bt_a[j] % 2) * plane + (fastconv_bt_a[j] // 2) * C
        cb = (fastconv_bt_b[j] % 2) * plane + (fastconv_bt_b[j] // 2) * C
        p00 = xb + fastconv_bt_a[i] * xw + ca
        p01 = xb + fastconv_bt_a[i] * xw + cb
        p10 = xb + fastconv_bt_b[i] * xw + ca
        p11 = xb + fastconv_bt_b[i] * xw + cb
        f = fastconv_bt_sign[i]
        g = fastconv_bt_sign[j]
        o = vbase + xi * vstride
        for k in range(run):
            top = x1[p00 + k] + g * x1[p01 + k]
            bot = x1[p10 + k] + g * x1[p11 + k]
            v[tid, o + k] = top + f * bot
    return 0


cdef inline int _wino_block_4x64(const float[:, ::1] v, const float[::1] u1, float[:, ::1] m,
                                 Py_ssize_t tid, Py_ssize_t vb, Py_ssize_t ub, Py_ssize_t mb,
                                 Py_ssize_t C, Py_ssize_t cp) except -1 nogil:
    # 4 tiles x 64 output channels of M[xi], accumulated over the C input channels: per channel
    # 4 broadcast V values times 64 contiguous U values.
    cdef Py_ssize_t ci, t, o
    cdef float acc[WTB * COB]
    cdef float xs[WTB]
    cdef float wv
    # (the first channel initializes the accumulators: a zero fill was a memset call)
    for t in range(4):
        xs[t] = v[tid, vb + t * C]
    for o in range(64):
        wv = u1[ub + o]
        for t in range(4):
            acc[t * 64 + o] = xs[t] * wv
    for ci in range(1, C):
        for t in range(4):
            xs[t] = v[tid, vb + t * C + ci]
        for o in range(64):
            wv = u1[ub + ci * cp + o]
            for t in range(4):
                acc[t * 64 + o] += xs[t] * wv
    for t in range(4):
        for o in range(64):
            m[tid, mb + t * cp + o] = acc[t * 64 + o]
    return 0


cdef inline int _wino_block_paired(const float[:, ::1] v, const float[::1] u1,
                                   float[:, ::1] m, Py_ssize_t tid, Py_ssize_t vb,
                                   Py_ssize_t ub, Py_ssize_t mb, Py_ssize_t C) except -1 nogil:
    # Paired (at most 32 output channels, u from transform_weight_paired, 64 wide): lanes 0-31
    # of register row t serve tile 2t, lanes 32-63 tile 2t + 1, so no multiply is spent on
    # padding channels; M holds 32 channels per tile, the pairs side by side.
    cdef Py_ssize_t ci, t, o
    cdef float acc[WTB * COB]
    cdef float xs[WTB]
    cdef float xz[WTB]
    cdef float wv
    for t in range(4):
        xs[t] = v[tid, vb + 2 * t * C]
        xz[t] = v[tid, vb + (2 * t + 1) * C]
    for o in range(32):
        wv = u1[ub + o]
        for t in range(4):
            acc[t * 64 + o] = xs[t] * wv
    for o in range(32):
        wv = u1[ub + 32 + o]
        for t in range(4):
            acc[t * 64 + 32 + o] = xz[t] * wv
    for ci in range(1, C):
        for t in range(4):
            xs[t] = v[tid, vb + 2 * t * C + ci]
            xz[t] = v[tid, vb + (2 * t + 1) * C + ci]
        for o in range(32):
            wv = u1[ub + ci * 64 + o]
            for t in range(4):
                acc[t * 64 + o] += xs[t] * wv
        for o in range(32):
            wv = u1[ub + ci * 64 + 32 + o]
            for t in range(4):
                acc[t * 64 + 32 + o] += xz[t] * wv
    for t in range(4):
        for o in range(64):
            m[tid, mb + t * 64 + o] = acc[t * 64 + o]
    return 0


cdef int _wino_fwd_task(const float[::1] x1, const float[::1] u1, const float[::1] bias,
                        float[:, :, :, ::1] y, float[::1] check, float[:, ::1] v,
                        float[:, ::1] m, float[:, ::1] rows, Py_ssize_t tid, Py_ssize_t task,
                        Py_ssize_t Hp, Py_ssize_t Wq, Py_ssize_t C, Py_ssize_t cp,
                        bint paired) except -1 nogil:
    cdef Py_ssize_t Co = y.shape[1], Ho = y.shape[2], Wo = y.shape[3]
    cdef Py_ssize_t TH = (Hp - 2) // 2, TW = Wq - 1, plane = Wq * C, xw = 2 * plane
    cdef Py_ssize_t cm = WHALF if paired else cp  # channels per tile in M
    cdef Py_ssize_t tpb = 2 * WTB if paired else WTB  # tiles per register block
    cdef Py_ssize_t nblk = _ceil_div(TW, tpb), ms = TW * cm
    cdef Py_ssize_t n = task // TH, th = task % TH
    cdef Py_ssize_t xi, c0, blk, t0, i, j, k0, l, q, q0, dst, co, t, even, odd, oh
    cdef float si, sj, r0, r1, r2, val, b, s
    cdef float chk[16]
    _wino_input_tiles(x1, (n * Hp + 2 * th) * xw, xw, plane, C, TW, v, tid, 0, TW * C)
    for xi in range(16):
        for c0 in range(0, cm, 64):
            for blk in range(nblk):
                t0 = _min(blk * tpb, TW - tpb)  # the last block shifted left
                if paired:
                    _wino_block_paired(v, u1, m, tid, (xi * TW + t0) * C, xi * C * cp,
                                       xi * ms + t0 * cm, C)
                else:
                    _wino_block_4x64(v, u1, m, tid, (xi * TW + t0) * C, xi * C * cp + c0,
                                     xi * ms + t0 * cm + c0, C, cp)
    # A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: row i of A^T is (1, s_i, s_i) on positions i,
    # i + 1, i + 2 with s_0 = 1, s_1 = -1. Into rows (2, 2, TW, cm): output row, column
    # parity, tile, channel. ms is a multiple of 16 (cm is 32 or a multiple of 64).
    for l in range(16):
        chk[l] = 0
    for i in range(2):
        for j in range(2):
            si = 1 - 2 * i
            sj = 1 - 2 * j
            q0 = (4 * i + j) * ms
            dst = (2 * i + j) * ms
            for k0 in range(0, ms, 16):
                for l in range(16):
                    q = q0 + k0 + l
                    r0 = m[tid, q] + sj * (m[tid, q + ms] + m[tid, q + 2 * ms])
                    r1 = m[tid, q + 4 * ms] + sj * (m[tid, q + 5 * ms] + m[tid, q + 6 * ms])
                    r2 = m[tid, q + 8 * ms] + sj * (m[tid, q + 9 * ms] + m[tid, q + 10 * ms])
                    val = r0 + si * (r1 + r2)
                    chk[l] += val - val  # 0, or NaN if val is inf or NaN
                    rows[tid, dst + k0 + l] = val
    s = 0
    for l in range(16):
        s += chk[l]
    check[task] = s
    for i in range(_min(2, Ho - 2 * th)):
        oh = 2 * th + i
        for co in range(Co):
            b = bias[co]
            even = 2 * i * ms + co
            odd = even + ms
            for t in range(Wo // 2):  # the two columns of a tile: adjacent stores
                y[n, co, oh, 2 * t] = rows[tid, even + t * cm] + b
                y[n, co, oh, 2 * t + 1] = rows[tid, odd + t * cm] + b
            if Wo % 2:
                y[n, co, oh, Wo - 1] = rows[tid, even + (Wo // 2) * cm] + b
    return 0


def conv_fwd_winograd(const float[::1] x1, const float[::1] u1, const float[::1] bias,
                      float[:, :, :, ::1] y, float[::1] check, float[:, ::1] v,
                      float[:, ::1] m, float[:, ::1] rows, Py_ssize_t Hp, Py_ssize_t Wq,
                      Py_ssize_t C, Py_ssize_t cp, bint paired, bint serial=False):
    """``y`` (N, C_out, Ho, Wo) = conv(x, g) + bias by Winograd F(2x2, 3x3), from x laid out
    by :func:`pad_split` (``x1``: xq (N, Hp = 2*TH + 2, 2, Wq = TW + 1, C) flattened) and the
    transformed weights ``u1`` ((16, C, cp) flattened, cp a multiple of 64; or, if ``paired``
    (C_out <= 32, TW >= 8), (16, C, 64) from transform_weight_paired).

    ``check[task]`` (N*TH) is 0 when every output of the tile row ``task`` was finite before
    the bias was added, else NaN. ``v`` (T, 16*TW*C), ``m`` (T, 16*TW*cm) and ``rows``
    (T, 4*TW*cm), cm = 32 if paired else cp: per-thread scratch, T = :func:`max_threads`.

    Loop order: one task per (image, tile row), owning y[n, :, 2*th : 2*th + 2, :] (handed
    out one image at a time). Inside: the input transform of the tile row into V (16, TW, C);
    per position xi (its weight slab u[xi] stays in L1), channel block and block of 4 tiles,
    the 4 x 64 register block over the input channels, into M (16, TW, cm); the output
    transform into rows (2, 2, TW, cm), transposed into y once.
    """
    cdef Py_ssize_t TH = (Hp - 2) // 2, ntask = y.shape[0] * TH, t
    cdef int nt = v.shape[0]
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(ntask):
                _wino_fwd_task(x1, u1, bias, y, check, v, m, rows, 0, t, Hp, Wq, C, cp, paired)
        else:
            for t in prange(ntask, schedule="dynamic", chunksize=TH, num_threads=nt):
                _wino_fwd_task(x1, u1, bias, y, check, v, m, rows, threadid(), t, Hp, Wq, C,
                               cp, paired)


cdef inline int _wino_grad_tiles(const float[::1] d1, Py_ssize_t db, Py_ssize_t dw,
                                 Py_ssize_t off0, Py_ssize_t off1, Py_ssize_t cp,
                                 Py_ssize_t ntile, float[:, ::1] m, Py_ssize_t tid,
                                 Py_ssize_t mbase, Py_ssize_t mstride) except -1 nogil:
    # m[tid, mbase + xi*mstride + t*cp + o] = (A dY A^T)[xi] for tile t < ntile and channel o
    # of the 2x2 gradient tiles whose rows start at d1[db] and d1[db + dw], columns 0 and 1 at
    # offsets off0 and off1. A = [[1, 0], [1, 1], [1, -1], [0, -1]].
    cdef Py_ssize_t run = ntile * cp, xi, a, b, k, o
    cdef float f00, f01, f10, f11
    for xi in range(16):
        a = xi // 4
        b = xi % 4
        f00 = fastconv_wa[a][0] * fastconv_wa[b][0]
        f01 = fastconv_wa[a][0] * fastconv_wa[b][1]
        f10 = fastconv_wa[a][1] * fastconv_wa[b][0]
        f11 = fastconv_wa[a][1] * fastconv_wa[b][1]
        o = mbase + xi * mstride
        for k in range(run):
            m[tid, o + k] = (f00 * d1[db + off0 + k] + f01 * d1[db + off1 + k]
                             + f10 * d1[db + dw + off0 + k] + f11 * d1[db + dw + off1 + k])
    return 0


cdef inline int _wino_dw_block4(const float[:, ::1] v, const float[:, ::1] m,
                                float[:, ::1] part, Py_ssize_t tid, Py_ssize_t task,
                                Py_ssize_t vx, Py_ssize_t mx, Py_ssize_t C, Py_ssize_t cp,
                                Py_ssize_t ntile, Py_ssize_t pb) except -1 nogil:
    # 4 input channels x 64 output channels of dU[xi], accumulated over the group's tiles: per
    # tile 4 broadcast V values times 64 contiguous M values; added to part[task, pb + ...].
    cdef Py_ssize_t t, c, o
    cdef float acc[WRB * COB]
    cdef float xs[WRB]
    cdef float mv
    for c in range(4):
        for o in range(64):
            acc[c * 64 + o] = 0
    for t in range(ntile):
        for c in range(4):
            xs[c] = v[tid, vx + t * C + c]
        for o in range(64):
            mv = m[tid, mx + t * cp + o]
            for c in range(4):
                acc[c * 64 + o] += xs[c] * mv
    for c in range(4):
        for o in range(64):
            part[task, pb + c * cp + o] += acc[c * 64 + o]
    return 0


cdef inline int _wino_dw_block1(const float[:, ::1] v, const float[:, ::1] m,
                                float[:, ::1] part, Py_ssize_t tid, Py_ssize_t task,
                                Py_ssize_t vx, Py_ssize_t mx, Py_ssize_t C, Py_ssize_t cp,
                                Py_ssize_t ntile, Py_ssize_t pb) except -1 nogil:
    # One input channel x 64 output channels (the channels past the last block of 4).
    cdef Py_ssize_t t, o
    cdef float acc[COB]
    cdef float xv
    for o in range(64):
        acc[o] = 0
    for t in range(ntile):
        xv = v[tid, vx + t * C]
        for o in range(64):
            acc[o] += xv * m[tid, mx + t * cp + o]
    for o in range(64):
        part[task, pb + o] += acc[o]
    return 0


cdef int _wino_dw_task(const float[::1] x1, const float[::1] d1, float[:, ::1] part,
                       float[:, ::1] v, float[:, ::1] m, Py_ssize_t tid, Py_ssize_t task,
                       Py_ssize_t N, Py_ssize_t Hp, Py_ssize_t Wq, Py_ssize_t C,
                       Py_ssize_t Hd, Py_ssize_t Wd, Py_ssize_t cp, Py_ssize_t dr,
                       Py_ssize_t ds) except -1 nogil:
    cdef Py_ssize_t T = part.shape[0], TH = (Hp - 2) // 2, TW = Wq - 1, R = N * TH
    cdef Py_ssize_t xplane = Wq * C, dplane = Wd * cp
    cdef Py_ssize_t off0 = (ds % 2) * dplane + (ds // 2) * cp  # tile column 0: ds + 2t
    cdef Py_ssize_t off1 = ((ds + 1) % 2) * dplane + ((ds + 1) // 2) * cp
    cdef Py_ssize_t g_rows = WGROUP // TW if TW < WGROUP else 1, nrb = C // WRB
    cdef Py_ssize_t r_end = (task + 1) * R // T, r0, nr, ntile, k, n, th, xi, vx, mx, cb, c0
    memset(&part[task, 0], 0, part.shape[1] * sizeof(float))
    r0 = task * R // T
    while r0 < r_end:
        nr = _min(g_rows, r_end - r0)
        ntile = nr * TW
        for k in range(nr):
            n = (r0 + k) // TH
            th = (r0 + k) % TH
            _wino_input_tiles(x1, (n * Hp + 2 * th) * 2 * xplane, 2 * xplane, xplane, C, TW,
                              v, tid, k * TW * C, ntile * C)
            _wino_grad_tiles(d1, (n * Hd + dr + 2 * th) * 2 * dplane, 2 * dplane, off0, off1,
                             cp, TW, m, tid, k * TW * cp, ntile * cp)
        for xi in range(16):
            vx = xi * ntile * C
            mx = xi * ntile * cp
            for cb in range(0, cp, 64):
                for c0 in range(0, nrb * 4, 4):
                    _wino_dw_block4(v, m, part, tid, task, vx + c0, mx + cb, C, cp, ntile,
                                    (xi * C + c0) * cp + cb)
                for c0 in range(nrb * 4, C):
                    _wino_dw_block1(v, m, part, tid, task, vx + c0, mx + cb, C, cp, ntile,
                                    (xi * C + c0) * cp + cb)
        r0 += nr
    return 0


def conv_grad_weight_winograd(const float[::1] x1, const float[::1] d1, float[:, ::1] part,
                              float[:, ::1] v, float[:, ::1] m, Py_ssize_t N, Py_ssize_t Hp,
                              Py_ssize_t Wq, Py_ssize_t C, Py_ssize_t Hd, Py_ssize_t Wd,
                              Py_ssize_t cp, Py_ssize_t dr, Py_ssize_t ds, bint serial=False):
    """``part[t]`` ((16, C, cp) flattened) = sum over the tiles of chunk t of
    V[xi, tile, c] * M[xi, tile, o]: the gradient of the transformed weights.

    ``x1``: x laid out by :func:`pad_split` for the forward, (N, Hp = 2*TH + 2, 2, Wq, C);
    ``d1``: dy laid out the same way, (N, Hd, 2, Wd, cp), with dy[n, :, 0, 0] at padded row
    dr, column ds, and zeros past H_out, W_out and C_out. Chunk t covers the tile rows
    [t*R//T, (t+1)*R//T) of the R = N*TH; the caller sums part over t in order, so the result
    does not depend on the thread count. ``v`` (nt, 16*G*TW*C) and ``m`` (nt, 16*G*TW*cp),
    G = max(1, WGROUP // TW): per-thread scratch, nt = :func:`max_threads`.

    Loop order: one task per chunk, owning part[t]; groups of G tile rows (their V and M stay
    in L2): the input and gradient transforms of the group, then per position xi, channel
    block and block of 4 input channels, the 4 x 64 register block over the group's tiles.
    """
    cdef Py_ssize_t T = part.shape[0], t
    cdef int nt = v.shape[0]
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(T):
                _wino_dw_task(x1, d1, part, v, m, 0, t, N, Hp, Wq, C, Hd, Wd, cp, dr, ds)
        else:
            for t in prange(T, schedule="dynamic", num_threads=nt):
                _wino_dw_task(x1, d1, part, v, m, threadid(), t, N, Hp, Wq, C, Hd, Wd, cp,
                              dr, ds)


# ------------------------------------------------------------------------------ 1x1 as GEMM
#
# 1x1 float32 convolutions as one matrix product per image in NCHW as it is (a port of the
# numba backend's ``_numba_gemm``): GRB (4) rows of ``a`` x COB (64) columns of ``b`` register
# blocks, per step of the inner dimension 4 broadcasts of ``a`` times 64 contiguous values of
# ``b``. Column blocks past the last full one are shifted left to end at N (recomputing a few
# columns, writing only their own); rows past the last block of 4 go one at a time.


cdef inline int _gemm_block4(const float[:, ::1] a, const float[::1] b1, const float[::1] bias,
                             float[::1] o1, Py_ssize_t i0, Py_ssize_t K, Py_ssize_t N,
                             Py_ssize_t bb, Py_ssize_t ob, Py_ssize_t j0,
                             Py_ssize_t own) except -1 nogil:
    cdef Py_ssize_t k, r, o
    cdef float acc[GRB * COB]
    cdef float xs[GRB]
    cdef float bv
    for r in range(4):
        for o in range(64):
            acc[r * 64 + o] = bias[i0 + r]
    for k in range(K):
        for r in range(4):
            xs[r] = a[i0 + r, k]
        for o in range(64):
            bv = b1[bb + k * N + j0 + o]
            for r in range(4):
                acc[r * 64 + o] += xs[r] * bv
    for r in range(4):
        for o in range(own - j0, 64):
            o1[ob + (i0 + r) * N + j0 + o] = acc[r * 64 + o]
    return 0


cdef inline int _gemm_block1(const float[:, ::1] a, const float[::1] b1, const float[::1] bias,
                             float[::1] o1, Py_ssize_t i, Py_ssize_t K, Py_ssize_t N,
                             Py_ssize_t bb, Py_ssize_t ob, Py_ssize_t j0,
                             Py_ssize_t own) except -1 nogil:
    cdef Py_ssize_t k, o
    cdef float acc[COB]
    cdef float xv
    for o in range(64):
        acc[o] = bias[i]
    for k in range(K):
        xv = a[i, k]
        for o in range(64):
            acc[o] += xv * b1[bb + k * N + j0 + o]
    for o in range(own - j0, 64):
        o1[ob + i * N + j0 + o] = acc[o]
    return 0


cdef int _gemm_task(const float[:, ::1] a, const float[::1] b1, const float[::1] bias,
                    float[::1] o1, Py_ssize_t task, Py_ssize_t K, Py_ssize_t N) except -1 nogil:
    cdef Py_ssize_t M = a.shape[0], nblk = _ceil_div(N, COB), ib = task // nblk
    cdef Py_ssize_t own = (task % nblk) * COB, j0 = _min(own, N - COB), i0
    for i0 in range(0, M - M % 4, 4):
        _gemm_block4(a, b1, bias, o1, i0, K, N, ib * K * N, ib * M * N, j0, own)
    for i0 in range(M - M % 4, M):
        _gemm_block1(a, b1, bias, o1, i0, K, N, ib * K * N, ib * M * N, j0, own)
    return 0


def gemm_batched(const float[:, ::1] a, const float[::1] b1, const float[::1] bias,
                 float[::1] out, Py_ssize_t B, Py_ssize_t K, Py_ssize_t N, bint serial=False):
    """``out[i]`` (M, N) = a (M, K) @ b[i] (K, N) + bias[:, None] for the B matrices of ``b1``
    ((B, K, N) flattened; N >= 64); ``out`` is (B, M, N) flattened.

    Loop order: one task per (matrix, block of 64 columns), owning out[i, :, block]; blocks
    of 4 rows of a, then k (the K x 64 strip of b[i] stays in L2 for every row block), then
    the 4 x 64 register block.
    """
    cdef Py_ssize_t nblk = _ceil_div(N, COB), t
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for t in range(B * nblk):
                _gemm_task(a, b1, bias, out, t, K, N)
        else:
            for t in prange(B * nblk, schedule="dynamic", chunksize=nblk):
                _gemm_task(a, b1, bias, out, t, K, N)


cdef inline int _gsum_block(const float[::1] a1, const float[::1] b1, float[:, ::1] part,
                            Py_ssize_t t, Py_ssize_t i0, Py_ssize_t rows, Py_ssize_t b0,
                            Py_ssize_t b1_, Py_ssize_t M, Py_ssize_t K, Py_ssize_t N,
                            Py_ssize_t j0, Py_ssize_t own) except -1 nogil:
    # rows (4, or fewer for the last block) x 64 columns of part[t], summed over the matrices
    # b0..b1_ and their inner dimension.
    cdef Py_ssize_t ib, k, r, o, ab, bb
    cdef float acc[GRB * COB]
    cdef float xs[GRB]
    cdef float bv
    for r in range(4):
        for o in range(64):
            acc[r * 64 + o] = 0
    for ib in range(b0, b1_):
        ab = (ib * M + i0) * K
        bb = ib * K * N + j0
        if rows == 4:
            for k in range(K):
                for r in range(4):
                    xs[r] = a1[ab + r * K + k]
                for o in range(64):
                    bv = b1[bb + k * N + o]
                    for r in range(4):
                        acc[r * 64 + o] += xs[r] * bv
        else:  # the rows past the last full block, one at a time
            for r in range(rows):
                for k in range(K):
                    xs[0] = a1[ab + r * K + k]
                    for o in range(64):
                        acc[r * 64 + o] += xs[0] * b1[bb + k * N + o]
    for r in range(rows):
        for o in range(own - j0, 64):
            part[t, (i0 + r) * N + j0 + o] = acc[r * 64 + o]
    return 0


def gemm_sum(const float[::1] a1, const float[::1] b1, float[:, ::1] part, Py_ssize_t B,
             Py_ssize_t M, Py_ssize_t K, Py_ssize_t N, bint serial=False):
    """``part[t]`` ((M, N) flattened) = sum over the matrices i of chunk t of a[i] @ b[i], for
    a (B, M, K) and b (B, K, N) flattened, N >= 64; chunk t holds [t*B//T, (t+1)*B//T), T =
    part.shape[0] (the caller adds part in order: thread-count independent).

    Loop order: one task per (chunk, block of 64 columns), owning part[t, :, block]; blocks of
    4 rows, then the chunk's matrices and their k, then the 4 x 64 register block.
    """
    cdef Py_ssize_t T = part.shape[0], nblk = _ceil_div(N, COB), task, t, own, j0, i0
    with nogil:
        if serial:  # see _serial_after_fork in cython_cpu
            for task in range(T * nblk):
                t = task // nblk
                own = (task % nblk) * COB
                j0 = _min(own, N - COB)
                for i0 in range(0, M, 4):
                    _gsum_block(a1, b1, part, t, i0, _min(GRB, M - i0), t * B // T,
                                (t + 1) * B // T, M, K, N, j0, own)
        else:
            for task in prange(T * nblk, schedule="dynamic"):
                t = task // nblk
                own = (task % nblk) * COB
                j0 = _min(own, N - COB)
                for i0 in range(0, M, 4):
                    _gsum_block(a1, b1, part, t, i0, _min(GRB, M - i0), t * B // T,
                                (t + 1) * B // T, M, K, N, j0, own)
