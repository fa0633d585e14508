"""``fastconv warmup``: compile the numba kernels for this CPU ahead of time.

Runs the kernels the bundled nets need (a training step at batch 64 and the last partial batch,
inference at batch 256 and its remainder, in float32) on the numba backend, so that Numba
writes them to its on-disk cache, then writes the marker that tells automatic selection the
cache is warm (``fastconv._coldstart``). A later process loads the kernels instead of compiling
them. ``--all`` adds every algorithm family of the benchmark shapes and the pools, in float32
and float64. For Docker images and clusters: run it once at build time, with the same
``NUMBA_CACHE_DIR`` (if any) as at run time.

``--background`` is how ``fastconv._coldstart`` starts it: low priority, no output, exits when
its parent process dies, and waits for (then skips work done by) a concurrent warmup.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

NETS = ("mnist", "lenet5")
# (N, C_in, H, W, C_out, k, stride, pad) of DESIGN §6, with a small batch: which kernel runs
# depends on the geometry, not on N, and compiling is what takes the time here.
_SHAPES = {
    "A": (2, 1, 28, 28, 32, 3, 1, 0), "B": (2, 32, 26, 26, 64, 3, 1, 0),
    "C": (2, 1, 28, 28, 6, 5, 1, 2), "D": (2, 6, 14, 14, 16, 5, 1, 0),
    "E": (2, 64, 20, 20, 64, 3, 1, 1), "F": (2, 64, 20, 20, 128, 3, 2, 1),
    "G": (2, 256, 14, 14, 64, 1, 1, 0),
}
_EXTRA_CONVS = {  # the generic kernels: groups, dilation, few-channel strided layers
    "groups": (2, 8, 12, 12, 8, 3, 1, 1, dict(groups=4)),
    "dilation": (2, 4, 12, 12, 8, 3, 1, 2, dict(dilation=2)),
    "strided": (2, 3, 12, 12, 4, 3, 2, 1, {}),
}
_POOLS = {"P1": ((2, 32, 26, 26), 2, 2, 0), "P2": ((2, 64, 24, 24), 2, 2, 0),
          "P3": ((2, 8, 30, 30), 3, 2, 1)}


def _net_tasks(name: str) -> list:
    """(label, callable) pairs that compile what training and evaluating net ``name`` needs:
    one per layer's forward and backward (the progress bar moves as kernels compile), then the
    optimizer, the last partial batch and inference."""
    from . import nn

    rng = np.random.default_rng(0)
    model = nn.ARCHITECTURES[name](rng=rng, backend="numba")
    layers = model.layers
    state = {"a": rng.standard_normal((64, 1, 28, 28)).astype(np.float32)}
    labels = rng.integers(0, 10, 64)
    optimizer, loss = nn.Adam(1e-3, backend="numba"), nn.SoftmaxCrossEntropy()

    def forward(layer):
        def run():
            state["a"] = layer.forward(state["a"], training=True)
        return run

    def backward(i):
        def run():
            if i == len(layers) - 1:
                loss.forward(state["a"], labels)
                state["g"] = loss.backward()
            state["g"] = layers[i].backward(state["g"], input_grad=i > 0)
        return run

    def finish():
        optimizer.step(model.named_parameters(), model.named_grads())
        x = rng.standard_normal((32, 1, 28, 28)).astype(np.float32)
        model.train_batch(x, labels[:32], optimizer, loss)

    def infer():
        model.predict(rng.standard_normal((272, 1, 28, 28)).astype(np.float32))
        model.predict(rng.standard_normal((1, 1, 28, 28)).astype(np.float32))  # small work

    out = [(f"{name}: {type(layer).__name__} {i} forward", forward(layer))
           for i, layer in enumerate(layers)]
    out += [(f"{name}: {type(layers[i]).__name__} {i} backward", backward(i))
            for i in range(len(layers) - 1, -1, -1)]
    return out + [(f"{name}: Adam step, batch 32", finish),
                  (f"{name}: inference, batch 256, 16 and 1", infer)]


def _tiny_task():
    """A tiny conv and max-pool (float32): the serial builds small work runs (``_serial``)."""
    def run():
        import fastconv as fc

        x = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
        for c_out in (1, 4, 6, 8):
            w = np.ones((c_out, 1, 3, 3), np.float32)
            fc.conv2d(x, w, backend="numba")
            fc.conv2d(x, w, padding=1, backend="numba")
        fc.max_pool2d(x, 2, backend="numba")
    return "small work: tiny conv and max-pool", run


def _conv_task(label, shape, dtype, extra=None):
    def run():
        import fastconv as fc

        n, c_in, h, w, c_out, k, stride, pad = shape
        groups = (extra or {}).get("groups", 1)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
        wt = rng.standard_normal((c_out, c_in // groups, k, k)).astype(dtype)
        y = fc.conv2d(x, wt, wt[:, 0, 0, 0].copy(), stride, pad, backend="numba", **(extra or {}))
        fc.conv2d_backward(np.ones_like(y), x, wt, stride, pad, backend="numba", **(extra or {}))
    return f"conv {label} {np.dtype(dtype).name}", run


def _pool_task(label, spec, dtype):
    def run():
        import fastconv as fc

        shape, k, s, pad = spec
        x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
        y, idx = fc.max_pool2d(x, k, s, pad, backend="numba")
        fc.max_pool2d_backward(np.ones_like(y), idx, shape, backend="numba")
    return f"max-pool {label} {np.dtype(dtype).name}", run


def tasks(nets, everything: bool = False) -> list:
    """The compile tasks for ``nets`` (and every kernel family with ``everything``)."""
    out = [t for name in nets for t in _net_tasks(name)] + [_tiny_task()]
    if everything:
        for dtype in (np.float32, np.float64):
            out += [_conv_task(k, s, dtype) for k, s in _SHAPES.items()]
            out += [_conv_task(k, s[:8], dtype, s[8]) for k, s in _EXTRA_CONVS.items()]
            out += [_pool_task(k, s, dtype) for k, s in _POOLS.items()]
    return out


def compile_stats() -> tuple:
    """(cache hits, cache misses = compilations) over every numba dispatcher fastconv loaded."""
    from numba.core.dispatcher import Dispatcher

    hits = misses = 0
    seen = set()
    for mod_name, module in list(sys.modules.items()):
        if not mod_name.startswith("fastconv.") or module is None:
            continue
        values = list(vars(module).values())
        values += list(getattr(module, "_builds", {}).values())  # ``_serial``'s builds
        for value in values:
            if isinstance(value, Dispatcher) and id(value) not in seen:
                seen.add(id(value))
                hits += sum(value.stats.cache_hits.values())
                misses += sum(value.stats.cache_misses.values())
    return hits, misses


def _watch_parent(parent: int) -> None:
    """Exit as soon as the process that started this one is gone (no orphan compiles on)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)
    threading.Thread(target=watch, daemon=True, name="fastconv-warmup-parent").start()


