"""``Sequential``: a stack of layers with training, evaluation, a summary and save/load."""

from __future__ import annotations

import time

import numpy as np

from . import _step
from . import checkpoint as _ckpt
from .layers import LAYERS, Dropout, Layer
from .losses import SoftmaxCrossEntropy
from .optim import Adam


class _hybridmethod:
    """A method that receives the class when called on the class, the instance otherwise."""

    def __init__(self, func):
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj, cls):
        target = cls if obj is None else obj

        def bound(*args, **kwargs):
            return self.func(target, *args, **kwargs)

        bound.__doc__ = self.__doc__
        return bound


def _is_dask(x) -> bool:
    """A dask array (checked without importing dask)."""
    return type(x).__module__.startswith("dask.") and hasattr(x, "__dask_graph__")


def _batches(n, batch_size):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


class Sequential:
    """Layers applied in order.

    Parameters
    ----------
    *layers : Layer instances (or one list of them)
    input_shape : optional per-sample input shape, e.g. ``(1, 28, 28)``, for :meth:`summary`
    backend : fastconv backend for every layer that was given none (``None`` = auto)

    Parameters are named ``"<layer index>.<name>"`` (``"0.weight"``), as in a
    ``torch.nn.Sequential`` state dict, so weights move between the two by name.
    """

    def __init__(self, *layers, input_shape=None, backend=None):
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i} is a {type(layer).__name__}, not a fastconv Layer")
        self.layers = list(layers)
        self.input_shape = None if input_shape is None else tuple(int(s) for s in input_shape)
        if backend is not None:
            self.set_backend(backend)

    # ------------------------------------------------------------------ structure

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        lines = [f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers)]
        return "Sequential(\n" + "\n".join(lines) + "\n)"

    def set_backend(self, backend):
        """Use ``backend`` in every layer (``None`` = the selection order)."""
        for layer in self.layers:
            layer.backend = backend

    def set_rng(self, rng: np.random.Generator):
        """Make every ``Dropout`` draw its masks from ``rng``."""
        for layer in self.layers:
            if isinstance(layer, Dropout):
                layer.rng = rng

    def named_parameters(self) -> dict:
        """``{"<i>.<name>": array}``: the live parameter arrays (optimizers update them)."""
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers)
                for k, v in layer.params.items()}

    def named_grads(self) -> dict:
        """``{"<i>.<name>": array}``: the gradients of the last :meth:`backward`."""
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers)
                for k, v in layer.grads.items()}

    def num_params(self) -> int:
        return sum(layer.num_params() for layer in self.layers)

    def state_dict(self) -> dict:
        """Copies of all parameters, by name."""
        return {k: v.copy() for k, v in self.named_parameters().items()}

    def load_state_dict(self, state: dict) -> None:
        """Copy ``state`` (name -> array) into the parameters; names and shapes must match."""
        params = self.named_parameters()
        missing, unexpected = set(params) - set(state), set(state) - set(params)
        if missing or unexpected:
            raise KeyError(f"state dict mismatch: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        for name, p in params.items():
            v = np.asarray(state[name])
            if v.shape != p.shape:
                raise ValueError(f"{name}: shape {v.shape} in state, {p.shape} in the model")
            p[...] = v

    def get_config(self) -> dict:
        return {"input_shape": None if self.input_shape is None else list(self.input_shape),
                "layers": [{"class": type(layer).__name__, "config": layer.get_config()}
                           for layer in self.layers]}

    @classmethod
    def from_config(cls, config: dict, backend=None, rng=None) -> "Sequential":
        layers = []
        for spec in config["layers"]:
            if spec["class"] not in LAYERS:
                raise ValueError(f"unknown layer class {spec['class']!r} in the model config")
            kwargs = dict(spec["config"])
            if spec["class"] in ("Conv2D", "Dense", "Dropout"):
                kwargs["rng"] = rng
            layers.append(LAYERS[spec["class"]](**kwargs))
        return cls(layers, input_shape=config.get("input_shape"), backend=backend)

    # ------------------------------------------------------------------ passes

    def forward(self, x, training=True):
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    __call__ = forward

    def backward(self, grad, input_grad=False):
        """Backpropagate ``grad`` (of the output); fills every layer's ``grads``.

        Returns the gradient for the input when ``input_grad`` (else ``None``: the first layer
        then skips computing it).
        """
        for i in range(len(self.layers) - 1, -1, -1):
            grad = self.layers[i].backward(grad, input_grad=input_grad or i > 0)
        return grad

    def train_batch(self, x, y, optimizer, loss=None) -> float:
        """One step: forward, loss, backward, ``optimizer.step``. Returns the batch loss.

        The same outputs and gradients as :meth:`forward` then :meth:`backward`; element-wise
        layers run fused with their neighbours (``ReLU -> MaxPool2D`` as ``MaxPool2D ->
        ReLU``, ``ReLU -> Dropout`` in one pass, ReLU in place: see ``fastconv.nn._step``).
        """
        loss = loss or SoftmaxCrossEntropy()
        stages = _step.plan(self.layers)
        value = loss.forward(_step.forward(stages, x), y)
        _step.backward(stages, loss.backward())
        optimizer.step(self.named_parameters(), self.named_grads())
        return value

    def predict(self, x, batch_size=256, transform=None):
        """Outputs for ``x`` in inference mode, computed ``batch_size`` samples at a time.

        ``transform`` (optional) maps each raw batch to the model's input (e.g. uint8 images to
        normalized float32).

        ``x`` may be a dask array chunked along the batch axis: the result is then a lazy dask
        array, one task per chunk (see ``fastconv.distributed.predict_dask``).
        """
        if _is_dask(x):
            from ..distributed._dask import predict_dask

            return predict_dask(self, x, batch_size=batch_size, transform=transform)
        n = len(x)
        outs = []
        for s in _batches(n, batch_size):
            xb = x[s] if transform is None else transform(x[s])
            outs.append(self.forward(xb, training=False))
        if not outs:
            raise ValueError("predict needs at least one sample")
        return np.concatenate(outs)

    def evaluate(self, x, y, batch_size=256, transform=None, loss=None):
        """``(mean loss, accuracy)`` of the model on ``(x, y)`` in inference mode.

        ``x`` (and ``y``) may be dask arrays: the blocks are evaluated where the data lives and
        only their sums come back (see ``fastconv.distributed.evaluate_dask``).
        """
        if _is_dask(x) or _is_dask(y):
            from ..distributed._dask import evaluate_dask

            return evaluate_dask(self, x, y, batch_size=batch_size, transform=transform,
                                 loss=loss)
        loss = loss or SoftmaxCrossEntropy()
        y = np.asarray(y)
        total, correct = 0.0, 0
        for s in _batches(len(x), batch_size):
            xb = x[s] if transform is None else transform(x[s])
            out = self.forward(xb, training=False)
            total += loss.forward(out, y[s]) * (s.stop - s.start)
            correct += int(np.sum(out.argmax(axis=1) == y[s]))
        n = max(len(x), 1)
        return total / n, correct / n

    def fit(self, x, y, epochs=1, batch_size=64, optimizer=None, loss=None, rng=None,
            shuffle=True, validation_data=None, transform=None, lr_schedule=None,
            verbose=True, comm=None):
        """Train with mini-batches; returns a history dict of per-epoch lists.

        Parameters
        ----------
        x, y : training inputs and integer labels (``len(x) == len(y)``)
        optimizer : defaults to ``Adam()``; loss defaults to ``SoftmaxCrossEntropy()``
        rng : ``numpy.random.Generator`` (or seed) for shuffling; also drives dropout
        validation_data : optional ``(x_val, y_val)`` evaluated after each epoch
        transform : maps a raw batch of ``x`` to the model's input
        lr_schedule : optional ``f(epoch) -> lr`` applied at the start of each epoch
        verbose : print one line per epoch
        comm : an mpi4py communicator (e.g. ``MPI.COMM_WORLD``) to train data-parallel over its
            ranks: rank 0's weights are broadcast, ``batch_size`` is the global batch, split
            across the ranks, and the gradients are averaged with one Allreduce per step (see
            ``fastconv.distributed``); rank 0 alone prints.

        History keys: ``loss``, ``time``, ``images_per_s`` and, with validation data,
        ``val_loss`` and ``val_accuracy``.
        """
        if comm is not None:
            from ..distributed._fit import fit as fit_mpi

            return fit_mpi(self, x, y, comm, epochs=epochs, batch_size=batch_size,
                           optimizer=optimizer, loss=loss, rng=rng, shuffle=shuffle,
                           validation_data=validation_data, transform=transform,
                           lr_schedule=lr_schedule, verbose=verbose)
        optimizer = optimizer or Adam()
        loss = loss or SoftmaxCrossEntropy()
        if rng is not None:  # one generator for shuffling and dropout
            rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
            self.set_rng(rng)
        else:  # keep the dropout layers' own generators
            rng = np.random.default_rng()
        y = np.asarray(y)
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        history = {"loss": [], "time": [], "images_per_s": []}
        for epoch in range(epochs):
            if lr_schedule is not None:
                optimizer.lr = float(lr_schedule(epoch))
            order = rng.permutation(len(x)) if shuffle else np.arange(len(x))
            t0, total = time.perf_counter(), 0.0
            for s in _batches(len(x), batch_size):
                idx = order[s]
                xb = x[idx] if transform is None else transform(x[idx])
                total += self.train_batch(xb, y[idx], optimizer, loss) * len(idx)
            dt = time.perf_counter() - t0
            history["loss"].append(total / max(len(x), 1))
            history["time"].append(dt)
            history["images_per_s"].append(len(x) / dt if dt else float("inf"))
            line = f"epoch {epoch + 1}/{epochs}: loss {history['loss'][-1]:.4f}"
            if validation_data is not None:
                vl, va = self.evaluate(*validation_data, transform=transform, loss=loss)
                history.setdefault("val_loss", []).append(vl)
                history.setdefault("val_accuracy", []).append(va)
                line += f", val loss {vl:.4f}, val accuracy {va:.4f}"
            if verbose:
                print(f"{line}, {dt:.1f} s")
        return history

    # ------------------------------------------------------------------ summary, save, load

    def summary(self, input_shape=None, print_fn=print) -> str:
        """A table of each layer's output shape and parameter count; printed and returned."""
        shape = input_shape or self.input_shape
        if shape is None:
            raise ValueError("summary needs input_shape (per sample, e.g. (1, 28, 28))")
        shape = tuple(shape)
        rows = [("Layer", "Output shape", "Params")]
        for i, layer in enumerate(self.layers):
            shape = layer.output_shape(shape)
            rows.append((f"{i}: {layer!r}", str(shape), f"{layer.num_params():,}"))
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        rule = "-" * (sum(widths) + 4)

        def fmt(r):
            return f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}"

        text = "\n".join([fmt(rows[0]), rule, *map(fmt, rows[1:]), rule,
                          f"Total params: {self.num_params():,}"])
        if print_fn is not None:
            print_fn(text)
        return text

    def save(self, path, metadata=None):
        """Save architecture and parameters to ``path`` (atomically; see ``checkpoint``)."""
        state = {"kind": "fastconv.Sequential", "config": self.get_config(),
                 "params": self.named_parameters()}
        if metadata is not None:
            state["metadata"] = metadata
        return _ckpt.save_checkpoint(path, state)

    @_hybridmethod
    def load(target, path, backend=None):
        """Load a model saved by :meth:`save` (or a training checkpoint holding one).

        ``Sequential.load(path)`` builds a new model from the stored architecture;
        ``model.load(path)`` copies the stored parameters into ``model`` and returns it.
        """
        state = _ckpt.load_checkpoint(path)
        if not isinstance(state, dict) or "config" not in state or "params" not in state:
            raise _ckpt.CheckpointError(f"checkpoint {path} holds no fastconv model")
        if isinstance(target, type):
            target = target.from_config(state["config"], backend=backend)
        target.load_state_dict(state["params"])
        return target


