"""Backend registry and selection: names, precedence, thread-locality, errors, lazy imports."""

from __future__ import annotations

import subprocess
import sys
import threading
import types

import numpy as np
import pytest

import fastconv as fc
from fastconv import _dispatch

X = np.ones((1, 2, 5, 5))
W = np.ones((3, 2, 3, 3))


def ran(op="conv2d"):
    """Name of the backend that ran the last ``op`` in this thread."""
    algo = fc.last_algorithm(op)
    return None if algo is None else algo.split(":")[0]


@pytest.fixture(autouse=True)
def clean_selection(monkeypatch):
    """Every test starts from automatic selection and leaves it so."""
    monkeypatch.delenv("FASTCONV_BACKEND", raising=False)
    fc.set_backend(None)
    yield
    fc.set_backend(None)


def test_available_backends():
    names = fc.available_backends()
    assert {"naive", "numpy"} <= set(names)
    status = fc.backend_status()
    assert list(status) == ["naive", "numpy", "numba", "cython", "cuda"]
    assert names == [n for n, reason in status.items() if reason is None]
    assert all(isinstance(r, str) and r for r in status.values() if r is not None)


@pytest.mark.parametrize("op", ["conv2d", "conv2d_backward", "max_pool2d",
                                "max_pool2d_backward"])
def test_last_algorithm_records_each_op(backend, op):
    y, idx = fc.max_pool2d(X, 2, backend=backend)
    calls = {
        "conv2d": lambda: fc.conv2d(X, W, backend=backend),
        "conv2d_backward": lambda: fc.conv2d_backward(np.ones((1, 3, 3, 3)), X, W,
                                                      backend=backend),
        "max_pool2d": lambda: fc.max_pool2d(X, 3, stride=1, backend=backend),
        "max_pool2d_backward": lambda: fc.max_pool2d_backward(y, idx, X.shape, backend=backend),
    }
    calls[op]()
    algo = fc.last_algorithm(op)
    assert isinstance(algo, str) and algo.startswith(f"{backend}:"), algo


def test_auto_selection_order():
    fc.conv2d(X, W)
    expected = next(n for n in ("numba", "cython", "numpy") if n in fc.available_backends())
    assert ran() == expected


def test_set_backend():
    fc.set_backend("naive")
    fc.conv2d(X, W)
    assert ran() == "naive"
    fc.set_backend(None)
    fc.conv2d(X, W)
    assert ran() != "naive"


def test_use_backend_nests_and_restores():
    with fc.use_backend("numpy"):
        with fc.use_backend("naive"):
            fc.max_pool2d(X, 2)
            assert ran("max_pool2d") == "naive"
        fc.max_pool2d(X, 2)
        assert ran("max_pool2d") == "numpy"
    fc.set_backend("naive")
    with pytest.raises(RuntimeError, match="boom"):
        with fc.use_backend("numpy"):
            raise RuntimeError("boom")
    fc.max_pool2d(X, 2)
    assert ran("max_pool2d") == "naive"  # the block was left despite the exception


def test_use_backend_is_thread_local():
    seen = {}

    def worker():
        fc.conv2d(X, W)
        seen["worker"] = ran()

    with fc.use_backend("naive"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        fc.conv2d(X, W)
        seen["main"] = ran()
    assert seen["main"] == "naive"
    assert seen["worker"] not in (None, "naive")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTCONV_BACKEND", "naive")
    fc.conv2d(X, W)
    assert ran() == "naive"
    monkeypatch.setenv("FASTCONV_BACKEND", "numbaa")
    with pytest.raises(ValueError, match="did you mean 'numba'"):
        fc.conv2d(X, W)


def test_precedence_argument_context_global_environment(monkeypatch):
    monkeypatch.setenv("FASTCONV_BACKEND", "naive")
    fc.set_backend("numpy")
    fc.conv2d(X, W)
    assert ran() == "numpy"  # set_backend beats the environment
    with fc.use_backend("naive"):
        fc.conv2d(X, W)
        assert ran() == "naive"  # use_backend beats set_backend
        fc.conv2d(X, W, backend="numpy")
        assert ran() == "numpy"  # the argument beats everything


def test_unknown_backend_everywhere():
    for call in (lambda: fc.set_backend("numbaa"), lambda: fc.use_backend("numbaa").__enter__(),
                 lambda: fc.conv2d(X, W, backend="numbaa")):
        with pytest.raises(ValueError, match="unknown backend 'numbaa'; did you mean 'numba'"):
            call()


@pytest.fixture
def fake_backends(monkeypatch):
    """Two extra registry entries: one whose module says it cannot run, one that fails to
    import. The registry caches are restored afterwards."""
    module = types.ModuleType("fastconv_test_fake_backend")
    module.unavailable_reason = lambda: "no fake accelerator on this machine"
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(_dispatch, "BACKEND_MODULES", {
        **_dispatch.BACKEND_MODULES,
        "fake": module.__name__,
        "broken": "fastconv.backends.no_such_backend_module",
    })
    monkeypatch.setattr(_dispatch, "_reasons", dict(_dispatch._reasons))
    monkeypatch.setattr(_dispatch, "_modules", dict(_dispatch._modules))


def test_unavailable_backend_gives_the_reason(fake_backends):
    with pytest.raises(fc.BackendUnavailableError,
                       match="backend 'fake' is not available: no fake accelerator") as err:
        fc.conv2d(X, W, backend="fake")
    for name in fc.available_backends():
        assert name in str(err.value)
    with pytest.raises(fc.BackendUnavailableError, match="import failed: No module named"):
        fc.set_backend("broken")
    with pytest.raises(fc.BackendUnavailableError, match="no fake accelerator"):
        fc.use_backend("fake").__enter__()
    assert {"fake", "broken"}.isdisjoint(fc.available_backends())


def test_real_unavailable_backends_give_their_reason():
    for name, reason in fc.backend_status().items():
        if reason is not None:
            with pytest.raises(fc.BackendUnavailableError, match=f"'{name}' is not available"):
                fc.max_pool2d(X, 2, backend=name)


def test_importing_fastconv_does_not_import_numba():
    code = ("import fastconv, sys; import numpy as np; "
            "fastconv.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)), backend='numpy'); "
            "assert 'numba' not in sys.modules, 'numba imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
