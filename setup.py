"""Build of the optional Cython extensions of ``fastconv.backends.cython``.

All package metadata lives in pyproject.toml; this file only adds the compiled kernels, and
never makes installation fail: without Cython or a working C compiler fastconv installs without
the extensions, and ``fastconv.backends.cython.executor.unavailable_reason()`` says why.

The kernels are written once, in ``fastconv/backends/cython/_kernels.pyx.tp`` (a Tempita
template, as scikit-learn's ``.pyx.tp`` files); this file expands it into one ``.pyx`` per
variant (not committed) and compiles each, the way NumPy dispatches: the same source for the
baseline instruction set and for newer ones, the best one chosen at import by the CPU's
features (``fastconv/backends/cython/_variant.py``):

``_kernels_baseline``
    Plain x86-64 (SSE2; on other CPUs the compiler's default target): runs on every CPU the
    wheel tag claims. Register blocks for 16 vector registers.
``_kernels_avx2``
    ``-march=x86-64-v3`` (AVX2, FMA): register blocks for 16 vector registers.
``_kernels_avx512``
    ``-march=x86-64-v4`` (AVX-512) with 512-bit vectors preferred: blocks for 32 registers.

plus ``_cpu`` (the feature queries, baseline flags). Non-x86 machines build the baseline only.

Build switches (environment variables read at build time):

``FASTCONV_CYTHON_DEBUG=1``
    Bounds checks and memoryview initialisation checks on (an out-of-bounds access raises
    ``IndexError`` instead of corrupting memory), no ``-O3``, the baseline variant only. For
    testing only.
``FASTCONV_CYTHON_ARCH``
    Unset or empty (default): the portable variants above. Any other value is GCC/Clang's
    ``-march`` for ONE module ``_kernels_march`` instead (``native``: tuned for, and only
    runnable on, the building machine's CPU; its blocks follow whether that target has
    AVX-512).
``FASTCONV_CYTHON_OPENMP=0``
    Build without OpenMP even when the compiler supports it (serial kernels).

Compiler flags: ``-O3`` plus ``-fno-math-errno`` and ``-ffp-contract=fast`` (FMA contraction).
Deliberately *not* ``-ffast-math``: the kernels must keep NaN/inf semantics (max-pool pads with
-inf, and NaN propagates).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import textwrap
import warnings

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PACKAGE = "fastconv.backends.cython"
PKG_DIR = os.path.join("fastconv", "backends", "cython")
TEMPLATE = os.path.join(PKG_DIR, "_kernels.pyx.tp")
DEBUG = os.environ.get("FASTCONV_CYTHON_DEBUG") == "1"
ARCH = os.environ.get("FASTCONV_CYTHON_ARCH", "").strip()
WANT_OPENMP = os.environ.get("FASTCONV_CYTHON_OPENMP", "1") != "0"
X86 = platform.machine().lower() in ("x86_64", "amd64", "x64")

# Per variant: the -march flags to try in order (the first that compiles wins), and whether
# the register blocks are sized for 32 vector registers ("wide") or 16.
_V3 = ["-mavx2", "-mfma", "-mbmi", "-mbmi2", "-mf16c", "-mlzcnt", "-mmovbe"]
_V4 = _V3 + ["-mavx512f", "-mavx512bw", "-mavx512cd", "-mavx512dq", "-mavx512vl"]
VARIANT_FLAGS = {
    "baseline": [["-march=x86-64", "-mtune=generic"]] if X86 else [[]],
    "avx2": [["-march=x86-64-v3"], _V3],
    "avx512": [["-march=x86-64-v4", "-mprefer-vector-width=512"],
               _V4 + ["-mprefer-vector-width=512"]],
}

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
_AVX512_PROBE = "#ifndef __AVX512F__\n#error no AVX-512\n#endif\nint main(void) { return 0; }\n"


def _warn(message: str) -> None:
    text = f"fastconv: {message}"
    warnings.warn(text, stacklevel=2)
    print(f"WARNING: {text}", file=sys.stderr)


def _variants() -> list:
    """The kernel variants this build compiles."""
    if DEBUG:
        return ["baseline"]
    if ARCH:
        return ["march"]
    return ["baseline", "avx2", "avx512"] if X86 else ["baseline"]


def _kernel_extension(variant: str) -> Extension:
    ext = Extension(f"{PACKAGE}._kernels_{variant}",
                    [os.path.join(PKG_DIR, f"_kernels_{variant}.pyx")])
    ext.fastconv_variant = variant
    return ext


def expand_template(variant: str, wide: bool) -> str:
    """Write the template expanded for ``variant`` next to it; return the .pyx path."""
    from Cython import Tempita

    with open(TEMPLATE, encoding="utf-8") as f:
        text = Tempita.Template(f.read(), name=TEMPLATE).substitute(variant=variant, wide=wide)
    path = os.path.join(PKG_DIR, f"_kernels_{variant}.pyx")
    old = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    if old != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path


class OptionalBuildExt(build_ext):
    """``build_ext`` that expands the templates, cythonizes at build time, compiles the
    variants in parallel, probes the compiler, and never fails."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:  # the variants compile independently
            self.parallel = os.cpu_count() or 1

    def run(self):
        try:
            from Cython.Build import cythonize
        except ImportError:
            _warn("Cython is not installed: building without the Cython backend")
            return
        try:
            from distutils.ccompiler import new_compiler
            from distutils.sysconfig import customize_compiler

            # The compiler build_ext will use, made early: the flags are probed before the
            # templates are expanded (the blocks of a -march build follow its target).
            self._probe = new_compiler(compiler=self.compiler, force=self.force)
            customize_compiler(self._probe)
            self._arch_flags = {}
            kept = []
            for ext in self.extensions:
                variant = getattr(ext, "fastconv_variant", None)
                if variant is not None:
                    flags = self._variant_flags(variant)
                    if flags is None:
                        _warn(f"the compiler cannot target the {variant} variant: skipped")
                        continue
                    self._arch_flags[ext.name] = flags
                    expand_template(variant, self._wide(variant, flags))
                kept.append(ext)
            generated = cythonize(
                kept,
                compiler_directives=DIRECTIVES,
                # Directives differ between debug and release builds: regenerate the C files.
                force=True,
                quiet=True,
                nthreads=min(len(kept), os.cpu_count() or 1),
            )
            sources = {g.name: g.sources for g in generated}
            for ext in kept:  # keep setuptools' Extension objects, with the .c files
                ext.sources = sources[ext.name]
            self.extensions[:] = kept
            for ext in self.extensions:
                self._arch_flags.setdefault(ext.name, [])
            self._common = self._flags()
            if self.inplace:
                self._remove_stale()
            super().run()
        except Exception as e:  # noqa: BLE001 - any failure leaves an install without the ext
            _warn(f"building the Cython backend failed ({type(e).__name__}: {e}); "
                  "fastconv installs without it")

    def build_extension(self, ext):
        try:
            compile_args, link_args = self._common
            ext.extra_compile_args = compile_args + self._arch_flags.get(ext.name, [])
            ext.extra_link_args = link_args
            if DEBUG:
                ext.define_macros = [*ext.define_macros, ("FASTCONV_CYTHON_DEBUG", "1")]
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            _warn(f"compiling {ext.name} failed ({type(e).__name__}: {e}); "
                  "fastconv installs without it")

    # -------------------------------------------------------------- compiler probing
    def _variant_flags(self, variant):
        """The -march flags of ``variant`` that this compiler accepts; None if none does."""
        if self._compiler_type() == "msvc" or DEBUG:
            return [] if variant == "baseline" else None
        if variant == "march":
            return [f"-march={ARCH}"] if self._compiles([f"-march={ARCH}"]) else None
        for flags in VARIANT_FLAGS[variant]:
            if self._compiles(flags):
                return flags
        return None

    def _wide(self, variant, flags) -> bool:
        if variant == "march":  # the blocks follow the target: 32 registers with AVX-512
            return self._compiles(flags, source=_AVX512_PROBE)
        return variant == "avx512"

    def _compiler_type(self):
        return self._probe.compiler_type

    def _flags(self):
        if self._compiler_type() == "msvc":
            return (["/Od"] if DEBUG else ["/O2"]) + ["/openmp"] * WANT_OPENMP, []
        if not self._compiles([]):
            raise RuntimeError("no working C compiler")
        compile_args = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno", "-ffp-contract=fast"]
        link_args = []
        if WANT_OPENMP and self._compiles(["-fopenmp"], link=True, source=_OPENMP_PROBE):
            compile_args.append("-fopenmp")
            link_args.append("-fopenmp")
        elif WANT_OPENMP:
            _warn("the C compiler does not support OpenMP: the Cython kernels run serially")
        return compile_args, link_args

    def _compiles(self, flags, link=False, source="int main(void) { return 0; }\n") -> bool:
        compiler = self._probe
        tmp = tempfile.mkdtemp(prefix="fastconv-probe-")
        try:
            src = os.path.join(tmp, "probe.c")
            with open(src, "w") as f:
                f.write(source)
            objects = compiler.compile([src], output_dir=tmp, extra_postargs=flags)
            if link:
                compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=flags)
            return True
        except Exception:  # noqa: BLE001 - a failed probe only means "flag unsupported"
            return False
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _remove_stale(self):
        """In-place builds: drop kernel modules of variants this build does not make (a
        native build after a portable one, or the reverse), which the loader would find."""
        built = {ext.name.rsplit(".", 1)[1] for ext in self.extensions}
        for name in os.listdir(PKG_DIR):
            stem = name.split(".", 1)[0]
            if (stem.startswith("_kernels_") and stem not in built
                    and name.endswith((".so", ".pyd"))):
                os.remove(os.path.join(PKG_DIR, name))


# Typed memoryviews need no NumPy headers: the extensions build without numpy installed.
setup(
    ext_modules=[Extension(f"{PACKAGE}._cpu", [os.path.join(PKG_DIR, "_cpu.pyx")])]
    + [_kernel_extension(v) for v in _variants()],
    cmdclass={"build_ext": OptionalBuildExt},
)
