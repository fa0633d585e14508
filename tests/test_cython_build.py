"""The portable Cython build: the variants compiled from one template (``setup.py``), their
instruction sets (``objdump``), the loader's choice (``fastconv.backends.cython._variant``),
the ``FASTCONV_CYTHON_VARIANT`` override and its errors, and the correctness suite run on the
baseline variant in a subprocess.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastconv as fc

REPO = Path(__file__).resolve().parents[1]
PKG = "fastconv.backends.cython"
X86 = platform.machine().lower() in ("x86_64", "amd64")
pytestmark = pytest.mark.skipif(
    "cython" not in fc.available_backends(),
    reason=f"cython backend unavailable here: {fc.backend_status().get('cython')}",
)


def _variant_module():
    from fastconv.backends.cython import _variant

    return _variant


def _built(variant: str) -> Path | None:
    spec = importlib.util.find_spec(f"{PKG}._kernels_{variant}")
    return Path(spec.origin) if spec is not None else None


def _portable_build() -> bool:
    return _built("march") is None


def _disassembly(variant: str) -> str:
    path = _built(variant)
    assert path is not None, f"the {variant} variant was not built"
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(path)],
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def _cpuinfo_flags() -> set:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


needs_objdump = pytest.mark.skipif(
    not (X86 and shutil.which("objdump") and _portable_build()),
    reason="needs an x86-64 portable build and binutils' objdump",
)


@pytest.mark.skipif(not (X86 and _portable_build()), reason="x86-64 portable build only")
def test_every_variant_is_built():
    built = {v: _built(v) for v in ("baseline", "avx2", "avx512")}
    assert all(built.values()), built


@needs_objdump
def test_baseline_uses_no_avx():
    """The baseline runs on every x86-64 CPU: SSE2 at most, no ymm (AVX) or zmm (AVX-512)."""
    asm = _disassembly("baseline")
    assert "xmm" in asm  # the disassembly is real: SSE2 code is there
    assert "%ymm" not in asm and "%zmm" not in asm


@needs_objdump
def test_avx2_uses_ymm_but_no_zmm():
    asm = _disassembly("avx2")
    assert "%ymm" in asm
    assert "%zmm" not in asm


@needs_objdump
def test_avx512_uses_zmm():
    assert "%zmm" in _disassembly("avx512")


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists() or not X86,
                    reason="the independent reference is Linux's /proc/cpuinfo on x86")
def test_cpu_features_agree_with_cpuinfo():
    flags = _cpuinfo_flags()
    got = _variant_module().cpu_features()
    avx2 = {"avx2", "fma", "bmi1", "bmi2", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags
    assert got["avx2"] == avx2 and got["avx512"] == avx512, (got, sorted(flags))


def test_loader_picks_the_best_variant_this_cpu_runs(monkeypatch):
    var = _variant_module()
    monkeypatch.delenv(var.ENV, raising=False)
    if not _portable_build():
        assert var.load().variant == "march"
        return
    features = var.cpu_features()
    expected = "avx512" if features["avx512"] else ("avx2" if features["avx2"] else "baseline")
    loaded = var.load()
    assert loaded.variant == expected
    assert loaded.module.VARIANT == expected
    # The same choice for CPUs with fewer features (the modules are imported, not run).
    for feats, want in [({"avx2": True, "avx512": False}, "avx2"),
                        ({"avx2": False, "avx512": False}, "baseline")]:
        monkeypatch.setattr(var, "cpu_features", lambda feats=feats: {"x86": True, **feats})
        if _built(want) is not None:
            assert var.load().variant == want


def test_variant_override_and_its_errors(monkeypatch):
    var = _variant_module()
    monkeypatch.setenv(var.ENV, "baseline")
    if _portable_build():
        assert var.load().variant == "baseline"
        assert var.load().module.VARIANT == "baseline"
    monkeypatch.setenv(var.ENV, "avx3")
    with pytest.raises(ValueError, match=r"FASTCONV_CYTHON_VARIANT='avx3': expected one of"):
        var.load()
    monkeypatch.setenv(var.ENV, "avx512")
    monkeypatch.setattr(var, "cpu_features",
                        lambda: {"x86": True, "avx2": True, "avx512": False})
    with pytest.raises(ValueError, match=r"cannot run the avx512 variant.*avx2, baseline"):
        var.load()


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTCONV_BACKEND", "FASTCONV_CYTHON_VARIANT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def test_bad_variant_makes_the_backend_unavailable_with_the_reason():
    script = (
        "import numpy as np\n"
        "import fastconv as fc\n"
        "reason = fc.backend_status()['cython']\n"
        "assert 'FASTCONV_CYTHON_VARIANT' in reason and 'nope' in reason, reason\n"
        "x = np.ones((1, 1, 3, 3), np.float32)\n"
        "try:\n"
        "    fc.conv2d(x, x, backend='cython')\n"
        "except fc.BackendUnavailableError as e:\n"
        "    assert 'nope' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "print('OK')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env=_env(FASTCONV_CYTHON_VARIANT="nope"))
    assert run.returncode == 0 and "OK" in run.stdout, run.stdout + run.stderr


@pytest.mark.skipif(not _portable_build(), reason="a -march build has no baseline variant")
def test_correctness_suite_on_the_forced_baseline(tmp_path):
    """The Cython correctness tests (block paths, shared conv/pool suites) in a subprocess on
    the baseline variant: its 16-register blocks and SSE2 code against PyTorch."""
    script = (
        "import sys, pytest\n"
        "from fastconv.backends.cython import executor as cython_cpu\n"
        "assert cython_cpu.VARIANT == 'baseline', cython_cpu.VARIANT\n"
        "sys.exit(pytest.main(sys.argv[1:]))\n"
    )
    args = ["tests/test_cython_backend.py", "tests/test_conv.py", "tests/test_pool.py",
            "-k", "cython and not debug_build", "-q", "-x", "-p", "no:cacheprovider",
            "--benchmark-disable", "-o", f"cache_dir={tmp_path}"]
    run = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True,
                         text=True, timeout=600, env=_env(FASTCONV_CYTHON_VARIANT="baseline"))
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    assert re.search(r"\d+ passed", run.stdout) and " failed" not in run.stdout, tail
