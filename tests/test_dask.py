"""Inference over dask arrays: lazy ``predict``, reduced ``evaluate``, a LocalCluster on 127.0.0.1.

The reference is NumPy ``Sequential.predict`` on the same images. A sample's outputs may move in
the last bit with its batch size, so outputs are compared within float32 rounding and their
argmax exactly.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest

from fastconv import nn
from fastconv.datasets import normalize

da = pytest.importorskip("dask.array", reason='needs pip install "fastconv[dask]"')
distributed = pytest.importorskip("distributed", reason='needs pip install "fastconv[dask]"')

UNEVEN = (100, 37, 1, 162)  # 300 images


@pytest.fixture(scope="module")
def model():
    return nn.lenet5(rng=11, backend="numpy")


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(12)
    return rng.integers(0, 256, (sum(UNEVEN), 28, 28), dtype=np.uint8), rng.integers(0, 10, 300)


@pytest.fixture(scope="module")
def client():
    """Two worker processes, one thread each, on loopback; always closed."""
    cluster = None
    try:
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, env={"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
            # The scheduler's small HTTP server (health routes) on a free loopback port.
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"})
        with distributed.Client(cluster, timeout=60) as c:
            yield c
    finally:
        if cluster is not None:
            cluster.close(timeout=30)


def _assert_same(got, ref):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(axis=1), ref.argmax(axis=1))


@pytest.mark.parametrize("scheduler", ["synchronous", "threads"])
def test_local_schedulers_match_numpy_and_stay_lazy(model, images, scheduler):
    x, _ = images
    calls = []

    def transform(batch):
        calls.append(len(batch))
        return normalize(batch)

    lazy = model.predict(da.from_array(x, chunks=(UNEVEN, 28, 28)), transform=transform)
    assert isinstance(lazy, da.Array) and lazy.chunks == (UNEVEN, (10,))
    assert calls == [1]  # only the one-sample probe ran: nothing computed yet
    got = lazy.compute(scheduler=scheduler)
    assert sorted(calls[1:]) == sorted(UNEVEN)
    _assert_same(got, model.predict(x, transform=normalize))


def test_the_model_is_one_graph_node_and_a_snapshot(images):
    x, _ = images
    model = nn.lenet5(rng=3, backend="numpy")
    before = model.predict(x, transform=normalize)
    lazy = model.predict(da.from_array(x, chunks=10), transform=normalize)  # 30 blocks
    graph = dict(lazy.__dask_graph__())
    holders = [k for k, v in graph.items() if isinstance(getattr(v, "value", v), nn.Sequential)]
    assert len(holders) == 1
    import cloudpickle

    tasks = [v for k, v in graph.items() if str(k).startswith("('fastconv-predict'")
             or (isinstance(k, tuple) and k[0] == "fastconv-predict")]
    assert len(tasks) == 30
    weights = sum(p.nbytes for p in model.named_parameters().values())
    assert sum(len(cloudpickle.dumps(t)) for t in tasks) < weights / 10  # no weights inside
    for p in model.named_parameters().values():
        p += 1.0  # training on after predict() does not change the lazy result
    _assert_same(lazy.compute(scheduler="synchronous"), before)


def test_wrong_chunks_give_numpys_error(model, images):
    x, _ = images
    for bad in (x.astype(np.int32)[:, None], np.zeros((20, 1, 27, 28), np.float32)):
        with pytest.raises((TypeError, ValueError)) as numpy_error:
            model.predict(bad)
        with pytest.raises(type(numpy_error.value)) as dask_error:
            model.predict(da.from_array(bad, chunks=7))
        assert str(dask_error.value).split(",")[0] == str(numpy_error.value).split(",")[0]
        assert "dtype" in str(dask_error.value) or "expects input" in str(dask_error.value)


def test_evaluate_reduces_blocks_like_numpy(model, images):
    x, y = images
    ref_loss, ref_acc = model.evaluate(x, y, transform=normalize)
    for labels in (y, da.from_array(y, chunks=50)):
        loss, acc = model.evaluate(da.from_array(x, chunks=(UNEVEN, 28, 28)), labels,
                                   transform=normalize)
        assert acc == ref_acc
        assert loss == pytest.approx(ref_loss, rel=1e-6)
    with pytest.raises(ValueError, match="300 samples but y has 299"):
        model.evaluate(da.from_array(x, chunks=100), y[:-1])


def test_local_cluster_matches_numpy(client, model, images):
    x, y = images
    lazy = model.predict(da.from_array(x, chunks=(UNEVEN, 28, 28)), transform=normalize)
    got = client.compute(lazy).result(timeout=60)
    _assert_same(got, model.predict(x, transform=normalize))
    loss, acc = model.evaluate(da.from_array(x, chunks=(UNEVEN, 28, 28)), y, transform=normalize)
    ref_loss, ref_acc = model.evaluate(x, y, transform=normalize)
    assert acc == ref_acc
    assert loss == pytest.approx(ref_loss, rel=1e-6)


def test_the_cluster_listens_on_loopback_only(client):
    psutil = pytest.importorskip("psutil")
    pids = [os.getpid(), *client.run(os.getpid).values()]
    listening = [c.laddr for pid in pids for c in psutil.Process(pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_a_worker_killed_during_compute_is_retried(client, model, images):
    x, _ = images

    def slow(batch):
        time.sleep(0.4)
        return normalize(batch)

    pids = client.run(os.getpid)
    lazy = model.predict(da.from_array(x, chunks=25), transform=slow)  # 12 blocks, ~2.4 s
    future = client.compute(lazy)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(client.processing().values()):
        time.sleep(0.05)
    victim_address, victim = next(iter(pids.items()))
    time.sleep(0.5)  # let the victim finish a block or two: their results are lost with it
    assert not future.done()
    os.kill(victim, signal.SIGKILL)
    got = future.result(timeout=90)
    _assert_same(got, model.predict(x, transform=normalize))
    assert victim not in client.run(os.getpid).values()


def test_without_dask_the_error_says_how_to_install(model, monkeypatch):
    from fastconv.distributed import predict_dask

    monkeypatch.setitem(sys.modules, "dask", None)
    with pytest.raises(ImportError, match=r'pip install "fastconv\[dask\]"'):
        predict_dask(model, object())
