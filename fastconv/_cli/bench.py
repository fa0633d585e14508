"""Timing core shared by ``fastconv bench`` and the pytest-benchmark suites in ``benchmarks/``.

What it provides:

* the benchmark shapes of DESIGN §6 (``A``–``G`` convolutions, ``P1``–``P3`` max-pools) and a
  ``small`` set that runs in seconds (CI, smoke tests);
* the work of each (op, shape): forward GFLOP ``2·N·C_out·H_out·W_out·(C_in/groups)·kH·kW``, three
  times that for forward + backward; bytes read + written for pools;
* :func:`make_contender`: one zero-argument callable per contender (a fastconv backend, the naive
  loops on a reduced slice scaled per MAC, PyTorch), each returning its outputs as a tuple;
* :func:`time_interleaved`: medians over repeats with the contenders interleaved in one process;
* :func:`sgemm_peak`: the machine's float32 GEMM throughput through NumPy's BLAS, measured in the
  same run, as the yardstick for "% of peak";
* :func:`run_shapes`, :func:`run_scaling`, markdown tables, machine metadata, a PNG chart.

The naive loops are far too slow for the full shapes (shape B forward is ~1e9 multiply-adds in
Python), so they run on a slice -- batch 1, then fewer output channels, then fewer output rows,
until the slice has at most ``naive_work`` multiply-adds (window elements for pools) -- and
their time is multiplied by ``work(full shape) / work(slice)``. Tables and JSON say so.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np

import fastconv as fc
from fastconv._dispatch import record_algorithm
from fastconv._oracle import BENCH_TOLERANCE, assert_close, to_host

CONV_OPS = ("conv_fwd", "conv_fwdbwd")
POOL_OPS = ("pool_fwd", "pool_fwdbwd")
OPS = CONV_OPS + POOL_OPS
OP_TITLES = {
    "conv_fwd": "conv2d forward",
    "conv_fwdbwd": "conv2d forward + backward",
    "pool_fwd": "max_pool2d forward",
    "pool_fwdbwd": "max_pool2d forward + backward",
}
DTYPE = np.float32
#: Multiply-adds (pool: window elements) of the slice the naive loops run on.
NAIVE_WORK = 400_000
#: Contenders slower than this per call (seconds, at warm-up) are timed at most 3 times.
SLOW_CALL_S = 1.0


# ------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class ConvShape:
    """A float32 conv2d problem: x (n, c_in, h, w), weight (c_out, c_in, k, k), groups 1."""

    name: str
    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    k: int
    stride: int = 1
    pad: int = 0

    kind = "conv"

    @property
    def out_hw(self) -> tuple:
        return tuple((s + 2 * self.pad - self.k) // self.stride + 1 for s in (self.h, self.w))

    def macs(self) -> int:
        """Multiply-adds of the forward pass."""
        ho, wo = self.out_hw
        return self.n * self.c_out * ho * wo * self.c_in * self.k * self.k

    def work(self) -> int:
        """The unit the naive time is scaled by: multiply-adds."""
        return self.macs()

    def describe(self) -> str:
        return (f"x ({self.n},{self.c_in},{self.h},{self.w}) -> C_out {self.c_out}, "
                f"k{self.k} s{self.stride} p{self.pad}")


@dataclass(frozen=True)
class PoolShape:
    """A float32 max_pool2d problem: x (n, c, h, w), square window k, stride, -inf padding."""

    name: str
    n: int
    c: int
    h: int
    w: int
    k: int
    stride: int
    pad: int = 0

    kind = "pool"

    @property
    def out_hw(self) -> tuple:
        return tuple((s + 2 * self.pad - self.k) // self.stride + 1 for s in (self.h, self.w))

    def work(self) -> int:
        """The unit the naive time is scaled by: window elements visited."""
        ho, wo = self.out_hw
        return self.n * self.c * ho * wo * self.k * self.k

    def bytes(self, op: str) -> int:
        """Bytes read + written: x and (y, int64 idx) forward; (dy, idx) and dx backward."""
        ho, wo = self.out_hw
        plane_in = self.n * self.c * self.h * self.w * 4
        plane_out = self.n * self.c * ho * wo * (4 + 8)
        fwd = plane_in + plane_out
        return fwd if op == "pool_fwd" else 2 * fwd

    def describe(self) -> str:
        return f"x ({self.n},{self.c},{self.h},{self.w}), k{self.k} s{self.stride} p{self.pad}"


SHAPES = {
    s.name: s
    for s in (
        ConvShape("A", 64, 1, 28, 28, 32, 3, 1, 0),
        ConvShape("B", 64, 32, 26, 26, 64, 3, 1, 0),
        ConvShape("C", 64, 1, 28, 28, 6, 5, 1, 2),
        ConvShape("D", 64, 6, 14, 14, 16, 5, 1, 0),
        ConvShape("E", 32, 64, 56, 56, 64, 3, 1, 1),
        ConvShape("F", 32, 64, 56, 56, 128, 3, 2, 1),
        ConvShape("G", 32, 256, 14, 14, 64, 1, 1, 0),
        PoolShape("P1", 64, 32, 26, 26, 2, 2),
        PoolShape("P2", 64, 64, 24, 24, 2, 2),
        PoolShape("P3", 32, 64, 112, 112, 3, 2, 1),
    )
}
# Tiny shapes that cover the same code paths (C_in = 1, C_in/C_out >= 32 for the register-blocked
# kernels, stride 2 with padding, overlapping pool windows) in milliseconds: CI and smoke runs.
SMALL_SHAPES = {
    s.name: s
    for s in (
        ConvShape("s1", 2, 1, 12, 12, 8, 3, 1, 0),
        ConvShape("s32", 2, 32, 8, 8, 32, 3, 1, 1),
        ConvShape("s2", 2, 8, 11, 11, 16, 3, 2, 1),
        PoolShape("sp2", 2, 8, 10, 10, 2, 2),
        PoolShape("sp3", 2, 8, 11, 11, 3, 2, 1),
    )
}


def select_shapes(spec: str) -> list:
    """Shapes for a comma-separated list of names (``A``..``G``, ``P1``..``P3``), ``all`` or
    ``small``. Raises ``ValueError`` naming an unknown name."""
    out = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name == "all":
            out.extend(SHAPES.values())
        elif name == "small":
            out.extend(SMALL_SHAPES.values())
        elif name.upper() in SHAPES:
            out.append(SHAPES[name.upper()])
        elif name in SMALL_SHAPES:
            out.append(SMALL_SHAPES[name])
        else:
            known = ", ".join([*SHAPES, "all", "small"])
            raise ValueError(f"unknown shape {name!r}; expected a comma-separated list of {known}")
    return list(dict.fromkeys(out))


def ops_for(shape) -> tuple:
    return CONV_OPS if shape.kind == "conv" else POOL_OPS


def gflop(op: str, shape) -> float:
    """Floating-point work in GFLOP (0 for pools)."""
    if shape.kind != "conv":
        return 0.0
    return (3 if op == "conv_fwdbwd" else 1) * 2 * shape.macs() / 1e9


def gbytes(op: str, shape) -> float:
    """Memory traffic in GB for pools (0 for convolutions)."""
    return shape.bytes(op) / 1e9 if shape.kind == "pool" else 0.0


def naive_slice(shape, budget: int = NAIVE_WORK):
    """The reduced problem the naive loops run on, and the factor its time is scaled by.

    Batch 1 first; then fewer output channels (conv) or channels (pool); then fewer input rows.
    Returns ``(slice_shape, work(shape) / work(slice_shape))``.
    """
    s = dataclasses.replace(shape, n=1)
    if s.work() > budget:
        field = "c_out" if shape.kind == "conv" else "c"
        c = getattr(s, field)
        s = dataclasses.replace(s, **{field: max(1, c * budget // s.work())})
    if s.work() > budget:
        rows = max(1, s.out_hw[0] * budget // s.work())
        h = max((rows - 1) * s.stride + s.k - 2 * s.pad, s.k - 2 * s.pad, 1)
        s = dataclasses.replace(s, h=min(h, s.h))
    return s, shape.work() / s.work()


def slice_label(shape, s) -> str:
    """``naive (n=1, C_out 8/64) x512 scaled`` -- what the naive row actually ran."""
    parts = [f"n={s.n}/{shape.n}"]
    if shape.kind == "conv" and s.c_out != shape.c_out:
        parts.append(f"C_out {s.c_out}/{shape.c_out}")
    if shape.kind == "pool" and s.c != shape.c:
        parts.append(f"C {s.c}/{shape.c}")
    if s.h != shape.h:
        parts.append(f"H {s.h}/{shape.h}")
    unit = "MAC" if shape.kind == "conv" else "window element"
    return f"naive ({', '.join(parts)}; x{shape.work() / s.work():,.0f} scaled per {unit})"


# ------------------------------------------------------------------------------------ inputs


def make_inputs(op: str, shape, seed: int = 0) -> dict:
    """Float32 host arrays for ``op`` on ``shape``: x (and w, b for conv) and dy for backward."""
    rng = np.random.default_rng(seed)
    c = shape.c_in if shape.kind == "conv" else shape.c
    arrays = {"x": rng.standard_normal((shape.n, c, shape.h, shape.w), dtype=DTYPE)}
    if shape.kind == "conv":
        scale = 1.0 / np.sqrt(shape.c_in * shape.k * shape.k)
        arrays["w"] = (rng.standard_normal((shape.c_out, shape.c_in, shape.k, shape.k),
                                           dtype=DTYPE) * scale).astype(DTYPE)
        arrays["b"] = rng.standard_normal(shape.c_out, dtype=DTYPE)
        out_c = shape.c_out
    else:
        out_c = shape.c
    if op.endswith("fwdbwd"):
        arrays["dy"] = rng.standard_normal((shape.n, out_c, *shape.out_hw), dtype=DTYPE)
    return arrays


def output_names(op: str) -> tuple:
    return {
        "conv_fwd": ("y",),
        "conv_fwdbwd": ("y", "dx", "dw", "db"),
        "pool_fwd": ("y", "idx"),
        "pool_fwdbwd": ("y", "idx", "dx"),
    }[op]


# ------------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """One timed participant of an (op, shape) group.

    ``fn()`` runs the op once on ``shape`` (for the naive loops: on a slice of it) and returns the
    outputs, in :func:`output_names` order. ``scale`` multiplies its time into the full shape.
    """

    name: str
    label: str
    fn: object
    shape: object
    scale: float = 1.0
    algorithm: str | None = None
    threads: int | None = None
    checked: bool = False
    warm_s: float = 0.0
    inputs: dict = dataclasses.field(default_factory=dict, repr=False)


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def cuda_is_simulated() -> bool:
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def default_contenders() -> list:
    """Every available fastconv backend, the naive loops and torch (when installed).

    ``cuda`` joins when a GPU is there, not under the CUDA simulator: simulated timings mean
    nothing and a simulated conv backward takes ~50 s even on the small shapes. (Asking for it by
    name, ``--backends cuda``, still works under the simulator, on host arrays.)
    """
    names = [b for b in fc.available_backends() if not (b == "cuda" and cuda_is_simulated())]
    if torch_available():
        names.append("torch")
    return names


def _fastconv_fn(op, shape, backend, a):
    kw = dict(stride=shape.stride, padding=shape.pad)
    if backend == "cuda":
        from numba import cuda

        if not cuda_is_simulated():  # the simulator's arrays are not device arrays: host copies
            a = {k: cuda.to_device(v) for k, v in a.items()}
        sync = cuda.synchronize
    else:
        sync = None
    if op == "conv_fwd":
        def fn():
            return (fc.conv2d(a["x"], a["w"], a["b"], backend=backend, **kw),)
    elif op == "conv_fwdbwd":
        def fn():
            y = fc.conv2d(a["x"], a["w"], a["b"], backend=backend, **kw)
            return (y, *fc.conv2d_backward(a["dy"], a["x"], a["w"], backend=backend, **kw))
    elif op == "pool_fwd":
        def fn():
            return fc.max_pool2d(a["x"], shape.k, backend=backend, **kw)
    else:
        def fn():
            y, idx = fc.max_pool2d(a["x"], shape.k, backend=backend, **kw)
            return y, idx, fc.max_pool2d_backward(a["dy"], idx, a["x"].shape, backend=backend)
    if sync is None:
        return fn

    def synced():
        out = fn()
        sync()
        return out

    return synced


def _torch_fn(op, shape, a):
    import torch
    import torch.nn.functional as F

    t = {k: torch.from_numpy(v) for k, v in a.items()}
    kw = dict(stride=shape.stride, padding=shape.pad)
    if op == "conv_fwd":
        def fn():
            with torch.no_grad():
                return (F.conv2d(t["x"], t["w"], t["b"], **kw).numpy(),)
    elif op == "conv_fwdbwd":
        x, w, b = (t[k].clone().requires_grad_() for k in "xwb")

        def fn():
            y = F.conv2d(x, w, b, **kw)
            grads = torch.autograd.grad(y, (x, w, b), t["dy"])
            return tuple(g.detach().numpy() for g in (y, *grads))
    elif op == "pool_fwd":
        def fn():
            with torch.no_grad():
                y, idx = F.max_pool2d(t["x"], shape.k, return_indices=True, **kw)
            return y.numpy(), idx.numpy()
    else:
        x = t["x"].clone().requires_grad_()

        def fn():
            y, idx = F.max_pool2d(x, shape.k, return_indices=True, **kw)
            (dx,) = torch.autograd.grad(y, (x,), t["dy"])
            return y.detach().numpy(), idx.numpy(), dx.numpy()
    return fn


def _recorded_ops(op: str) -> tuple:
    if op.startswith("conv"):
        return ("conv2d", "conv2d_backward") if op == "conv_fwdbwd" else ("conv2d",)
    return ("max_pool2d", "max_pool2d_backward") if op == "pool_fwdbwd" else ("max_pool2d",)


def _algorithm(op: str) -> str | None:
    algos = [fc.last_algorithm(n) for n in _recorded_ops(op)]
    if not any(algos):
        return None
    return " + ".join(a or "?" for a in algos)


def make_contender(op: str, shape, name: str, naive_work: int = NAIVE_WORK,
                   seed: int = 0) -> Contender:
    """A :class:`Contender` for ``name``: a fastconv backend, ``naive`` or ``torch``.

    The naive loops run on :func:`naive_slice` of ``shape`` with inputs of their own.
    """
    if name == "naive":
        run_shape, scale = naive_slice(shape, naive_work)
        label = slice_label(shape, run_shape)
    else:
        run_shape, scale, label = shape, 1.0, name
    a = make_inputs(op, run_shape, seed)
    fn = _torch_fn(op, run_shape, a) if name == "torch" else _fastconv_fn(op, run_shape, name, a)
    return Contender(name, label, fn, run_shape, scale, inputs=a)


def warm_up(c: Contender, op: str, calls: int = 2):
    """Call ``c`` ``calls`` times (JIT compile, first-touch pages); record its algorithm and
    thread count; return the outputs of the last call as host arrays."""
    for _ in range(calls):
        for name in _recorded_ops(op):  # a backend that records nothing must not inherit a name
            record_algorithm(name, None)
        t0 = time.perf_counter()
        out = c.fn()
        c.warm_s = time.perf_counter() - t0
    c.algorithm = "torch:aten" if c.name == "torch" else _algorithm(op)
    c.threads = backend_threads(c.name)
    return tuple(to_host(o) for o in out)


#: Largest problem (multiply-adds / window elements) the naive loops serve as a reference for.
NAIVE_REFERENCE_LIMIT = 2_000_000


def reference(op: str, shape, inputs: dict, exclude: str | None) -> tuple | None:
    """Outputs of an independent implementation on the same inputs: PyTorch when installed (and
    not the contender under check), else fastconv's NumPy reference, else the naive loops on
    small problems; ``None`` when there is none."""
    if exclude != "torch" and torch_available():
        return tuple(to_host(o) for o in _torch_fn(op, shape, inputs)())
    available = fc.available_backends()
    for backend in ("numpy", "naive"):
        if backend == exclude or backend not in available:
            continue
        if backend == "naive" and shape.work() > NAIVE_REFERENCE_LIMIT:
            continue
        return tuple(to_host(o) for o in _fastconv_fn(op, shape, backend, inputs)())
    return None


def assert_outputs(op: str, actual: tuple, expected: tuple, what: str = ""):
    """Raise ``AssertionError`` unless ``actual`` matches ``expected``: the tests' oracle check
    (``fastconv._oracle``) with the benchmarks' tolerance (pool indices exactly)."""
    names = output_names(op)
    assert len(actual) == len(names), f"{what}: {len(actual)} outputs, expected {names}"
    for name, a, e in zip(names, actual, expected):
        assert_close(a, e, f"{what} {name}", BENCH_TOLERANCE)


