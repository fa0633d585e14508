"""Small work: per-call cost of fastconv against PyTorch on tiny inputs (issue 18).

Not a pytest file. One process, fastconv and PyTorch interleaved call by call, medians over
repeats; ``torch.set_num_threads`` equals numba's thread count. Prints a markdown table of µs
per call and the ratio fastconv / torch for:

* tiny conv: ``fastconv.conv2d`` of a (1, 1, 8, 8) float32 input with four 3x3 filters (no bias)
  against ``torch.nn.functional.conv2d``;
* tiny max_pool: ``fastconv.max_pool2d`` 2x2 of the same input against
  ``torch.nn.functional.max_pool2d(..., return_indices=True)`` (fastconv always returns them);
* ``predict`` of ``fastconv.nn.mnist_cnn`` (the net of examples/train_mnist.py) and of
  ``fastconv.nn.lenet5`` on 1 and 8 images, against the same net in ``torch.nn`` with the same
  weights under ``torch.inference_mode``.

Run (timings under the machine's benchmark lock)::

    flock /tmp/fastconv-bench.lock python benchmarks/small_work.py --repeat 15

``--separate`` times torch in a process of its own (see ``_setup`` for why), ``--threads 1``
compares one thread with one thread, ``--only`` picks cases by substring, ``--profile CASE``
prints a cProfile of the fastconv side of one case instead. OpenBLAS (NumPy's matmul in the
dense layers) runs on one thread, as in ``fastconv train`` (``--blas-threads``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastconv as fc  # noqa: E402
from fastconv import nn  # noqa: E402


def _setup(threads, torch_first):
    """Import torch and load numba's backend, threads equal.

    fastconv sets ``OMP_WAIT_POLICY=PASSIVE`` for numba's OpenMP pool when it loads; a torch
    imported after that reads it too (its own tiny calls are then slower: the woken thread
    sleeps). Imported first, torch keeps libgomp's spinning policy, and its spinning threads
    then fight numba's (and other processes) for 2 cores: timings of both sides swing by 10-100x.
    So by default fastconv loads first (both pools passive), and ``--separate`` times torch in a
    process of its own (its default policy, nothing else running) for the fairest torch figure.
    """
    if torch_first:
        import torch  # noqa: F401
    fc.conv2d(np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 1, 3, 3), np.float32))
    import numba

    if threads:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    import torch

    torch.set_num_threads(numba.get_num_threads())
    return torch


def cases(torch):
    """{name: (fastconv callable, torch callable, check)}: each callable runs one call."""
    import torch.nn.functional as F
    from train_vs_torch import torch_twin

    rng = np.random.default_rng(0)
    x8 = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
    w4 = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    tx8, tw4 = torch.from_numpy(x8), torch.from_numpy(w4)
    out = {
        "tiny conv (1,1,8,8) * (4,1,3,3)": (
            lambda: fc.conv2d(x8, w4), lambda: F.conv2d(tx8, tw4),
            lambda a, b: np.testing.assert_allclose(a, b.numpy(), rtol=1e-5, atol=1e-5)),
        "tiny max_pool (1,1,8,8) k2": (
            lambda: fc.max_pool2d(x8, 2), lambda: F.max_pool2d(tx8, 2, return_indices=True),
            lambda a, b: np.testing.assert_array_equal(a[1], b[1].numpy())),
    }
    for name, build in (("MNIST", nn.mnist_cnn), ("LeNet-5", nn.lenet5)):
        model = build(rng=1)
        twin = torch_twin(model).eval()
        for n in (1, 8):
            x = rng.standard_normal((n, 1, 28, 28)).astype(np.float32)
            tx = torch.from_numpy(x)

            def tcall(twin=twin, tx=tx):
                with torch.inference_mode():
                    return twin(tx)

            out[f"{name} predict {n}"] = (
                lambda model=model, x=x: model.predict(x), tcall,
                lambda a, b: np.testing.assert_allclose(a, b.numpy(), rtol=1e-3, atol=1e-4))
    return out


_CLOCK = time.perf_counter


def _time(fn, inner):
    t0 = _CLOCK()
    for _ in range(inner):
        fn()
    return (_CLOCK() - t0) / inner


def measure(table, repeat, budget, sides=(0, 1)):
    """Median µs per call of each side (0: fastconv, 1: torch; NaN for a side not run),
    interleaved: every repeat times each case's fastconv then its torch call, ``inner`` calls
    each (sized so one sample takes about ``budget`` s)."""
    results = {}
    for name, (fcall, tcall, check) in table.items():
        calls = (fcall, tcall)
        if len(sides) == 2:
            check(fcall(), tcall())
        for _ in range(3):
            for side in sides:
                calls[side]()
        once = max(_time(calls[side], 3) for side in sides)
        results[name] = (max(1, int(budget / once)), [], [])
    for _ in range(repeat):
        for name, calls in table.items():
            inner, *samples = results[name]
            for side in sides:
                samples[side].append(_time(calls[side], inner))
    return {name: tuple(statistics.median(v) * 1e6 if v else float("nan") for v in (fs, ts))
            for name, (_inner, fs, ts) in results.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--budget", type=float, default=0.004, help="seconds per timing sample")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", default=None, help="cProfile the fastconv side of this case")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OpenBLAS threads for fastconv's dense layers, as fastconv train and "
                        "benchmarks/train_vs_torch.py (default: %(default)s; 0 = leave as is)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="'thread': CPU time of the calling thread (time.thread_time), immune to "
                        "other processes on a loaded machine; meaningful with --threads 1 only")
    p.add_argument("--torch-first", action="store_true",
                   help="import torch before fastconv loads (see _setup)")
    p.add_argument("--separate", action="store_true",
                   help="time torch in a process of its own (see _setup)")
    p.add_argument("--side", choices=["torch"], help=argparse.SUPPRESS)
    p.add_argument("--only", default=None, help="comma-separated substrings of case names")
    args = p.parse_args(argv)
    global _CLOCK
    if args.clock == "thread":
        if args.threads != 1:
            p.error("--clock thread needs --threads 1 (other threads' work would not count)")
        _CLOCK = time.thread_time
    if args.blas_threads:
        from fastconv._cli.blas import limit_blas_threads

        limit_blas_threads(args.blas_threads)
    torch = _setup(args.threads, args.torch_first or args.side == "torch")
    table = cases(torch)
    if args.only:
        keys = args.only.split(",")
        table = {k: v for k, v in table.items() if any(s in k for s in keys)}
    if args.profile:
        fcall = next(v[0] for k, v in table.items() if args.profile in k)
        for _ in range(100):
            fcall()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            fcall()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return 0
    import numba

    if args.side == "torch":
        res = measure(table, args.repeat, args.budget, sides=(1,))
        print(json.dumps({k: v[1] for k, v in res.items()}))
        return 0
    res = measure(table, args.repeat, args.budget, sides=(0,) if args.separate else (0, 1))
    if args.separate:
        cmd = [sys.executable, os.path.abspath(__file__), "--side", "torch", "--repeat",
               str(args.repeat), "--budget", str(args.budget), "--threads", str(args.threads),
               "--blas-threads", str(args.blas_threads), "--clock", args.clock]
        cmd += ["--only", args.only] if args.only else []
        torch_us = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                             text=True).stdout.splitlines()[-1])
        res = {k: (f, torch_us[k]) for k, (f, _t) in res.items()}
    where = "torch in its own process" if args.separate else (
        "one process, " + ("torch first" if args.torch_first else "fastconv loaded first"))
    print(f"numba {numba.__version__}, torch {torch.__version__}, "
          f"{numba.get_num_threads()} threads, layer {numba.threading_layer()}, "
          f"vectors {os.environ.get('FASTCONV_NUMBA_VECTORS', 'native')}, "
          f"OpenBLAS threads {args.blas_threads or 'default'}, {args.clock} clock, "
          f"median of {args.repeat}, {where}")
    print()
    print("| case | fastconv µs | torch µs | fastconv / torch |")
    print("|---|---|---|---|")
    for name, (f, t) in res.items():
        print(f"| {name} | {f:,.1f} | {t:,.1f} | {f / t:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
