"""conv2d forward and forward + backward: every backend, the naive loops and PyTorch in one
pytest-benchmark group per (op, shape). Shapes and modes: see ``conftest.py``."""

from __future__ import annotations

from fastconv._cli import bench as b

KIND = "conv"


def test_conv_fwd(run_bench, shape, contender):
    actual, expected = run_bench("conv_fwd", shape, contender)
    b.assert_outputs("conv_fwd", actual, expected, f"{contender} conv_fwd {shape.name}")


def test_conv_fwdbwd(run_bench, shape, contender):
    actual, expected = run_bench("conv_fwdbwd", shape, contender)
    b.assert_outputs("conv_fwdbwd", actual, expected, f"{contender} conv_fwdbwd {shape.name}")
