"""Training throughput: fastconv against PyTorch CPU on the same nets and recipe, in one run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE MALLOC_MMAP_THRESHOLD_=1073741824 \\
        MALLOC_TRIM_THRESHOLD_=4294967296 OPENBLAS_THREAD_TIMEOUT=4 python benchmarks/train_vs_torch.py

For each net (PyTorch's examples/mnist CNN and LeNet-5): the same initial weights, Adam
(lr 1e-3), batch 64 of real MNIST images normalized per batch, softmax cross-entropy, dropout
in training mode. Each framework trains ``--batches`` batches per round after a warm-up (JIT
compiles, allocator); rounds alternate fastconv / PyTorch ``--rounds`` times and the median
images/s of each is reported with their ratio. PyTorch runs in a child process driven round by
round (see :class:`TorchProcess`; ``--torch-process same`` keeps it in this one). Both use
``--threads`` threads (2 by default: ``numba.set_num_threads`` and ``torch.set_num_threads``).
``--profile`` adds a per-stage breakdown of one fastconv batch (the stages of
``Sequential.train_batch``: a layer, or element-wise layers fused with a neighbour);
``--memory`` the peak memory (ru_maxrss) of a fresh process per framework training
``--memory-batches`` batches. Not a pytest file (pytest collects test_*.py / bench_*.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

import fastconv as fc
from fastconv import nn
from fastconv.datasets import normalize


def torch_twin(model):
    """The same layers in torch.nn with the fastconv weights copied in (PyTorch layouts)."""
    import torch
    from torch import nn as tnn

    layers = []
    for layer in model:
        c = layer.get_config()
        if isinstance(layer, nn.Conv2D):
            layers.append(tnn.Conv2d(c["in_channels"], c["out_channels"], c["kernel_size"],
                                     c["stride"], c.get("padding", 0)))
        elif isinstance(layer, nn.Dense):
            layers.append(tnn.Linear(c["in_features"], c["out_features"]))
        elif isinstance(layer, nn.MaxPool2D):
            layers.append(tnn.MaxPool2d(c["kernel_size"], c["stride"]))
        elif isinstance(layer, nn.Dropout):
            layers.append(tnn.Dropout(c["p"]))
        elif isinstance(layer, nn.ReLU):
            layers.append(tnn.ReLU())
        else:
            layers.append(tnn.Flatten())
    twin = tnn.Sequential(*layers)
    twin.load_state_dict({k: torch.from_numpy(v.copy())
                          for k, v in model.named_parameters().items()})
    return twin


def load_images(n, rng):
    try:
        (x, y), _ = fc.datasets.load_mnist(download=False, progress=False)
        return x[:n], y[:n]
    except (FileNotFoundError, ValueError):
        # stderr: stdout is the reply channel of the torch process (see TorchProcess)
        print("(real MNIST not found: random images)", file=sys.stderr)
        return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def fastconv_runner(model, x, y, bs):
    opt, loss = nn.Adam(1e-3), nn.SoftmaxCrossEntropy()

    def run(batches, start):
        for b in range(start, start + batches):
            s = slice((b * bs) % len(x), (b * bs) % len(x) + bs)
            model.train_batch(normalize(x[s]), y[s], opt, loss)
    return run


def torch_runner(twin, x, y, bs):
    import torch

    opt = torch.optim.Adam(twin.parameters(), 1e-3)
    yt = torch.from_numpy(np.asarray(y, np.int64))
    twin.train()

    def run(batches, start):
        for b in range(start, start + batches):
            s = slice((b * bs) % len(x), (b * bs) % len(x) + bs)
            opt.zero_grad(set_to_none=True)
            out = twin(torch.from_numpy(normalize(x[s])))
            torch.nn.functional.cross_entropy(out, yt[s]).backward()
            opt.step()
    return run


def profile_layers(model, x, y, reps=5):
    """Median ms of each stage's forward and backward on one batch, as ``train_batch`` runs
    them (a stage is one layer, or element-wise layers fused with a neighbour: see
    ``fastconv.nn._step``)."""
    from fastconv.nn import _step

    xb = normalize(x)
    stages = _step.plan(model.layers)
    fwd = {i: [] for i in range(len(stages))}
    bwd = {i: [] for i in range(len(stages))}
    loss = nn.SoftmaxCrossEntropy()
    for _ in range(reps):
        a, owned = xb, False
        for i, stage in enumerate(stages):
            t = time.perf_counter()
            a = stage.forward(a, owned)
            fwd[i].append(time.perf_counter() - t)
            owned = stage.owns_output
        loss.forward(a, y)
        g, owned = loss.backward(), False
        for i in range(len(stages) - 1, -1, -1):
            t = time.perf_counter()
            new = _step.backward_one(stages[i], g, stages[i].first > 0, owned)
            bwd[i].append(time.perf_counter() - t)
            owned = owned or not np.may_share_memory(new, g)
            g = new
    print(f"  {'stage (layers)':58s} {'fwd ms':>8s} {'bwd ms':>8s}")
    for i, stage in enumerate(stages):
        print(f"  {stage.describe():58s} {1e3 * statistics.median(fwd[i]):8.2f} "
              f"{1e3 * statistics.median(bwd[i]):8.2f}")


class TorchProcess:
    """PyTorch in its own process, driven round by round over a pipe.

    Each framework then runs with its own OpenMP runtime settings: in one process, torch would
    share Numba's GNU OpenMP library and its ``OMP_WAIT_POLICY=PASSIVE``, which on this loaded
    2-core machine slowed torch's many small parallel regions by up to 100x (measured).
    """

    def __init__(self, args):
        import subprocess

        cmd = [sys.executable, __file__, "--serve-torch", "--batch-size", str(args.batch_size),
               "--threads", str(args.threads), "--batches", str(args.batches),
               "--warmup", str(args.warmup)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)

    def call(self, *words) -> str:
        self.proc.stdin.write(" ".join(map(str, words)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the torch process died")
        if line.strip() != "ok":  # a stray line would shift every later reply by one round
            raise RuntimeError(f"unexpected reply from the torch process: {line.strip()!r}")
        return line.strip()

    def runner(self, name):
        self.call("init", name)

        def run(batches, start):
            self.call("run", name, batches, start)
        return run

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def serve_torch(args):
    """The child side of :class:`TorchProcess` (never loads a fastconv backend)."""

    import torch

    torch.set_num_threads(args.threads)
    bs = args.batch_size
    x, y = load_images(bs * (args.batches + args.warmup), np.random.default_rng(0))
    runners = {}
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "init":
            model = nn.ARCHITECTURES[cmd[1]](rng=np.random.default_rng(1))
            runners[cmd[1]] = torch_runner(torch_twin(model), x, y, bs)
            print("ok", flush=True)
        elif cmd[0] == "run":
            runners[cmd[1]](int(cmd[2]), int(cmd[3]))
            print("ok", flush=True)


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def serve_memory(args):
    """``--serve-memory FRAMEWORK``: in this fresh process, train ``--batches`` batches of the
    model(s) with FRAMEWORK alone (the other is never imported) and print one line per model:
    ``name peak_MiB before_MiB`` (ru_maxrss after the batches, and after the model, data and
    runtime were set up, before the first batch)."""
    bs = args.batch_size
    x, y = load_images(bs * args.batches, np.random.default_rng(0))
    if args.serve_memory == "torch":
        import torch

        torch.set_num_threads(args.threads)
    else:
        backend = args.backend or fc._dispatch.current_backend_name()
        fc._dispatch.get_backend(backend)
        if backend == "numba":
            import numba

            numba.set_num_threads(args.threads)
        if args.blas_threads:
            from fastconv._cli.blas import limit_blas_threads

            limit_blas_threads(args.blas_threads)
    for name in args.models.split(","):
        model = nn.ARCHITECTURES[name](rng=np.random.default_rng(1))
        if args.serve_memory == "torch":
            run = torch_runner(torch_twin(model), x, y, bs)
        else:
            model.set_backend(backend)
            run = fastconv_runner(model, x, y, bs)
        before = _maxrss_mib()
        run(args.batches, 0)
        print(f"{name} {_maxrss_mib():.1f} {before:.1f}", flush=True)


def peak_memory(args) -> dict:
    """{(framework, model): (peak MiB, MiB before the first batch)}, each in its own fresh
    process (see :func:`serve_memory`)."""
    import subprocess

    out = {}
    for model in args.models.split(","):
        for fw in ("fastconv", "torch"):
            cmd = [sys.executable, __file__, "--serve-memory", fw, "--models", model,
                   "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                   "--batches", str(args.memory_batches), "--blas-threads",
                   str(args.blas_threads)]
            if args.backend:
                cmd += ["--backend", args.backend]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            name, peak, before = line.split()
            out[fw, name] = (float(peak), float(before))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mnist,lenet5")
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default=None)
    p.add_argument("--profile", action="store_true",
                   help="per-layer forward/backward times of one fastconv batch")
    p.add_argument("--torch-process", choices=["separate", "same"], default="separate",
                   help="run PyTorch in its own process (default) or in this one")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OpenBLAS threads for fastconv's dense layers, as fastconv train "
                        "(default: %(default)s; 0 = leave as is)")
    p.add_argument("--memory", action="store_true",
                   help="peak memory (ru_maxrss) of a fresh process per framework and model "
                        "that trains --memory-batches batches")
    p.add_argument("--memory-batches", type=int, default=100)
    p.add_argument("--serve-torch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serve-memory", choices=["fastconv", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_torch:
        return serve_torch(args)
    if args.serve_memory:
        return serve_memory(args)
    memory = peak_memory(args) if args.memory else None

    backend = args.backend or fc._dispatch.current_backend_name()
    # Load the backend (and its threading policy) before torch can load an OpenMP runtime.
    fc._dispatch.get_backend(backend)
    if backend == "numba":
        import numba

        numba.set_num_threads(args.threads)
    if args.blas_threads:
        from fastconv._cli.blas import limit_blas_threads

        limit_blas_threads(args.blas_threads)
    torch_proc = TorchProcess(args) if args.torch_process == "separate" else None
    import torch

    torch.set_num_threads(args.threads)
    bs = args.batch_size
    x, y = load_images(bs * (args.batches + args.warmup), np.random.default_rng(0))
    print(f"fastconv backend {backend}, torch {torch.__version__} ({args.torch_process} "
          f"process), {args.threads} threads, batch {bs}, {args.batches} batches x "
          f"{args.rounds} rounds after {args.warmup} warm-up batches, fastconv OpenBLAS threads "
          f"{args.blas_threads or 'default'}")
    rows = []
    for name in args.models.split(","):
        model = nn.ARCHITECTURES[name](rng=np.random.default_rng(1), backend=backend)
        runners = {"fastconv": fastconv_runner(model, x, y, bs),
                   "torch": (torch_proc.runner(name) if torch_proc else
                             torch_runner(torch_twin(model), x, y, bs))}
        for run in runners.values():
            run(args.warmup, 0)
        speed = {k: [] for k in runners}
        for _ in range(args.rounds):
            for key, run in runners.items():
                t = time.perf_counter()
                run(args.batches, args.warmup)
                speed[key].append(args.batches * bs / (time.perf_counter() - t))
        algos = ", ".join(f"{op}={fc.last_algorithm(op)}" for op in
                          ("conv2d", "conv2d_backward", "max_pool2d", "max_pool2d_backward"))
        f, t = statistics.median(speed["fastconv"]), statistics.median(speed["torch"])
        rows.append((name, f, t, f / t))
        print(f"\n{name}: fastconv {f:.0f} images/s, torch {t:.0f} images/s, ratio {f / t:.2f}"
              f"\n  rounds fastconv {[round(v) for v in speed['fastconv']]}, "
              f"torch {[round(v) for v in speed['torch']]}\n  algorithms: {algos}")
        if args.profile:
            profile_layers(model, x[:bs], y[:bs])
    if torch_proc:
        torch_proc.close()
    print("\n| net | fastconv images/s | PyTorch images/s | ratio |\n| --- | ---: | ---: | ---: |")
    for name, f, t, r in rows:
        print(f"| {name} | {f:.0f} | {t:.0f} | {r:.2f} |")
    if memory:
        print(f"\nPeak memory (ru_maxrss, MiB) of a fresh process training {args.memory_batches} "
              f"batches (in parentheses: the growth from before the first batch)\n\n| net | fastconv | PyTorch |\n| --- | ---: | ---: |")
        for name in args.models.split(","):
            (fp, fb), (tp, tb) = memory["fastconv", name], memory["torch", name]
            print(f"| {name} | {fp:.0f} (+{fp - fb:.0f}) | {tp:.0f} (+{tp - tb:.0f}) |")
    return rows


if __name__ == "__main__":
    main()
