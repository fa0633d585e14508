"""fastconv.torch benchmarks: converted torch models, bridge overhead, coexistence.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/torch_bridge.py

1. Training step (SGD, batch 64, 1x28x28) of PyTorch's examples/mnist net and of LeNet-5 as torch
   models: stock, converted (every conv and pool layer) and pools only, in one process with
   ``--threads`` threads (torch and numba), in interleaved rounds; medians and ratios to stock.
2. Bridge overhead: ``fastconv.torch.conv2d`` / ``max_pool2d`` on a tiny shape against the raw
   ``fastconv.conv2d`` / ``max_pool2d`` on NumPy arrays (and ``torch.nn.functional``'s), per call.
3. Coexistence, each in its own process, repeated in alternation: a ``fastconv.nn`` LeNet-5
   training step and the MNIST net's one-image predict without torch, with ``import torch``
   first (as fixed), with torch first and Numba's pool bound to torch's libgomp (the behaviour
   before the fix, reproduced by importing Numba's ``omppool`` before fastconv), and with
   fastconv's first call before ``import torch``; plus the stock torch LeNet-5 step in those
   processes and alone.

Prints markdown tables (and ``--json PATH`` writes the figures). Not a pytest file.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

BATCH = 64


# --------------------------------------------------------------------------- models


def mnist_net(nn):
    """PyTorch's examples/mnist ``Net`` as a Sequential (log-softmax output, NLL loss)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, 10), nn.LogSoftmax(dim=1),
    )


