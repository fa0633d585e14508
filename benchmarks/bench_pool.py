"""max_pool2d forward and forward + backward: every backend, the naive loops and PyTorch in one
pytest-benchmark group per (op, shape). Shapes and modes: see ``conftest.py``."""

from __future__ import annotations

from fastconv._cli import bench as b

KIND = "pool"


def test_pool_fwd(run_bench, shape, contender):
    actual, expected = run_bench("pool_fwd", shape, contender)
    b.assert_outputs("pool_fwd", actual, expected, f"{contender} pool_fwd {shape.name}")


def test_pool_fwdbwd(run_bench, shape, contender):
    actual, expected = run_bench("pool_fwdbwd", shape, contender)
    b.assert_outputs("pool_fwdbwd", actual, expected, f"{contender} pool_fwdbwd {shape.name}")
