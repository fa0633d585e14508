"""First-run timings of the MNIST net (DESIGN §9, docs/first-run.md): not a test, a script.

    python benchmarks/first_run.py [--steps-after 20] [--limit 300] [--json out.json]

Every case runs in a fresh interpreter with its own ``NUMBA_CACHE_DIR``, on random data
(batch 64, Adam, the net of ``fastconv.nn.mnist_cnn``), and reports:

* ``fastconv warmup`` (default nets) on an empty cache, then again on the warm one;
* the first training step (time from the call to its return, the interpreter already started
  and the model built) on a cold cache and on the warm one, for automatic selection, numba
  pinned and cython pinned;
* in the cold automatic process: when it switched to numba, and when a step first ran within
  1.2x of numba's warm step time (the median of the warm numba-pinned run's steps 5+).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_STEPS = r"""
import json, sys, time
t_start = time.perf_counter()
import numpy as np
import fastconv as fc
from fastconv import _coldstart, nn
backend = None if sys.argv[1] == "auto" else sys.argv[1]
steps, limit, target = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rng = np.random.default_rng(0)
model = nn.mnist_cnn(rng=rng, backend=backend)
opt, loss = nn.Adam(1e-3), nn.SoftmaxCrossEntropy()
x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
y = rng.integers(0, 10, 64)
t0 = time.perf_counter()
rows, after = [], None
while True:
    s = time.perf_counter()
    model.train_batch(x, y, opt, loss)
    e = time.perf_counter()
    rows.append((e - t0, e - s, fc.last_algorithm("conv2d").split(":")[0]))
    if rows[-1][2] == "numba" and (target <= 0 or rows[-1][1] <= 1.2 * target):
        after = len(rows) if after is None else after
    if (after is not None and len(rows) >= after + steps) or e - t0 > limit:
        break
    if after is None and backend is not None and len(rows) >= steps:
        break
print(json.dumps({"setup_s": t0 - t_start, "rows": rows, "state": _coldstart.state()}))
"""


def _env(cache) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTCONV_BACKEND", "FASTCONV_COLDSTART", "FASTCONV_WARMUP"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["NUMBA_CACHE_DIR"] = str(cache)
    return env


def _steps(backend, cache, steps, limit, target=0.0) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_STEPS), backend, str(steps), str(limit),
         str(target)], env=_env(cache), capture_output=True, text=True, timeout=limit + 300)
    if run.returncode:
        raise RuntimeError(run.stderr[-2000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def _warmup(cache) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastconv", "warmup", "--quiet"], env=_env(cache),
                   check=True, timeout=1200)
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps-after", type=int, default=20,
                   help="steps to run after the switch (and for the warm runs)")
    p.add_argument("--limit", type=float, default=300, help="seconds a cold auto run may take")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "machine": f"{platform.machine()} {_cpu_name()}, {os.cpu_count()} CPUs"}
    with tempfile.TemporaryDirectory() as tmp:
        warm = Path(tmp) / "warm"
        out["warmup_cold_s"] = _warmup(warm)
        out["warmup_warm_s"] = _warmup(warm)
        for backend in ("numba", "cython", "auto"):
            r = _steps(backend, warm, args.steps_after, args.limit)
            out[f"warm_{backend}"] = _summary(r)
        target = out["warm_numba"]["median_step_s"]
        for backend in ("cython", "auto", "numba"):
            r = _steps(backend, Path(tmp) / f"cold-{backend}", args.steps_after, args.limit,
                       target)
            out[f"cold_{backend}"] = _summary(r, target)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def _summary(r, target=0.0) -> dict:
    rows = r["rows"]
    s = {"setup_s": round(r["setup_s"], 2), "first_step_s": round(rows[0][1], 3),
         "steps": len(rows), "median_step_s": round(statistics.median(x[1] for x in rows[5:]
                                                                       or rows), 4),
         "final_state": r["state"]}
    ran = [x[2] for x in rows]
    if "numba" in ran and ran[0] != "numba":
        s["switched_at_s"] = round(rows[ran.index("numba")][0], 1)
    if target:
        fast = [x[0] for x in rows if x[2] == "numba" and x[1] <= 1.2 * target]
        s["numba_speed_at_s"] = round(fast[0], 1) if fast else None
    return s


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
