"""``fastconv info``: exits 0 and reports every backend, also without Numba installed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import fastconv as fc
from fastconv._cli import info as _info


def _run_info(env=None):
    return subprocess.run([sys.executable, "-m", "fastconv", "info"], capture_output=True,
                          text=True, timeout=120, env=env)


def test_info_lists_every_backend_and_reason():
    result = _run_info()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"fastconv {fc.__version__}" in out
    for name, reason in fc.backend_status().items():
        line = next((ln for ln in out.splitlines() if ln.split()[:1] == [name]), None)
        assert line is not None, f"backend {name} missing from:\n{out}"
        assert ("available" if reason is None else reason) in line
    assert "threads:" in out and "cuda:" in out
    if fc.backend_status()["numba"] is None:
        from fastconv.backends.numba import _simd as _numba_simd

        family = "AVX-512 blocks" if _numba_simd.WIDE_VECTORS else "explicit 256-bit vectors"
        assert f"  register blocks: {family}" in out


def test_info_in_process(capsys):
    assert _info.main([]) == 0
    out = capsys.readouterr().out
    assert "numba" in out and "cython extension:" in out


def test_info_without_numba(tmp_path):
    """With ``import numba`` failing, info still exits 0 and says numba is missing."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "for name in ('numba', 'numba_cuda', 'llvmlite'):\n"
        "    sys.modules[name] = None\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_BACKEND"}
    env["PYTHONPATH"] = str(tmp_path)
    result = _run_info(env)
    assert result.returncode == 0, result.stderr
    assert "numba: not installed" in result.stdout
    numba_line = next(ln for ln in result.stdout.splitlines() if ln.startswith("  numba "))
    assert numba_line.split(None, 1)[1].strip() != "available"  # the reason instead


def test_info_names_the_cython_variant_that_runs():
    """The line names the variant the loader picked, and a forced one as forced."""
    if fc.backend_status()["cython"] is not None:
        pytest.skip("no Cython extension built here")
    from fastconv.backends.cython import executor

    out = _run_info().stdout
    assert f"cython extension: variant {executor.VARIANT}, the best this CPU runs" in out
    forced = _run_info({**os.environ, "FASTCONV_CYTHON_VARIANT": "baseline"}).stdout
    assert "cython extension: variant baseline, baseline (FASTCONV_CYTHON_VARIANT)" in forced
