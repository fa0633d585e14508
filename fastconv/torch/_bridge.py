"""Tensors to kernel arrays and back, without copies.

A CPU tensor becomes a NumPy view of its storage (``Tensor.numpy``: no copy; a non-contiguous
one, e.g. channels_last, is made contiguous once by fastconv's validation). A CUDA tensor is
passed as a view that exposes its ``__cuda_array_interface__`` (with a NumPy dtype), so
fastconv's selection routes it to the ``cuda`` backend, which uses the memory in place and
returns a device array that :func:`to_tensor` wraps in place.
"""

from __future__ import annotations

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


class CudaView:
    """A CUDA tensor as fastconv sees a device array: ``__cuda_array_interface__``, ``shape``
    and a NumPy ``dtype``; it keeps the tensor alive."""

    def __init__(self, t):
        self.tensor = t
        self.__cuda_array_interface__ = t.__cuda_array_interface__
        self.shape = tuple(t.shape)
        self.dtype = np.dtype(str(t.dtype).removeprefix("torch."))


def to_array(t: torch.Tensor):
    """The array fastconv's kernels see for ``t`` (a view; a CUDA tensor is made contiguous
    on the device if it is not)."""
    if t.device.type == "cpu":
        try:
            return t.numpy()
        except RuntimeError:  # it requires grad, or carries a lazy negation bit
            return t.detach().resolve_neg().numpy()
    return CudaView(t.detach().contiguous())


def to_tensor(a, like: torch.Tensor) -> torch.Tensor:
    """A tensor over the kernel result ``a`` on ``like``'s device (no copy)."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.as_tensor(a, device=like.device)


def backend_arg(backend) -> str:
    """The ops carry the backend as a string ("" = fastconv's own selection)."""
    if backend is None:
        return ""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a backend name or None, got {backend!r}")
    return backend


def backend_kw(backend: str):
    return backend or None