# ---------------------------------------------------------------------- reference architectures


def mnist_cnn(rng=None, dtype=np.float32, backend=None, init="glorot_uniform") -> Sequential:
    """PyTorch's examples/mnist net: conv 1->32 3x3, ReLU, conv 32->64 3x3, ReLU, max-pool 2,
    dropout 0.25, flatten, dense 9216->128, ReLU, dropout 0.5, dense 128->10 (1,199,882
    parameters). Input ``(N, 1, 28, 28)``.

    Glorot-uniform weights by default: with He-normal ones the 9216-input dense layer starts
    with logits so large that the first epoch's loss is ~2x higher (measured in PyTorch and
    fastconv alike)."""
    from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU

    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    kw = dict(rng=rng, dtype=dtype, init=init)
    return Sequential(
        Conv2D(1, 32, 3, **kw), ReLU(), Conv2D(32, 64, 3, **kw), ReLU(), MaxPool2D(2),
        Dropout(0.25, rng=rng), Flatten(), Dense(9216, 128, **kw), ReLU(),
        Dropout(0.5, rng=rng), Dense(128, 10, **kw),
        input_shape=(1, 28, 28), backend=backend,
    )


def lenet5(rng=None, dtype=np.float32, backend=None, init="glorot_uniform") -> Sequential:
    """LeNet-5 with ReLU and max-pool: conv 1->6 5x5 pad 2, pool 2, conv 6->16 5x5, pool 2,
    dense 400->120->84->10 (61,706 parameters). Input ``(N, 1, 28, 28)``."""
    from .layers import Conv2D, Dense, Flatten, MaxPool2D, ReLU

    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    kw = dict(rng=rng, dtype=dtype, init=init)
    return Sequential(
        Conv2D(1, 6, 5, padding=2, **kw), ReLU(), MaxPool2D(2), Conv2D(6, 16, 5, **kw), ReLU(),
        MaxPool2D(2), Flatten(), Dense(400, 120, **kw), ReLU(), Dense(120, 84, **kw), ReLU(),
        Dense(84, 10, **kw),
        input_shape=(1, 28, 28), backend=backend,
    )


ARCHITECTURES = {"mnist": mnist_cnn, "lenet5": lenet5}
