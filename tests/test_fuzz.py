"""Fuzzing: random valid configurations against the reference, random invalid ones must raise.

Hypothesis profiles (registered here, applied to this file's tests only), chosen by
``FASTCONV_FUZZ_PROFILE``:

* ``ci`` (default): ``CI_EXAMPLES`` examples per test and backend, derandomized so that CI is
  reproducible;
* ``thorough``: ``THOROUGH_EXAMPLES`` per test and backend, random; run it locally
  (docs/reliability.md): ``FASTCONV_FUZZ_PROFILE=thorough python -m pytest tests/test_fuzz.py``.

Valid configurations go through the shared checkers of ``tests/helpers.py`` (forward and every
gradient against PyTorch in float64, else the NumPy reference, else the naive loops for the
NumPy backend). Invalid configurations must raise ``ValueError`` or ``TypeError``; for the
compiled backends they run in ``tests/fuzz_worker.py`` subprocesses, so a crash is caught,
counted and attributed to its configuration instead of killing pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import SLOW_BACKENDS, TEST_BACKENDS
from fuzz_worker import outcome
from helpers import check_conv, check_pool
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

CI_EXAMPLES = 30
THOROUGH_EXAMPLES = 500
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
           HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=CI_EXAMPLES, deadline=None, derandomize=True,
                          database=None, suppress_health_check=_HEALTH)
settings.register_profile("thorough", max_examples=THOROUGH_EXAMPLES, deadline=None,
                          suppress_health_check=_HEALTH)
PROFILE = os.environ.get("FASTCONV_FUZZ_PROFILE", "ci")
FUZZ = settings(settings.get_profile(PROFILE))
ISOLATED = {"numba", "cython", "cuda"}  # compiled backends: invalid calls run in a worker
ACCEPTED_ERRORS = {"ValueError", "TypeError"}
FLOATS = ("float32", "float64")


def _pairs(draw, lo, hi):
    return draw(st.integers(lo, hi)), draw(st.integers(lo, hi))


# ---------------------------------------------------------------- valid configurations


@st.composite
def conv_configs(draw, tiny: bool):
    """Keyword arguments of ``check_conv`` for a random valid convolution."""
    groups = draw(st.integers(1, 2 if tiny else 3))
    c_in = groups * draw(st.integers(1, 2 if tiny else 3))
    if not tiny and groups == 1 and draw(st.integers(0, 3)) == 0:
        c_out = draw(st.integers(32, 36))  # numba's register-blocked kernels
    else:
        c_out = groups * draw(st.integers(1, 2 if tiny else 3))
    kh, kw = _pairs(draw, 1, 3 if tiny else 4)
    stride = _pairs(draw, 1, 3)
    dilation = _pairs(draw, 1, 2 if tiny else 3)
    eff = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    kind = draw(st.sampled_from(["int", "pair", "valid", "same"]))
    if kind == "same":
        stride = (1, 1)
        padding = "same"
        total = (eff[0] - 1, eff[1] - 1)
    elif kind == "valid":
        padding, total = "valid", (0, 0)
    elif kind == "int":
        padding = draw(st.integers(0, 3))
        total = (2 * padding, 2 * padding)
    else:
        padding = _pairs(draw, 0, 3)
        total = (2 * padding[0], 2 * padding[1])
    extra = 3 if tiny else 7
    h = max(1, eff[0] - total[0]) + draw(st.integers(0, extra))
    w = max(1, eff[1] - total[1]) + draw(st.integers(0, extra))
    n = draw(st.integers(1, 2 if tiny else 3))
    return dict(
        x_shape=(n, c_in, h, w), w_shape=(c_out, c_in // groups, kh, kw),
        bias=draw(st.booleans()), stride=stride, padding=padding, dilation=dilation,
        groups=groups, dtype=np.dtype(draw(st.sampled_from(FLOATS))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def pool_configs(draw, tiny: bool):
    """Keyword arguments of ``check_pool`` for a random valid max-pool."""
    k = _pairs(draw, 1, 3 if tiny else 4)
    stride = None if draw(st.booleans()) else _pairs(draw, 1, 3)
    padding = (draw(st.integers(0, k[0] // 2)), draw(st.integers(0, k[1] // 2)))
    dilation = _pairs(draw, 1, 2 if tiny else 3)
    eff = (dilation[0] * (k[0] - 1) + 1, dilation[1] * (k[1] - 1) + 1)
    extra = 3 if tiny else 8
    h = max(1, eff[0] - 2 * padding[0]) + draw(st.integers(0, extra))
    w = max(1, eff[1] - 2 * padding[1]) + draw(st.integers(0, extra))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 2 if tiny else 4))
    ceil_mode = draw(st.booleans())
    s = k if stride is None else stride
    # a window that sees only padding has no defined index (see test_pool_window_of_only_padding)
    axes = zip((h, w), k, s, padding, dilation)
    assume(not any(_padding_only_window(*axis, ceil_mode) for axis in axes))
    return dict(
        x_shape=(n, c, h, w), kernel_size=k, stride=stride, padding=padding, dilation=dilation,
        ceil_mode=ceil_mode, dtype=np.dtype(draw(st.sampled_from(FLOATS))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _padding_only_window(size, k, s, p, d, ceil_mode) -> bool:
    """Whether some pooling window along one axis has all its taps in the padding.

    Output size by PyTorch's formula (a ceil_mode window starting in the right padding is
    dropped)."""
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return any(all(not 0 <= o * s - p + d * t < size for t in range(k)) for o in range(out))


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_pool_window_of_only_padding_is_rejected(backend):
    """x 1x1, kernel (1, 2), padding (0, 1), dilation (1, 2): the one window's taps are at
    columns -1 and 1, both padding. PyTorch returns -inf with index 1 (outside the 1x1 plane,
    which its own backward then rejects); fastconv rejects the geometry up front, naming it."""
    import fastconv as fc

    x = np.ones((1, 1, 1, 1), np.float32)
    kw = dict(kernel_size=(1, 2), padding=(0, 1), dilation=(1, 2), backend=backend)
    with pytest.raises(ValueError, match=r"dilation=\(1, 2\).*entirely in the padding"):
        fc.max_pool2d(x, **kw)


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_valid_conv_configs_match_reference(backend):
    ran = []

    @FUZZ
    @given(conv_configs(tiny=backend in SLOW_BACKENDS))
    def run(cfg):
        cfg = dict(cfg)
        check_conv(backend, np.random.default_rng(cfg.pop("seed")), cfg.pop("x_shape"),
                   cfg.pop("w_shape"), **cfg)
        ran.append(1)

    run()
    _report(backend, "valid conv", len(ran))


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_valid_pool_configs_match_reference(backend):
    ran = []

    @FUZZ
    @given(pool_configs(tiny=backend in SLOW_BACKENDS))
    def run(cfg):
        cfg = dict(cfg)
        check_pool(backend, np.random.default_rng(cfg.pop("seed")), cfg.pop("x_shape"),
                   cfg.pop("kernel_size"), **cfg)
        ran.append(1)

    run()
    _report(backend, "valid pool", len(ran))


def _report(backend, what, count):
    """Print the number of examples run (the thorough profile's result table reads it) and
    check that the fuzzer did run."""
    print(f"[fuzz {PROFILE}] {backend}: {count} {what} configurations passed")
    assert count >= FUZZ.max_examples // 2, f"only {count} examples ran"


# ---------------------------------------------------------------- invalid configurations


def _spec(shape, dtype="float32", **extra):
    return {"shape": list(shape), "dtype": dtype, **extra}


def _base_conv(draw):
    groups = draw(st.integers(1, 2))
    cig, cog = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    k = draw(st.integers(1, 3))
    h, w = draw(st.integers(k, k + 4)), draw(st.integers(k, k + 4))
    n, dtype = draw(st.integers(1, 2)), draw(st.sampled_from(FLOATS))
    arrays = {"x": _spec((n, groups * cig, h, w), dtype),
              "w": _spec((groups * cog, cig, k, k), dtype),
              "b": _spec((groups * cog,), dtype),
              "dy": _spec((n, groups * cog, h - k + 1, w - k + 1), dtype)}
    return arrays, {"stride": 1, "padding": 0, "dilation": 1, "groups": groups}


BAD_INTS = [0, -1, -3, 1.5, True, "2", None, [1], [1, 2, 3], [0, 1], [1, -2]]
BAD_DTYPES = ["int32", "int64", "float16", "complex64", "bool", "uint8"]

CONV_MUTATIONS = [
    "x_ndim", "w_ndim", "x_dtype", "w_dtype", "mixed_dtype", "x_list", "x_none", "channels",
    "groups_not_dividing", "groups_bad", "stride_bad", "padding_bad", "dilation_bad",
    "kernel_too_big", "zero_channels", "zero_spatial", "bias_len", "bias_ndim", "bias_dtype",
    "dy_shape", "dy_dtype", "needs_bad", "unknown_backend", "same_with_stride",
]


@st.composite
def invalid_conv_configs(draw, backend: str):
    """A small valid convolution with one thing made invalid."""
    arrays, kw = _base_conv(draw)
    op = draw(st.sampled_from(["conv2d", "conv2d_backward"]))
    m = draw(st.sampled_from(CONV_MUTATIONS))
    x, w = arrays["x"], arrays["w"]
    if m in ("x_ndim", "w_ndim"):
        a = arrays[m[0]]
        a["shape"] = a["shape"][:-1] if draw(st.booleans()) else a["shape"] + [2]
    elif m in ("x_dtype", "w_dtype"):
        arrays[m[0]]["dtype"] = draw(st.sampled_from(BAD_DTYPES))
    elif m == "mixed_dtype":
        w["dtype"] = "float64" if x["dtype"] == "float32" else "float32"
    elif m == "x_list":
        x["as"] = "list"
    elif m == "x_none":
        x["as"] = "none"
    elif m == "channels":
        w["shape"][1] += draw(st.integers(1, 3))
    elif m == "groups_not_dividing":
        kw["groups"] = x["shape"][1] + draw(st.integers(1, 3))
    elif m in ("groups_bad", "stride_bad", "dilation_bad"):
        bad = [v for v in BAD_INTS if not (m == "groups_bad" and isinstance(v, list))]
        kw[m.split("_")[0]] = draw(st.sampled_from(bad))
    elif m == "padding_bad":
        kw["padding"] = draw(st.sampled_from([-1, "full", "SAME", [0, -1], 1.5, [1, 2, 3], None]))
    elif m == "kernel_too_big":
        k = x["shape"][2] + draw(st.integers(1, 3))
        w["shape"][2] = k
    elif m == "zero_channels":
        x["shape"][1] = 0
        w["shape"][1] = 0
    elif m == "zero_spatial":
        x["shape"][draw(st.sampled_from([2, 3]))] = 0
        kw["padding"] = draw(st.integers(0, 2))
    elif m == "bias_len":
        arrays["b"]["shape"][0] += draw(st.integers(1, 2))
        op = "conv2d"
    elif m == "bias_ndim":
        arrays["b"]["shape"] = arrays["b"]["shape"] + [1]
        op = "conv2d"
    elif m == "bias_dtype":
        arrays["b"]["dtype"] = draw(st.sampled_from(BAD_DTYPES + ["float64", "float32"]))
        if arrays["b"]["dtype"] == x["dtype"]:
            arrays["b"]["dtype"] = "int32"
        op = "conv2d"
    elif m in ("dy_shape", "dy_dtype", "needs_bad"):
        op = "conv2d_backward"
        if m == "dy_shape":
            arrays["dy"]["shape"][draw(st.integers(0, 3))] += draw(st.integers(1, 2))
        elif m == "dy_dtype":
            arrays["dy"]["dtype"] = draw(st.sampled_from(BAD_DTYPES))
        else:
            kw["needs"] = draw(st.sampled_from([["inputs"], 5, ["input", "grad"], [None]]))
    elif m == "unknown_backend":
        backend = draw(st.sampled_from(["numbaa", "torch", "", "CPU"]))
    elif m == "same_with_stride":
        kw["padding"] = "same"
        kw["stride"] = draw(st.sampled_from([2, 3, [1, 2]]))
    names = ["x", "w", "b"] if op == "conv2d" else ["dy", "x", "w"]
    return {"op": op, "backend": backend, "arrays": {k: arrays[k] for k in names},
            "kwargs": kw, "seed": draw(st.integers(0, 2**31)), "mutation": m}


POOL_MUTATIONS = [
    "x_ndim", "x_dtype", "x_list", "kernel_bad", "stride_bad", "padding_too_big",
    "padding_bad", "dilation_bad", "ceil_mode_bad", "too_small", "zero_spatial",
    "zero_channels", "idx_range", "idx_dtype", "idx_shape", "dy_dtype", "input_shape_len",
    "input_shape_nc", "input_shape_bad", "unknown_backend",
]


@st.composite
def invalid_pool_configs(draw, backend: str):
    """A small valid max-pool (forward or backward) with one thing made invalid."""
    k = draw(st.integers(1, 3))
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w = draw(st.integers(k, k + 5)), draw(st.integers(k, k + 5))
    dtype = draw(st.sampled_from(FLOATS))
    ho, wo = h // k, w // k
    x = _spec((n, c, h, w), dtype)
    dy = _spec((n, c, ho, wo), dtype)
    idx = _spec((n, c, ho, wo), "int64", idx_below=h * w)
    fwd = {"kernel_size": k, "stride": None, "padding": 0, "dilation": 1, "ceil_mode": False}
    bwd = {"input_shape": [n, c, h, w]}
    m = draw(st.sampled_from(POOL_MUTATIONS))
    op = "max_pool2d"
    if m == "x_ndim":
        x["shape"] = x["shape"][:-1] if draw(st.booleans()) else x["shape"] + [1]
    elif m == "x_dtype":
        x["dtype"] = draw(st.sampled_from(BAD_DTYPES))
    elif m == "x_list":
        x["as"] = "list"
    elif m in ("kernel_bad", "stride_bad", "dilation_bad"):
        key = {"kernel_bad": "kernel_size", "stride_bad": "stride", "dilation_bad": "dilation"}[m]
        bad = [v for v in BAD_INTS if not (key == "stride" and v is None)]
        fwd[key] = draw(st.sampled_from(bad))
    elif m == "padding_too_big":
        fwd["padding"] = k // 2 + draw(st.integers(1, 2))
    elif m == "padding_bad":
        fwd["padding"] = draw(st.sampled_from([-1, 1.5, "same", [0, -1], None]))
    elif m == "ceil_mode_bad":
        fwd["ceil_mode"] = draw(st.sampled_from([1, 0, "yes", None, 1.0]))
    elif m == "too_small":
        fwd["kernel_size"] = h + draw(st.integers(1, 3))
    elif m == "zero_spatial":
        x["shape"][draw(st.sampled_from([2, 3]))] = 0
        fwd["kernel_size"] = 2
        fwd["padding"] = draw(st.integers(0, 1))
        fwd["ceil_mode"] = draw(st.booleans())
    elif m == "zero_channels":
        x["shape"][1] = 0
    else:
        op = "max_pool2d_backward"
        if m == "idx_range":
            idx["idx_set"] = draw(st.sampled_from([-1, h * w, h * w + 7, -(2**40), 2**40]))
        elif m == "idx_dtype":
            idx["dtype"] = draw(st.sampled_from(["float32", "float64", "bool", "complex64"]))
        elif m == "idx_shape":
            idx["shape"][draw(st.integers(0, 3))] += 1
        elif m == "dy_dtype":
            dy["dtype"] = draw(st.sampled_from(BAD_DTYPES))
        elif m == "input_shape_len":
            bwd["input_shape"] = bwd["input_shape"][: draw(st.integers(0, 3))]
        elif m == "input_shape_nc":
            bwd["input_shape"][draw(st.integers(0, 1))] += 1
        elif m == "input_shape_bad":
            bwd["input_shape"][draw(st.integers(0, 3))] = draw(st.sampled_from([-1, 2.5, "4"]))
        else:  # unknown_backend
            backend = draw(st.sampled_from(["numbaa", "torch", "", "CPU"]))
    if op == "max_pool2d":
        return {"op": op, "backend": backend, "arrays": {"x": x}, "kwargs": fwd,
                "seed": draw(st.integers(0, 2**31)), "mutation": m}
    return {"op": op, "backend": backend, "arrays": {"dy": dy, "idx": idx}, "kwargs": bwd,
            "seed": draw(st.integers(0, 2**31)), "mutation": m}


def run_isolated(configs, backend_env=None) -> list:
    """Outcomes of ``configs`` run in ``fuzz_worker.py`` subprocesses.

    A worker that dies is restarted after the config it died on, which is reported as
    ``"crash"`` with the exit status. A hung worker fails the test (``TimeoutExpired``).
    """
    timeout = 120 + len(configs)  # imports and JIT compiles, then well under 1 s per call
    worker = os.path.join(os.path.dirname(__file__), "fuzz_worker.py")
    results = [None] * len(configs)
    start = 0
    while start < len(configs):
        todo = configs[start:]
        proc = subprocess.run(
            [sys.executable, worker], input="".join(json.dumps(c) + "\n" for c in todo),
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **(backend_env or {})},
        )
        last_started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if rec.get("start"):
                last_started = start + rec["i"]
            else:
                results[start + rec["i"]] = (rec["outcome"], rec["message"])
        if proc.returncode == 0 and last_started is not None and results[last_started]:
            break
        if last_started is None:  # died before the first config: a broken worker
            raise RuntimeError(f"fuzz worker failed to start: {proc.stderr[-3000:]}")
        if results[last_started] is None:
            results[last_started] = ("crash", f"worker exited {proc.returncode}: "
                                              f"{proc.stderr[-500:]}")
        start = last_started + 1
    return results


def _check_invalid(backend, strategy):
    configs = []

    @FUZZ
    @given(strategy(backend))
    def collect(cfg):
        configs.append(cfg)

    collect()
    if backend in ISOLATED:
        results = run_isolated(configs)
    else:
        results = [outcome(c) for c in configs]
    bad = [(c["mutation"], c["op"], r, c) for c, r in zip(configs, results)
           if r[0] not in ACCEPTED_ERRORS]
    print(f"[fuzz {PROFILE}] {backend}: {len(configs)} invalid {strategy.__name__} run, "
          f"{len(bad)} not rejected cleanly")
    assert len(configs) >= FUZZ.max_examples // 2, f"only {len(configs)} examples ran"
    assert not bad, "\n".join(
        f"{m} ({op}): got {r[0]} {r[1]!r}\n    config {json.dumps(c)}" for m, op, r, c in bad[:10]
    )


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_invalid_conv_configs_raise_clean_errors(backend):
    _check_invalid(backend, invalid_conv_configs)


@pytest.mark.parametrize("backend", TEST_BACKENDS)
def test_invalid_pool_configs_raise_clean_errors(backend):
    _check_invalid(backend, invalid_pool_configs)


def test_isolation_counts_a_crash():
    """The worker harness itself: a config that kills the process is reported as a crash and
    the configs after it still run."""
    ok = {"op": "max_pool2d", "backend": "numpy", "arrays": {"x": _spec((1, 1, 4, 4))},
          "kwargs": {"kernel_size": 2}}
    bad = dict(ok, kwargs={"kernel_size": 0})
    crash = dict(ok, op="__crash__")  # the worker sends itself SIGSEGV on this op
    results = run_isolated([ok, crash, bad], backend_env={"FASTCONV_FUZZ_CRASH_OP": "__crash__"})
    assert results[0] == ("ok", "")
    assert results[1][0] == "crash"
    assert results[2][0] == "ValueError"


@pytest.mark.parametrize("op", ["max_pool2d", "conv2d"])
def test_zero_size_spatial_input_is_rejected(op):
    """H or W of 0 is a bad shape (PyTorch rejects it) even when padding makes a window fit.

    Validation runs before any backend, so one backend covers all."""
    import fastconv as fc

    x = np.zeros((1, 2, 0, 5), np.float32)
    with pytest.raises(ValueError):
        if op == "max_pool2d":
            fc.max_pool2d(x, 2, padding=1, backend="numpy")
        else:
            fc.conv2d(x, np.ones((3, 2, 3, 3), np.float32), padding=2, backend="numpy")
