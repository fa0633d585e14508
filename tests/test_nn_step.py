"""The fused training step of ``Sequential`` (``fastconv.nn._step``): the same outputs and
gradients as the layers one by one, and as PyTorch's autograd (the independent reference)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import fastconv as fc
from fastconv import nn
from fastconv._splitmix import hi32
from fastconv.nn import _step

torch = pytest.importorskip("torch")
F = torch.nn.functional


def small_mnist(rng, dtype, backend):
    """PyTorch's examples/mnist net, scaled down: ReLU -> ReLU+MaxPool+Dropout -> ReLU+Dropout."""
    kw = dict(rng=rng, dtype=dtype)
    return nn.Sequential(
        nn.Conv2D(1, 4, 3, **kw), nn.ReLU(), nn.Conv2D(4, 8, 3, **kw), nn.ReLU(),
        nn.MaxPool2D(2), nn.Dropout(0.25, rng=rng), nn.Flatten(), nn.Dense(8 * 4 * 4, 16, **kw),
        nn.ReLU(), nn.Dropout(0.5, rng=rng), nn.Dense(16, 10, **kw), backend=backend,
    )


def small_lenet(rng, dtype, backend):
    """LeNet-5's pattern, scaled down: ReLU+MaxPool twice, then ReLU between Dense layers."""
    kw = dict(rng=rng, dtype=dtype)
    return nn.Sequential(
        nn.Conv2D(1, 3, 5, padding=2, **kw), nn.ReLU(), nn.MaxPool2D(2),
        nn.Conv2D(3, 4, 3, **kw), nn.ReLU(), nn.MaxPool2D(2), nn.Flatten(),
        nn.Dense(4 * 2 * 2, 12, **kw), nn.ReLU(), nn.Dense(12, 10, **kw), backend=backend,
    )


NETS = {"mnist": small_mnist, "lenet": small_lenet}


def fused_step(model, x, y, input_grad=False):
    """(output, loss, dx) of the fused stages (what ``train_batch`` runs before its update)."""
    loss = nn.SoftmaxCrossEntropy()
    stages = _step.plan(model.layers)
    out = _step.forward(stages, x)
    value = loss.forward(out, y)
    return out, value, _step.backward(stages, loss.backward(), input_grad=input_grad)


def test_plan_fuses_the_expected_layers(rng):
    kinds = [type(s).__name__ for s in _step.plan(small_mnist(rng, np.float32, "numpy").layers)]
    assert kinds == ["_Stage", "_ReLUStage", "_Stage", "_FusedStage", "_Stage", "_Stage",
                     "_FusedStage", "_Stage"]
    kinds = [type(s).__name__ for s in _step.plan(small_lenet(rng, np.float32, "numpy").layers)]
    assert kinds == ["_Stage", "_FusedStage", "_Stage", "_FusedStage", "_Stage", "_Stage",
                     "_ReLUStage", "_Stage"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("net", sorted(NETS))
def test_fused_step_equals_the_layers_one_by_one(backend, net, dtype):
    """Bit for bit: the same kernels on the same values (the pool's argmax differs only inside
    windows whose gradient is 0)."""
    a = NETS[net](np.random.default_rng(5), dtype, backend)
    b = NETS[net](np.random.default_rng(5), dtype, backend)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 1, 12, 12)).astype(dtype)
    x0 = x.copy()
    y = rng.integers(0, 10, 5)
    loss = nn.SoftmaxCrossEntropy()
    out_a = a.forward(x, training=True)
    value_a = loss.forward(out_a, y)
    dx_a = a.backward(loss.backward(), input_grad=True)
    out_b, value_b, dx_b = fused_step(b, x, y, input_grad=True)
    np.testing.assert_array_equal(x, x0)  # the caller's input is never written
    np.testing.assert_array_equal(out_b, out_a)
    assert value_b == value_a
    np.testing.assert_array_equal(dx_b, dx_a)
    ga, gb = a.named_grads(), b.named_grads()
    assert set(ga) == set(gb)
    for k in ga:
        np.testing.assert_array_equal(gb[k], ga[k], err_msg=k)


