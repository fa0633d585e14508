"""fastconv inside PyTorch (``import fastconv.torch as ft``; extra ``fastconv[torch]``).

>>> import torch, fastconv.torch as ft
>>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
>>> model = ft.convert(model)        # same Parameter objects; an existing optimizer keeps working
>>> y = model(torch.randn(4, 1, 28, 28))

* Operators ``torch.ops.fastconv.conv2d`` / ``conv2d_backward`` / ``max_pool2d`` /
  ``max_pool2d_backward``, registered with ``torch.library.custom_op`` with fake (meta) kernels
  and autograd formulas, so they work under ``torch.compile``, ``opcheck`` and ``gradcheck``.
* :func:`conv2d`, :func:`max_pool2d`: ``torch.nn.functional``'s signatures plus ``backend=``.
* :class:`Conv2d`, :class:`MaxPool2d`: ``torch.nn``'s constructor arguments and parameter names.
* :func:`convert`, :func:`to_sequential`, :func:`from_sequential`.

CPU tensors reach the kernels as NumPy views (no copy when contiguous); CUDA tensors go to the
``cuda`` backend through ``__cuda_array_interface__`` and stay on the device.
"""

try:
    import torch as _torch  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        'fastconv.torch needs PyTorch, which is not installed: pip install "fastconv[torch]"'
    ) from e

from ._convert import convert, from_sequential, to_sequential
from ._functional import conv2d, max_pool2d
from ._modules import Conv2d, MaxPool2d

__all__ = ["conv2d", "max_pool2d", "Conv2d", "MaxPool2d", "convert", "to_sequential",
           "from_sequential"]
