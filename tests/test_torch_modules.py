"""fastconv.torch modules and model conversion against the stock torch layers.

A torch model with convs (groups, dilation, 'same'), ReLU, pools (ceil_mode) and Linear layers
is converted: outputs and every parameter gradient equal the stock model's, 20 SGD steps track
the stock losses, ``torch.compile`` gives eager's outputs. Also: state dicts load unchanged,
unsupported options raise naming the option, ``convert`` warns once, ``to_sequential`` /
``from_sequential`` keep the function, and without torch ``import fastconv`` works while
``import fastconv.torch`` says how to install it.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import fastconv.torch as ft  # noqa: E402
from fastconv import nn as fnn  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOL32 = dict(rtol=1e-4, atol=1e-5)


def small_net():
    """Every conv/pool option the bridge supports, on 1x16x16 inputs, 10 classes."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding="same"), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2), nn.ReLU(),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),                     # 16 -> 8
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.ReLU(),  # depthwise
        nn.Conv2d(8, 12, 2, stride=2, padding=(1, 0)), nn.ReLU(),     # 8 -> (5, 4)
        nn.MaxPool2d(2, stride=1, padding=1), nn.Flatten(),           # (6, 5)
        nn.Linear(12 * 6 * 5, 10),
    )


def _batch(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_state_dict_and_constructor_parity():
    stock = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    ours = ft.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    assert [n for n, _ in ours.named_parameters()] == ["weight", "bias"]
    ours.load_state_dict(stock.state_dict())  # strict: same names and shapes
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(ours(x), stock(x), **TOL32)
    pool = ft.MaxPool2d(3, 2, 1, ceil_mode=True, return_indices=True)
    y, idx = pool(x)
    ref, ref_idx = nn.MaxPool2d(3, 2, 1, ceil_mode=True, return_indices=True)(x)
    assert torch.equal(y, ref) and torch.equal(idx, ref_idx)
    assert "backend=None" in repr(ours) and "ceil_mode=True" in repr(pool)
    assert ft.Conv2d(1, 2, 3, dtype=torch.float64).weight.dtype == torch.float64


def test_unsupported_options_name_the_option():
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        ft.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(TypeError, match=r"dtype=torch.float16"):
        ft.Conv2d(1, 2, 3, dtype=torch.float16)
    conv = ft.Conv2d(1, 2, 3)
    conv.padding_mode = "circular"
    with pytest.raises(ValueError, match="padding_mode='circular'"):
        conv(torch.randn(1, 1, 5, 5))
    with pytest.raises(TypeError, match=r"input has dtype torch.complex64"):
        ft.Conv2d(1, 2, 3)(torch.randn(1, 1, 5, 5, dtype=torch.complex64))
    with pytest.raises(TypeError, match=r"input has dtype torch.float16"):
        ft.MaxPool2d(2)(torch.randn(1, 1, 4, 4).half())


def test_convert_keeps_parameters_and_warns_once():
    model = small_net()
    model.insert(0, nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = ft.convert(model)
    assert out is model
    msgs = [str(w.message) for w in caught if "fastconv.torch.convert" in str(w.message)]
    assert len(msgs) == 1 and "1 layer(s)" in msgs[0] and "0: padding_mode='reflect'" in msgs[0]
    assert type(model[0]) is nn.Conv2d
    kinds = [type(m) for m in model]
    assert kinds.count(ft.Conv2d) == 4 and kinds.count(ft.MaxPool2d) == 2
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert any(p is model[1].weight for p in opt.param_groups[0]["params"])
    before = model[1].weight.detach().clone()
    x, _ = _batch(0, 2)
    model(x).sum().backward()
    opt.step()  # the optimizer built before the swap updates the converted layers
    assert not torch.equal(model[1].weight, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ft.convert(model[1:])  # nothing left to swap or to warn about
    nested = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 1, padding_mode="circular")))
    with pytest.warns(UserWarning, match=r"0\.1: padding_mode='circular'"):
        ft.convert(nested)
    assert type(nested[0][0]) is ft.Conv2d and type(nested[0][1]) is nn.Conv2d
    single = ft.convert(nn.MaxPool2d(2), backend="numpy")
    assert type(single) is ft.MaxPool2d and single.backend == "numpy"


