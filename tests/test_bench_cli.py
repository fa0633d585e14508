"""``fastconv bench``: the table, the JSON record, the chart, the timing environment, the work
formulas and the naive-loop scaling, checked against numbers computed here by hand."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

import fastconv as fc
from fastconv._cli import bench as b
from fastconv._cli import bench_cmd as _bench_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _conv_macs(n, c_in, h, w, c_out, k, stride, pad):
    ho = (h + 2 * pad - k) // stride + 1
    wo = (w + 2 * pad - k) // stride + 1
    return n * c_out * ho * wo * c_in * k * k


def _proc_cpu_model():
    with open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))


def test_gflop_follows_the_design_formula():
    # B: 2 * 64 * 64 * 24 * 24 * 32 * 3 * 3 = 1.358954496 GFLOP forward, 3x for fwd+bwd.
    assert b.gflop("conv_fwd", b.SHAPES["B"]) == pytest.approx(1.358954496, rel=1e-12)
    assert b.gflop("conv_fwdbwd", b.SHAPES["B"]) == pytest.approx(3 * 1.358954496, rel=1e-12)
    # F: stride 2, padding 1: 56 -> 28 outputs per axis.
    assert b.SHAPES["F"].macs() == 32 * 128 * 28 * 28 * 64 * 9
    # P3: 112 -> 56 (k3 s2 p1); x read + (y float32, idx int64) written.
    expected = 32 * 64 * 112 * 112 * 4 + 32 * 64 * 56 * 56 * 12
    assert b.gbytes("pool_fwd", b.SHAPES["P3"]) * 1e9 == pytest.approx(expected)


@pytest.mark.parametrize("name", list(b.SHAPES))
def test_naive_slice_is_a_valid_smaller_problem_scaled_by_its_work(name):
    shape = b.SHAPES[name]
    s, scale = b.naive_slice(shape, 400_000)
    assert s.n == 1 and min(s.out_hw) >= 1
    if shape.kind == "conv":
        full = _conv_macs(shape.n, shape.c_in, shape.h, shape.w, shape.c_out, shape.k,
                          shape.stride, shape.pad)
        part = _conv_macs(s.n, s.c_in, s.h, s.w, s.c_out, s.k, s.stride, s.pad)
        assert (s.c_in, s.w, s.k, s.stride, s.pad) == (shape.c_in, shape.w, shape.k,
                                                       shape.stride, shape.pad)
    else:
        ho, wo = ((x + 2 * shape.pad - shape.k) // shape.stride + 1 for x in (s.h, s.w))
        full = shape.work()
        part = s.n * s.c * ho * wo * shape.k**2
    assert scale == pytest.approx(full / part)
    assert part <= 400_000 or (s.h < shape.h and s.out_hw[0] == 1)
    channels = "c_out" if shape.kind == "conv" else "c"
    reduced = getattr(s, channels) < getattr(shape, channels) or s.h < shape.h
    assert part > 400_000 / 8 or not reduced  # not needlessly small


def test_unknown_shape_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        _bench_cli.main(["--shapes", "B,Z", "--no-reexec"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'Z'" in err and "P3" in err and "small" in err


def test_unknown_backend_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        _bench_cli.main(["--backends", "numbaa", "--no-reexec"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "'numbaa'" in err and "numba" in err and "torch" in err


def test_plot_without_matplotlib_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    png = tmp_path / "chart.png"
    assert _bench_cli.main(["--shapes", "small", "--plot", str(png), "--no-reexec"]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not png.exists()


@pytest.mark.skipif(not b.torch_available(), reason="the check's reference here is PyTorch")
def test_a_wrong_result_is_reported_left_out_and_fails_the_run(monkeypatch, capsys):
    real = b._fastconv_fn

    def off_by_one_numpy(op, shape, backend, a):
        fn = real(op, shape, backend, a)
        return (lambda: tuple(o + 1 for o in fn())) if backend == "numpy" else fn

    monkeypatch.setattr(b, "_fastconv_fn", off_by_one_numpy)
    argv = ["--shapes", "s1", "--ops", "conv_fwd", "--backends", "numpy,naive,torch",
            "--repeat", "1", "--sgemm-size", "64", "--no-reexec"]
    assert _bench_cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "## Failures" in out and "- numpy conv_fwd s1: AssertionError" in out
    assert "| naive (" in out and "| torch |" in out and "| numpy |" not in out


def test_child_env_sets_malloc_thresholds_blas_timeout_and_unsets_openblas_overrides():
    env = _bench_cli.child_env(3, {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "1",
                                   "PATH": "/bin", "OMP_NUM_THREADS": "8"})
    assert "OPENBLAS_CORETYPE" not in env and "OPENBLAS_L2_SIZE" not in env
    assert env["MALLOC_MMAP_THRESHOLD_"] == "1073741824"
    assert env["MALLOC_TRIM_THRESHOLD_"] == "4294967296"
    assert env["OPENBLAS_THREAD_TIMEOUT"] == "4"  # no spinning BLAS workers between contenders
    assert env["OMP_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "3"
    assert env["PATH"] == "/bin" and env[_bench_cli.REEXEC_MARKER] == "1"


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="the chart needs matplotlib (fastconv[plot])")
def test_bench_small_prints_table_and_writes_json_and_png(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    env = dict(os.environ, OPENBLAS_CORETYPE="Haswell")  # the re-exec must drop it
    env.pop(_bench_cli.REEXEC_MARKER, None)
    cmd = [sys.executable, "-m", "fastconv", "bench", "--shapes", "small", "--repeat", "2",
           "--threads", "1", "--naive-work", "20000", "--sgemm-size", "256",
           "--json", str(out_json), "--plot", str(out_png)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout

    contenders = b.default_contenders()
    header = "| " + " | ".join(b.TABLE_COLUMNS) + " |"
    conv_groups = 2 * sum(s.kind == "conv" for s in b.SMALL_SHAPES.values())
    pool_groups = 2 * sum(s.kind == "pool" for s in b.SMALL_SHAPES.values())
    assert out.count(header) == conv_groups
    assert out.count(header.replace("GFLOP/s", "GB/s")) == pool_groups
    for name in contenders:
        prefix = "| naive (" if name == "naive" else f"| {name} |"
        assert out.count(prefix) == conv_groups + pool_groups, name

    record = json.loads(out_json.read_text())
    machine = record["machine"]
    assert machine["cpu"] == _proc_cpu_model()
    assert machine["numpy"] == np.__version__ and machine["fastconv"] == fc.__version__
    assert machine["env"]["MALLOC_MMAP_THRESHOLD_"] == "1073741824"
    assert machine["env"]["MALLOC_TRIM_THRESHOLD_"] == "4294967296"
    assert machine["env"]["OPENBLAS_CORETYPE"] is None
    assert machine["env"]["OMP_NUM_THREADS"] == "1"
    if "numba" in contenders:
        assert machine["threads"]["numba"] == 1
    if "torch" in contenders:
        import torch

        assert machine["torch"] == torch.__version__ and machine["threads"]["torch"] == 1
    assert record["peak"]["start"]["gflops"] > 0

    results = record["results"]
    assert len(results) == len(contenders) * (conv_groups + pool_groups)
    for r in results:
        assert r["median_ms"] == pytest.approx(statistics.median(r["times_ms"]))
        group = {g["contender"]: g for g in results
                 if (g["op"], g["shape"]) == (r["op"], r["shape"])}
        if "naive" in group:
            assert r["x_naive"] == pytest.approx(group["naive"]["median_ms"] / r["median_ms"])
        if "torch" in group:
            assert r["vs_torch"] == pytest.approx(r["median_ms"] / group["torch"]["median_ms"])
        if r["contender"] not in ("naive", "torch"):
            assert r["algorithm"].startswith(r["contender"] + ":")
            assert r["checked"]  # against torch or the numpy reference, before timing
    s1 = [r for r in results if r["shape"] == "s1" and r["op"] == "conv_fwd"][0]
    macs = _conv_macs(2, 1, 12, 12, 8, 3, 1, 0)
    assert s1["gflop"] == pytest.approx(2 * macs / 1e9)
    assert s1["gflops"] == pytest.approx(2 * macs / 1e9 / (s1["median_ms"] / 1e3))
    peak = record["peak"]
    assert peak["used"] == max(peak["start"]["gflops"], peak["end"]["gflops"])
    assert s1["pct_peak"] == pytest.approx(100 * s1["gflops"] / peak["used"])

    assert out_png.read_bytes()[:8] == PNG_MAGIC


def test_scaling_study_reports_time_per_image(tmp_path, capsys):
    out_json = tmp_path / "scaling.json"
    argv = ["--scaling", "--ops", "conv_fwd,pool_fwdbwd", "--backends", "numpy",
            "--scaling-batches", "1,2", "--scaling-images", "8,12", "--repeat", "1",
            "--sgemm-size", "256", "--json", str(out_json), "--no-reexec"]
    assert _bench_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| batch | numpy |" in out and "| image | numpy |" in out
    assert "| 8×8 |" in out and "| 12×12 |" in out
    rows = json.loads(out_json.read_text())["scaling"]
    assert len(rows) == 2 * (2 + 2)
    for r in rows:
        assert r["us_per_image"] == pytest.approx(r["median_ms"] * 1e3 / r["batch"])
    firsts = [r for r in rows if (r["sweep"] == "batch" and r["batch"] == 1)
              or (r["sweep"] == "image" and r["image"] == 8)]
    assert [r["rel"] for r in firsts] == [1.0] * 4
