"""PNG pictures of a trained model: training curves, first-layer filters, feature maps of one
test digit after each conv/pool layer, and the confusion matrix.

matplotlib is optional (``pip install fastconv[plot]``): it is imported only here, only when a
picture is drawn, with the non-interactive Agg backend. :func:`missing_reason` says, without a
traceback, when it is not installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INSTALL_HINT = "pictures need matplotlib: pip install matplotlib (or fastconv[plot])"


def missing_reason() -> str | None:
    """``None`` when matplotlib can be imported, else a one-line message saying how to fix it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        return f"{INSTALL_HINT} ({e})"
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(count):
    cols = min(count, 8)
    return int(np.ceil(count / cols)), cols


def plot_curves(history: dict, path) -> Path:
    """Training loss per batch and per epoch, test loss and test accuracy per epoch."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    batch_loss = history.get("batch_loss") or []
    if batch_loss and len(epochs):
        x = np.linspace(0, len(epochs), len(batch_loss) + 1)[1:]
        ax1.plot(x, batch_loss, lw=0.5, alpha=0.4, label="train loss (batch)")
    ax1.plot(epochs, history.get("loss", []), "o-", label="train loss (epoch)")
    ax1.plot(epochs, history.get("test_loss", []), "s-", label="test loss")
    ax1.set_xlabel("epoch")
    ax1.set_yscale("log")
    ax1.set_title("loss")
    ax1.legend()
    acc = 100 * np.asarray(history.get("test_accuracy", []), float)
    ax2.plot(epochs, acc, "o-", color="C2")
    for e, a in zip(epochs, acc):
        ax2.annotate(f"{a:.2f}", (e, a), textcoords="offset points", xytext=(0, 6),
                     ha="center", fontsize=8)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_title("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_filters(weight: np.ndarray, path) -> Path:
    """The first conv layer's filters ``(C_out, C_in, kH, kW)`` (input channel 0), one tile
    each, on a symmetric colour scale."""
    plt = _pyplot()
    w = np.asarray(weight)[:, 0]
    rows, cols = _grid(len(w))
    vmax = float(np.abs(w).max()) or 1.0
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.1), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(w):
            ax.imshow(w[i], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    fig.suptitle(f"first-layer filters {tuple(weight.shape)}")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_feature_maps(model, image: np.ndarray, transform, out_dir, label=None) -> list:
    """Run one image ``(H, W)`` through ``model`` and draw the activations after each conv and
    pool layer (up to 32 channels each). One PNG per layer; returns their paths."""
    from ..nn import Conv2D, MaxPool2D

    plt = _pyplot()
    x = transform(image[None])
    paths = []
    for i, layer in enumerate(model.layers):
        x = layer.forward(x, training=False)
        if not isinstance(layer, (Conv2D, MaxPool2D)):
            continue
        maps = x[0, :32]
        rows, cols = _grid(len(maps))
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.2 + 0.4),
                                 squeeze=False)
        for j, ax in enumerate(axes.flat):
            ax.axis("off")
            if j < len(maps):
                ax.imshow(maps[j], cmap="viridis")
        what = f"digit {label}" if label is not None else "one test image"
        fig.suptitle(f"layer {i}: {layer!r} on {what}, output {tuple(x.shape[1:])}", fontsize=8)
        path = Path(out_dir) / f"feature_maps_layer{i}_{type(layer).__name__.lower()}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def confusion_matrix(y_true, y_pred, num_classes=10) -> np.ndarray:
    """Counts ``[true, predicted]``."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def plot_confusion(cm: np.ndarray, path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.4))
    im = ax.imshow(np.log1p(cm), cmap="Blues")
    for (t, p), v in np.ndenumerate(cm):
        ax.text(p, t, str(v), ha="center", va="center", fontsize=7,
                color="white" if t == p else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(len(cm)))
    ax.set_yticks(range(len(cm)))
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"confusion matrix ({cm.sum()} test images, accuracy {100 * acc:.2f} %)")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_all(out_dir, model, history, x_test, y_test, transform) -> list:
    """All pictures into ``out_dir``; returns the paths written."""
    from ..nn import Conv2D

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if history and history.get("loss"):
        paths.append(plot_curves(history, out / "training_curves.png"))
    conv = next((layer for layer in model.layers if isinstance(layer, Conv2D)), None)
    if conv is not None:
        paths.append(plot_filters(conv.params["weight"], out / "first_layer_filters.png"))
    paths += plot_feature_maps(model, x_test[0], transform, out, label=int(y_test[0]))
    pred = model.predict(x_test, transform=transform).argmax(axis=1)
    paths.append(plot_confusion(confusion_matrix(y_test, pred), out / "confusion_matrix.png"))
    return paths