# ------------------------------------------------------------------------------- threading


def set_threads(threads: int | None):
    """Set the thread count of numba and torch in this process (OpenMP/BLAS threads come from
    the environment: ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, set before start)."""
    if not threads:
        return
    if importlib.util.find_spec("numba") is not None:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    if torch_available():
        import torch

        torch.set_num_threads(threads)


def backend_threads(name: str) -> int | None:
    """Threads the contender runs on, as far as this process can tell."""
    try:
        if name == "numba":
            import numba

            return numba.get_num_threads()
        if name == "torch":
            import torch

            return torch.get_num_threads()
        if name == "cython":
            from ..backends.cython import executor as cython_cpu

            if not cython_cpu.OPENMP:
                return 1
            env = os.environ.get("OMP_NUM_THREADS")
            return int(env) if env else len(os.sched_getaffinity(0))
    except (ImportError, ValueError, AttributeError):
        return None
    if name == "numpy":
        env = os.environ.get("OPENBLAS_NUM_THREADS")  # its GEMMs run on BLAS threads
        return int(env) if env and env.isdigit() else None
    return 1 if name == "naive" else None


# ---------------------------------------------------------------------------------- timing


def time_interleaved(fns: dict, repeat: int, counts: dict | None = None) -> dict:
    """Time each zero-argument callable ``repeat`` times (``counts[name]`` for some), one call of
    each per round, the order rotating every round, so that every contender sees the same
    machine state. Returns seconds per call, per name."""
    counts = counts or {}
    names = list(fns)
    times = {n: [] for n in names}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call would be charged to whoever triggered it
    try:
        for r in range(repeat):
            order = names[r % len(names):] + names[:r % len(names)] if names else []
            for n in order:
                if len(times[n]) >= counts.get(n, repeat):
                    continue
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
    finally:
        if enabled:
            gc.enable()
    return times


