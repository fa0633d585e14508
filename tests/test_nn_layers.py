"""fastconv.nn layers, loss and optimizers: float64 finite differences and PyTorch references."""

from __future__ import annotations

import numpy as np
import pytest

import fastconv as fc
from fastconv import nn

torch = pytest.importorskip("torch")

# The numpy reference backend and whatever the selection order picks here (numba when built).
LAYER_BACKENDS = ["numpy", None]
F64 = np.float64


def _layer_cases():
    """(id, factory(rng, backend), input shape, margin): small shapes, float64 parameters."""
    return [
        ("conv-pad1", lambda r, b: nn.Conv2D(2, 3, 3, padding=1, rng=r, dtype=F64, backend=b),
         (2, 2, 5, 5)),
        ("conv-s2-d2-g2-nobias", lambda r, b: nn.Conv2D(
            4, 2, (3, 2), stride=2, dilation=(2, 1), groups=2, bias=False, rng=r, dtype=F64,
            backend=b), (2, 4, 7, 6)),
        ("conv-same-even", lambda r, b: nn.Conv2D(1, 2, 2, padding="same", rng=r, dtype=F64,
                                                  backend=b), (1, 1, 4, 5)),
        ("maxpool2", lambda r, b: nn.MaxPool2D(2, backend=b), (2, 2, 4, 5)),
        ("maxpool3-s2-p1", lambda r, b: nn.MaxPool2D(3, stride=2, padding=1, backend=b),
         (1, 2, 5, 5)),
        ("relu", lambda r, b: nn.ReLU(backend=b), (3, 7)),
        ("flatten", lambda r, b: nn.Flatten(backend=b), (2, 3, 2, 2)),
        ("dense", lambda r, b: nn.Dense(6, 4, rng=r, dtype=F64, backend=b), (3, 6)),
        ("dense-glorot-nobias", lambda r, b: nn.Dense(5, 3, bias=False, init="glorot_uniform",
                                                      rng=r, dtype=F64, backend=b), (2, 5)),
        ("dropout", lambda r, b: nn.Dropout(0.4, rng=r, backend=b), (4, 6)),
    ]


CASES = _layer_cases()


def _forward(layer, x):
    if isinstance(layer, nn.Dropout):  # the same mask for every evaluation
        layer.rng = np.random.default_rng(7)
    return layer.forward(x, training=True)