def _dropout_masks(model, rng_state, shapes, dtype):
    """The masks (scale or 0) the model's Dropout layers draw, in forward order, from a copy of
    their generator: splitmix64 of the drawn seed (the NumPy stream, not the kernels)."""
    gen = copy.deepcopy(rng_state)
    masks = []
    for layer, shape in zip([la for la in model if isinstance(la, nn.Dropout)], shapes):
        seed = np.uint64(gen.bit_generator.random_raw())
        keep = hi32(seed, int(np.prod(shape))) >= layer._threshold()
        masks.append(torch.tensor(np.where(keep, 1.0 / (1.0 - layer.p), 0.0).reshape(shape),
                                  dtype=dtype))
    return masks


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_train_batch_follows_torch_autograd_with_dropout(backend, dtype):
    """train_batch (SGD, lr 0.1) against PyTorch's autograd of ReLU -> MaxPool -> Dropout and
    ReLU -> Dropout with the same masks: the gradients and the updated weights."""
    rng = np.random.default_rng(7)
    model = small_mnist(rng, dtype, backend)
    x = rng.standard_normal((6, 1, 12, 12)).astype(dtype)
    y = rng.integers(0, 10, 6)
    tdt = torch.float64
    w = {k: torch.tensor(v, dtype=tdt, requires_grad=True)
         for k, v in model.named_parameters().items()}
    m1, m2 = _dropout_masks(model, model[5].rng, [(6, 8, 4, 4), (6, 16)], tdt)
    h = F.relu(F.conv2d(torch.tensor(x, dtype=tdt), w["0.weight"], w["0.bias"]))
    h = F.max_pool2d(F.relu(F.conv2d(h, w["2.weight"], w["2.bias"])), 2) * m1
    h = F.relu(F.linear(h.flatten(1), w["7.weight"], w["7.bias"])) * m2
    tloss = F.cross_entropy(F.linear(h, w["10.weight"], w["10.bias"]), torch.tensor(y))
    tloss.backward()
    before = model.state_dict()
    value = model.train_batch(x, y, nn.SGD(0.1))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-11)
    assert value == pytest.approx(tloss.item(), rel=tol["rtol"])
    grads = model.named_grads()
    for k, p in w.items():
        np.testing.assert_allclose(grads[k], p.grad.numpy(), **tol, err_msg=k)
        np.testing.assert_allclose(model.named_parameters()[k],
                                   before[k] - 0.1 * p.grad.numpy(), **tol, err_msg=k)


EDGE_GEOMETRIES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1),  # overlapping windows, -inf padding
    dict(kernel_size=3, stride=1),  # an element is the maximum of several windows
    dict(kernel_size=2, stride=2, ceil_mode=True),
    dict(kernel_size=2, stride=1, dilation=2),
]


def _edge_input(rng, dtype):
    """Ties (equal positive maxima, zeros, -0.0), all-negative windows, NaN and infinities."""
    x = rng.choice(np.array([-2.0, -1.0, -0.0, 0.0, 1.0, 1.0, 3.0], dtype), size=(2, 3, 7, 7))
    x[0, 0, :4, :4] = -1.5  # all-negative windows with ties
    x[0, 1, :2, :2] = 0.0
    x[0, 1, 0, 0] = -0.0
    x[1, 0, 1, 1] = np.nan
    x[1, 0, 4, 3] = np.nan
    x[1, 0, 4, 4] = np.nan  # two NaN in one window
    x[1, 1, 2, 2] = np.inf
    x[1, 1, 5, 5] = -np.inf
    x[1, 2, :, :3] = -np.inf
    return x


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("geometry", EDGE_GEOMETRIES, ids=lambda g: str(sorted(g.items())))
def test_relu_then_pool_edge_cases_match_torch_and_layers(backend, geometry, dropout):
    """ReLU -> MaxPool2D [-> Dropout] fused, on ties, all-negative windows, NaN and inf, with
    an upstream gradient holding NaN and inf too: the output and the input gradient equal the
    layers one by one and PyTorch's (relu, then max_pool2d)."""
    rng = np.random.default_rng(8)
    dtype = np.float64
    x = _edge_input(rng, dtype)

    def build():
        layers = [nn.ReLU(), nn.MaxPool2D(**geometry)]
        if dropout:
            layers.append(nn.Dropout(0.5, rng=np.random.default_rng(9)))
        return nn.Sequential(layers, backend=backend)

    a, b = build(), build()
    out_a = a.forward(x, training=True)
    stages = _step.plan(b.layers)
    assert len(stages) == 1
    out_b = _step.forward(stages, x)
    g = rng.standard_normal(out_a.shape)
    g.flat[::7] = np.nan
    g.flat[3::11] = np.inf
    dx_a = a.backward(g.copy(), input_grad=True)
    dx_b = _step.backward(stages, g.copy(), input_grad=True)
    np.testing.assert_array_equal(out_b, out_a)
    np.testing.assert_array_equal(dx_b, dx_a)

    tx = torch.tensor(x, requires_grad=True)
    ty = F.max_pool2d(F.relu(tx), **geometry)
    if dropout:
        ty = ty * _dropout_masks(b, np.random.default_rng(9), [out_a.shape], torch.float64)[0]
    ty.backward(torch.tensor(g))
    np.testing.assert_array_equal(out_b, ty.detach().numpy())
    np.testing.assert_array_equal(dx_b, tx.grad.numpy())


