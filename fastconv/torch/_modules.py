"""``Conv2d`` and ``MaxPool2d``: torch.nn's layers computed by fastconv's kernels.

Subclasses of ``torch.nn.Conv2d`` / ``torch.nn.MaxPool2d`` with the same constructor arguments,
attributes and parameter names (a torch ``state_dict`` loads unchanged), plus ``backend=``.
"""

from __future__ import annotations

import torch
from torch import nn

from ._bridge import FLOAT_DTYPES, backend_arg
from ._functional import conv2d, max_pool2d


def unsupported_conv(module: nn.Conv2d) -> str | None:
    """Why fastconv cannot compute ``module`` (None if it can)."""
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only 'zeros' is supported)"
    if module.weight.dtype not in FLOAT_DTYPES:
        return f"dtype={module.weight.dtype} (float32 or float64 expected)"
    return None


def _check_dtype(dtype) -> None:
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype={dtype} is not supported by fastconv, expected torch.float32 "
                        "or torch.float64")


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, bias=True, padding_mode='zeros', device=None, dtype=None)`` on
    fastconv's kernels; ``backend`` picks the fastconv backend (None: fastconv's selection).

    Input (N, C_in, H, W) or (C_in, H, W); output (N, C_out, H_out, W_out). Only
    ``padding_mode='zeros'`` and float32/float64 are supported (ValueError/TypeError naming the
    option otherwise).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None,
                 backend=None):
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode={padding_mode!r} is not supported by fastconv "
                             "(only 'zeros')")
        _check_dtype(dtype)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        self.backend = backend_arg(backend) or None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError(f"padding_mode={self.padding_mode!r} is not supported by fastconv "
                             "(only 'zeros')")
        return conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation,
                      self.groups, backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d(kernel_size, stride=None, padding=0, dilation=1,
    return_indices=False, ceil_mode=False)`` on fastconv's kernels, plus ``backend``."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
                 ceil_mode=False, backend=None):
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self.backend = backend_arg(backend) or None

    def forward(self, input: torch.Tensor):
        return max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                          ceil_mode=self.ceil_mode, return_indices=self.return_indices,
                          backend=self.backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", backend={self.backend!r}"