def test_convert_leaves_a_half_models_layers_and_says_which():
    model = small_net().half()
    with pytest.warns(UserWarning, match=r"float16") as caught:
        ft.convert(model)
    assert not any(isinstance(m, (ft.Conv2d, ft.MaxPool2d)) for m in model.modules())
    msg = next(str(w.message) for w in caught if "fastconv.torch.convert" in str(w.message))
    pools = [i for i, m in enumerate(model) if isinstance(m, nn.MaxPool2d)]
    assert all(f"{i}: the model's dtype torch.float16" in msg for i in pools), msg


def test_converted_model_matches_stock_outputs_gradients_and_training():
    stock = small_net()
    converted = ft.convert(copy.deepcopy(stock))
    x, y = _batch(1)
    torch.testing.assert_close(converted(x), stock(x), **TOL32)
    for model in (stock, converted):
        nn.functional.cross_entropy(model(x), y).backward()
    for (name, a), (_, b) in zip(converted.named_parameters(), stock.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5,
                                   msg=lambda m: f"grad of {name}: {m}")
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (stock, converted)]
    losses = {0: [], 1: []}
    for step in range(20):
        x, y = _batch(100 + step % 2)  # two batches, learnt by heart
        for i, (model, opt) in enumerate(zip((stock, converted), opts)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
    np.testing.assert_allclose(losses[1], losses[0], rtol=2e-3, atol=1e-4)
    assert sum(losses[0][-2:]) < 0.9 * sum(losses[0][:2])  # it trained


def test_torch_compile_of_a_converted_model_equals_eager(capsys):
    model = ft.convert(small_net())
    x, y = _batch(2)
    start = time.perf_counter()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x)
    nn.functional.cross_entropy(out, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with capsys.disabled():
        print(f"\n[torch.compile(converted) first call + backward: "
              f"{time.perf_counter() - start:.1f} s]")
    model.zero_grad()
    torch.testing.assert_close(out, model(x))
    nn.functional.cross_entropy(model(x), y).backward()
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_no_grad_and_frozen_parameters_in_modules():
    model = ft.convert(small_net())
    for p in model[0].parameters():
        p.requires_grad_(False)
    x, y = _batch(3)
    nn.functional.cross_entropy(model(x), y).backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None
    with torch.inference_mode():
        assert model(x).is_inference()
    with torch.no_grad():
        assert model(x).grad_fn is None


def test_to_sequential_and_back():
    torch.manual_seed(1)
    tmodel = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5),
        nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True), nn.Flatten(), nn.Dropout(0.3),
        nn.Linear(400, 10),
    ).eval()
    seq = ft.to_sequential(tmodel)
    assert set(seq.state_dict()) == set(tmodel.state_dict())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        ref = tmodel(x).numpy()
    np.testing.assert_allclose(seq.predict(x.numpy()), ref, rtol=1e-4, atol=1e-5)
    back = ft.from_sequential(seq)
    assert [type(m) for m in back][:3] == [ft.Conv2d, nn.ReLU, ft.MaxPool2d]
    back.load_state_dict(tmodel.state_dict())  # same names
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), tmodel(x), **TOL32)
    lenet = fnn.lenet5(rng=0)
    stock = ft.from_sequential(lenet, fastconv_layers=False).eval()
    assert type(stock[0]) is nn.Conv2d
    with torch.no_grad():
        np.testing.assert_allclose(stock(x).numpy(), lenet.predict(x.numpy()),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"layer 1 \(Tanh\)"):
        ft.to_sequential(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Tanh()))
    with pytest.raises(TypeError, match="torch.nn.Sequential"):
        ft.to_sequential(lenet)


def _torch_blocked_env(tmp_path) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env = {k: v for k, v in os.environ.items() if k != "FASTCONV_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    return env


def test_import_without_torch(tmp_path):
    script = textwrap.dedent(
        """
        import numpy as np
        import fastconv as fc
        y = fc.conv2d(np.ones((1, 1, 4, 4), np.float32), np.ones((1, 1, 3, 3), np.float32))
        assert y.shape == (1, 1, 2, 2)
        try:
            import fastconv.torch
        except ImportError as e:
            print("ERROR:", e)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_torch_blocked_env(tmp_path),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 'pip install "fastconv[torch]"' in proc.stdout, proc.stdout
