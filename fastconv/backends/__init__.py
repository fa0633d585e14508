"""Backends: one module each, with the same five functions (see ``fastconv._dispatch``).

Nothing here is imported by ``import fastconv``; ``fastconv._dispatch`` imports a backend module
the first time it is used.
"""

import os

# The numba 'omp' threading layer and the Cython extension share one OpenMP runtime. With the
# default (active) wait policy its idle threads spin after every parallel region, which on a
# 2-core machine starves everything else (OpenBLAS, the other backend, Python): 16-69 ms for a
# tiny conv instead of 0.03 ms was measured. The policy is read once, when the runtime starts,
# so it is set here, before any backend can load it; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
