"""GNU OpenMP (libgomp) facts shared by the numba ``omp`` layer and the Cython extension.

Both compiled CPU backends run their parallel loops on the one system libgomp, so two of its
behaviours are handled here, once:

* Wait policy. With the default (active) policy idle OpenMP threads spin after every parallel
  region, which on a 2-core machine starves every other thread pool (OpenBLAS, PyTorch, the other
  backend): a tiny conv took milliseconds, not microseconds. libgomp reads ``OMP_WAIT_POLICY``
  once, when it loads, so importing this module (which each compiled backend does before it
  loads its runtime) sets ``PASSIVE``; a user's own setting wins.
* Another libgomp already in the process. PyTorch's wheels ship their own ``libgomp.so.1`` and
  load it into the global symbol scope (``RTLD_GLOBAL``) when ``torch`` is imported, reading its
  environment then (so without ``PASSIVE``: idle threads spin for a while after each region). A
  library loaded later resolves ``GOMP_parallel`` and friends in that global scope first, so
  Numba's ``omp`` pool would run on torch's spinning runtime even though it links its own copy:
  that is why a fastconv step slowed many-fold with ``import torch`` first. Numba's pool is
  therefore loaded with ``RTLD_DEEPBIND`` (:func:`load_bound_to_own_runtime`) whenever a libgomp
  is already mapped, so it binds to the libgomp it links, loaded now with ``PASSIVE``.
* Fork. libgomp's thread pool does not survive ``fork()``: a child that enters a parallel region
  after its parent ran one hangs. Each backend registers its own at-fork hook; a child forked
  before fastconv was imported is recognised by libgomp being mapped at the same address as in
  its parent (an exec'd process maps it elsewhere).
"""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_TORCH_LIBS = "/torch/lib/"


def gnu_openmp_mapping(pid="self", skip_torch=False) -> str | None:
    """Address range of the first GNU libgomp in process ``pid``; None if unmapped or unknown.

    PyTorch's bundled ``torch/lib/libgomp.so.1`` is a GNU libgomp too and is matched, unless
    ``skip_torch``: Numba's pool never runs on it (:func:`load_bound_to_own_runtime`), while a
    Cython ``prange`` may (it links ``libgomp.so.1`` by the name torch's copy registered).
    """
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "/libgomp.so" in line and not (skip_torch and _TORCH_LIBS in line):
                    return line.split()[0]
    except OSError:
        pass
    return None


def gnu_openmp_loaded(skip_torch=False) -> bool:
    """Whether this process has a GNU libgomp mapped (PyTorch's too, unless ``skip_torch``)."""
    return gnu_openmp_mapping(skip_torch=skip_torch) is not None


def forked_from_gnu_openmp_parent(skip_torch=False) -> bool:
    """Whether this process is a fork of a parent that had libgomp loaded (same mapping)."""
    mine = gnu_openmp_mapping(skip_torch=skip_torch)
    return mine is not None and mine == gnu_openmp_mapping(os.getppid(), skip_torch)


def load_bound_to_own_runtime(module: str) -> bool:
    """Import the extension ``module`` with ``RTLD_DEEPBIND`` if a libgomp is already mapped.

    Its OpenMP calls then resolve in the libraries it links (the libgomp it needs, which reads
    ``OMP_WAIT_POLICY`` as it loads now) before the global scope, where another library's
    libgomp (PyTorch's) may sit. Returns True if it did so; False if ``module`` was already
    imported, no libgomp is mapped (ordinary binding is then the same), the platform has no
    ``RTLD_DEEPBIND``, or the import failed (the caller's own import then reports it).
    """
    if module in sys.modules or not hasattr(os, "RTLD_DEEPBIND") or not gnu_openmp_loaded():
        return False
    flags = sys.getdlopenflags()  # process-wide; restored at once
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    finally:
        sys.setdlopenflags(flags)
    return True
