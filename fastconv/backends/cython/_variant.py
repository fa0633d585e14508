"""The one place that imports the compiled Cython kernels: picks the variant for this CPU.

``setup.py`` compiles the same kernel template for several instruction sets (NumPy's dispatch
idea): ``baseline`` (plain x86-64, or the compiler's default target elsewhere), ``avx2``
(x86-64-v3) and ``avx512`` (x86-64-v4), or one ``march`` module when built with
``FASTCONV_CYTHON_ARCH`` (e.g. ``native``). :func:`load` returns the best variant that was
built and that this CPU runs (``_cpu.cpu_features``); ``FASTCONV_CYTHON_VARIANT`` =
``baseline``, ``avx2``, ``avx512`` or ``march`` forces one.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import NamedTuple

#: Variants from the fastest to the most portable, with the CPU feature each needs.
VARIANTS = {"avx512": "avx512", "avx2": "avx2", "baseline": None}
ENV = "FASTCONV_CYTHON_VARIANT"


class VariantError(ImportError, ValueError):
    """``FASTCONV_CYTHON_VARIANT`` names an unknown variant, one not built, or one this CPU
    cannot run. An ImportError (the backend is then unavailable, with this message) and a
    ValueError (a bad setting)."""


class Loaded(NamedTuple):
    """The compiled kernel module and the name of its variant."""

    module: object
    variant: str


def _import(variant: str):
    return importlib.import_module(f"{__package__}._kernels_{variant}")


def _built(variant: str) -> bool:
    """Whether the variant's module is installed (found, not imported: importing a variant
    this CPU cannot run could kill the process with SIGILL)."""
    return importlib.util.find_spec(f"{__package__}._kernels_{variant}") is not None


def cpu_features() -> dict:
    """What this CPU runs (see ``_cpu.cpu_features``); all False if ``_cpu`` is not built."""
    try:
        from . import _cpu
    except ImportError:
        return {"x86": False, "avx2": False, "avx512": False}
    return _cpu.cpu_features()


def _runs_here(variant: str, features: dict) -> bool:
    need = VARIANTS.get(variant)
    return need is None or features.get(need, False)


def load() -> Loaded:
    """The kernel module to use and its variant name.

    Raises
    ------
    VariantError
        ``FASTCONV_CYTHON_VARIANT`` is set to an unknown variant, one that was not built, or
        one this CPU cannot run.
    ImportError
        No variant was built (no C compiler or Cython at install time).
    """
    forced = os.environ.get(ENV, "").strip()
    features = cpu_features()
    if forced:
        known = [*VARIANTS, "march"]
        if forced not in known:
            raise VariantError(f"{ENV}={forced!r}: expected one of {', '.join(known)} or unset")
        if not _runs_here(forced, features):
            raise VariantError(
                f"{ENV}={forced!r}: this CPU cannot run the {forced} variant "
                f"(features: {', '.join(k for k, v in features.items() if v) or 'none'}); "
                f"choose one of {', '.join(v for v in VARIANTS if _runs_here(v, features))}"
            )
        try:
            return Loaded(_import(forced), forced)
        except ImportError as e:
            raise VariantError(
                f"{ENV}={forced!r}: the {forced} variant was not built ({e}); built here: "
                f"{', '.join(v for v in known if _built(v)) or 'none'}"
            ) from e
    # A -march build (FASTCONV_CYTHON_ARCH) makes one module, for the building machine.
    if _built("march"):
        return Loaded(_import("march"), "march")
    errors = []
    for variant in VARIANTS:
        if not _runs_here(variant, features):
            continue
        try:
            return Loaded(_import(variant), variant)
        except ImportError as e:
            errors.append(f"{variant}: {e}")
    raise ImportError("no variant of the Cython kernels imports (" + "; ".join(errors) + ")")
