"""Faults: killed checkpoint writers, failing writes, damaged dataset files, a damaged Numba cache.

* SIGKILL: a writer process saves ever newer checkpoints of a few MiB in a loop, resuming from
  the file each time it starts; it is killed at random moments, mostly inside
  ``save_checkpoint``. After every kill the file must load and hold one complete state: the
  last one whose write returned, or the one in flight if its ``os.replace`` had happened.
* Failing writes, three ways: a real ``EFBIG`` from a file-size limit (``RLIMIT_FSIZE``, in a
  subprocess), a real ``ENOSPC`` on a tiny tmpfs (where this process may mount one), and
  injected ``ENOSPC`` from ``write``. Each must raise ``CheckpointWriteError`` naming the file
  and the reason, keep the previous checkpoint, and leave no temporary file.
* Damaged copies of the real MNIST files (random truncations and byte flips) must raise
  ``DatasetError`` naming the file, never another exception.
* A Numba cache whose files were damaged (e.g. a process killed while writing it) must not
  break the numba backend.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

if __name__ == "__main__":  # the subprocess side: no conftest (it probes every backend)
    TEST_BACKENDS = []
else:
    from helpers import TEST_BACKENDS

from fastconv.nn import CheckpointWriteError, load_checkpoint, save_checkpoint

KILLS = 12
STATE_FLOATS = 1 << 20  # 4 MiB of float32 per checkpoint: a write takes a while
MNIST = Path(os.environ.get("FASTCONV_DATA_DIR") or
             Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist")


def _state(step: int, n: int) -> dict:
    return {"step": step, "data": np.full(n, step, np.float32),
            "nested": {"bias": np.arange(step % 7 + 1, dtype=np.float64), "note": "x" * 50}}


def _check_state(state: dict) -> int:
    """The step of a loaded state, after checking that all its parts are of that step."""
    step = state["step"]
    assert np.all(state["data"] == step), "data from another step"
    np.testing.assert_array_equal(state["nested"]["bias"], np.arange(step % 7 + 1))
    return step


# ------------------------------------------------------------------------- the worker side


def writer(path: str, n: int) -> None:
    """Resume from ``path`` (if any), then write checkpoints of increasing step forever."""
    step = _check_state(load_checkpoint(path)) if os.path.exists(path) else 0
    print(f"resumed {step}", flush=True)
    while True:
        step += 1
        print(f"begin {step}", flush=True)
        save_checkpoint(path, _state(step, n))
        print(f"end {step}", flush=True)


def fsize_worker(directory: str) -> dict:
    """Save a small checkpoint, then one larger than RLIMIT_FSIZE allows (a real EFBIG)."""
    import resource

    path = os.path.join(directory, "limited.ckpt")
    save_checkpoint(path, _state(1, 1000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
    try:
        save_checkpoint(path, _state(2, STATE_FLOATS))
        error = None
    except CheckpointWriteError as e:
        error = {"type": type(e).__name__, "message": str(e),
                 "errno": getattr(e.__cause__, "errno", None), "is_oserror": isinstance(e, OSError)}
    return {"error": error, "kept_step": _check_state(load_checkpoint(path)),
            "files": sorted(os.listdir(directory))}


# ------------------------------------------------------------------------- the pytest side


def test_sigkill_during_checkpoint_writes_keeps_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "train.ckpt"
    rng = np.random.default_rng(11)
    last_end, mid_write = 0, 0
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, __file__, "writer", str(path), str(STATE_FLOATS)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()
        if not first.startswith("resumed"):
            proc.kill()
            pytest.fail(f"writer could not resume from {path}: {proc.communicate()[1][-3000:]}")
        assert int(first.split()[1]) >= last_end, "resumed from an older checkpoint"
        time.sleep(rng.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        markers = out.split()
        ends = [int(v) for k, v in zip(markers[::2], markers[1::2]) if k == "end"]
        last_end = max(ends, default=last_end)
        mid_write += bool(markers) and markers[-2] == "begin"
        if not path.exists():
            assert last_end == 0, "a completed checkpoint vanished"
            continue
        step = _check_state(load_checkpoint(path))
        assert step in (last_end, last_end + 1), f"loaded step {step}, last completed {last_end}"
        last_end = step
    litter = [p for p in tmp_path.iterdir() if p != path]
    print(f"{KILLS} SIGKILLs, {mid_write} inside save_checkpoint; final step {last_end}; "
          f"{len(litter)} temporary files left ({sum(p.stat().st_size for p in litter)} bytes)")
    assert mid_write >= 1, "no kill landed inside a checkpoint write"
    assert last_end >= 1
    assert all(p.name.startswith(".train.ckpt.") and p.suffix == ".tmp" for p in litter), litter
    save_checkpoint(path, _state(last_end + 1, 10))  # litter does not get in the way
    assert _check_state(load_checkpoint(path)) == last_end + 1


def test_file_size_limit_gives_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, __file__, "fsize", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] is not None, "a write past RLIMIT_FSIZE did not fail"
    assert result["error"]["is_oserror"] and result["error"]["errno"] == errno.EFBIG
    assert "limited.ckpt" in result["error"]["message"]
    assert "too large" in result["error"]["message"].lower(), result["error"]["message"]
    assert result["kept_step"] == 1
    assert result["files"] == ["limited.ckpt"], "temporary file left behind"


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 256 KiB tmpfs mounted at tmp_path/mnt (needs root and mount rights)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(tiny_tmpfs):
    path = tiny_tmpfs / "full.ckpt"
    save_checkpoint(path, _state(1, 1000))
    with pytest.raises(CheckpointWriteError, match="full.ckpt.*No space left") as info:
        save_checkpoint(path, _state(2, STATE_FLOATS))
    assert info.value.__cause__.errno == errno.ENOSPC
    assert _check_state(load_checkpoint(path)) == 1
    assert os.listdir(tiny_tmpfs) == ["full.ckpt"]


def test_injected_write_error_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """ENOSPC from a ``write`` halfway through the file (the other test of this injects it at
    ``fsync``)."""
    path = tmp_path / "inj.ckpt"
    save_checkpoint(path, _state(1, 1000))
    real_fdopen = os.fdopen

    class HalfFull:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            if self.written + len(data) > 64 * 1024:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(os, "fdopen", lambda *a, **kw: HalfFull(real_fdopen(*a, **kw)))
    with pytest.raises(CheckpointWriteError, match="inj.ckpt.*No space left"):
        save_checkpoint(path, _state(2, STATE_FLOATS))
    monkeypatch.undo()
    assert _check_state(load_checkpoint(path)) == 1
    assert os.listdir(tmp_path) == ["inj.ckpt"]


# ------------------------------------------------------------------------- datasets


MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


@pytest.fixture(scope="module")
def mnist_copy(tmp_path_factory):
    """A copy of the real MNIST files whose test set is cut to 500 images (fast to load)."""
    if not all((MNIST / f).is_file() for f in MNIST_FILES):
        pytest.skip(f"real MNIST files not found in {MNIST} (set FASTCONV_DATA_DIR)")
    root = tmp_path_factory.mktemp("mnist")
    for name in MNIST_FILES:
        raw = gzip.decompress((MNIST / name).read_bytes())
        if name.startswith("train"):  # keep 500 of 60,000: same layout, quick to read
            header = 16 if "images" in name else 8
            item = 784 if "images" in name else 1
            body = raw[header:header + 500 * item]
            raw = raw[:4] + (500).to_bytes(4, "big") + raw[8:header] + body
        (root / name).write_bytes(gzip.compress(raw, compresslevel=1))
    return root


def _damage(data: bytes, how: str, rng) -> bytes:
    data = bytearray(data)
    if how == "truncate":
        return bytes(data[: int(rng.integers(0, len(data)))])
    if how == "flip-gz":  # anywhere in the compressed stream, header and trailer included
        for _ in range(int(rng.integers(1, 4))):
            data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        return bytes(data)
    raw = bytearray(gzip.decompress(bytes(data)))
    if how == "flip-header":  # magic, type, dimensions
        raw[int(rng.integers(0, 16 if raw[3] == 3 else 8))] ^= 1 << int(rng.integers(0, 8))
    elif how == "count":
        count = int.from_bytes(raw[4:8], "big")
        raw[4:8] = (count + int(rng.choice([-2, -1, 1, 3]))).to_bytes(4, "big")
    elif how == "truncate-raw":
        raw = raw[: int(rng.integers(0, len(raw)))]
    return gzip.compress(bytes(raw), compresslevel=1)


@pytest.mark.parametrize("how", ["truncate", "flip-gz", "flip-header", "count", "truncate-raw"])
def test_damaged_real_mnist_files_name_the_file(mnist_copy, tmp_path, how):
    from fastconv.datasets import DatasetError, load_mnist

    rng = np.random.default_rng(zlib.crc32(how.encode()))  # str hash() varies per process
    trials, undetected = 0, 0
    for trial in range(6):
        root = tmp_path / f"{how}-{trial}"
        shutil.copytree(mnist_copy, root)
        name = MNIST_FILES[trial % 4]
        (root / name).write_bytes(_damage((mnist_copy / name).read_bytes(), how, rng))
        trials += 1
        try:
            load_mnist(root, download=False, progress=False)
        except DatasetError as e:
            assert name in str(e), f"{how}: error does not name {name}: {e}"
        else:
            # a flipped header bit can give another valid layout only for labels/images that
            # still pair up; anything that loads must still be MNIST-shaped
            undetected += 1
    assert undetected <= trials // 3, f"{how}: {undetected} of {trials} damaged copies loaded"


def test_train_cli_names_a_damaged_dataset_file(mnist_copy, tmp_path, capsys):
    from fastconv._cli import train as _train_cli

    root = tmp_path / "data"
    shutil.copytree(mnist_copy, root)
    name = "t10k-labels-idx1-ubyte.gz"
    (root / name).write_bytes((mnist_copy / name).read_bytes()[:-9])
    status = _train_cli.main(["--data-dir", str(root), "--no-download", "--epochs", "1",
                              "--checkpoint", str(tmp_path / "c"), "--save", str(tmp_path / "m"),
                              "--no-progress", "--backend", "numpy"])
    err = capsys.readouterr().err
    assert status == 2
    assert name in err and "Traceback" not in err


# ------------------------------------------------------------------------- numba cache

_CACHE_SCRIPT = """
import numpy as np, fastconv as fc
x = np.arange(2 * 3 * 6 * 6, dtype=np.float32).reshape(2, 3, 6, 6) % 7
y, idx = fc.max_pool2d(x, 2, backend="numba")
assert np.array_equal(y, x.reshape(2, 3, 3, 2, 3, 2).max(axis=(3, 5)))
print("ok")
"""


@pytest.mark.skipif("numba" not in TEST_BACKENDS, reason="numba backend not under test")
def test_damaged_numba_cache_does_not_break_the_backend(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))

    def run():
        return subprocess.run([sys.executable, "-c", _CACHE_SCRIPT], capture_output=True,
                              text=True, timeout=300, env=env)

    first = run()
    assert first.returncode == 0, first.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert files, "numba wrote no cache files"
    for i, p in enumerate(files):  # truncate some, fill others with garbage
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2] if i % 2 else b"\0garbage")
    second = run()
    assert second.returncode == 0 and second.stdout.strip() == "ok", second.stderr[-3000:]


if __name__ == "__main__":
    if sys.argv[1] == "writer":
        writer(sys.argv[2], int(sys.argv[3]))
    else:
        print(json.dumps(fsize_worker(sys.argv[2])))


def test_stale_checkpoint_temporaries_are_removed_fresh_ones_kept(tmp_path):
    """A writer killed mid-write leaves `.NAME.XXXX.tmp`; the next successful save removes such
    files once they are older than an hour, and never a fresh one (a concurrent writer's)."""
    from fastconv.nn import save_checkpoint, load_checkpoint

    target = tmp_path / "train.ckpt"
    stale = tmp_path / ".train.ckpt.abc123.tmp"
    fresh = tmp_path / ".train.ckpt.def456.tmp"
    other = tmp_path / ".other.ckpt.abc123.tmp"
    for f in (stale, fresh, other):
        f.write_bytes(b"partial")
    old = os.path.getmtime(stale) - 2 * 3600
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    save_checkpoint(target, {"w": np.arange(3.0)})
    assert not stale.exists()
    assert fresh.exists() and other.exists()
    np.testing.assert_array_equal(load_checkpoint(target)["w"], np.arange(3.0))
