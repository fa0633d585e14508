"""``torch.nn.functional``-style entry points over the ``fastconv::`` operators.

They check what the operators cannot express (tensor types, dtypes, devices, ndim), normalise
the geometry arguments, and accept unbatched ``(C, H, W)`` input as torch does. Errors name the
argument as torch's signature does, in the NumPy API's words.
"""

from __future__ import annotations

import numbers

import torch

from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _ops
from ._bridge import FLOAT_DTYPES, backend_arg

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _direct(*tensors) -> bool:
    """Whether the operator's kernel may run as a plain call, skipping the dispatcher: eager
    mode (not compiling, no dispatch mode such as FakeTensorMode, no functorch transform),
    plain tensors, and no gradient to record. Anything else goes through ``torch.ops``."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)
                              or _is_wrapped(t)):
            return False
    return True


def _pair(name: str, v) -> list[int]:
    if type(v) is int:
        return [v, v]
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return list(v)
    if isinstance(v, numbers.Integral) and not isinstance(v, bool):
        return [int(v), int(v)]
    if isinstance(v, (tuple, list)) and len(v) == 1:
        return _pair(name, v[0])
    if (isinstance(v, (tuple, list)) and len(v) == 2
            and all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in v)):
        return [int(v[0]), int(v[1])]
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def _check_tensors(named: dict) -> None:
    device = None
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}, expected float32 or float64")
        if device is None:
            device = (name, t.device)
        elif t.device != device[1]:
            raise ValueError(f"mixed devices: {device[0]} is on {device[1]}, {name} is on "
                             f"{t.device}; all tensors must be on one device")


def _batched(input: torch.Tensor, name: str = "input"):
    if input.dim() == 4:
        return input, False
    if input.dim() == 3:
        return input.unsqueeze(0), True
    raise ValueError(f"{name} must be 3-D (C, H, W) or 4-D (N, C, H, W), got {input.dim()}-D "
                     f"tensor of shape {tuple(input.shape)}")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, backend=None):
    """``torch.nn.functional.conv2d`` on fastconv's kernels.

    Parameters
    ----------
    input : tensor (N, C_in, H, W) or unbatched (C_in, H, W), float32 or float64
    weight : tensor (C_out, C_in // groups, kH, kW), same dtype and device
    bias : tensor (C_out,) or None
    stride, dilation : int or (h, w) pair
    padding : int, (h, w) pair, ``"valid"`` or ``"same"`` (stride 1; an even kernel pads the
        extra row/column at the bottom/right, as torch)
    groups : int dividing C_in and C_out
    backend : fastconv backend name, or None for fastconv's selection (``cuda`` for CUDA tensors)

    Returns
    -------
    tensor (N, C_out, H_out, W_out), contiguous, with
    ``H_out = (H + 2*padding_h - dilation_h*(kH-1) - 1) // stride_h + 1`` (likewise W_out).
    Differentiable in input, weight and bias (twice).
    """
    _check_tensors({"input": input, "weight": weight, "bias": bias})
    x, unbatched = _batched(input)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D (C_out, C_in // groups, kH, kW), got "
                         f"{weight.dim()}-D tensor of shape {tuple(weight.shape)}")
    same = isinstance(padding, str) and padding == "same"
    if isinstance(padding, str) and padding not in ("same", "valid"):
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    pad = [0, 0] if isinstance(padding, str) else _pair("padding", padding)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {groups!r}")
    op = _ops.conv2d_impl if _direct(x, weight, bias) else torch.ops.fastconv.conv2d
    y = op(x, weight, bias, _pair("stride", stride), pad, _pair("dilation", dilation),
           int(groups), same, backend_arg(backend))
    return y.squeeze(0) if unbatched else y


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False, backend=None):
    """``torch.nn.functional.max_pool2d`` on fastconv's kernels.

    Parameters
    ----------
    input : tensor (N, C, H, W) or unbatched (C, H, W), float32 or float64
    kernel_size, stride, padding, dilation : int or (h, w) pair; ``stride`` None (or ``[]``)
        means ``kernel_size``; padding (-inf) at most half the kernel
    ceil_mode : round the output size up (a window starting in the right padding is dropped)
    return_indices : also return the int64 flat index ``h * W + w`` of each maximum in its
        input plane, exactly as torch's
    backend : fastconv backend name, or None

    Returns
    -------
    output (N, C, H_out, W_out), and indices of the same shape when ``return_indices``.
    Ties: the first maximum in the window wins. Differentiable in input.
    """
    _check_tensors({"input": input})
    x, unbatched = _batched(input)
    k = _pair("kernel_size", kernel_size)
    s = k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) \
        else _pair("stride", stride)
    op = _ops.max_pool2d_impl if _direct(x) else torch.ops.fastconv.max_pool2d
    y, idx = op(x, k, s, _pair("padding", padding), _pair("dilation", dilation),
                bool(ceil_mode), backend_arg(backend))
    if unbatched:
        y, idx = y.squeeze(0), idx.squeeze(0)
    return (y, idx) if return_indices else y
