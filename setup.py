"""Build of the optional Cython extension ``fastconv.backends._cython_kernels``.

All package metadata lives in pyproject.toml; this file only adds the compiled kernels, and
never makes installation fail: without Cython or a working C compiler fastconv installs without
the extension, and ``fastconv.backends.cython_cpu.unavailable_reason()`` says why.

Build switches (environment variables read at build time):

``FASTCONV_CYTHON_DEBUG=1``
    Bounds checks and memoryview initialisation checks on (an out-of-bounds access raises
    ``IndexError`` instead of corrupting memory), no ``-O3``. For testing only.
``FASTCONV_CYTHON_ARCH``
    Value of GCC/Clang's ``-march`` (default ``native``: the kernels are compiled on the machine
    that installs from source, and need AVX2/AVX-512 to be fast). Set it to a portable target
    (e.g. ``x86-64-v2``) or to an empty string when building a wheel for other machines.
``FASTCONV_CYTHON_OPENMP=0``
    Build without OpenMP even when the compiler supports it (serial kernels).

Compiler flags: ``-O3`` plus ``-fno-math-errno`` and ``-ffp-contract=fast`` (FMA contraction).
Deliberately *not* ``-ffast-math``: the kernels must keep NaN/inf semantics (max-pool pads with
-inf, and NaN propagates).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXT_NAME = "fastconv.backends._cython_kernels"
PYX = os.path.join("fastconv", "backends", "_cython_kernels.pyx")
DEBUG = os.environ.get("FASTCONV_CYTHON_DEBUG") == "1"
ARCH = os.environ.get("FASTCONV_CYTHON_ARCH", "native")
WANT_OPENMP = os.environ.get("FASTCONV_CYTHON_OPENMP", "1") != "0"

# Set once here, never in the .pyx: the kernels trust inputs that fastconv._validate checked.
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "nonecheck": DEBUG,
    "embedsignature": True,
}

_OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        return omp_get_max_threads() > 0 && n > 0 ? 0 : 1;
    }
    """
)


def _warn(message: str) -> None:
    text = f"fastconv: {message}"
    warnings.warn(text, stacklevel=2)
    print(f"WARNING: {text}", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """``build_ext`` that cythonizes at build time, probes the compiler, and never fails."""

    def run(self):
        try:
            from Cython.Build import cythonize
        except ImportError:
            _warn("Cython is not installed: building without the Cython backend")
            return
        try:
            for ext in self.extensions:
                (generated,) = cythonize(
                    [ext],
                    compiler_directives=DIRECTIVES,
                    # Directives differ between debug and release builds: regenerate the C file.
                    force=True,
                    quiet=True,
                )
                ext.sources = generated.sources  # keep setuptools' Extension, with the .c file
            super().run()
        except Exception as e:  # noqa: BLE001 - any failure leaves an install without the ext
            _warn(f"building the Cython backend failed ({type(e).__name__}: {e}); "
                  "fastconv installs without it")

    def build_extension(self, ext):
        try:
            ext.extra_compile_args, ext.extra_link_args = self._flags()
            if DEBUG:
                ext.define_macros = [*ext.define_macros, ("FASTCONV_CYTHON_DEBUG", "1")]
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            _warn(f"compiling {ext.name} failed ({type(e).__name__}: {e}); "
                  "fastconv installs without the Cython backend")

    # -------------------------------------------------------------- compiler probing
    def _flags(self):
        if self.compiler.compiler_type == "msvc":
            return (["/Od"] if DEBUG else ["/O2"]) + ["/openmp"] * WANT_OPENMP, []
        if not self._compiles([]):
            raise RuntimeError(f"no working C compiler (tried {self.compiler.compiler[0]!r})")
        compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno", "-ffp-contract=fast"]
        if ARCH and not DEBUG:
            march = [f"-march={ARCH}", "-mprefer-vector-width=512"]
            if self._compiles(march):
                compile_args += march
            elif self._compiles([f"-march={ARCH}"]):
                compile_args += [f"-march={ARCH}"]
        link_args = []
        if WANT_OPENMP and self._compiles(["-fopenmp"], link=True, source=_OPENMP_PROBE):
            compile_args.append("-fopenmp")
            link_args.append("-fopenmp")
        elif WANT_OPENMP:
            _warn("the C compiler does not support OpenMP: the Cython kernels run serially")
        return compile_args, link_args

    def _compiles(self, flags, link=False, source="int main(void) { return 0; }\n") -> bool:
        tmp = tempfile.mkdtemp(prefix="fastconv-probe-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(source)
            objects = self.compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            if link:
                self.compiler.link_executable(
                    objects, "probe", output_dir=tmp, extra_postargs=flags
                )
            return True
        except Exception:  # noqa: BLE001 - a failed probe only means "flag unsupported"
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# Typed memoryviews need no NumPy headers: the extension builds without numpy installed.
setup(ext_modules=[Extension(EXT_NAME, [PYX])], cmdclass={"build_ext": OptionalBuildExt})
