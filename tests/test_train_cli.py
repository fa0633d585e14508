"""`fastconv train`: the CI smoke run on real MNIST, exact resume, Ctrl-C, clear errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastconv import nn
from fastconv._cli import train as _train_cli

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("FASTCONV_DATA_DIR") or REPO.parent / "shared" / "data" / "mnist")
needs_mnist = pytest.mark.skipif(not (DATA / "train-images-idx3-ubyte.gz").exists(),
                                 reason=f"real MNIST not found in {DATA}")


def _args(tmp_path, tag, *extra):
    return ["--data-dir", str(DATA), "--no-download", "--no-progress", "--blas-threads", "0",
            "--checkpoint", str(tmp_path / f"{tag}.ckpt"), "--save", str(tmp_path / f"{tag}.model"),
            *extra]


def _subprocess(args, **kw):
    env = dict(os.environ, FASTCONV_DATA_DIR=str(DATA), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "fastconv", "train", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


@needs_mnist
def test_ci_smoke_run_learns(tmp_path):
    """2,000 training images, 1 epoch, in a subprocess: far above chance (10 %)."""
    args = _args(tmp_path, "smoke", "--limit", "2000", "--epochs", "1", "--test-limit", "1000")
    args.remove("--blas-threads")
    args.remove("0")
    proc = _subprocess(args)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert re.search(r"\(\d+ threads, OpenBLAS threads 1\)", out), out  # the default
    acc = float(re.search(r"final test accuracy: ([\d.]+) %", out).group(1))
    assert acc >= 80.0, out
    model = nn.Sequential.load(tmp_path / "smoke.model")
    assert model.num_params() == 1_199_882


def _history(path):
    state = nn.load_checkpoint(path)
    return state["history"], state["params"]


def _assert_same_run(a, b):
    (ha, pa), (hb, pb) = _history(a), _history(b)
    for key in ("loss", "test_loss", "test_accuracy", "batch_loss"):
        assert ha[key] == hb[key], key  # bitwise: floats compared exactly
    assert set(pa) == set(pb)
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@needs_mnist
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, capsys):
    common = ("--limit", "256", "--batch-size", "32", "--test-limit", "100", "--seed", "3",
              "--augment", "1")
    assert _train_cli.main(_args(tmp_path, "straight", "--epochs", "2", *common)) == 0
    assert _train_cli.main(_args(tmp_path, "split", "--epochs", "1", *common)) == 0
    assert _train_cli.main(_args(tmp_path, "split", "--epochs", "2", "--resume", *common)) == 0
    _assert_same_run(tmp_path / "straight.ckpt", tmp_path / "split.ckpt")
    assert "resumed from" in capsys.readouterr().out


@needs_mnist
def test_interrupt_mid_epoch_then_resume_is_exact(tmp_path, monkeypatch):
    """A SIGINT during the 3rd batch: that batch finishes, a checkpoint is written, exit 130."""
    common = ("--limit", "300", "--test-limit", "100", "--epochs", "2", "--batch-size", "50")
    assert _train_cli.main(_args(tmp_path, "straight", *common)) == 0

    calls = {"n": 0}
    original = nn.Sequential.train_batch

    def train_batch(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 9:  # epoch 2, batch 3
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **kw)

    monkeypatch.setattr(nn.Sequential, "train_batch", train_batch)
    assert _train_cli.main(_args(tmp_path, "split", *common)) == _train_cli.EXIT_INTERRUPTED
    state = nn.load_checkpoint(tmp_path / "split.ckpt")
    assert (state["epoch"], state["batch"]) == (1, 3)
    monkeypatch.undo()
    assert _train_cli.main(_args(tmp_path, "split", "--resume", *common)) == 0
    _assert_same_run(tmp_path / "straight.ckpt", tmp_path / "split.ckpt")


@needs_mnist
def test_ctrl_c_in_a_subprocess_leaves_a_loadable_checkpoint(tmp_path):
    proc = _subprocess(_args(tmp_path, "int", "--limit", "1000", "--test-limit", "100",
                             "--epochs", "50"))
    deadline = time.monotonic() + 300
    line = ""
    while time.monotonic() < deadline and not line.startswith("epoch 1/"):
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == _train_cli.EXIT_INTERRUPTED, err
    assert "checkpoint written" in err and "Traceback" not in err
    state = nn.load_checkpoint(tmp_path / "int.ckpt")
    assert state["kind"] == "fastconv.train" and state["epoch"] >= 1
    model = nn.Sequential.load(tmp_path / "int.ckpt")
    assert set(model.named_parameters()) == set(state["params"])


@needs_mnist
def test_resume_refuses_corrupt_or_mismatched_checkpoints(tmp_path, capsys):
    ckpt = tmp_path / "c.ckpt"
    assert _train_cli.main(_args(tmp_path, "c", "--limit", "64", "--test-limit", "10",
                                 "--epochs", "1", "--model", "lenet5")) == 0
    assert _train_cli.main(_args(tmp_path, "c", "--limit", "64", "--test-limit", "10",
                                 "--epochs", "2", "--model", "lenet5", "--lr", "0.1",
                                 "--resume")) == 2
    assert "--lr was 0.001, now 0.1" in capsys.readouterr().err
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    assert _train_cli.main(_args(tmp_path, "c", "--limit", "64", "--epochs", "2",
                                 "--model", "lenet5", "--resume")) == 2
    err = capsys.readouterr().err
    assert "c.ckpt" in err and "truncated" in err and "Traceback" not in err


def test_bad_options_are_clear_errors(tmp_path, capsys):
    assert _train_cli.main(_args(tmp_path, "x", "--backend", "numbaa")) == 2
    assert "did you mean 'numba'" in capsys.readouterr().err
    assert _train_cli.main(_args(tmp_path, "x", "--epochs", "0")) == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err
    assert _train_cli.main(["--data-dir", str(tmp_path), "--no-download", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and "Traceback" not in err


@needs_mnist
def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert _train_cli.main(_args(tmp_path, "none", "--resume")) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_plots_without_matplotlib_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert _train_cli.main(_args(tmp_path, "p", "--plots", str(tmp_path / "pics"))) == 2
    err = capsys.readouterr().err
    assert "pip install matplotlib" in err and "Traceback" not in err
    assert not (tmp_path / "pics").exists()


@needs_mnist
def test_visualize_writes_the_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    import runpy

    model = nn.mnist_cnn(rng=0)
    model.save(tmp_path / "m.model", metadata={"history": {
        "loss": [0.5, 0.2], "test_loss": [0.3, 0.1], "test_accuracy": [0.9, 0.95],
        "batch_loss": [1.0, 0.6, 0.3, 0.2]}})
    visualize = runpy.run_path(str(REPO / "examples" / "visualize.py"))
    rc = visualize["main"]([str(tmp_path / "m.model"), "--out", str(tmp_path / "pics"),
                            "--data-dir", str(DATA), "--test-limit", "50"])
    assert rc == 0
    names = sorted(p.name for p in (tmp_path / "pics").iterdir())
    assert names == ["confusion_matrix.png", "feature_maps_layer0_conv2d.png",
                     "feature_maps_layer2_conv2d.png", "feature_maps_layer4_maxpool2d.png",
                     "first_layer_filters.png", "training_curves.png"]
    assert all((tmp_path / "pics" / n).read_bytes()[:4] == b"\x89PNG" for n in names)


def test_limit_blas_threads_finds_numpys_openblas():
    """In a subprocess (it changes a process-wide setting): every loaded OpenBLAS is found."""
    code = ("import numpy, sys; from fastconv._cli.blas import _loaded_openblas, "
            "limit_blas_threads; print(len(_loaded_openblas()), len(limit_blas_threads(1)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    found, changed = map(int, out)
    assert changed == found  # each OpenBLAS mapped into the process exposes a setter
