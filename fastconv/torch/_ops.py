"""The ``fastconv::`` operators: kernels, fake (shape-only) kernels and autograd formulas.

Arguments are already normalised by :mod:`._functional`: ``stride``/``padding``/``dilation``
are ``[h, w]`` lists, ``same`` selects ``padding="same"`` (then ``padding`` is ``[0, 0]``), and
``backend`` is a name or ``""``. Gradients that are not asked for come back as empty tensors
(an operator cannot return None).

Every output is a new contiguous NCHW tensor (also for a channels_last input).

``conv2d_impl`` / ``max_pool2d_impl`` are the operators' kernels as plain functions: the
functional wrappers call them directly when nothing but the result is wanted (see
``_functional._direct``), which saves the dispatcher's per-call cost on small shapes.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

import fastconv as fc

from ._bridge import backend_kw, to_array, to_tensor


def _padding(padding: List[int], same: bool):
    return "same" if same else tuple(padding)


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


# ------------------------------------------------------------------------- conv2d


def conv2d_impl(input: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int],
           padding: List[int], dilation: List[int], groups: int, same: bool,
           backend: str) -> Tensor:
    """``fastconv.conv2d`` on tensors: (N, C_in, H, W) -> (N, C_out, H_out, W_out)."""
    y = fc.conv2d(to_array(input), to_array(weight), None if bias is None else to_array(bias),
                  stride=tuple(stride), padding=_padding(padding, same),
                  dilation=tuple(dilation), groups=groups, backend=backend_kw(backend))
    return to_tensor(y, input)


conv2d = torch.library.custom_op("fastconv::conv2d", conv2d_impl, mutates_args=())


@conv2d.register_fake
def _(input, weight, bias, stride, padding, dilation, groups, same, backend):
    n, h, w = input.shape[0], input.shape[2], input.shape[3]
    if same:
        return input.new_empty((n, weight.shape[0], h, w))
    kh, kw = weight.shape[2], weight.shape[3]
    return input.new_empty((n, weight.shape[0],
                            _conv_out(h, kh, stride[0], padding[0], dilation[0]),
                            _conv_out(w, kw, stride[1], padding[1], dilation[1])))


@torch.library.custom_op("fastconv::conv2d_backward", mutates_args=())
def conv2d_backward(grad: Tensor, input: Tensor, weight: Tensor, stride: List[int],
                    padding: List[int], dilation: List[int], groups: int, same: bool,
                    backend: str, output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`conv2d` for (input, weight, bias); empty where ``output_mask`` is
    False."""
    needs = tuple(n for n, m in zip(("input", "weight", "bias"), output_mask) if m)
    grads = fc.conv2d_backward(to_array(grad), to_array(input), to_array(weight),
                               stride=tuple(stride), padding=_padding(padding, same),
                               dilation=tuple(dilation), groups=groups, needs=needs,
                               backend=backend_kw(backend))
    return tuple(input.new_empty(0) if g is None else to_tensor(g, input) for g in grads)


@conv2d_backward.register_fake
def _(grad, input, weight, stride, padding, dilation, groups, same, backend, output_mask):
    shapes = (input.shape, weight.shape, (weight.shape[0],))
    return tuple(input.new_empty(s if m else (0,)) for s, m in zip(shapes, output_mask))


def _conv2d_setup(ctx, inputs, output):
    input, weight, bias, *ctx.geometry = inputs
    ctx.save_for_backward(input, weight)


def _conv2d_grad(ctx, grad):
    input, weight = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    if not any(mask):
        return (None,) * 9
    grads = torch.ops.fastconv.conv2d_backward(grad, input, weight, *ctx.geometry, mask)
    return (*(g if m else None for g, m in zip(grads, mask)),) + (None,) * 6


conv2d.register_autograd(_conv2d_grad, setup_context=_conv2d_setup)


def _present(g):
    return g is not None and g.numel() > 0


def _conv2d_backward_setup(ctx, inputs, output):
    grad, input, weight, *geometry, _ = inputs
    ctx.geometry = geometry
    ctx.save_for_backward(grad, input, weight)