def lenet5(nn):
    """LeNet-5 with ReLU and max-pool, as ``fastconv.nn.lenet5``."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(400, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10), nn.LogSoftmax(dim=1),
    )


def pools_only(model):
    import fastconv.torch as ft

    model = copy.deepcopy(model)
    for i, m in enumerate(model):
        if type(m).__name__ == "MaxPool2d":
            model[i] = ft.convert(m)
    return model


def _rounds(fns: dict, rounds: int, reps: int) -> dict:
    """Median seconds per call of each fn, the fns interleaved round by round."""
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            f = fns[k]
            t = time.perf_counter()
            for _ in range(reps):
                f()
            times[k].append((time.perf_counter() - t) / reps)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- 1. training


def training(args) -> dict:
    import torch

    import fastconv.torch as ft

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (BATCH,), generator=g)
    out = {}
    for name, make in (("mnist", mnist_net), ("lenet5", lenet5)):
        stock = make(torch.nn)
        variants = {"stock": stock, "converted": ft.convert(copy.deepcopy(stock)),
                    "pools only": pools_only(stock)}
        steps = {}
        for label, model in variants.items():
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                torch.nn.functional.nll_loss(model(x), y).backward()
                opt.step()
            for _ in range(3):
                step()
            steps[label] = step
        med = _rounds(steps, args.rounds, args.steps)
        out[name] = {k: 1e3 * v for k, v in med.items()}
    return out


# --------------------------------------------------------------------------- 2. overhead


def overhead(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import fastconv as fc
    import fastconv.torch as ft

    xn = np.random.default_rng(0).standard_normal((1, 1, 6, 6)).astype(np.float32)
    wn = np.random.default_rng(1).standard_normal((1, 1, 3, 3)).astype(np.float32)
    tx, tw = torch.from_numpy(xn), torch.from_numpy(wn)
    twg = tw.clone().requires_grad_(True)

    def bridge_conv_nograd():
        with torch.no_grad():
            ft.conv2d(tx, tw)

    def bridge_pool_nograd():
        with torch.no_grad():
            ft.max_pool2d(tx, 2)

    fns = {
        "conv2d raw fastconv": lambda: fc.conv2d(xn, wn),
        "conv2d bridge": lambda: ft.conv2d(tx, tw),
        "conv2d bridge no_grad": bridge_conv_nograd,
        "conv2d bridge, weight requires grad": lambda: ft.conv2d(tx, twg),
        "conv2d torch": lambda: F.conv2d(tx, tw),
        "max_pool2d raw fastconv": lambda: fc.max_pool2d(xn, 2),
        "max_pool2d bridge": lambda: ft.max_pool2d(tx, 2),
        "max_pool2d bridge no_grad": bridge_pool_nograd,
        "max_pool2d torch": lambda: F.max_pool2d(tx, 2),
    }
    for f in fns.values():
        for _ in range(50):
            f()
    return {k: 1e6 * v for k, v in _rounds(fns, args.rounds, 2000).items()}


# --------------------------------------------------------------------------- 3. coexistence

COEXIST_MODES = ("no torch", "torch only", "torch first", "torch first, before the fix",
                 "fastconv first")


def coexist_child(mode: str, threads: int, reps: int) -> dict:
    """One process of the coexistence comparison; returns median ms per call."""
    _numba_threads(threads)
    if mode.startswith("torch"):
        import torch  # noqa: F401
    if mode == "torch first, before the fix":
        import numba.np.ufunc.omppool  # noqa: F401  (plain binding: resolves to torch's libgomp)
    import numpy as np

    fns = {}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, BATCH)
    if mode != "torch only":
        from fastconv import nn

        model, opt = nn.lenet5(rng=0), nn.SGD(0.01, momentum=0.9)
        predictor = nn.mnist_cnn(rng=0)
        fns["fastconv.nn LeNet-5 step"] = lambda: model.train_batch(x, y, opt)
        fns["fastconv.nn MNIST predict 1 image"] = lambda: predictor.predict(x[:1])
        for f in fns.values():
            f()
    if mode != "no torch":
        import torch

        torch.set_num_threads(threads)
        tm = lenet5(torch.nn)
        topt = torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.9)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)

        def torch_step():
            topt.zero_grad(set_to_none=True)
            torch.nn.functional.nll_loss(tm(tx), ty).backward()
            topt.step()
        fns["torch LeNet-5 step"] = torch_step
        for _ in range(3):
            torch_step()
    return {k: 1e3 * v for k, v in _rounds(fns, 15, reps).items()}


def coexistence(args) -> dict:
    results = {m: [] for m in COEXIST_MODES}
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER", "FASTCONV_BACKEND")}
    for _ in range(args.coexist_rounds):
        for mode in COEXIST_MODES:
            proc = subprocess.run(
                [sys.executable, __file__, "--coexist-child", mode, "--threads",
                 str(args.threads)], env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"coexistence child {mode!r} failed:\n{proc.stderr[-3000:]}")
            results[mode].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {m: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            for m, runs in results.items()}


# --------------------------------------------------------------------------- report


def _numba_threads(threads: int) -> None:
    # Through the environment, read when Numba starts its pool at fastconv's first parallel
    # call: numba.set_num_threads() here would start the pool before fastconv chose how.
    os.environ["NUMBA_NUM_THREADS"] = str(threads)


def machine() -> dict:
    import numba
    import torch

    cpu = platform.processor()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(ln.split(":", 1) for ln in out.splitlines() if ":" in ln)
        cpu = (f"{fields.get('Model name', '?').strip()} family "
               f"{fields.get('CPU family', '?').strip()} model {fields.get('Model', '?').strip()}"
               f", {os.cpu_count()} CPUs, avx512f: {'avx512f' in fields.get('Flags', '')}")
    except OSError:
        pass
    return {"date": datetime.date.today().isoformat(), "cpu": cpu, "torch": torch.__version__,
            "numba": numba.__version__, "python": platform.python_version()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15, help="interleaved rounds (parts 1, 2)")
    ap.add_argument("--steps", type=int, default=5, help="training steps per round")
    ap.add_argument("--coexist-rounds", type=int, default=3, help="processes per mode")
    ap.add_argument("--only", choices=("training", "overhead", "coexistence"))
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--coexist-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.coexist_child:
        print(json.dumps(coexist_child(args.coexist_child, args.threads, 5)))
        return
    _numba_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    report = {"machine": machine(), "threads": args.threads}
    print(f"# fastconv.torch bridge, {report['machine']}, {args.threads} threads\n")
    if args.only in (None, "training"):
        report["training"] = tr = training(args)
        print("| net | stock ms/step | converted ms | converted/stock | pools only ms | "
              "pools only/stock |\n|---|---|---|---|---|---|")
        for net, t in tr.items():
            print(f"| {net} | {t['stock']:.2f} | {t['converted']:.2f} | "
                  f"{t['converted'] / t['stock']:.2f} | {t['pools only']:.2f} | "
                  f"{t['pools only'] / t['stock']:.2f} |")
        print()
    if args.only in (None, "overhead"):
        report["overhead_us"] = ov = overhead(args)
        print("| call (tiny shape) | µs/call | over raw fastconv |\n|---|---|---|")
        for k, v in ov.items():
            raw = ov[k.split()[0] + " raw fastconv"]
            print(f"| {k} | {v:.1f} | {v - raw:+.1f} |")
        print()
    if args.only in (None, "coexistence"):
        report["coexistence_ms"] = co = coexistence(args)
        keys = ["fastconv.nn LeNet-5 step", "fastconv.nn MNIST predict 1 image",
                "torch LeNet-5 step"]
        base = co["no torch"]
        print("| process | " + " | ".join(keys) + " |\n|---|---|---|---|")
        for mode, r in co.items():
            cells = []
            for k in keys:
                if k not in r:
                    cells.append("-")
                    continue
                ref = base.get(k, co["torch only"].get(k))
                cells.append(f"{r[k]:.2f} ms ({r[k] / ref:.2f}x)")
            print(f"| {mode} | " + " | ".join(cells) + " |")
        print("\n(x: ratio to the process without torch; for the torch step, to torch alone)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