def _locked(directory: str, quiet: bool):
    """An exclusive lock on the cache directory's warmup lock file (None where no flock):
    a second warmup waits for the first, then finds its kernels in the cache."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent warmups compile twice, harmlessly
        return None
    path = os.path.join(directory, "fastconv-warmup.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not quiet:
            print(f"fastconv warmup: waiting for another warmup to finish ({path})",
                  file=sys.stderr, flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _write_marker(path: Path, key: dict, nets, seconds: float) -> None:
    from . import _coldstart

    record = {"key": key, "nets": sorted(set(nets) | _coldstart.warm_nets()),
              "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "seconds": round(seconds, 1)}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # atomic: a reader sees the old marker or the whole new one


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastconv warmup", description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group()
    which.add_argument("--nets", default=",".join(NETS),
                       help="comma-separated nets to compile for (default: %(default)s)")
    which.add_argument("--all", action="store_true",
                       help="the nets and every kernel family, float32 and float64")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--background", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    nets = list(NETS) if args.all else [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in nets if n not in NETS]
    if unknown or not nets:
        print(f"fastconv warmup: error: --nets must name some of {', '.join(NETS)}, got "
              f"{args.nets!r}", file=sys.stderr)
        return 2
    if args.background:
        os.environ["FASTCONV_WARMUP_CHILD"] = "1"
        parent = os.environ.get("FASTCONV_WARMUP_PARENT")
        if parent:
            _watch_parent(int(parent))
        try:
            os.nice(10)
        except (AttributeError, OSError):
            pass
    from . import _coldstart, _dispatch

    reason = _dispatch._load("numba")[1]  # numba alone: no other backend (CUDA) probed
    if reason is not None:
        print(f"fastconv warmup: error: the numba backend is not available: {reason}",
              file=sys.stderr)
        return 1
    directory = _coldstart.cache_dir()
    if directory is None:
        print("fastconv warmup: error: Numba cannot write a cache here (set NUMBA_CACHE_DIR to a "
              "writable directory); compiled kernels would not outlive this process",
              file=sys.stderr)
        return 1
    lock = _locked(directory, args.quiet)
    try:
        if args.background and set(nets) <= _coldstart.warm_nets():
            return 0  # a concurrent process compiled them while this one waited
        key = _coldstart.cache_key()
        todo = tasks(nets, args.all)
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        bar = tqdm(todo, desc="fastconv warmup", unit="task", disable=args.quiet,
                   dynamic_ncols=True)
        for label, run in bar:
            bar.set_postfix_str(label, refresh=True)
            run()
        bar.close()
        seconds = time.perf_counter() - t0
        _write_marker(_coldstart.marker_path(key, directory), key, nets, seconds)
    finally:
        if lock is not None:
            os.close(lock)
    if not args.quiet:
        hits, misses = compile_stats()
        print(f"fastconv warmup: {misses} kernels compiled, {hits} loaded from the cache, in "
              f"{seconds:.1f} s for {key['cpu']} (Numba {key['numba']}); cache: {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
