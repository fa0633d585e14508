"""First run (DESIGN §9, fastconv/_coldstart.py, fastconv/_warmup.py), each case in a fresh
interpreter with its own empty ``NUMBA_CACHE_DIR``:

* a numba that raises at import is passed over by automatic selection with one warning, is
  missing from ``available_backends()``, and its reason is shown everywhere;
* on an empty cache, training starts on cython while a background process compiles the numba
  kernels, then switches to numba by itself, with results that match a pinned run;
* a failing background compile keeps training on cython, with one message;
* after ``fastconv warmup`` a fresh process compiles nothing;
* the background child does not outlive a killed parent.

The compiling cases use LeNet-5 (``FASTCONV_WARMUP_NETS=lenet5``), the net with the fewest
kernels.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import fastconv as fc

REPO = Path(__file__).resolve().parents[1]
NUMBA_OK = fc.backend_status()["numba"] is None
CYTHON_OK = fc.backend_status()["cython"] is None
pytestmark = pytest.mark.skipif(
    not CYTHON_OK, reason=f"cython backend unavailable here: {fc.backend_status()['cython']}")
needs_numba = pytest.mark.skipif(not NUMBA_OK, reason="numba is not installed here")
COMPILING = "compiling the numba kernels"
FAILED = "background compile of the numba kernels failed"


def _env(tmp_path, *front, **extra) -> dict:
    """This environment with cold start on, a fresh cache and ``front`` first on sys.path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTCONV_BACKEND", "FASTCONV_COLDSTART", "FASTCONV_WARMUP"))}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, front), str(REPO)])
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba-cache")
    env.update(extra)
    return env


def _python(code, env, timeout=300, args=()):
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


# ----------------------------------------------------------------------------- broken numba

_BROKEN = r"""
import json, warnings
import numpy as np
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastconv as fc
    from fastconv import nn
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = fc.conv2d(x, w)
    algorithm = fc.last_algorithm("conv2d")
    fc.max_pool2d(x, 2)
    model = nn.lenet5(rng=0)
    loss = model.train_batch(rng.standard_normal((8, 1, 28, 28)).astype(np.float32),
                             rng.integers(0, 10, 8), nn.Adam(), nn.SoftmaxCrossEntropy())
try:
    fc.conv2d(x, w, backend="numba")
    explicit = None
except fc.BackendUnavailableError as e:
    explicit = str(e)
print(json.dumps({
    "available": fc.available_backends(), "status": fc.backend_status(),
    "algorithm": algorithm, "explicit": explicit, "loss": loss,
    "error": float(abs(y - fc.conv2d(x, w, backend="numpy")).max()),
    "warnings": [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)],
}))
"""
NUMPY_TOO_NEW = "Numba needs NumPy 2.3 or less; got NumPy 2.4."


