"""The ``numba`` backend: ``executor`` (runs the plans of ``backends._plan``) and its kernels,
one module per family (``_direct``, ``_plane``, ``_winograd``, ``_gemm``, ``_generic``,
``_pool``, ``_elementwise``; ``_simd``, ``_stack``, ``_stream``, ``_options`` and
``_threading`` underneath). Importing this package imports no Numba: the kernel modules do,
when the executor first needs them.
"""
