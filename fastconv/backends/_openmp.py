"""GNU OpenMP (libgomp) facts shared by the numba ``omp`` layer and the Cython extension.

Both compiled CPU backends run their parallel loops on the one system libgomp, so two of its
behaviours are handled here, once:

* Wait policy. With the default (active) policy idle OpenMP threads spin after every parallel
  region, which on a 2-core machine starves every other thread pool (OpenBLAS, PyTorch, the other
  backend): a tiny conv took milliseconds, not microseconds. libgomp reads ``OMP_WAIT_POLICY``
  once, when it loads, so importing this module (which each compiled backend does before it
  loads its runtime) sets ``PASSIVE``; a user's own setting wins.
* Fork. libgomp's thread pool does not survive ``fork()``: a child that enters a parallel region
  after its parent ran one hangs. Each backend registers its own at-fork hook; a child forked
  before fastconv was imported is recognised by libgomp being mapped at the same address as in
  its parent (an exec'd process maps it elsewhere).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def gnu_openmp_mapping(pid="self") -> str | None:
    """Address range of the system libgomp in process ``pid``; None if unmapped or unknown.

    (PyTorch's bundled OpenMP has another file name and is not matched.)
    """
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "/libgomp.so" in line:
                    return line.split()[0]
    except OSError:
        pass
    return None


def gnu_openmp_loaded() -> bool:
    """Whether this process has the system libgomp mapped."""
    return gnu_openmp_mapping() is not None


def forked_from_gnu_openmp_parent() -> bool:
    """Whether this process is a fork of a parent that had libgomp loaded (same mapping)."""
    mine = gnu_openmp_mapping()
    return mine is not None and mine == gnu_openmp_mapping(os.getppid())
