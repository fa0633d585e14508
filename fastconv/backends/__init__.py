"""Backends: one module each, with the same five functions (see ``fastconv._dispatch``).

Nothing here is imported by ``import fastconv``; ``fastconv._dispatch`` imports a backend module
the first time it is used.
"""