def _numeric_grad(f, a, eps=1e-6):
    """Central differences of scalar ``f()`` with respect to every element of ``a`` (in place)."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        hi = f()
        flat[i] = old - eps
        lo = f()
        flat[i] = old
        gflat[i] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("backend", LAYER_BACKENDS, ids=["numpy", "default"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_layer_gradients_match_finite_differences(case, backend, rng):
    _, factory, shape = case
    layer = factory(rng, backend)
    x = rng.standard_normal(shape)
    x[np.abs(x) < 1e-3] = 0.5  # keep ReLU away from its kink
    g = rng.standard_normal(_forward(layer, x).shape)

    y = _forward(layer, x)
    dx = layer.backward(g)
    assert y.dtype == F64 and dx.shape == x.shape
    assert set(layer.grads) == set(layer.params)

    def objective():
        return float(np.sum(_forward(layer, x) * g))

    np.testing.assert_allclose(dx, _numeric_grad(objective, x), rtol=1e-6, atol=1e-8)
    for name, p in layer.params.items():
        assert layer.grads[name].shape == p.shape and layer.grads[name].dtype == p.dtype
        np.testing.assert_allclose(layer.grads[name], _numeric_grad(objective, p),
                                   rtol=1e-6, atol=1e-8, err_msg=name)


def test_backward_without_input_grad_returns_none(rng):
    layer = nn.Conv2D(1, 2, 3, rng=rng, backend="numpy")
    x = rng.standard_normal((1, 1, 5, 5)).astype(np.float32)
    layer.forward(x)
    assert layer.backward(np.ones((1, 2, 3, 3), np.float32), input_grad=False) is None
    assert layer.grads["weight"].shape == (2, 1, 3, 3)


def test_backward_before_forward_is_a_clear_error():
    with pytest.raises(RuntimeError, match="before forward"):
        nn.MaxPool2D(2).backward(np.zeros((1, 1, 1, 1)))


def test_dropout_is_identity_at_inference_and_scales_in_training(rng):
    layer = nn.Dropout(0.25, rng=rng)
    x = np.ones((200, 50), np.float32)
    np.testing.assert_array_equal(layer.forward(x, training=False), x)
    y = layer.forward(x, training=True)
    assert y.dtype == np.float32
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert 0.2 < np.mean(y == 0) < 0.3
    with pytest.raises(ValueError, match="p must be in"):
        nn.Dropout(1.0)


@pytest.mark.skipif(fc.backend_status()["numba"] is not None, reason="needs numba")
@pytest.mark.parametrize("dtype", [np.float32, F64])
def test_parallel_relu_and_dropout_equal_the_numpy_path_bit_for_bit(rng, dtype):
    """Beside the numba backend ReLU and Dropout run compiled kernels; the NumPy path (any other
    backend) is the reference: same outputs, same masks from the same seed, NaN/inf included,
    non-contiguous input accepted."""
    x = rng.standard_normal((3, 4, 9, 10)).astype(dtype)[:, :, :, ::2]
    x[0, 0, 0, :4] = [np.nan, np.inf, -np.inf, 0.0]
    g = rng.standard_normal(x.shape).astype(dtype)
    g[0, 0, 1, :2] = [np.nan, np.inf]
    results = {}
    for backend in ("numba", "numpy"):
        relu = nn.ReLU(backend=backend)
        drop = nn.Dropout(0.3, rng=5, backend=backend)
        results[backend] = (relu.forward(x), relu.backward(g), drop.forward(x), drop.backward(g))
    for got, want in zip(results["numba"], results["numpy"]):
        assert got.dtype == dtype and got.shape == x.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(fc.backend_status()["numba"] is not None, reason="needs numba")
@pytest.mark.parametrize("batch, n_in, n_out", [(64, 9216 // 4, 128), (70, 301, 70), (67, 190, 93)])
def test_dense_on_numba_kernels_matches_float64_and_torch(rng, monkeypatch, batch, n_in, n_out):
    """Beside the numba backend, large float32 Dense products run on the register-blocked
    kernels (remainder rows, a shifted last column block, the forward's inner-dimension chunks
    all exercised here): float64 NumPy is the reference, torch.nn.Linear the second opinion."""
    from fastconv.backends.numba import _nn as _numba_nn

    used = []
    real = _numba_nn._gemm
    monkeypatch.setattr(_numba_nn, "_gemm",
                        lambda *a: used.append(real(*a) is not None) or real(*a))
    dense = nn.Dense(n_in, n_out, rng=3, backend="numba")
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    g = rng.standard_normal((batch, n_out)).astype(np.float32)
    y = dense.forward(x)
    dx = dense.backward(g.T.copy().T)  # a non-contiguous gradient is fine
    assert used == [True, True]
    w = dense.params["weight"].astype(F64)
    want = (x @ w.T + dense.params["bias"], g @ w, g.T.astype(F64) @ x, g.sum(axis=0))
    got = (y, dx, dense.grads["weight"], dense.grads["bias"])
    for name, a, b in zip(("y", "dx", "dw", "db"), got, want):
        assert a.dtype == np.float32, name
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.abs(b).max(), err_msg=name)
    linear = torch.nn.Linear(n_in, n_out)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(dense.params["weight"]))
        linear.bias.copy_(torch.from_numpy(dense.params["bias"]))
    np.testing.assert_allclose(y, linear(torch.from_numpy(x)).detach().numpy(), rtol=1e-4,
                               atol=1e-4)


def test_relu_gradient_is_a_select_as_in_torch():
    x = np.array([-1.0, 0.0, 2.0, np.nan, 3.0], np.float32)
    g = np.array([np.nan, np.inf, 5.0, 1.0, np.nan], np.float32)
    tx = torch.from_numpy(x.copy()).requires_grad_()
    torch.relu(tx).backward(torch.from_numpy(g))
    for backend in LAYER_BACKENDS:
        layer = nn.ReLU(backend=backend)
        np.testing.assert_array_equal(layer.forward(x), torch.relu(tx).detach().numpy())
        np.testing.assert_array_equal(layer.backward(g), tx.grad.numpy())


@pytest.mark.parametrize("init,expected_std", [
    ("he_normal", np.sqrt(2 / (16 * 9))),
    ("glorot_uniform", np.sqrt(6 / (16 * 9 + 32 * 9)) / np.sqrt(3)),
])
def test_initialisers_have_the_documented_spread(init, expected_std, rng):
    w = nn.Conv2D(16, 32, 3, init=init, rng=rng).params["weight"]
    assert w.dtype == np.float32 and w.shape == (32, 16, 3, 3)
    assert abs(w.std() / expected_std - 1) < 0.05
    assert abs(w.mean()) < 0.1 * expected_std


def test_layers_are_float32_and_have_readable_reprs(rng):
    conv = nn.Conv2D(1, 32, 3, rng=rng)
    assert conv.params["weight"].dtype == np.float32 and conv.params["bias"].dtype == np.float32
    assert repr(conv) == "Conv2D(1, 32, kernel_size=(3, 3), stride=(1, 1))"
    assert repr(nn.Dense(9216, 128, rng=rng)) == "Dense(9216, 128)"
    assert repr(nn.MaxPool2D(2)) == "MaxPool2D(kernel_size=(2, 2), stride=(2, 2))"
    assert repr(nn.Dropout(0.5)) == "Dropout(p=0.5)"
    assert repr(nn.ReLU()) == "ReLU()"


# ------------------------------------------------------------------------------- loss


def test_softmax_cross_entropy_matches_torch(rng):
    logits = rng.standard_normal((5, 4)) * 10
    labels = rng.integers(0, 4, 5)
    loss = nn.SoftmaxCrossEntropy()
    value = loss.forward(logits, labels)
    grad = loss.backward()
    t = torch.tensor(logits, requires_grad=True)
    ref = torch.nn.functional.cross_entropy(t, torch.tensor(labels))
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_softmax_cross_entropy_is_stable_and_validates():
    loss = nn.SoftmaxCrossEntropy()
    big = np.array([[1e4, 0.0], [0.0, -1e4]], np.float32)
    assert np.isfinite(loss.forward(big, np.array([1, 1])))
    assert loss.backward().dtype == np.float32
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        loss.forward(big, np.array([0, 2]))
    with pytest.raises(ValueError, match="labels must have shape"):
        loss.forward(big, np.array([0]))


# ------------------------------------------------------------------------------- optimizers


def _trajectories(make_ours, make_torch, rng, steps=6):
    shapes = {"a": (3, 4), "b": (5,)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
             for _ in range(steps)]
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    ours, theirs = make_ours(), make_torch(list(tparams.values()))
    for step in range(steps):
        ours.step(params, grads[step])
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[step][k])
        theirs.step()
        for k in shapes:
            assert params[k].dtype == np.float32
            np.testing.assert_allclose(params[k], tparams[k].detach().numpy(), rtol=2e-5,
                                       atol=2e-6, err_msg=f"{k} after step {step + 1}")
    return ours


@pytest.mark.parametrize("kw", [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, dampening=0.3),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.05, momentum=0.8, weight_decay=0.01, nesterov=True),
    dict(lr=0.1, weight_decay=0.1),
], ids=["plain", "momentum", "dampening", "nesterov", "nesterov-wd", "wd"])
def test_sgd_follows_torch(kw, rng):
    _trajectories(lambda: nn.SGD(**kw), lambda ps: torch.optim.SGD(ps, **kw), rng)


@pytest.mark.parametrize("kw", [
    dict(lr=1e-2),
    dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=1e-2, weight_decay=0.05),
], ids=["default", "betas-eps", "wd"])
@pytest.mark.parametrize("fused", [False, None], ids=["numpy", "auto"])
def test_adam_follows_torch(kw, fused, rng):
    opt = _trajectories(lambda: nn.Adam(**kw, fused=fused),
                        lambda ps: torch.optim.Adam(ps, **kw), rng)
    assert opt.t == 6


@pytest.mark.parametrize("backend", fc.available_backends())
def test_every_backend_serves_the_nn_ops(backend, rng):
    """The nn ops are part of the backend contract: each backend has them all, and SGD, Adam,
    ReLU, Dropout and Dense on ``backend=`` give the reference's values (torch's updates; the
    NumPy backend's layers, the same dropout mask from the same seed)."""
    from fastconv import _dispatch
    from fastconv.backends._host_ops import NN_OPS

    module = _dispatch.get_backend(backend)
    assert [op for op in NN_OPS if not callable(getattr(module, op, None))] == []
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    _trajectories(lambda: nn.SGD(**kw, backend=backend), lambda ps: torch.optim.SGD(ps, **kw),
                  rng, steps=3)
    _trajectories(lambda: nn.Adam(1e-2, backend=backend), lambda ps: torch.optim.Adam(ps, 1e-2),
                  rng, steps=3)
    x = rng.standard_normal((70, 40)).astype(np.float32)
    g = rng.standard_normal((70, 40)).astype(np.float32)
    for make in (lambda b: nn.ReLU(backend=b), lambda b: nn.Dropout(0.3, rng=1, backend=b),
                 lambda b: nn.Dense(40, 40, rng=2, backend=b)):
        ours, ref = make(backend), make("numpy")
        np.testing.assert_allclose(ours.forward(x), ref.forward(x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours.backward(g), ref.backward(g), rtol=1e-5, atol=1e-5)


def test_optimizer_state_round_trips_exactly(rng):
    params = {"w": rng.standard_normal(10).astype(np.float32)}
    grads = [{"w": rng.standard_normal(10).astype(np.float32)} for _ in range(4)]
    a = nn.Adam(1e-2)
    for g in grads[:2]:
        a.step(params, g)
    b = nn.Adam(99.0)
    b.load_state_dict(a.state_dict())
    p2 = {"w": params["w"].copy()}
    for g in grads[2:]:
        a.step(params, g)
        b.step(p2, g)
    np.testing.assert_array_equal(params["w"], p2["w"])


def test_optimizers_reject_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr must be"):
        nn.SGD(lr=float("nan"))
    with pytest.raises(ValueError, match="Nesterov"):
        nn.SGD(lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        nn.Adam(betas=(0.9, 1.0))
