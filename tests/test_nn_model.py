"""Sequential (against an equivalent torch.nn model), save/load and checkpoint files."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fastconv import nn

torch = pytest.importorskip("torch")
tnn = torch.nn


def mnist_net(rng, dtype=np.float32, backend=None):
    """PyTorch's examples/mnist net, in fastconv."""
    kw = dict(rng=rng, dtype=dtype)
    return nn.Sequential(
        nn.Conv2D(1, 4, 3, **kw), nn.ReLU(), nn.Conv2D(4, 8, 3, **kw), nn.ReLU(),
        nn.MaxPool2D(2), nn.Dropout(0.25, rng=rng), nn.Flatten(), nn.Dense(8 * 4 * 4, 16, **kw),
        nn.ReLU(), nn.Dropout(0.5, rng=rng), nn.Dense(16, 10, **kw),
        input_shape=(1, 12, 12), backend=backend,
    )


def torch_twin(model, dtype=torch.float64):
    """The same architecture in torch.nn, with fastconv's weights copied in by name."""
    layers = []
    for layer in model:
        cfg = layer.get_config()
        if isinstance(layer, nn.Conv2D):
            layers.append(tnn.Conv2d(cfg["in_channels"], cfg["out_channels"],
                                     cfg["kernel_size"], cfg["stride"]))
        elif isinstance(layer, nn.Dense):
            layers.append(tnn.Linear(cfg["in_features"], cfg["out_features"]))
        elif isinstance(layer, nn.MaxPool2D):
            layers.append(tnn.MaxPool2d(cfg["kernel_size"], cfg["stride"]))
        elif isinstance(layer, nn.Dropout):
            layers.append(tnn.Dropout(cfg["p"]))
        else:
            layers.append({"ReLU": tnn.ReLU, "Flatten": tnn.Flatten}[type(layer).__name__]())
    twin = tnn.Sequential(*layers).to(dtype)
    state = {k: torch.tensor(v) for k, v in model.named_parameters().items()}
    twin.load_state_dict(state, strict=True)  # same names and shapes: PyTorch layouts
    return twin


