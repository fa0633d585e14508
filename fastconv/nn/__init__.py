"""A small layer API on fastconv's kernels (``fastconv.nn``).

>>> from fastconv import nn
>>> model = nn.Sequential(nn.Conv2D(1, 8, 3), nn.ReLU(), nn.MaxPool2D(2), nn.Flatten(),
...                       nn.Dense(8 * 13 * 13, 10), input_shape=(1, 28, 28))
>>> history = model.fit(x, y, epochs=1, optimizer=nn.Adam(1e-3))        # doctest: +SKIP

Weights use PyTorch's layouts; parameter names match a ``torch.nn.Sequential`` state dict.
"""

from . import init
from .checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint
from .init import glorot_uniform, he_normal
from .layers import Conv2D, Dense, Dropout, Flatten, Layer, MaxPool2D, ReLU
from .losses import SoftmaxCrossEntropy
from .model import ARCHITECTURES, Sequential, lenet5, mnist_cnn
from .optim import SGD, Adam, Optimizer

__all__ = [
    "Layer", "Conv2D", "MaxPool2D", "ReLU", "Flatten", "Dense", "Dropout",
    "SoftmaxCrossEntropy", "Optimizer", "SGD", "Adam", "Sequential", "mnist_cnn", "lenet5",
    "ARCHITECTURES", "init", "he_normal",
    "glorot_uniform", "save_checkpoint", "load_checkpoint", "CheckpointError",
    "CheckpointWriteError",
]
