"""Classify a large image collection with Dask: the MNIST test set tiled lazily to a million.

    python examples/predict_dask.py fastconv_mnist.ckpt                  # threads, this process
    python examples/predict_dask.py fastconv_mnist.ckpt --workers 2      # LocalCluster, 2 processes
    python examples/predict_dask.py fastconv_mnist.ckpt --scheduler tcp://host:8786   # a cluster

The collection is never materialised: a dask array of ``--images`` images (the 10,000 test images
repeated) in chunks of ``--chunk``; ``model.predict`` on it is lazy (one task per chunk, the
model shipped to each worker once), and only the per-class counts and the number of correct
labels come back. Without a model file an untrained net is used (accuracy near 10 %). Prints the
accuracy, images/s and the peak resident memory of this process and of each worker.
Needs ``pip install "fastconv[dask]"``.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import time

import numpy as np


def _peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@functools.lru_cache(maxsize=2)
def _test_set(data_dir):
    from fastconv.datasets import load_mnist

    return load_mnist(data_dir, download=False)[1]


def _tile(data_dir, which, block_info=None):
    """Images (``which=0``) or labels (1) ``start:stop`` of the test set repeated endlessly."""
    start, stop = block_info[None]["array-location"][0]
    data = _test_set(data_dir)[which]
    return data[np.arange(start, stop) % len(data)]


def _kernel_threads(args) -> int:
    """Numba threads per worker thread: the cores shared out, so workers do not oversubscribe."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // (args.workers * args.threads_per_worker))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="model file saved by fastconv train (--save)")
    p.add_argument("--images", type=int, default=1_000_000, help="(default: %(default)s)")
    p.add_argument("--chunk", type=int, default=10_000,
                   help="images per task (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=500,
                   help="images per forward pass inside a task (default: %(default)s)")
    p.add_argument("--workers", type=int, default=0,
                   help="start a LocalCluster of this many worker processes on 127.0.0.1 "
                        "(default 0: Dask's threaded scheduler in this process)")
    p.add_argument("--threads-per-worker", type=int, default=1, help="(default: %(default)s)")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="connect to a running dask.distributed scheduler instead")
    p.add_argument("--backend", default=None, help="fastconv backend (default: auto)")
    p.add_argument("--data-dir", default=None, help="MNIST directory (default: as load_mnist)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("images", "chunk", "batch_size", "threads_per_worker"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    try:
        import dask
        import dask.array as da
    except ImportError as e:
        print(f'predict_dask: error: {e}; install with: pip install "fastconv[dask]"',
              file=sys.stderr)
        return 2
    from fastconv import nn
    from fastconv.datasets import load_mnist, normalize

    try:
        load_mnist(args.data_dir)  # here first: a clear error (or the download) before any task
        model = (nn.Sequential.load(args.model, backend=args.backend) if args.model
                 else nn.mnist_cnn(rng=0, backend=args.backend))
    except (OSError, ValueError) as e:  # missing files, DatasetError, CheckpointError
        print(f"predict_dask: error: {e}", file=sys.stderr)
        return 2
    # Each task reads the test set where it runs (once per worker) and tiles its own slice: the
    # graph holds a directory name, not images.
    chunks = (tuple(min(args.chunk, args.images - s) for s in range(0, args.images, args.chunk)),)
    images = da.map_blocks(_tile, args.data_dir, 0, dtype=np.uint8, chunks=chunks + ((28,), (28,)),
                           name="mnist-test-tiled", meta=np.empty((0, 0, 0), np.uint8))
    labels = da.map_blocks(_tile, args.data_dir, 1, dtype=np.int64, chunks=chunks,
                           name="mnist-test-labels", meta=np.empty((0,), np.int64))

    logits = model.predict(images, batch_size=args.batch_size, transform=normalize)
    predicted = logits.argmax(axis=1)
    per_class = da.bincount(predicted, minlength=10)
    correct = (predicted == labels).sum()

    client = cluster = None
    if args.scheduler or args.workers:
        from distributed import Client, LocalCluster, progress

        if args.scheduler:
            client = Client(args.scheduler)
        else:
            cluster = LocalCluster(
                n_workers=args.workers, threads_per_worker=args.threads_per_worker,
                processes=True, host="127.0.0.1", dashboard_address=None,
                scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # no fixed port 8787
                env={"NUMBA_NUM_THREADS": str(_kernel_threads(args))})
            client = Client(cluster)
    try:
        t0 = time.perf_counter()
        if client is not None:
            futures = client.compute([per_class, correct])
            if not args.no_progress:
                progress(futures)
                print()
            counts, n_correct = client.gather(futures)
        else:
            from dask.diagnostics import ProgressBar

            with ProgressBar() if not args.no_progress else _Null():
                counts, n_correct = dask.compute(per_class, correct)
        dt = time.perf_counter() - t0
        print(f"{args.images:,} images in {len(images.chunks[0])} chunks: accuracy "
              f"{100 * n_correct / args.images:.2f} %, {dt:.1f} s, "
              f"{args.images / dt:,.0f} images/s")
        print("predicted per class:", " ".join(str(int(c)) for c in counts))
        line = f"peak RSS: this process {_peak_rss_mib():.0f} MiB"
        if client is not None:
            worker_rss = client.run(_peak_rss_mib)
            line += ", workers " + ", ".join(f"{v:.0f}" for v in worker_rss.values()) + " MiB"
        print(line)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return 0


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    sys.exit(main())
