"""The NumPy side of Winograd F(2x2, 3x3), shared by the numba and cython backends (no numba
here: the cython backend must work without it).

A 2x2 output tile is ``A^T [ (G g G^T) * (B^T d B) ] A`` for its 4x4 input tile ``d`` and each
3x3 filter ``g`` (Lavin & Gray, 2016). This module transforms the weights (``G g G^T``, and the
adjoint for the weight gradient); the kernels transform the tiles.
"""

from __future__ import annotations

import numpy as np

HALF = 32  # output channels per tile when two tiles share a 64-lane register block

_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])


def transform_weight(w, cp):
    """(C_out, C_in, 3, 3) -> u (16, C_in, Cp): u[4a+b, i, o] = (G w[o, i] G^T)[a, b], zero for
    o >= C_out. Computed in float64, then rounded (the entries are sums of halves of weights)."""
    c_out, c_in = w.shape[:2]
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite weights: see the kernels
        gw = np.tensordot(_G, w.astype(np.float64), axes=(1, 2))  # (4, C_out, C_in, 3)
        u = np.tensordot(gw, _G, axes=(3, 1))  # (4, C_out, C_in, 4): [a, o, i, b]
    out = np.zeros((4, 4, c_in, cp), w.dtype)
    out[..., :c_out] = u.transpose(0, 3, 2, 1)
    return out.reshape(16, c_in, cp)


def transform_weight_paired(w):
    """(C_out <= 32, C_in, 3, 3) -> u (16, C_in, 64): :func:`transform_weight` to 32 channels,
    repeated in channels 32-63 (for the kernels' paired register blocks)."""
    u = transform_weight(w, HALF)
    return np.concatenate([u, u], axis=2)


def weight_from_transformed(du, c_out):
    """Adjoint of :func:`transform_weight`: du (16, C_in, Cp) -> dw (C_out, C_in, 3, 3) with
    dw[o, i] = G^T du[:, i, o] G (in float64, then rounded)."""
    c_in = du.shape[1]
    d = du.reshape(4, 4, c_in, -1)[..., :c_out].astype(np.float64)
    gd = np.tensordot(_G, d, axes=(0, 0))  # (3, 4, C_in, C_out): [k, b, i, o]
    dw = np.tensordot(gd, _G, axes=(1, 0))  # (3, C_in, C_out, 3): [k, i, o, l]
    return np.ascontiguousarray(dw.transpose(2, 1, 0, 3)).astype(du.dtype)
