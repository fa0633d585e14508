"""Cold start of the numba backend: Cython runs while Numba's cache fills in the background.

On a machine where Numba has not yet compiled fastconv's kernels (an empty cache for this CPU,
Numba version and fastconv version), the first training step would wait tens of seconds for the
JIT. Instead, the first time *automatic* selection would pick ``numba``:

1. if the cache is warm (a marker written by ``fastconv warmup`` after it succeeded, for any
   of its nets, see :func:`marker_path`), numba is used at once (loading compiled kernels from
   the cache is fast; kernels for other shapes compile on first use);
2. else a low-priority child process (``python -m fastconv._warmup --background``) compiles the
   kernels of the bundled nets (``FASTCONV_WARMUP_NETS``, default ``mnist,lenet5``) into Numba's
   on-disk cache, one line says so, and automatic selection picks the next backend (``cython``)
   meanwhile;
3. when the child succeeds, automatic selection switches to ``numba`` in the same process; when
   it fails, the process stays on ``cython`` and says so once.

Only automatic selection switches: ``backend=``, ``use_backend``, ``set_backend`` and
``FASTCONV_BACKEND`` always run the backend they name (pin one for bitwise reproducibility
across a run: before and after the switch, results agree within float32 rounding only).
``FASTCONV_COLDSTART=0`` turns this off (numba compiles in the process, as before).

Robustness: the child runs in its own session (a Ctrl-C in the terminal does not reach it),
exits by itself when its parent dies, and is terminated at the parent's exit; a lock file in
the cache directory makes concurrent processes compile once (the second child waits, sees the
marker and exits).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("fastconv")

#: The nets whose kernels the background child compiles (``fastconv warmup --nets``), unless
#: ``FASTCONV_WARMUP_NETS`` names others.
BACKGROUND_NETS = ("mnist", "lenet5")
_POLL_S = 0.2  # how often a pending state checks on the child (a waitpid, cheap)
_OFF_VALUES = ("0", "off", "no", "false")

_lock = threading.Lock()
_state = "unknown"  # unknown | off | warm | pending | failed
_proc: subprocess.Popen | None = None
_next_poll = 0.0
_log_path: Path | None = None
_marker: Path | None = None  # this CPU's marker, once decided


def _set(state: str) -> None:
    global _state
    _state = state


def numba_ready() -> bool:
    """Whether automatic selection may pick ``numba`` now (cheap; called for every op).

    The first call decides (and may start the background compile); later calls poll the child
    at most every 0.2 s while it runs.
    """
    state = _state
    if state in ("warm", "off"):
        return True
    if state == "failed":
        return False
    with _lock:
        if _state == "unknown":
            _decide()
        elif _state == "pending" and time.monotonic() >= _next_poll:
            _poll()
        return _state in ("warm", "off")


def state() -> str:
    """``unknown`` (not decided yet), ``off``, ``warm``, ``pending`` or ``failed``."""
    return _state


# ------------------------------------------------------------------------ the cache and its key


def cache_dir() -> str | None:
    """Where Numba caches the fastconv backend kernels, or None when it cannot cache them.

    ``NUMBA_CACHE_DIR`` when set and writable, else ``__pycache__`` beside the sources, else
    Numba's user-wide cache (a read-only install); see ``backends.numba._options``.
    """
    from numba.core import caching

    from .backends.numba import _options as opts

    if not opts.CACHE:
        return None
    return caching.CompileResultCacheImpl(opts._probe).locator.get_cache_path()


def _sources() -> list:
    """The files whose numba kernels the cache holds: Numba invalidates a file's entries when
    its size or modification time changes, so the key does too."""
    root = Path(__file__).resolve().parent
    files = sorted((root / "backends" / "numba").glob("*.py"))
    return [(f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.exists()]


def cache_key() -> dict:
    """What a warm cache depends on: CPU (Numba's target tuple), Numba, Python, fastconv, the
    kernel sources and the vector-family override."""
    import numba
    from numba.core.registry import cpu_target

    from . import __version__

    triple, cpu, features = cpu_target.target_context.codegen().magic_tuple()
    return {
        "cpu": cpu, "triple": triple,
        "features": hashlib.sha256(features.encode()).hexdigest()[:16],
        "numba": numba.__version__, "python": sys.version.split()[0], "fastconv": __version__,
        "vectors": os.environ.get("FASTCONV_NUMBA_VECTORS", "").strip(),
        "sources": hashlib.sha256(repr(_sources()).encode()).hexdigest()[:16],
    }


def marker_path(key: dict | None = None, directory: str | None = None) -> Path | None:
    """The file ``fastconv warmup`` writes into the cache directory once every kernel of its
    nets compiled for ``key`` (default: this CPU, Numba, fastconv); None without a cache."""
    directory = directory or cache_dir()
    if directory is None:
        return None
    key = key or cache_key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(directory) / f"fastconv-warm-{key['cpu']}-{digest}.json"


def warm_nets(path: Path | None = None) -> set:
    """The nets recorded as compiled in this CPU's marker (empty when cold)."""
    path = path or marker_path()
    try:
        return set(json.loads(path.read_text())["nets"]) if path else set()
    except (OSError, ValueError, KeyError, TypeError):
        return set()


# ----------------------------------------------------------------------------- the decision


def background_nets() -> tuple:
    """``FASTCONV_WARMUP_NETS`` (comma-separated) or :data:`BACKGROUND_NETS`."""
    env = os.environ.get("FASTCONV_WARMUP_NETS", "").strip()
    if not env:
        return BACKGROUND_NETS
    nets = tuple(n.strip() for n in env.split(",") if n.strip())
    if not nets or any(n not in BACKGROUND_NETS for n in nets):
        raise ValueError(f"FASTCONV_WARMUP_NETS must name some of {', '.join(BACKGROUND_NETS)} "
                         f"(comma-separated), got {env!r}")
    return nets


def _decide() -> None:
    """First automatic pick of numba in this process: warm, off, or start the child."""
    global _marker
    nets = background_nets()  # a bad value is the caller's error, raised here
    if os.environ.get("FASTCONV_COLDSTART", "").strip().lower() in _OFF_VALUES:
        return _set("off")
    if os.environ.get("FASTCONV_WARMUP_CHILD"):  # the compiling child itself
        return _set("off")
    from . import _dispatch

    if _dispatch._load("cython")[0] is None:  # nothing fast to run meanwhile
        return _set("off")
    try:
        directory = cache_dir()
        if directory is None:  # no cache: a background compile could not help
            return _set("off")
        _marker = marker_path(directory=directory)
        if warm_nets(_marker):
            return _set("warm")
        _start_child(directory, nets)
    except Exception as e:  # never let the cold-start machinery break a call
        log.warning("fastconv: could not start the background compile of the numba kernels "
                    "(%s); the numba kernels compile on first use instead", e)
        return _set("off")
    _set("pending")


def _start_child(directory: str, nets: tuple) -> None:
    global _proc, _log_path, _next_poll
    from numba import __version__ as numba_version

    import fastconv

    _log_path = Path(directory) / f"fastconv-warmup-{os.getpid()}.log"
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_BACKEND"}
    # The same fastconv, whatever put it on this process's sys.path.
    package_root = str(Path(fastconv.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(
        [package_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(FASTCONV_WARMUP_CHILD="1", FASTCONV_WARMUP_PARENT=str(os.getpid()),
               NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")  # leave the cores to the parent
    with open(_log_path, "wb") as err:
        _proc = subprocess.Popen(
            [sys.executable, "-m", "fastconv._warmup", "--background",
             "--nets", ",".join(nets)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
            start_new_session=True, close_fds=True,
        )
    _next_poll = time.monotonic() + _POLL_S
    atexit.register(_stop_child)
    cpu = cache_key()["cpu"]
    log.warning("fastconv: compiling the numba kernels for this CPU (%s) in the background, "
                "once per machine and Numba %s; cache: %s; running on cython until then",
                cpu, numba_version, directory)


def _poll() -> None:
    global _next_poll
    _next_poll = time.monotonic() + _POLL_S
    if _proc is None:  # forked from a process whose child compiles: watch the marker only
        if warm_nets(_marker):
            _set("warm")
        return
    rc = _proc.poll()
    if rc is None:
        return
    if rc == 0 and warm_nets(_marker):
        _set("warm")
        _remove_log()
        log.info("fastconv: numba kernels compiled; automatic selection now picks numba")
        return
    _set("failed")
    log.warning("fastconv: the background compile of the numba kernels failed (exit status "
                "%s%s); staying on the cython backend in this process (details: %s)",
                rc, _log_tail(), _log_path)


def _log_tail() -> str:
    try:
        lines = [ln for ln in _log_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return f": {lines[-1].strip()[:300]}" if lines else ""


def _remove_log() -> None:
    try:
        _log_path.unlink()
    except (OSError, AttributeError):
        pass


def _stop_child() -> None:
    """At exit: a child still compiling is terminated (what it cached so far stays cached)."""
    proc = _proc
    if proc is None:
        return
    if proc.poll() is not None:
        if proc.returncode == 0:
            _remove_log()  # a failed child's log stays: the failure message names it
        return
    proc.terminate()
    try:
        proc.wait(2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _remove_log()


def _after_fork_in_child() -> None:
    """A forked process (e.g. a data-loader worker) does not own its parent's child: it keeps
    cython until the marker appears, and never terminates or reports that child."""
    global _proc, _lock
    _lock = threading.Lock()
    _proc = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
