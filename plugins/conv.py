"""Convolutions: ``nn.Conv1d/2d/3d`` and ``F.conv1d/2d/3d``, grouped and depthwise included.

FLOPs (docs/flop-convention.md). Let ``F = 2 * numel(out) * (C_in/groups) * prod(kernel)``:
each output element is a dot product of length ``C_in/groups * prod(kernel)``.

- forward: ``torch`` = ``F`` (bias ignored); ``exact`` = ``F + numel(out)`` with a bias.
- backward (``convolution_backward`` with ``output_mask = (input, weight, bias)`` gradients needed):
  ``grad_input`` is a transposed convolution of ``grad_out`` with the weight: ``F`` in both
  conventions. ``grad_weight``: each weight element accumulates ``N * prod(out spatial)`` products,
  so ``2 * numel(w) * N * prod(out spatial) = F`` exactly; the stock counter (``torch``) computes it
  as ``2 * numel(grad_out) * C_in * prod(kernel)`` = ``groups * F``, a known overcount kept on
  purpose. ``grad_bias`` sums ``grad_out``: ``numel(grad_out)`` in ``exact``, 0 in ``torch``.

Memory (torch 2.14.1, CPU): the forward allocates only its output. When autograd records the op it
saves the input and the weight unconditionally (even if only one of the gradients is needed); the
weight is a parameter (no new bytes), the input stays alive until this node's backward.
``convolution_backward`` allocates exactly the gradients in ``output_mask``, nothing else.

Not modelled (answer None): transposed convolutions, ``padding_mode`` other than zeros (they pad
first), ``padding="same"`` that needs asymmetric padding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch._prims_common import suggest_memory_format
from torch.nn import functional as F

from costmodel.authoring import (HandleTable, add_tensor_argument_grads, input_index, module_param, needs_grad,
                                 new_output, no_grads, numel, tensor_input, trainable_param)
from costmodel.costs import Flops, OpCost, OpNode, SavedRef, TensorMeta
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()


def conv_flops(out_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> int:
    """``F``: multiply-adds of one non-transposed convolution (forward, grad_input, true grad_weight)."""
    return 2 * numel(out_shape) * weight_shape[1] * numel(weight_shape[2:])


def conv_cost(node: OpNode, x: TensorMeta, weight_shape: tuple[int, ...], groups: int, has_bias: bool,
              needs: tuple[bool, bool, bool], weight_saved: SavedRef | None) -> OpCost:
    """The cost of one convolution. ``needs`` = (input, weight, bias) gradients required."""
    out = node.outputs[0]
    f = conv_flops(out.shape, weight_shape)
    forward = Flops(torch=f, exact=f + (numel(out.shape) if has_bias else 0))
    cost = OpCost(forward=forward, forward_allocs=new_output(node),
                  note=f"conv: F = 2*{numel(out.shape)}*{weight_shape[1]}*{numel(weight_shape[2:])}")
    if not node.records_autograd:
        return cost
    need_input, need_weight, need_bias = needs
    cost.backward = Flops(
        torch=need_input * f + need_weight * groups * f,
        exact=need_input * f + need_weight * f + need_bias * numel(out.shape),
    )
    x_index = input_index(node, x)
    cost.saved = tuple(ref for ref in (SavedRef("input", x_index), weight_saved) if ref is not None)
    grads = list(no_grads(node))
    if need_input:
        grads[x_index] = x.nbytes
    cost.input_grads = tuple(grads)
    return cost


def _padding_is_direct(padding: object, kernel: tuple[int, ...], dilation: object) -> bool:
    """Whether aten convolves without a separate pad op (only ``"same"`` with odd total padding pads)."""
    if padding != "same":
        return True
    dilations = dilation if isinstance(dilation, (tuple, list)) else (dilation,) * len(kernel)
    return all(d * (k - 1) % 2 == 0 for d, k in zip(dilations, kernel))


@TABLE.register("call_module", nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(node: OpNode) -> OpCost | None:
    """``nn.ConvNd`` with zero padding: weight and bias are the module's own parameters."""
    conv = node.module
    if conv is None or conv.padding_mode != "zeros" or conv.transposed:
        return None
    if not _padding_is_direct(conv.padding, conv.kernel_size, conv.dilation):
        return None
    x = node.inputs[0]
    weight, bias = trainable_param(node, "weight"), trainable_param(node, "bias")
    has_bias = module_param(node, "bias") is not None
    cost = conv_cost(node, x, module_param(node, "weight")[1].shape, conv.groups, has_bias,
                     needs=(node.needs_input_grad[0], weight is not None, bias is not None), weight_saved=None)
    if node.records_autograd:
        cost.param_grads = {found[0]: found[1].nbytes for found in (weight, bias) if found is not None}
    return cost


@TABLE.register("call_function", F.conv1d, F.conv2d, F.conv3d)
def conv_function(node: OpNode) -> OpCost | None:
    """``F.convNd(input, weight, bias, stride, padding, dilation, groups)``: the weight and bias are
    inputs of the node, so their gradients are input gradients."""
    x, weight = tensor_input(node, 0, "input"), tensor_input(node, 1, "weight")
    if x is None or weight is None:
        return None
    bias = tensor_input(node, 2, "bias")
    if not _padding_is_direct(node.arg(4, "padding", 0), weight.shape[2:], node.arg(5, "dilation", 1)):
        return None
    groups = node.arg(6, "groups", 1)
    cost = conv_cost(node, x, weight.shape, groups, bias is not None,
                     needs=(needs_grad(node, x), needs_grad(node, weight), needs_grad(node, bias)),
                     weight_saved=SavedRef("input", input_index(node, weight)))
    if node.records_autograd:
        add_tensor_argument_grads(node, cost, weight, bias)
    return cost


def in_cpu_layout(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``out`` in the memory format CPU's convolution writes: channels-last when the input or the
    weight suggests it (a permuted tensor: ConvNeXt's ``permute`` back, a token grid reshaped to
    an image), 4-d and 5-d alike (``determine_backend_memory_format``); the meta kernel writes a
    contiguous result whatever its input, so later reshapes would be views on meta and copies on
    CPU. Checked against the CPU kernel in tests/test_op_plugins.py."""
    formats = {4: torch.channels_last, 5: torch.channels_last_3d}
    channels_last = formats.get(out.dim())
    if channels_last is not None and channels_last in (suggest_memory_format(x), suggest_memory_format(weight)):
        return out.contiguous(memory_format=channels_last)
    return out


def _function_on_cpu(function: Any) -> Any:
    def propagate(input: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return in_cpu_layout(function(input, weight, *args, **kwargs), input, weight)

    return propagate


def _module_on_cpu(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return in_cpu_layout(module(x), x, module.weight)


@hookimpl
def costmodel_meta_function(target: Any) -> Any:
    """Shape propagation of a convolution gives CPU's layout (:func:`in_cpu_layout`)."""
    if target in (F.conv2d, F.conv3d):
        return _function_on_cpu(target)
    if isinstance(target, type) and issubclass(target, (nn.Conv2d, nn.Conv3d)):
        return _module_on_cpu
    return None


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
