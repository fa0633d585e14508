"""The planner shared by the CPU backends (``fastconv/backends/_plan.py``): one grammar for the
algorithm names every backend records, and the rules where the backends' kernels differ."""

from __future__ import annotations

import re

import numpy as np
import pytest

import fastconv as fc
from fastconv import _validate
from fastconv.backends import _plan

ALGO = r"[a-z0-9]+(-[a-z0-9]+)*(>[a-z0-9]+(-[a-z0-9]+)*)?"
FORWARD = re.compile(rf"[a-z]+:{ALGO}")
BACKWARD = re.compile(rf"[a-z]+:(input:{ALGO})?( ?weight:{ALGO})?( ?bias:{ALGO})?")

# (x shape, w shape, kwargs): a first layer, a Winograd layer, a 1x1 layer, a strided layer
# and a grouped one
LAYERS = [((2, 1, 12, 12), (8, 1, 3, 3), {}), ((2, 16, 9, 10), (32, 16, 3, 3), dict(padding=1)),
          ((2, 8, 9, 9), (64, 8, 1, 1), {}), ((2, 32, 9, 9), (32, 32, 3, 3), dict(stride=2)),
          ((2, 4, 7, 7), (4, 2, 3, 3), dict(groups=2))]


@pytest.mark.parametrize("backend", [b for b in fc.available_backends() if b != "cuda"])
@pytest.mark.parametrize("needs", [("input", "weight", "bias"), ("weight", "bias"), ("input",)])
def test_every_backend_names_its_algorithms_in_one_grammar(backend, needs, rng):
    for x_shape, w_shape, kw in LAYERS:
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        y = fc.conv2d(x, w, backend=backend, **kw)
        assert FORWARD.fullmatch(fc.last_algorithm("conv2d")), fc.last_algorithm("conv2d")
        fc.conv2d_backward(np.ones_like(y), x, w, needs=needs, backend=backend, **kw)
        name = fc.last_algorithm("conv2d_backward")
        assert BACKWARD.fullmatch(name), name
        assert [g for g in ("input", "weight", "bias") if f"{g}:" in name] == list(needs), name


def _p(x_shape, w_shape, **kw):
    kw = dict(dict(stride=1, padding=0, dilation=1, groups=1), **kw)
    return _validate._conv_geometry(x_shape, w_shape, **kw)


def test_fused_rule_differs_only_where_the_kernels_do():
    """A first layer's fused backward: both backends when dx is wanted; for dw and db alone only
    numba, whose fused kernel can skip dx (the cython one always computes it)."""
    x = np.ones((2, 1, 12, 12), np.float32)
    p = _p(x.shape, (8, 1, 3, 3))
    for needs in (("input", "weight", "bias"), ("input",)):
        assert _plan.numba_backward(p, x, 8, needs, True).family == "plane-fused"
        assert _plan.cython_backward(p, x, 8, needs).family == "plane-fused"
    assert _plan.numba_backward(p, x, 8, ("weight", "bias"), True).family == "plane-fused"
    assert _plan.cython_backward(p, x, 8, ("weight", "bias")).family != "plane-fused"
    x[0, 0, 3, 3] = np.inf  # dw by plane dot products would meet 0 * inf: the exact kernels
    assert _plan.numba_backward(p, x, 8, ("input", "weight"), True)["weight"] == "generic"
    assert _plan.cython_backward(p, x, 8, ("input", "weight"))["weight"] != "plane-fused"


def test_grad_input_phases_cover_every_row_once():
    """Each dx row and column belongs to exactly one stride phase; taps reach only the rows
    whose phase they serve."""
    p = _p((1, 32, 11, 9), (32, 32, 3, 3), stride=2, padding=1)
    split = _plan.grad_input_phases((1, 32, 11, 9), (32, 32, 3, 3), p)
    rows = sorted(i for a in {a for a, _ in split.live}
                  for i in range(2 * a.first + a.residue - 1,
                                 2 * (a.first + a.count - 1) + a.residue, 2))
    assert rows == list(range(11)) and split.covered
    for a, _ in split.live:
        assert all((t - a.residue) % 2 == 0 for t in a.taps)
    assert _plan.grad_input_phases((1, 32, 11, 9), (32, 32, 3, 3),
                                   _p((1, 32, 11, 9), (32, 32, 3, 3), stride=(1, 2),
                                      dilation=(1, 4))) is None  # column step 4 / 2