def sgemm_peak(n: int = 2048, repeat: int = 5) -> dict:
    """Best float32 ``n x n @ n x n`` throughput of NumPy's BLAS in this process (its threads come
    from ``OPENBLAS_NUM_THREADS``): the "peak" that "% of peak" is measured against."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    np.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(max(repeat, 5)):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "best_ms": best * 1e3, "gflops": 2 * n**3 / best / 1e9,
            "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS")}


@dataclass
class Result:
    """Timing of one contender in one (op, shape) group, full-shape milliseconds."""

    op: str
    shape: str
    contender: str
    label: str
    algorithm: str | None
    threads: int | None
    scale: float
    times_ms: list
    gflop: float
    gbytes: float
    checked: bool = False

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def rate(self) -> float:
        """GFLOP/s (conv) or GB/s (pool) at the median."""
        work = self.gflop or self.gbytes
        return work / (self.median_ms / 1e3)

    def as_dict(self, group: list, peak: float | None) -> dict:
        d = dataclasses.asdict(self)
        d.update(median_ms=self.median_ms, gflops=self.rate if self.gflop else None,
                 gbps=self.rate if self.gbytes else None,
                 pct_peak=pct_peak(self, peak), x_naive=x_naive(self, group),
                 vs_torch=vs_torch(self, group))
        return d


def pct_peak(r: Result, peak: float | None):
    return 100 * r.rate / peak if (peak and r.gflop) else None


def x_naive(r: Result, group: list):
    naive = [g for g in group if g.contender == "naive"]
    return naive[0].median_ms / r.median_ms if naive else None


def vs_torch(r: Result, group: list):
    torch_ = [g for g in group if g.contender == "torch"]
    return r.median_ms / torch_[0].median_ms if torch_ else None


def run_group(op: str, shape, names: list, repeat: int, naive_work: int = NAIVE_WORK,
              check: bool = True, log=None, failures: list | None = None) -> list:
    """Warm up, check and time every contender of one (op, shape) group, interleaved.

    The naive loops, and any contender whose warm call took more than ``SLOW_CALL_S``, run
    ``min(repeat, 3)`` times. Each contender's output is checked once against an independent
    implementation (:func:`reference`): PyTorch where installed (PyTorch itself is not
    re-checked), else the NumPy backend. With a ``failures`` list, a contender that raises or
    gives a wrong result is left out of the group and ``(op, shape, name, message)`` appended to
    the list (a long run survives one broken backend); without one, the error propagates.
    """
    contenders = []
    ref = None
    for name in names:
        if log:
            log(f"  {op} {shape.name}: warm-up {name}")
        try:
            c = make_contender(op, shape, name, naive_work)
            out = warm_up(c, op, calls=1 if name == "naive" else 2)
            if check and name != "torch":  # torch is the reference the others are checked against
                if c.shape == shape and torch_available():  # one torch result per group
                    ref = ref if ref is not None else reference(op, shape, c.inputs, name)
                    expected = ref
                else:
                    expected = reference(op, c.shape, c.inputs, exclude=name)
                if expected is not None:
                    assert_outputs(op, out, expected, f"{name} {op} {shape.name}")
                    c.checked = True
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            if failures is None:
                raise
            message = f"{type(e).__name__}: {e}".strip().splitlines()
            failures.append((op, shape.name, name, " ".join(message)[:300]))
            if log:
                log(f"  {op} {shape.name}: {name} FAILED: {message[0][:200]}")
            continue
        contenders.append(c)
    del ref
    if log:
        log(f"  {op} {shape.name}: timing {len(contenders)} contenders x {repeat}")
    counts = {c.name: min(repeat, 3) for c in contenders
              if c.name == "naive" or c.warm_s > SLOW_CALL_S}
    times = time_interleaved({c.name: c.fn for c in contenders}, repeat, counts)
    return [
        Result(op, shape.name, c.name, c.label, c.algorithm, c.threads, c.scale,
               [t * 1e3 * c.scale for t in times[c.name]], gflop(op, shape), gbytes(op, shape),
               c.checked)
        for c in contenders
    ]


# --------------------------------------------------------------------------------- scaling

#: The scaling study's representative problems: B's 32 -> 64 channel 3x3 convolution (padding 1,
#: so the output is the image size) and a 2x2 max-pool of its 32-channel input.
SCALING_BATCHES = (1, 8, 64, 256)
SCALING_IMAGES = (28, 56, 112)
SCALING_IMAGE_BATCH = 8
SCALING_BATCH_IMAGE = 28
SCALING_BACKENDS = ("numba", "cython", "torch")


def scaling_shape(kind: str, n: int, size: int):
    if kind == "conv":
        return ConvShape(f"conv n={n} {size}x{size}", n, 32, size, size, 64, 3, 1, 1)
    return PoolShape(f"pool n={n} {size}x{size}", n, 32, size, size, 2, 2)


def run_scaling(ops: list, names: list, repeat: int, batches=SCALING_BATCHES,
                images=SCALING_IMAGES, log=None, failures: list | None = None) -> list:
    """Time per image as the batch grows (image 28) and as the image grows (batch 8).

    Returns rows ``{op, sweep, batch, image, contender, median_ms, us_per_image,
    ns_per_work, rel}`` where ``rel`` is the cost per unit of work (multiply-add or window
    element) relative to the first point of the sweep: 1.0 = flat, > 1 = rises.
    """
    rows = []
    for op in ops:
        kind = "conv" if op in CONV_OPS else "pool"
        sweeps = [("batch", n, SCALING_BATCH_IMAGE) for n in batches]
        sweeps += [("image", SCALING_IMAGE_BATCH, s) for s in images]
        first = {}
        for sweep, n, size in sweeps:
            shape = scaling_shape(kind, n, size)
            group = run_group(op, shape, [x for x in names if x != "naive"], repeat,
                              check=False, log=log, failures=failures)
            for r in group:
                per_work = r.median_ms * 1e6 / shape.work()
                key = (sweep, r.contender)
                first.setdefault(key, per_work)
                rows.append(dict(op=op, sweep=sweep, batch=n, image=size, contender=r.contender,
                                 algorithm=r.algorithm, median_ms=r.median_ms,
                                 us_per_image=r.median_ms * 1e3 / n,
                                 ns_per_work=per_work, rel=per_work / first[key]))
    return rows


# -------------------------------------------------------------------------------- reporting


def _fmt(v, spec: str, dash: str = "–") -> str:
    return dash if v is None else format(v, spec)


def _fmt_ratio(v) -> str:
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:,.0f}×"
    return f"{v:.2f}×" if v < 10 else f"{v:.1f}×"


TABLE_COLUMNS = ("backend", "algorithm", "median ms", "GFLOP/s", "% SGEMM peak", "× naive",
                 "time / torch")


def markdown_table(group: list, peak: float | None) -> str:
    """One markdown table for one (op, shape) group (pools: GB/s in the GFLOP/s column)."""
    is_pool = bool(group and group[0].gbytes)
    cols = list(TABLE_COLUMNS)
    if is_pool:
        cols[3] = "GB/s"
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for r in group:
        ratio = vs_torch(r, group)
        cells = [
            r.label,
            r.algorithm or "–",
            f"{r.median_ms:.3f}" if r.median_ms < 100 else f"{r.median_ms:,.0f}",
            f"{r.rate:.2f}" if is_pool else f"{r.rate:.1f}",
            _fmt(pct_peak(r, peak), ".0f") + ("" if pct_peak(r, peak) is None else " %"),
            _fmt_ratio(x_naive(r, group)),
            "–" if ratio is None else f"{ratio:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_title(op: str, shape) -> str:
    work = (f"{gflop(op, shape):.3g} GFLOP" if shape.kind == "conv"
            else f"{gbytes(op, shape) * 1e3:.3g} MB moved")
    return f"{OP_TITLES[op]} · shape {shape.name}: {shape.describe()} · {work}"


def scaling_tables(rows: list) -> str:
    """Markdown tables of the scaling study, one per (op, sweep), and a note on where the cost
    per unit of work rises by more than 15 %."""
    out, notes = [], {}
    for op in dict.fromkeys(r["op"] for r in rows):
        for sweep in ("batch", "image"):
            sel = [r for r in rows if r["op"] == op and r["sweep"] == sweep]
            if not sel:
                continue
            names = list(dict.fromkeys(r["contender"] for r in sel))
            if sweep == "batch":
                title = f"{OP_TITLES[op]}, image {sel[0]['image']}×{sel[0]['image']}"
                key, head = "batch", "batch"
            else:
                title = f"{OP_TITLES[op]}, batch {sel[0]['batch']}"
                key, head = "image", "image"
            out.append(f"**{title}** — µs per image (cost per "
                       f"{'MAC' if op in CONV_OPS else 'window element'} relative to the first "
                       "row)\n")
            out.append("| " + " | ".join([head, *names]) + " |")
            out.append("|" + "|".join(["---"] * (len(names) + 1)) + "|")
            for v in dict.fromkeys(r[key] for r in sel):
                cells = [str(v) if sweep == "batch" else f"{v}×{v}"]
                for n in names:
                    m = [r for r in sel if r[key] == v and r["contender"] == n]
                    cells.append(f"{m[0]['us_per_image']:,.1f} ({m[0]['rel']:.2f})" if m else "–")
                    if m and m[0]["rel"] > 1.15:
                        notes.setdefault(f"{n} {op} vs {head}", []).append(
                            f"{m[0]['rel']:.2f}× at {v}")
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in notes.items())
    out.append("Where the cost per unit of work rises by more than 15 % over the first row: "
               + (listing or "nowhere") + ".")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512vl"})
    except OSError:
        pass
    return []


ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
            "NUMBA_THREADING_LAYER", "OMP_WAIT_POLICY", "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TRIM_THRESHOLD_", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
            "OPENBLAS_THREAD_TIMEOUT")


def machine_info() -> dict:
    """Versions, thread counts, CPU and the environment variables that affect timings."""
    info = {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "fastconv": fc.__version__,
        "numpy": np.__version__,
        "backends": fc.available_backends(),
        "env": {k: os.environ.get(k) for k in ENV_VARS},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "threads": {},
    }
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["numpy_blas"] = f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001 - older numpy: no dict mode
        info["numpy_blas"] = None
    if importlib.util.find_spec("numba") is not None:
        import numba

        info["numba"] = numba.__version__
        info["threads"]["numba"] = numba.get_num_threads()
        try:
            from ..backends.numba import _threading as _numba_threading

            info["numba_threading_layer"] = _numba_threading.threading_layer()
        except ImportError:
            info["numba_threading_layer"] = None
        from .info import _register_blocks

        info["numba_register_blocks"] = _register_blocks()
    if torch_available():
        import torch

        info["torch"] = torch.__version__
        info["threads"]["torch"] = torch.get_num_threads()
    try:
        from ..backends.cython import executor as cython_cpu

        info["cython_openmp"] = cython_cpu.OPENMP
        info["threads"]["cython"] = backend_threads("cython")
    except ImportError:
        pass
    return info


def machine_line(info: dict, peak: dict | None) -> str:
    parts = [f"CPU: {info['cpu']} ({info['affinity_cpus']} usable of {info['logical_cpus']} "
             f"logical CPUs; {', '.join(info['cpu_flags']) or 'no AVX flags found'})",
             f"threads: {', '.join(f'{k} {v}' for k, v in info['threads'].items())}",
             f"numpy {info['numpy']} ({info.get('numpy_blas')}), numba {info.get('numba', '–')}, "
             f"torch {info.get('torch', '–')}, fastconv {info['fastconv']}"]
    if info.get("numba_register_blocks"):
        parts.append(f"numba register blocks: {info['numba_register_blocks']}")
    if peak:
        parts.append(f"measured SGEMM peak: {peak['gflops']:.0f} GFLOP/s (NumPy float32 "
                     f"{peak['n']}³ matmul, best of the run, OPENBLAS_NUM_THREADS="
                     f"{peak['blas_threads']})")
    return "\n".join(f"- {p}" for p in parts)


# -------------------------------------------------------------------------------------- plot


def plot(results: list, peak: float | None, path, title: str = ""):
    """A PNG bar chart: one panel per op, shapes on the x axis, one bar per contender, GFLOP/s
    (GB/s for pools) on a log axis; the SGEMM peak as a dashed line on conv panels."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r.op for r in results))
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 3.4 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        sel = [r for r in results if r.op == op]
        shapes = list(dict.fromkeys(r.shape for r in sel))
        names = list(dict.fromkeys(r.contender for r in sel))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            xs, ys = [], []
            for j, s in enumerate(shapes):
                m = [r for r in sel if r.shape == s and r.contender == name]
                if m:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(m[0].rate)
            label = "naive (scaled)" if name == "naive" else name
            ax.bar(xs, ys, width, label=label)
        if peak and op in CONV_OPS:
            ax.axhline(peak, color="k", ls="--", lw=1, label=f"SGEMM peak {peak:.0f}")
        ax.set_xticks(range(len(shapes)), shapes)
        ax.set_yscale("log")
        ax.set_ylabel("GB/s" if op in POOL_OPS else "GFLOP/s")
        ax.set_title(OP_TITLES[op])
        ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
        ax.grid(axis="y", which="both", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(rows: list, path, title: str = ""):
    """A PNG line chart of the scaling study: µs per image against batch and against image."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 3.2 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        for j, (sweep, key) in enumerate((("batch", "batch"), ("image", "image"))):
            ax = axes[i, j]
            sel = [r for r in rows if r["op"] == op and r["sweep"] == sweep]
            for name in dict.fromkeys(r["contender"] for r in sel):
                pts = [r for r in sel if r["contender"] == name]
                ax.plot([r[key] for r in pts], [r["us_per_image"] for r in pts], "o-",
                        label=name)
            ax.set_xscale("log", base=2)
            ticks = sorted({r[key] for r in sel})
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_yscale("log")
            ax.set_xlabel(key)
            ax.set_ylabel("µs / image")
            ax.set_title(f"{OP_TITLES[op]} vs {key}", fontsize=9)
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
