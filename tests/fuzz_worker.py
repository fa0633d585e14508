"""Crash-isolated execution of fuzzed kernel calls (used by tests/test_fuzz.py).

A *config* is a JSON-able dict describing one public call::

    {"op": "conv2d" | "conv2d_backward" | "max_pool2d" | "max_pool2d_backward",
     "backend": "numba",
     "arrays": {"x": SPEC, "w": SPEC, ...},     # the array arguments, by name
     "kwargs": {"stride": [1, 2], ...},          # the other arguments, passed as given
     "seed": 123}

and an array SPEC is ``{"shape": [...], "dtype": "float32"}`` with optional ``"as": "list"``
(pass a nested list instead of an array), ``"as": "none"``, ``"order": "F"`` (a non-contiguous
view) or, for pool indices, ``"idx_below": n`` (random indices in ``[0, n)``) and
``"idx_set": v`` (then set the first one to ``v``).

Run as a script, it reads one config per line on stdin and, for each, writes
``{"i": i, "start": true}`` *before* the call and ``{"i": i, "outcome": ...}`` after it, flushing
both: when the process dies (a segfault, an abort), the parent knows which config did it.
Outcomes: ``"ok"``, or the exception's class name (``"ValueError"``, ``"TypeError"``, ...)
with its message.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np

OPS = ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward")


def make_array(spec, rng):
    """The argument described by ``spec`` (see the module docstring)."""
    if spec is None or spec.get("as") == "none":
        return None
    shape = tuple(spec["shape"])
    dtype = np.dtype(spec.get("dtype", "float32"))
    if "idx_below" in spec:
        a = rng.integers(0, max(1, spec["idx_below"]), size=shape).astype(dtype)
        if "idx_set" in spec and a.size:
            a.flat[0] = spec["idx_set"]
    elif dtype.kind == "c":
        a = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    elif dtype.kind in "iub":
        a = rng.integers(0, 3, size=shape).astype(dtype)
    else:
        a = rng.standard_normal(shape).astype(dtype)
    if spec.get("order") == "F":
        a = np.asfortranarray(a)
    if spec.get("as") == "list":
        return a.tolist()
    return a


def call(config):
    """Make the arrays of ``config`` and run its op; returns the result."""
    import fastconv as fc

    rng = np.random.default_rng(config.get("seed", 0))
    arrays = {name: make_array(spec, rng) for name, spec in config["arrays"].items()}
    kw = dict(config.get("kwargs", {}))
    kw["backend"] = config["backend"]
    op = config["op"]
    if op == os.environ.get("FASTCONV_FUZZ_CRASH_OP"):  # tests of the harness: die as a segfault
        os.kill(os.getpid(), signal.SIGSEGV)
    if op == "conv2d":
        return fc.conv2d(arrays["x"], arrays["w"], arrays.get("b"), **kw)
    if op == "conv2d_backward":
        return fc.conv2d_backward(arrays["dy"], arrays["x"], arrays["w"], **kw)
    if op == "max_pool2d":
        return fc.max_pool2d(arrays["x"], **kw)
    if op == "max_pool2d_backward":
        return fc.max_pool2d_backward(arrays["dy"], arrays["idx"], **kw)
    raise KeyError(f"unknown op {op!r}")


def outcome(config) -> tuple:
    """(outcome, message): ``"ok"`` or the name of the exception the call raised."""
    try:
        call(config)
    except Exception as e:  # the caller decides which exceptions are acceptable
        return type(e).__name__, str(e)[:300]
    return "ok", ""


def main() -> int:
    for i, line in enumerate(sys.stdin):
        config = json.loads(line)
        print(json.dumps({"i": i, "start": True}), flush=True)
        name, message = outcome(config)
        print(json.dumps({"i": i, "outcome": name, "message": message}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
