"""Numba threading-layer policy for the CPU kernels: safe under threads and fork.

Decisions (DESIGN §2, measured on a 2-core machine):

* Layer: Numba's default order, ``tbb`` if the ``tbb`` package is installed, else ``omp``, else
  ``workqueue``; ``NUMBA_THREADING_LAYER`` set by the user wins. ``tbb`` is not a runtime
  dependency of fastconv.
* ``omp`` (GNU libgomp) keeps its threads spinning after a parallel region, which starved
  OpenBLAS on 2 cores (docs/performance.md). So ``OMP_WAIT_POLICY=PASSIVE`` is set before Numba
  starts its OpenMP pool, unless the user set it. libgomp reads it once, when it loads.
* ``omp`` on its own runtime: when another libgomp (PyTorch's) is already in the process, Numba's
  pool is loaded bound to the libgomp it links, not to that one (``_openmp``); checked at import
  and again before the first launch (torch may be imported in between).
* ``workqueue`` aborts the process when two Python threads launch parallel kernels at once. When
  it is the layer in use, every parallel kernel call takes one process-wide lock.
* GNU OpenMP is not fork-safe: a child forked after the parent ran OpenMP threads would hang or be
  terminated by Numba. So in a forked child:
  - if this process had started Numba's ``omp`` pool, the kernels run as serial (non-parallel)
    builds of the same functions, compiled on first use;
  - else, if GNU libgomp is loaded (another library, e.g. a Cython ``prange`` extension, may
    have started its threads) and the pool would be ``omp``, Numba is told to start the
    fork-safe ``workqueue`` layer instead (calls then take the lock above);
  each with one ``RuntimeWarning`` per process.
* A child forked from a process that used GNU OpenMP but never imported this module has no fork
  hook to run. It is recognised when this module is first imported: libgomp is mapped at the
  same address as in the parent process (an exec'd process maps it elsewhere). There too, unless
  the user chose a layer, Numba starts the ``workqueue`` layer, with one warning. An ordinary
  process keeps Numba's default choice whatever other backends it loaded.

Thread count: Numba's own ``numba.set_num_threads`` / ``NUMBA_NUM_THREADS``.
"""

from __future__ import annotations

import os
import threading
import warnings

from .._openmp import (  # sets OMP_WAIT_POLICY
    forked_from_gnu_openmp_parent,
    gnu_openmp_loaded,
    load_bound_to_own_runtime,
)

import numba  # noqa: E402  (after OMP_WAIT_POLICY on purpose)
from numba import njit  # noqa: E402

from ._options import SERIAL, drop_damaged_cache  # noqa: E402

_launch_lock = threading.Lock()  # serializes calls while the layer is unknown or unsafe
_layer: str | None = None  # numba.threading_layer() once the pool has started
_started_in_parent = False  # this process (or its parent before fork) started the pool
_forked_child = False
_serial_builds: dict = {}
_warned = False


def _use_workqueue_after_fork():
    global _warned
    numba.config.THREADING_LAYER = "workqueue"
    _warned = True
    warnings.warn(
        "fastconv: this process was forked from one that had loaded GNU OpenMP, which is "
        "not fork-safe; numba kernels use the 'workqueue' threading layer in this process",
        RuntimeWarning,
        stacklevel=3,
    )


def _omp_would_be_chosen() -> bool:
    """Whether Numba's pool will be its ``omp`` layer: asked for by name, or the first choice
    it can load of ``default``/``threadsafe`` (tbb, then omp). ``safe`` is tbb alone and
    ``forksafe`` never GNU OpenMP."""
    layer = numba.config.THREADING_LAYER
    if layer == "omp":
        return True
    if layer in ("default", "threadsafe"):
        from importlib.util import find_spec

        return find_spec("tbb") is None
    return False


def _after_fork_in_child():
    global _forked_child, _launch_lock
    _launch_lock = threading.Lock()  # the parent's lock may have been held by another thread
    if _layer is not None or _started_in_parent:
        _forked_child = True
    elif _omp_would_be_chosen() and gnu_openmp_loaded(skip_torch=True):
        _use_workqueue_after_fork()  # (torch's libgomp: Numba's pool binds its own, fresh)


os.register_at_fork(after_in_child=_after_fork_in_child)

if _omp_would_be_chosen() and forked_from_gnu_openmp_parent(skip_torch=True):
    _use_workqueue_after_fork()

_OMP_POOL = "numba.np.ufunc.omppool"


def _own_omp_runtime():
    if _omp_would_be_chosen():
        load_bound_to_own_runtime(_OMP_POOL)


_own_omp_runtime()


def threading_layer() -> str | None:
    """The Numba threading layer in use, or None before the first parallel kernel ran."""
    return _layer


def _serial(kernel):
    """A non-parallel build of ``kernel`` (for a child forked from an OpenMP parent)."""
    global _warned
    build = _serial_builds.get(kernel)
    if build is None:
        if not _warned:
            _warned = True
            warnings.warn(
                "fastconv: this process was forked after Numba started its OpenMP threads "
                f"(threading layer {_layer!r}), which is not fork-safe; numba kernels run "
                "single-threaded in this process",
                RuntimeWarning,
                stacklevel=3,
            )
        build = _serial_builds[kernel] = njit(**SERIAL)(kernel.py_func)
    return build


def _call(kernel, args):
    try:
        return kernel(*args)
    except Exception as e:
        if drop_damaged_cache(kernel, e):
            return kernel(*args)
        raise


def run(kernel, *args):
    """Call the parallel ``kernel`` under the policy above; returns its result."""
    global _layer, _started_in_parent
    if _forked_child and _layer == "omp":
        return _serial(kernel)(*args)
    if _layer is None or _layer == "workqueue":
        with _launch_lock:
            if _layer is None:
                _own_omp_runtime()
            result = _call(kernel, args)
            if _layer is None:
                _layer = numba.threading_layer()
                _started_in_parent = True
        return result
    return _call(kernel, args)


@njit(**dict(SERIAL, parallel=True, cache=False))
def thread_ids(out):
    """out[i] = the Numba thread id that ran iteration i (a probe for tests and diagnostics)."""
    for i in numba.prange(out.shape[0]):
        out[i] = numba.get_thread_id()
    return out
