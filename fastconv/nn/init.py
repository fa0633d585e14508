"""Weight initialisers (He / Glorot), drawn from a caller-supplied ``numpy.random.Generator``.

Fans follow PyTorch's layouts: a conv weight ``(C_out, C_in/groups, kH, kW)`` has
``fan_in = C_in/groups * kH * kW`` and ``fan_out = C_out * kH * kW``; a dense weight
``(out, in)`` has ``fan_in = in`` and ``fan_out = out``.
"""

from __future__ import annotations

import math

import numpy as np


def fans(shape) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of ``shape`` (2-D dense or 4-D OIHW conv)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"a weight needs at least 2 dimensions, got shape {shape}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def he_normal(shape, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """He (Kaiming) normal: ``N(0, 2 / fan_in)``, for layers followed by ReLU."""
    fan_in, _ = fans(shape)
    std = math.sqrt(2.0 / fan_in)
    return (rng.standard_normal(shape) * std).astype(dtype)


def glorot_uniform(shape, rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
    """Glorot (Xavier) uniform: ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``."""
    fan_in, fan_out = fans(shape)
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-limit, limit, size=shape).astype(dtype)


INITIALIZERS = {"he_normal": he_normal, "glorot_uniform": glorot_uniform}


def get(name):
    """The initialiser called ``name`` (or ``name`` itself when it is callable)."""
    if callable(name):
        return name
    try:
        return INITIALIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown initialiser {name!r}; expected one of {', '.join(INITIALIZERS)}"
        ) from None