def test_numba_raising_at_import_falls_back_to_cython(tmp_path):
    stub = tmp_path / "stub"
    (stub / "numba").mkdir(parents=True)
    (stub / "numba" / "__init__.py").write_text(f"raise ImportError({NUMPY_TOO_NEW!r})\n")
    env = _env(tmp_path, stub)
    out, _ = _python(_BROKEN, env)
    assert "numba" not in out["available"] and "cython" in out["available"]
    assert NUMPY_TOO_NEW in out["status"]["numba"]
    assert out["algorithm"].startswith("cython:")
    assert out["error"] < 1e-4
    assert math.isfinite(out["loss"]) and out["loss"] > 0  # Adam fell back to NumPy
    assert out["explicit"] is not None and NUMPY_TOO_NEW in out["explicit"]
    mentioning = [m for m in out["warnings"] if NUMPY_TOO_NEW in m]
    assert len(mentioning) == 1, out["warnings"]

    info = subprocess.run([sys.executable, "-m", "fastconv", "info"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    numba_row = next(ln for ln in info.stdout.splitlines() if ln.strip().startswith("numba "))
    assert NUMPY_TOO_NEW in numba_row, info.stdout


def test_bad_warmup_nets_variable_is_a_clear_error(monkeypatch):
    from fastconv import _coldstart

    monkeypatch.setattr(_coldstart, "_state", "unknown")
    monkeypatch.setenv("FASTCONV_WARMUP_NETS", "resnet")
    monkeypatch.delenv("FASTCONV_BACKEND", raising=False)
    import numpy as np

    with pytest.raises(ValueError, match="FASTCONV_WARMUP_NETS.*'resnet'"):
        _coldstart.numba_ready()
    x = np.ones((1, 1, 4, 4), np.float32)
    assert fc.conv2d(x, x, backend="numpy").shape == (1, 1, 1, 1)  # explicit: unaffected


def test_warmup_cli_rejects_unknown_nets():
    run = subprocess.run([sys.executable, "-m", "fastconv", "warmup", "--nets", "resnet"],
                         capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert run.returncode == 2
    assert "--nets must name some of mnist, lenet5, got 'resnet'" in run.stderr


# ------------------------------------------------------------------------- the switch-over

# Trains LeNet-5 on automatic selection until numba took over (plus 3 steps). Before every step
# the NumPy reference backend computes the loss and gradients from the same parameters: each
# step's results, before and after the switch, must match it within float32 rounding. (Whole
# trajectories cannot be compared: Adam turns rounding differences in near-zero gradients into
# lr-sized steps.) Prints what ran at each step and the largest relative differences.
_TRAIN = r"""
import json, sys, time
import numpy as np
import fastconv as fc
from fastconv import _coldstart, _warmup, nn

LIMIT, CHECK = float(sys.argv[1]), sys.argv[2] == "check"
data = np.random.default_rng(1)
X = data.standard_normal((8 * 32, 1, 28, 28)).astype(np.float32)
Y = data.integers(0, 10, len(X))
model = nn.lenet5(rng=0)
ref = nn.lenet5(rng=0, backend="numpy")
opt, loss, ref_loss = nn.Adam(1e-3), nn.SoftmaxCrossEntropy(), nn.SoftmaxCrossEntropy()


def relative(a, b):
    return float(abs(a - b).max() / max(abs(b).max(), 1e-12))


ran, states, loss_err, grad_err = [], [], 0.0, 0.0
deadline = time.monotonic() + LIMIT
while True:
    i = len(ran) % 8
    xb, yb = X[i * 32:(i + 1) * 32], Y[i * 32:(i + 1) * 32]
    if CHECK:
        ref.load_state_dict(model.named_parameters())
        expected = ref_loss.forward(ref.forward(xb), yb)
        ref.backward(ref_loss.backward())
    value = model.train_batch(xb, yb, opt, loss)
    ran.append(fc.last_algorithm("conv2d_backward").split(":")[0])
    states.append(_coldstart.state())
    if CHECK:
        loss_err = max(loss_err, abs(value - expected) / expected)
        got = model.named_grads()
        grad_err = max(grad_err, *(relative(got[k], g) for k, g in ref.named_grads().items()))
    if ran[-3:] == ["numba"] * 3 or time.monotonic() > deadline:
        break
    if states[-1] == "pending":
        time.sleep(0.3)  # few steps while the child compiles
    elif states[-1] == "failed" and len(ran) > states.index("failed") + 3:
        break
hits, misses = _warmup.compile_stats()
print(json.dumps({"ran": ran, "states": states, "misses": misses, "hits": hits,
                  "loss_error": loss_err, "grad_error": grad_err}))
"""


def _lines(stderr, text):
    return [ln for ln in stderr.splitlines() if text in ln]


@needs_numba
@pytest.mark.slow  # compiles LeNet-5's kernels once (~15-40 s)
def test_cold_cache_trains_on_cython_then_switches_to_numba(tmp_path):
    env = _env(tmp_path, FASTCONV_WARMUP_NETS="lenet5")
    out, err = _python(_TRAIN, env, timeout=600, args=("420", "check"))
    ran = out["ran"]
    assert ran[0] == "cython" and ran[-1] == "numba", ran
    switch = ran.index("numba")
    assert set(ran[:switch]) == {"cython"} and set(ran[switch:]) == {"numba"}, ran
    assert out["states"][switch] == "warm" and "pending" in out["states"][:switch]
    announced = _lines(err, COMPILING)
    assert len(announced) == 1, err
    assert "once per machine" in announced[0] and env["NUMBA_CACHE_DIR"] in announced[0]
    assert not _lines(err, FAILED), err
    # The process loaded the kernels the child compiled instead of compiling them itself.
    assert out["misses"] == 0 and out["hits"] > 0, out
    assert out["loss_error"] < 1e-5 and out["grad_error"] < 1e-4, out


@needs_numba
def test_failed_background_compile_stays_on_cython_with_one_message(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if os.environ.get('FASTCONV_WARMUP_CHILD'):  # the background compile: fail it\n"
        "    sys.stderr.write('simulated compile failure\\n')\n"
        "    sys.stderr.flush()\n"
        "    os._exit(5)\n"
    )
    env = _env(tmp_path, site, FASTCONV_WARMUP_NETS="lenet5")
    out, err = _python(_TRAIN, env, timeout=300, args=("60", "check"))
    assert set(out["ran"]) == {"cython"}, out["ran"]
    assert out["states"][-1] == "failed", out["states"]
    assert len(_lines(err, COMPILING)) == 1, err
    failed = _lines(err, FAILED)
    assert len(failed) == 1, err
    assert "simulated compile failure" in failed[0] and "exit status 5" in failed[0]
    assert "staying on the cython backend" in failed[0]
    assert out["loss_error"] < 1e-5 and out["grad_error"] < 1e-4, out


@needs_numba
@pytest.mark.slow  # compiles LeNet-5's kernels once (~15-40 s)
def test_warmup_then_a_fresh_process_compiles_nothing(tmp_path):
    env = _env(tmp_path)
    run = subprocess.run([sys.executable, "-m", "fastconv", "warmup", "--nets", "lenet5"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert "kernels compiled" in summary and env["NUMBA_CACHE_DIR"] in summary, run.stdout
    assert int(summary.split("warmup: ")[1].split()[0]) > 0  # it did compile, the first time

    out, err = _python(_TRAIN, env, timeout=300, args=("60", "no"))
    assert set(out["ran"]) == {"numba"} and set(out["states"]) == {"warm"}, out
    assert out["misses"] == 0 and out["hits"] > 0, out
    assert not _lines(err, COMPILING), err


_ORPHAN = r"""
import time, numpy as np
import fastconv as fc
from fastconv import _coldstart
x = np.ones((1, 1, 6, 6), np.float32)
fc.conv2d(x, x[:, :, :3, :3])
print(_coldstart._proc.pid, flush=True)
time.sleep(600)
"""


@needs_numba
def test_background_compile_dies_with_its_parent(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=_env(tmp_path),
                              start_new_session=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait(30)
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the background compile outlived its parent"
    finally:
        parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return state not in ("Z", "X")  # a zombie has exited


_MARK = r"""
from fastconv import _coldstart, _warmup
key, where = _coldstart.cache_key(), _coldstart.cache_dir()
_warmup._write_marker(_coldstart.marker_path(key, where), key, ["lenet5"], 0.0)
print(where)
"""


@needs_numba
@pytest.mark.skipif(sys.platform == "win32", reason="the warmup lock is fcntl.flock (POSIX)")
def test_a_second_background_compile_waits_for_the_first_and_compiles_nothing(tmp_path):
    import fcntl

    env = _env(tmp_path)
    run = subprocess.run([sys.executable, "-c", _MARK], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    where = Path(run.stdout.strip().splitlines()[-1])
    lock = os.open(where / "fastconv-warmup.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)  # a first warmup, still compiling
    child = subprocess.Popen([sys.executable, "-m", "fastconv._warmup", "--background",
                              "--nets", "lenet5"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        assert child.poll() is None, child.stderr.read()  # waiting for the lock
        fcntl.flock(lock, fcntl.LOCK_UN)  # the first one finished (its marker is there)
        assert child.wait(60) == 0, child.stderr.read()
    finally:
        os.close(lock)
        child.kill()
        child.wait()
    assert not list(where.glob("*.nbi")), "the second warmup compiled kernels again"