def test_train_batch_writes_neither_input_nor_loss_gradient(rng):
    """A leading ReLU works on a copy of the caller's input; the loss's gradient array (a loss
    may keep it) is not written either."""

    class KeepingLoss(nn.SoftmaxCrossEntropy):
        def backward(self):
            self.grad = super().backward()
            self.kept = self.grad.copy()
            return self.grad

    model = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Dense(16, 4, rng=rng), nn.ReLU(),
                          backend="numpy")
    x = rng.standard_normal((3, 1, 4, 4))
    x0 = x.copy()
    loss = KeepingLoss()
    model.train_batch(x, np.array([0, 1, 3]), nn.SGD(0.1), loss)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(loss.grad, loss.kept)


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (4, 32, 32, 33)], ids=["small", "large"])
@pytest.mark.parametrize("backend_name", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_ops_in_place_and_fused_dropout_equal_the_plain_ops(backend_name, dtype, shape):
    """relu(x, out=x), relu_backward(g, y, out=g) and dropout(..., relu=True) against the NumPy
    expressions they stand for (numba: its serial and parallel builds, below and above
    ``SERIAL_BELOW`` elements)."""
    if fc.backend_status().get(backend_name):
        pytest.skip(f"{backend_name} unavailable here")
    ops = fc._dispatch.get_backend(backend_name)
    rng = np.random.default_rng(10)
    x = rng.standard_normal(shape).astype(dtype)
    x.flat[::13] = np.nan
    x.flat[5::17] = -0.0
    g = rng.standard_normal(x.shape).astype(dtype)
    g.flat[1::19] = np.nan
    y_ref = np.where(x <= 0, dtype(0), x)
    dx_ref = np.where(y_ref <= 0, dtype(0), g)
    buf = x.copy()
    y = ops.relu(buf, out=buf)
    assert y is buf
    np.testing.assert_array_equal(y, y_ref)
    gbuf = g.copy()
    dx = ops.relu_backward(gbuf, y, out=gbuf)
    assert dx is gbuf
    np.testing.assert_array_equal(dx, dx_ref)

    seed, threshold, scale = np.uint64(12345), 2**31, dtype(2.0)
    keep = (hi32(seed, x.size) >= threshold).reshape(x.shape)
    yd, code = ops.dropout(x, seed, threshold, scale, relu=True)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(yd, y_ref * np.where(keep, scale, dtype(0)))
        dxd = ops.dropout_backward(g, code, scale, relu=True)
        np.testing.assert_array_equal(dxd, np.where(y_ref <= 0, dtype(0),
                                                    g * np.where(keep, scale, dtype(0))))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_adam_on_a_large_parameter_follows_torch(dtype):
    """Above ``ADAM_SERIAL_BELOW`` elements the numba Adam runs as a parallel pass: three steps
    of a 1,200,000-element parameter against ``torch.optim.Adam`` (weight decay on)."""
    if fc.backend_status().get("numba"):
        pytest.skip("numba unavailable here")
    rng = np.random.default_rng(11)
    p = rng.standard_normal((1200, 1000)).astype(dtype)
    tp = torch.tensor(p.copy(), requires_grad=True)
    topt = torch.optim.Adam([tp], lr=1e-2, weight_decay=0.01)
    opt = nn.Adam(1e-2, weight_decay=0.01, backend="numba", fused=True)
    for _ in range(3):
        g = rng.standard_normal(p.shape).astype(dtype)
        opt.step({"w": p}, {"w": g})
        tp.grad = torch.tensor(g)
        topt.step()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(p, tp.detach().numpy(), **tol)
    np.testing.assert_allclose(opt.exp_avg_sq["w"], topt.state[tp]["exp_avg_sq"].numpy(), **tol)
