"""Swap torch layers for fastconv's, and move models between torch and ``fastconv.nn``."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from ._bridge import backend_arg
from ._modules import Conv2d, MaxPool2d, unsupported_conv


def _adopt(cls, old: nn.Module, backend):
    """An instance of ``cls`` sharing ``old``'s state: the very same Parameter objects."""
    new = cls.__new__(cls)
    new.__dict__.update(old.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        new.__dict__[key] = type(old.__dict__[key])(old.__dict__[key])
    new.backend = backend
    return new


def _swap(module: nn.Module, backend, name: str, skipped: list, pool_reason=None):
    if type(module) is nn.Conv2d:
        reason = unsupported_conv(module)
        if reason is None:
            return _adopt(Conv2d, module, backend)
        skipped.append(f"{name or '<model>'}: {reason}")
    elif type(module) is nn.MaxPool2d:
        if pool_reason is None:
            return _adopt(MaxPool2d, module, backend)
        skipped.append(f"{name or '<model>'}: {pool_reason}")
    elif isinstance(module, (nn.Conv2d, nn.MaxPool2d)) and not isinstance(
            module, (Conv2d, MaxPool2d)):
        skipped.append(f"{name or '<model>'}: subclass {type(module).__name__}")
    for child_name, child in list(module.named_children()):
        new = _swap(child, backend, f"{name}.{child_name}" if name else child_name, skipped,
                    pool_reason)
        if new is not child:
            setattr(module, child_name, new)
    return module


def convert(module: nn.Module, backend=None) -> nn.Module:
    """Swap every supported ``nn.Conv2d`` / ``nn.MaxPool2d`` in ``module`` for fastconv's.

    The swap is in place (the returned module is ``module`` unless ``module`` itself is a
    layer that was swapped) and keeps the same ``Parameter`` objects, so an optimizer built
    before the swap keeps working and the state dict is unchanged. Layers fastconv cannot take
    (``padding_mode`` other than 'zeros', dtypes other than float32/float64, subclasses; the
    pools of a model with parameters of another dtype) stay as they are and are listed in one
    ``UserWarning``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    backend = backend_arg(backend) or None
    skipped: list[str] = []
    # Pools have no parameters of their own: they follow the model's dtype.
    other = sorted({str(p.dtype) for p in module.parameters()}
                   - {str(torch.float32), str(torch.float64)})
    pool_reason = f"the model's dtype {', '.join(other)} (fastconv: float32/float64)" \
        if other else None
    converted = _swap(module, backend, "", skipped, pool_reason)
    if skipped:
        warnings.warn(f"fastconv.torch.convert left {len(skipped)} layer(s) as they are: "
                      + "; ".join(skipped), UserWarning, stacklevel=2)
    return converted


def _numpy(p: torch.Tensor) -> np.ndarray:
    return p.detach().cpu().numpy().copy()


def to_sequential(model: nn.Module, backend=None):
    """A ``fastconv.nn.Sequential`` with ``model``'s layers and a copy of its weights.

    ``model`` is a ``torch.nn.Sequential`` of Conv2d, MaxPool2d, ReLU, Flatten, Linear and
    Dropout layers (torch's or fastconv.torch's); the state-dict names are the same.
    """
    from .. import nn as fnn

    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be a torch.nn.Sequential, got {type(model).__name__}")
    layers = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Conv2d):
            if unsupported_conv(m):
                raise ValueError(f"layer {i}: {unsupported_conv(m)}")
            layer = fnn.Conv2D(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                               m.padding, m.dilation, m.groups, bias=m.bias is not None,
                               dtype=_numpy(m.weight).dtype)
        elif isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise ValueError(f"layer {i}: MaxPool2d(return_indices=True) has no "
                                 "fastconv.nn equivalent")
            layer = fnn.MaxPool2D(m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        elif isinstance(m, nn.ReLU):
            layer = fnn.ReLU()
        elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            layer = fnn.Flatten()
        elif isinstance(m, nn.Linear):
            layer = fnn.Dense(m.in_features, m.out_features, bias=m.bias is not None,
                              dtype=_numpy(m.weight).dtype)
        elif isinstance(m, nn.Dropout):
            layer = fnn.Dropout(m.p)
        else:
            raise ValueError(f"layer {i} ({type(m).__name__}) has no fastconv.nn equivalent")
        for name, value in m.named_parameters(recurse=False):
            layer.params[name] = _numpy(value)
        layers.append(layer)
    return fnn.Sequential(layers, backend=backend)


def from_sequential(seq, fastconv_layers: bool = True, backend=None) -> nn.Sequential:
    """A ``torch.nn.Sequential`` with the layers of the ``fastconv.nn.Sequential`` ``seq`` and a
    copy of its weights: fastconv.torch's Conv2d/MaxPool2d (or torch's own with
    ``fastconv_layers=False``), torch's ReLU, Flatten, Linear and Dropout.
    """
    from .. import nn as fnn

    if not isinstance(seq, fnn.Sequential):
        raise TypeError(f"seq must be a fastconv.nn.Sequential, got {type(seq).__name__}")
    backend = backend_arg(backend) or None
    conv_cls, pool_cls = (Conv2d, MaxPool2d) if fastconv_layers else (nn.Conv2d, nn.MaxPool2d)
    extra = {"backend": backend} if fastconv_layers else {}
    modules = []
    for i, layer in enumerate(seq):
        dtype = None
        if layer.params:
            dtype = torch.from_numpy(np.asarray(layer.params["weight"])[:0]).dtype
        if isinstance(layer, fnn.Conv2D):
            m = conv_cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                         layer.padding, layer.dilation, layer.groups,
                         bias="bias" in layer.params, dtype=dtype, **extra)
        elif isinstance(layer, fnn.MaxPool2D):
            m = pool_cls(layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                         ceil_mode=layer.ceil_mode, **extra)
        elif isinstance(layer, fnn.ReLU):
            m = nn.ReLU()
        elif isinstance(layer, fnn.Flatten):
            m = nn.Flatten()
        elif isinstance(layer, fnn.Dense):
            m = nn.Linear(layer.in_features, layer.out_features, bias="bias" in layer.params,
                          dtype=dtype)
        elif isinstance(layer, fnn.Dropout):
            m = nn.Dropout(layer.p)
        else:
            raise ValueError(f"layer {i} ({type(layer).__name__}) has no torch equivalent")
        with torch.no_grad():
            for name, value in layer.params.items():
                getattr(m, name).copy_(torch.from_numpy(np.asarray(value)))
        modules.append(m)
    return nn.Sequential(*modules)
