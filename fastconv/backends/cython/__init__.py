"""The ``cython`` backend's compiled side: kernels written once as a Tempita template
(``_kernels.pyx.tp``), built by ``setup.py`` for several instruction sets, and the loader
(``_variant.load``) that picks the variant this CPU runs.
"""
