"""``fastconv info``: what this installation can run, and with what.

Prints the version, every backend with ``available`` or the reason it is not, the Numba version,
threading layer and thread count, whether the Cython extension was built with OpenMP, and the
CUDA device (or the simulator, or why there is none). Works without Numba installed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

import numpy as np


def _numba_lines(probe: bool) -> list:
    try:
        import numba
    except Exception as e:  # not installed, or raising at import (built for another NumPy)
        what = "not installed" if isinstance(e, ModuleNotFoundError) else "cannot be imported"
        return [f"numba: {what} ({e})", f"threads: os.cpu_count()={os.cpu_count()}"]
    configured = numba.config.THREADING_LAYER
    if probe:
        _probe_numba()
    try:
        in_use = numba.threading_layer()
    except ValueError:  # no parallel kernel has run in this process yet
        in_use = "not started in this process (run with --probe to start it)"
    return [
        f"numba: {numba.__version__}",
        f"  threading layer: configured {configured!r}, in use: {in_use}",
        f"  priority: {', '.join(numba.config.THREADING_LAYER_PRIORITY)}",
        f"  register blocks: {_register_blocks()}",
        f"  kernel cache: {_cache_line()}",
        f"threads: numba.get_num_threads()={numba.get_num_threads()}, "
        f"os.cpu_count()={os.cpu_count()}",
    ]


def _register_blocks() -> str:
    """Which family of register-blocked kernels the numba backend runs here, and why."""
    try:
        from ..backends.numba import _simd as simd
    except Exception as e:  # e.g. a bad FASTCONV_NUMBA_VECTORS: the backend would say so too
        return f"unknown ({e})"
    from numba.core.registry import cpu_target

    cpu = cpu_target.target_context.codegen().magic_tuple()[1]
    forced = os.environ.get("FASTCONV_NUMBA_VECTORS", "").strip()
    why = f"FASTCONV_NUMBA_VECTORS={forced}" if forced else (
        f"Numba compiles for {cpu}" + ("" if simd.WIDE_VECTORS else ", without AVX-512"))
    family = "AVX-512 blocks, LLVM-vectorized" if simd.WIDE_VECTORS else \
        "explicit 256-bit vectors"
    return f"{family} ({why})"


def _cache_line() -> str:
    """Whether Numba's cache holds this CPU's kernels (``fastconv warmup``), and where."""
    from .. import _coldstart

    try:
        where, nets = _coldstart.cache_dir(), _coldstart.warm_nets()
    except Exception as e:  # e.g. a numba whose cache machinery fails: never crash `info`
        return f"unknown ({e})"
    if where is None:
        return "none (Numba cannot write a cache here; set NUMBA_CACHE_DIR)"
    if nets:
        return f"warm for this CPU ({', '.join(sorted(nets))}) in {where}"
    return (f"cold in {where}: the first automatic use compiles in the background "
            "(`fastconv warmup` compiles now)")


def _probe_numba() -> None:
    """Run one tiny numba convolution so that Numba starts its threading layer."""
    import fastconv as fc

    if "numba" in fc.available_backends():
        x = np.ones((1, 1, 4, 4), np.float32)
        fc.conv2d(x, np.ones((1, 1, 2, 2), np.float32), backend="numba")


def _cython_line(status: dict) -> str:
    if status.get("cython") is not None:
        return "cython extension: not available"
    module = importlib.import_module("fastconv.backends.cython.executor")
    openmp = getattr(module, "OPENMP", None)
    built = {True: "yes", False: "no (serial build)", None: "unknown"}[openmp]
    forced = os.environ.get("FASTCONV_CYTHON_VARIANT")
    chosen = f"{forced} (FASTCONV_CYTHON_VARIANT)" if forced else "the best this CPU runs"
    return (f"cython extension: variant {module.VARIANT}, {chosen}; "
            f"built with OpenMP: {built}")


def _cuda_line(status: dict) -> str:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        state = "available" if status.get("cuda") is None else f"unavailable: {status['cuda']}"
        return f"cuda: simulator (NUMBA_ENABLE_CUDASIM=1), backend {state}"
    if status.get("cuda") is not None:
        return f"cuda: none ({status['cuda']})"
    try:
        from numba import cuda

        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else device.name
        return f"cuda: {name} (compute capability {'.'.join(map(str, device.compute_capability))})"
    except Exception as e:  # the backend said available; still never crash `info`
        return f"cuda: backend available but the device query failed: {e}"


def main(argv=None) -> int:
    """Print the report; return 0."""
    parser = argparse.ArgumentParser(prog="fastconv info", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--probe", action="store_true",
        help="run one tiny numba kernel first, so the threading layer in use can be reported",
    )
    args = parser.parse_args([] if argv is None else list(argv))

    import fastconv as fc

    status = fc.backend_status()
    lines = [
        f"fastconv {fc.__version__}",
        f"python {platform.python_version()} ({sys.executable}), numpy {np.__version__}",
        "backends:",
    ]
    width = max(map(len, status))
    for name, reason in status.items():
        lines.append(f"  {name:<{width}}  {'available' if reason is None else reason}")
    env = os.environ.get("FASTCONV_BACKEND")
    lines.append(f"FASTCONV_BACKEND: {env!r}" if env else "FASTCONV_BACKEND: not set (auto)")
    lines += _numba_lines(args.probe)
    lines.append(_cython_line(status))
    lines.append(_cuda_line(status))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
