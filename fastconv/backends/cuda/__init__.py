"""The ``cuda`` backend: ``executor`` (host/device arrays, launches) and ``_kernels`` (the
numba.cuda kernels). Importing this package imports no Numba."""