@pytest.mark.parametrize("backend", ["numpy", None], ids=["numpy", "default"])
def test_weights_move_to_torch_with_same_outputs_and_gradients(backend, rng):
    model = mnist_net(rng, np.float64, backend)
    twin = torch_twin(model).eval()
    x = rng.standard_normal((3, 1, 12, 12))
    y = np.array([1, 7, 3])
    loss = nn.SoftmaxCrossEntropy()
    out = model.forward(x, training=False)
    value = loss.forward(out, y)
    dx = model.backward(loss.backward(), input_grad=True)

    tx = torch.tensor(x, requires_grad=True)
    tout = twin(tx)
    tloss = tnn.functional.cross_entropy(tout, torch.tensor(y))
    tloss.backward()
    np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-10, atol=1e-12)
    assert value == pytest.approx(tloss.item(), rel=1e-10)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-12)
    tgrads = {k: p.grad.numpy() for k, p in twin.named_parameters()}
    grads = model.named_grads()
    assert set(grads) == set(tgrads)
    for k in grads:
        np.testing.assert_allclose(grads[k], tgrads[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_fit_follows_torch_training(rng):
    """Same data, weights and SGD recipe (no dropout, no shuffle): same loss trajectory."""
    model = nn.Sequential(nn.Conv2D(1, 3, 3, rng=rng), nn.ReLU(), nn.MaxPool2D(2),
                          nn.Flatten(), nn.Dense(3 * 3 * 3, 4, rng=rng))
    twin = torch_twin(model, torch.float32)
    x = rng.standard_normal((24, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 4, 24)
    history = model.fit(x, y, epochs=3, batch_size=8, shuffle=False, verbose=False,
                        optimizer=nn.SGD(0.1, momentum=0.9))
    opt = torch.optim.SGD(twin.parameters(), 0.1, momentum=0.9)
    for epoch in range(3):
        total = 0.0
        for s in range(0, 24, 8):
            opt.zero_grad()
            loss = tnn.functional.cross_entropy(twin(torch.tensor(x[s:s + 8])),
                                                torch.tensor(y[s:s + 8]))
            loss.backward()
            opt.step()
            total += loss.item() * 8
        assert history["loss"][epoch] == pytest.approx(total / 24, rel=1e-4)
    assert history["loss"][-1] < history["loss"][0]


def test_evaluate_and_predict_are_batched_and_consistent(rng):
    model = mnist_net(rng, backend="numpy")
    x = rng.standard_normal((10, 1, 12, 12)).astype(np.float32)
    y = rng.integers(0, 10, 10)
    full = model.forward(x, training=False)
    out = model.predict(x, batch_size=3)
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)
    loss, acc = model.evaluate(x, y, batch_size=4)
    ref = torch.nn.functional.cross_entropy(torch.tensor(full), torch.tensor(y)).item()
    assert loss == pytest.approx(ref, rel=1e-4)
    assert acc == np.mean(full.argmax(1) == y)


def test_summary_lists_shapes_and_parameter_counts(rng):
    model = mnist_net(rng)
    text = model.summary(print_fn=None)
    assert "(8, 4, 4)" in text and "(128,)" in text and "(10,)" in text
    total = sum(p.numel() for p in torch_twin(model).parameters())
    assert f"Total params: {total:,}" in text
    assert repr(model).startswith("Sequential(\n  (0): Conv2D(1, 4, kernel_size=(3, 3)")


def test_save_load_round_trip(tmp_path, rng):
    model = mnist_net(rng)
    x = rng.standard_normal((2, 1, 12, 12)).astype(np.float32)
    path = model.save(tmp_path / "m.ckpt", metadata={"note": "hi"})
    loaded = nn.Sequential.load(path)
    assert repr(loaded) == repr(model)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    other = mnist_net(np.random.default_rng(1))
    assert other.load(path) is other
    for k, v in model.named_parameters().items():
        np.testing.assert_array_equal(other.named_parameters()[k], v)
    assert nn.load_checkpoint(path)["metadata"] == {"note": "hi"}


# ------------------------------------------------------------------------------- checkpoints


def _state(rng):
    return {"params": {"0.weight": rng.standard_normal((2, 3)).astype(np.float32),
                       "labels": np.arange(4, dtype=np.int64)},
            "epoch": 3, "lr": 0.5, "name": "x", "flags": [True, None, 1.5],
            "rng": np.random.default_rng(5).bit_generator.state, "empty": np.zeros((0, 2))}


def test_checkpoint_round_trip_preserves_arrays_and_metadata(tmp_path, rng):
    state = _state(rng)
    nn.save_checkpoint(tmp_path / "c.ckpt", state)
    back = nn.load_checkpoint(tmp_path / "c.ckpt")
    for k in ("epoch", "lr", "name", "flags", "rng"):
        assert back[k] == state[k]
    for k, v in state["params"].items():
        assert back["params"][k].dtype == v.dtype
        np.testing.assert_array_equal(back["params"][k], v)
    assert back["empty"].shape == (0, 2)
    assert os.listdir(tmp_path) == ["c.ckpt"]  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "truncate-header", "flip", "append", "magic",
                                    "version", "empty"])
def test_damaged_checkpoint_raises_checkpoint_error_naming_the_file(damage, tmp_path, rng):
    path = tmp_path / "damaged.ckpt"
    nn.save_checkpoint(path, _state(rng))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "truncate-header":
        data = data[:20]
    elif damage == "flip":
        data[-50] ^= 0x01
    elif damage == "append":
        data += b"junk"
    elif damage == "magic":
        data[:4] = b"PK\x03\x04"
    elif damage == "version":
        data = data.replace(b'"format": 1', b'"format": 9', 1)
    else:
        data = b""
    path.write_bytes(bytes(data))
    with pytest.raises(nn.CheckpointError, match="damaged.ckpt") as info:
        nn.load_checkpoint(path)
    assert isinstance(info.value, ValueError)


def test_failed_write_keeps_previous_checkpoint(tmp_path, rng, monkeypatch):
    path = tmp_path / "keep.ckpt"
    nn.save_checkpoint(path, {"epoch": 1})

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(nn.CheckpointWriteError, match="keep.ckpt.*No space left") as info:
        nn.save_checkpoint(path, {"epoch": 2, "w": rng.standard_normal(10)})
    assert isinstance(info.value, OSError)
    monkeypatch.undo()
    assert nn.load_checkpoint(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["keep.ckpt"]


def test_checkpoint_refuses_unstorable_entries(tmp_path):
    with pytest.raises(TypeError, match="object array"):
        nn.save_checkpoint(tmp_path / "o.ckpt", {"a": np.array([object()])})
    with pytest.raises(TypeError, match="set"):
        nn.save_checkpoint(tmp_path / "o.ckpt", {"a": {1, 2}})
    assert not os.listdir(tmp_path)


def test_loading_a_non_model_checkpoint_is_a_clear_error(tmp_path):
    nn.save_checkpoint(tmp_path / "s.ckpt", {"epoch": 1})
    with pytest.raises(nn.CheckpointError, match="holds no fastconv model"):
        nn.Sequential.load(tmp_path / "s.ckpt")
