"""pytest-benchmark suites of fastconv: one group per (op, shape), every contender inside it.

Contenders: every available fastconv backend (``cuda`` only where it is available), the naive
loops (test id ``naive-batch1-scaled``: run on a slice -- batch 1, then fewer output channels or
rows -- with the timer scaled by ``work(shape) / work(slice)``, so the group table compares
full-shape times; the factor is in ``extra_info["scale"]``) and PyTorch when installed.

Two modes:

* CI (the default; ``pyproject.toml`` passes ``--benchmark-disable``): tiny shapes
  (``fastconv._cli.bench.SMALL_SHAPES``); each benchmark runs once, as a test, and checks its
  result.
* Full (``--benchmark-enable`` or ``FASTCONV_BENCH_FULL=1``): the DESIGN §6 shapes A-G, P1-P3.
  ``FASTCONV_BENCH_SHAPES=B,P1`` restricts them; ``FASTCONV_BENCH_THREADS=2`` sets the numba and
  torch thread counts (OpenMP/BLAS threads come from ``OMP_NUM_THREADS``/``OPENBLAS_NUM_THREADS``).

Time in the environment that ``fastconv bench`` sets up for itself (docs/performance.md)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE MALLOC_MMAP_THRESHOLD_=1073741824 \\
        MALLOC_TRIM_THRESHOLD_=4294967296 OPENBLAS_THREAD_TIMEOUT=4 FASTCONV_BENCH_SHAPES=B \\
        python -m pytest benchmarks --benchmark-enable
"""

from __future__ import annotations

import os
import time

import pytest

from fastconv._cli import bench as b

# Automatic selection must not switch from cython to numba in the middle of the suite (see
# fastconv/_coldstart.py): numba compiles in the process, as it always did. tests/test_first_run.py
# turns it back on in its own subprocesses; the subprocesses of other tests inherit this.
os.environ.setdefault("FASTCONV_COLDSTART", "0")

CI_NAIVE_WORK = 100_000  # smaller naive slices in CI: a few hundred ms in all


def full_mode(config) -> bool:
    """Full DESIGN §6 shapes when benchmarking is on or ``FASTCONV_BENCH_FULL=1``."""
    if os.environ.get("FASTCONV_BENCH_FULL") == "1":
        return True
    disabled = config.getoption("benchmark_disable", True)
    return not disabled or config.getoption("benchmark_enable", False)


def bench_shapes(config, kind: str) -> list:
    full = full_mode(config)
    pool = b.SHAPES if full else b.SMALL_SHAPES
    shapes = [s for s in pool.values() if s.kind == kind]
    only = os.environ.get("FASTCONV_BENCH_SHAPES")
    if only and full:
        wanted = {n.strip().upper() for n in only.split(",")}
        shapes = [s for s in shapes if s.name.upper() in wanted]
    return shapes


def contender_id(name: str) -> str:
    return "naive-batch1-scaled" if name == "naive" else name


def pytest_generate_tests(metafunc):
    if "shape" in metafunc.fixturenames:
        shapes = bench_shapes(metafunc.config, metafunc.module.KIND)
        metafunc.parametrize("shape", shapes, ids=[s.name for s in shapes])
    if "contender" in metafunc.fixturenames:
        names = b.default_contenders()
        metafunc.parametrize("contender", names, ids=[contender_id(n) for n in names])


@pytest.fixture(scope="session", autouse=True)
def _bench_threads():
    threads = os.environ.get("FASTCONV_BENCH_THREADS")
    if threads:
        b.set_threads(int(threads))


class ScaledTimer:
    """``time.perf_counter`` times ``scale``: differences come out as full-shape seconds."""

    def __init__(self, scale: float):
        self.scale = scale
        self.__name__ = f"perf_counter*{scale:.6g}"

    def __call__(self) -> float:
        return time.perf_counter() * self.scale


@pytest.fixture
def run_bench(benchmark, request):
    """``run_bench(op, shape, contender) -> (actual, expected)``.

    Builds the contender, warms it up outside the timing (JIT compile, first-touch pages), fills
    the group and ``extra_info``, benchmarks it and returns its warm-up outputs together with an
    independent reference's outputs on the same inputs (PyTorch, else the NumPy backend).
    """

    def run(op: str, shape, contender: str):
        full = full_mode(request.config)
        c = b.make_contender(op, shape, contender, b.NAIVE_WORK if full else CI_NAIVE_WORK)
        warm_calls = 1 if (contender == "naive" or not benchmark.enabled) else 2
        actual = b.warm_up(c, op, calls=warm_calls)
        expected = b.reference(op, c.shape, c.inputs, exclude=contender)
        if expected is None:
            pytest.skip(f"no independent reference for {contender} on {shape.name} "
                        "(install torch)")
        benchmark.group = f"{op} {shape.name}"
        benchmark.extra_info.update(
            op=op, shape=shape.name, backend=contender, algorithm=c.algorithm,
            threads=c.threads, gflop=b.gflop(op, shape), gbytes=b.gbytes(op, shape),
            scale=c.scale, ran=c.label if contender == "naive" else shape.describe(),
        )
        if contender == "naive":
            if hasattr(benchmark, "_timer"):  # pytest-benchmark's timer: report scaled times
                benchmark._timer = ScaledTimer(c.scale)
                benchmark.extra_info["times_scaled"] = True
            else:
                benchmark.extra_info["times_scaled"] = False
            benchmark.pedantic(c.fn, rounds=3 if full else 1, iterations=1)
        else:
            benchmark(c.fn)
        return actual, expected

    return run
