"""``fastconv bench``: every backend against the naive loops and PyTorch, as markdown tables, JSON
and a PNG chart.

    fastconv bench                                   # DESIGN §6 shapes A-G, P1-P3, all ops
    fastconv bench --shapes B,P1 --ops conv_fwd --threads 2 --repeat 7 --json b.json --plot b.png
    fastconv bench --scaling                         # time per image vs batch and image size

Timing environment. Large outputs page-fault afresh on every call unless glibc keeps freed
memory (``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296``);
``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` change which GEMM kernels OpenBLAS uses; and
OpenBLAS's worker threads busy-wait for up to 2**28 cycles (~0.1 s) after every call, so after
one NumPy-backend call (or the SGEMM peak measurement) every contender timed next ran at half
speed on 2 cores (docs/performance.md);
``OPENBLAS_THREAD_TIMEOUT=4`` makes them sleep at once. glibc and OpenBLAS read these when the
process starts, so the command re-executes itself (``os.execve``) with them set and unset
respectively, ``OMP_NUM_THREADS`` / ``OPENBLAS_NUM_THREADS`` /
``MKL_NUM_THREADS`` / ``NUMBA_NUM_THREADS`` set to ``--threads``, and ``FASTCONV_BENCH_CHILD=1``
marking the child. ``--no-reexec`` times in the current environment instead. The equivalent
manual command is::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE MALLOC_MMAP_THRESHOLD_=1073741824 \\
        MALLOC_TRIM_THRESHOLD_=4294967296 OPENBLAS_THREAD_TIMEOUT=4 OMP_NUM_THREADS=2 \\
        OPENBLAS_NUM_THREADS=2 FASTCONV_BENCH_CHILD=1 fastconv bench --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time

REEXEC_MARKER = "FASTCONV_BENCH_CHILD"
TIMING_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296",
              "OPENBLAS_THREAD_TIMEOUT": "4"}
UNSET_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
PLOT_HINT = "--plot needs matplotlib: pip install matplotlib (or fastconv[plot])"


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _int_list(text: str) -> list:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from . import bench as b

    p = argparse.ArgumentParser(
        prog="fastconv bench",
        description="Time conv2d / max_pool2d (forward, forward+backward) for every backend "
                    "against the naive loops and PyTorch, in one process.",
        epilog="The command re-executes itself with the timing environment set (see "
               "docs/performance.md).",
    )
    p.add_argument("--ops", default=",".join(b.OPS),
                   help=f"comma-separated ops (default: all of {','.join(b.OPS)})")
    p.add_argument("--shapes", default="all",
                   help="comma-separated DESIGN §6 shapes A..G,P1..P3, 'all' (default) or "
                        "'small' (tiny shapes, seconds)")
    p.add_argument("--backends", default="all",
                   help="comma-separated contenders: fastconv backends, 'naive' (the baseline, "
                        "on a slice scaled per MAC) and 'torch'; default all available")
    p.add_argument("--threads", type=_positive, default=None,
                   help="threads for numba, torch, OpenMP and BLAS (default: all usable CPUs)")
    p.add_argument("--repeat", type=_positive, default=5,
                   help="timed calls per contender, median reported (naive: at most 3)")
    p.add_argument("--json", metavar="PATH", help="write results and machine metadata as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    p.add_argument("--scaling", action="store_true",
                   help="run the scaling study (time per image vs batch and vs image size, "
                        "numba/cython/torch) instead of the per-shape tables")
    p.add_argument("--scaling-batches", type=_int_list, default=list(b.SCALING_BATCHES),
                   help="batch sizes of the scaling study (default 1,8,64,256)")
    p.add_argument("--scaling-images", type=_int_list, default=list(b.SCALING_IMAGES),
                   help="image sizes of the scaling study (default 28,56,112)")
    p.add_argument("--naive-work", type=_positive, default=b.NAIVE_WORK,
                   help="multiply-adds (pool: window elements) of the slice the naive loops run "
                        f"on (default {b.NAIVE_WORK})")
    p.add_argument("--sgemm-size", type=_positive, default=2048,
                   help="matrix size of the SGEMM peak measurement (default 2048)")
    p.add_argument("--no-reexec", action="store_true",
                   help="time in the current environment instead of re-executing with the "
                        "malloc/OpenBLAS settings")
    return p


def _resolve_contenders(parser, spec: str) -> list:
    import fastconv as fc

    from . import bench as b
    from .._dispatch import BACKEND_MODULES

    if spec == "all":
        return b.default_contenders()
    available = b.default_contenders()
    if "cuda" in fc.available_backends() and "cuda" not in available:
        available.append("cuda")  # by name even under the simulator
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for n in names:
        if n not in BACKEND_MODULES and n != "torch":
            parser.error(f"unknown backend {n!r}; known: {', '.join([*BACKEND_MODULES, 'torch'])}")
        if n not in available:
            reason = fc.backend_status().get(n) or "torch is not installed"
            parser.error(f"backend {n!r} is not available here ({reason}); available: "
                         f"{', '.join(available)}")
    return list(dict.fromkeys(names))


def child_env(threads: int, base=None) -> dict:
    """The environment the timing process runs in (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    for k in UNSET_ENV:
        env.pop(k, None)
    env.update(TIMING_ENV)
    for k in THREAD_ENV:
        env[k] = str(threads)
    env[REEXEC_MARKER] = "1"
    return env


def _reexec(argv: list, threads: int) -> int:
    cmd = [sys.executable, "-m", "fastconv", "bench", *argv]
    env = child_env(threads)
    sys.stdout.flush()
    sys.stderr.flush()
    if os.name == "posix":
        os.execve(sys.executable, cmd, env)  # does not return
    return subprocess.call(cmd, env=env)


def _log(msg: str):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list) -> int:
    """Run ``fastconv bench`` with ``argv`` (without the ``bench`` word); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from . import bench as b

    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in b.OPS]
    if bad or not ops:
        parser.error(f"unknown op(s) {bad or args.ops!r}; expected some of {','.join(b.OPS)}")
    try:
        shapes = b.select_shapes(args.shapes)
    except ValueError as e:
        parser.error(str(e))
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(f"fastconv bench: error: {PLOT_HINT}", file=sys.stderr)
        return 2
    names = _resolve_contenders(parser, args.backends)
    threads = args.threads or _default_threads()

    if not args.no_reexec and os.environ.get(REEXEC_MARKER) != "1":
        return _reexec(list(argv), threads)
    return _run(args, ops, shapes, names, threads, argv)


def _run(args, ops, shapes, names, threads, argv) -> int:
    from . import bench as b

    if args.threads or os.environ.get(REEXEC_MARKER) == "1":
        b.set_threads(threads)  # not in an in-process --no-reexec call without --threads
    for path in (args.json, args.plot):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    command = "fastconv bench " + shlex.join(argv)
    _log("measuring the SGEMM peak")
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    peak_start = b.sgemm_peak(args.sgemm_size, repeat=args.repeat)
    record = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "requested_threads": threads, "naive_work": args.naive_work}
    print("# fastconv bench\n")
    naive = ("" if args.scaling else f" (naive loops and calls slower than {b.SLOW_CALL_S:g} s: "
             f"of {min(args.repeat, 3)}; the naive loops run on a slice, scaled per MAC)")
    print(f"`{command}` · float32 · median of {args.repeat} interleaved calls{naive} · "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")

    results, scaling, groups, failures = [], [], {}, []
    if args.scaling:
        contenders = [n for n in names if n in b.SCALING_BACKENDS] or names
        scaling = b.run_scaling(ops, contenders, args.repeat, args.scaling_batches,
                                args.scaling_images, log=_log, failures=failures)
    else:
        for op in ops:
            for shape in [s for s in shapes if op in b.ops_for(s)]:
                group = b.run_group(op, shape, names, args.repeat, args.naive_work, log=_log,
                                    failures=failures)
                groups[(op, shape.name)] = (shape, group)
                results.extend(group)

    _log("measuring the SGEMM peak again")
    peak_end = b.sgemm_peak(args.sgemm_size, repeat=args.repeat)
    peak = max(peak_start, peak_end, key=lambda p: p["gflops"])
    info = b.machine_info()
    # Tables come after both peak measurements: "% SGEMM peak" uses the better of the two.
    if args.scaling:
        print("## Scaling\n")
        print(b.scaling_tables(scaling) + "\n")
    for op in ops:
        op_groups = [g for (o, _), g in groups.items() if o == op]
        if op_groups:
            print(f"## {b.OP_TITLES[op]}\n")
        for shape, group in op_groups:
            print(f"### {b.group_title(op, shape)}\n")
            print(b.markdown_table(group, peak["gflops"]) + "\n")
    if failures:
        print("## Failures (left out of the tables above)\n")
        for op, shape, name, message in failures:
            print(f"- {name} {op} {shape}: {message}")
        print()
    print("## Machine\n")
    print(b.machine_line(info, peak))
    print(f"- SGEMM peak at start {peak_start['gflops']:.0f}, at end {peak_end['gflops']:.0f} "
          "GFLOP/s; '% SGEMM peak' uses the better one. The machine may be shared: compare "
          "ratios within one run, not absolute times across runs.")
    if load_start is not None:
        print(f"- load average (1 min) at start {load_start[0]:.1f}, at end "
              f"{info['load_average'][0]:.1f} on {info['affinity_cpus']} CPUs (other processes "
              "competing for the cores)")
    sys.stdout.flush()
    if args.json:
        record.update(load_average_start=load_start, machine=info,
                      peak={"start": peak_start, "end": peak_end, "used": peak["gflops"]},
                      results=[r.as_dict(groups[(r.op, r.shape)][1], peak["gflops"])
                               for r in results],
                      scaling=scaling, failures=[dict(zip(("op", "shape", "contender",
                                                          "error"), f)) for f in failures])
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        _log(f"wrote {args.json}")
    if args.plot:
        title = f"{info['cpu']}, {threads} threads, float32 — {command}"
        if args.scaling:
            b.plot_scaling(scaling, args.plot, title)
        else:
            b.plot(results, peak["gflops"], args.plot, title)
        _log(f"wrote {args.plot}")
    return 1 if failures else 0