def _conv2d_backward_grad(ctx, g_input, g_weight, g_bias):
    # The convolution y = x * w + b is bilinear: grad_input is linear in (dy, w), grad_weight
    # in (dy, x) and grad_bias in dy, so each second derivative is one of the same operators.
    grad, input, weight = ctx.saved_tensors
    geometry = ctx.geometry
    need_grad, need_input, need_weight = ctx.needs_input_grad[:3]
    d_grad = d_input = d_weight = None
    if need_grad:
        d_grad = torch.zeros_like(grad)
        if _present(g_input):
            d_grad = d_grad + torch.ops.fastconv.conv2d(g_input, weight, None, *geometry)
        if _present(g_weight):
            d_grad = d_grad + torch.ops.fastconv.conv2d(input, g_weight, None, *geometry)
        if _present(g_bias):
            d_grad = d_grad + g_bias[None, :, None, None]
    if need_input and _present(g_weight):
        d_input = torch.ops.fastconv.conv2d_backward(grad, input, g_weight, *geometry,
                                                      [True, False, False])[0]
    if need_weight and _present(g_input):
        d_weight = torch.ops.fastconv.conv2d_backward(grad, g_input, weight, *geometry,
                                                       [False, True, False])[1]
    return (d_grad, d_input, d_weight) + (None,) * 7


conv2d_backward.register_autograd(_conv2d_backward_grad, setup_context=_conv2d_backward_setup)


# ------------------------------------------------------------------------- max_pool2d


def _pool_out(size, k, s, p, d, ceil_mode):
    span = size + 2 * p - d * (k - 1) - 1
    if not ceil_mode:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= size + p:  # a window starting in the right padding is dropped
        out = out - 1
    return out


def max_pool2d_impl(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
               dilation: List[int], ceil_mode: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """``fastconv.max_pool2d``: (output, int64 flat indices into each H*W input plane)."""
    y, idx = fc.max_pool2d(to_array(input), tuple(kernel_size), stride=tuple(stride),
                           padding=tuple(padding), dilation=tuple(dilation),
                           ceil_mode=ceil_mode, backend=backend_kw(backend))
    return to_tensor(y, input), to_tensor(idx, input)


max_pool2d = torch.library.custom_op("fastconv::max_pool2d", max_pool2d_impl, mutates_args=())


@max_pool2d.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode, backend):
    out = [_pool_out(input.shape[2 + i], kernel_size[i], stride[i], padding[i], dilation[i],
                     ceil_mode) for i in range(2)]
    shape = (input.shape[0], input.shape[1], *out)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("fastconv::max_pool2d_backward", mutates_args=())
def max_pool2d_backward(grad: Tensor, indices: Tensor, input_shape: List[int],
                        backend: str) -> Tensor:
    """Gradient of :func:`max_pool2d` for its input: ``grad`` scattered-added at ``indices``."""
    dx = fc.max_pool2d_backward(to_array(grad), to_array(indices), tuple(input_shape),
                                backend=backend_kw(backend))
    return to_tensor(dx, grad)


@max_pool2d_backward.register_fake
def _(grad, indices, input_shape, backend):
    return grad.new_empty(input_shape)


def _pool_setup(ctx, inputs, output):
    ctx.input_shape = list(inputs[0].shape)
    ctx.backend = inputs[-1]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])


def _pool_grad(ctx, grad, _grad_indices):
    (indices,) = ctx.saved_tensors
    dx = torch.ops.fastconv.max_pool2d_backward(grad, indices, ctx.input_shape, ctx.backend)
    return (dx,) + (None,) * 6


max_pool2d.register_autograd(_pool_grad, setup_context=_pool_setup)


def _pool_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _pool_backward_grad(ctx, g):
    # Linear in grad: its adjoint gathers g at the same indices.
    (indices,) = ctx.saved_tensors
    d_grad = g.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)
    return d_grad, None, None, None


max_pool2d_backward.register_autograd(_pool_backward_grad, setup_context=_pool_backward_setup)
