"""2-d pooling: max, average, and adaptive average (the global ``1 x 1`` pool included), and its
inverse, nearest-neighbour upsampling (``F.interpolate(x, mode="nearest")``: GhostNetV2's gate).

FLOPs: 0 in the ``torch`` convention. ``exact`` (docs/flop-convention.md):

- max pool (``max_pool2d_with_indices``): a comparison per window element, windows counted as
  full: ``numel(out) * prod(kernel)``; backward adds each gradient into ``grad_input`` at its
  argmax: ``numel(out)``.
- adaptive average pool to ``1 x 1`` runs as ``mean`` over the spatial dims: ``numel(x) + numel(out)``
  (a sum and a divide per output); backward ``expand`` (0) and a divide per input element:
  ``numel(x)``.
- average pool (``avg_pool2d``) and adaptive average pool to other sizes
  (``_adaptive_avg_pool2d``): a mean per window, ``numel(out) * (prod(kernel) + 1)``, resp. the
  sum of all window sizes plus ``numel(out)`` (adaptive windows ``[floor(i*H/h), ceil((i+1)*H/h))``
  may overlap); backward the same count (a divide per output gradient, an add per window element).

- nearest upsampling (``upsample_nearest2d``): each output element is a copy of one input
  element, no arithmetic: 0. Backward (``upsample_nearest2d_backward``) adds each output gradient
  into the input element it was copied from: one add per output gradient, ``numel(out)``
  (counted as max pool's backward is, the first write of each input gradient included).

Memory (torch 2.14.1, CPU): max pool always allocates the output and int64 indices of the same
shape (also without autograd, when the indices die at once); with autograd it saves the input and
the indices. Average pools save the input; the global pool (``mean``) and nearest upsampling
(``UpsampleNearest2DBackward0`` keeps only sizes and scales) save nothing. Every
backward allocates one input-sized gradient and nothing else.

Not modelled (answer None): ``return_indices=True``, 1-d/3-d pools, adaptive max pools, every
interpolation mode but ``nearest`` on a 4-d input (and ``antialias``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from costmodel.authoring import HandleTable, new_output, no_grads, numel, saved_or_transient
from costmodel.costs import Flops, OpCost, OpNode, SavedRef
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()

INDEX_BYTES = torch.int64.itemsize


def _pair(value: int | tuple[int, ...] | list[int] | None) -> tuple[int, int] | None:
    """A 2-d kernel size as aten reads it (one number for both dims), or None if it is not one."""
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) in (1, 2):
        return (value[0], value[-1])
    return None


def _with_backward(node: OpNode, cost: OpCost, backward_exact: int, saves_input: bool) -> OpCost:
    if node.records_autograd:
        x = node.inputs[0]
        cost.backward = Flops(torch=0, exact=backward_exact)
        cost.saved = (SavedRef("input", 0),) if saves_input else ()
        cost.input_grads = (x.nbytes if node.needs_input_grad[0] else None,) + no_grads(node)[1:]
    return cost


def max_pool2d_cost(node: OpNode, kernel_size: int | tuple[int, int]) -> OpCost | None:
    kernel = _pair(kernel_size)
    if kernel is None or len(node.outputs) != 1:
        return None
    out = node.outputs[0]
    allocs = new_output(node) + (saved_or_transient(numel(out.shape) * INDEX_BYTES, node),)
    cost = OpCost(forward=Flops(torch=0, exact=numel(out.shape) * math.prod(kernel)), forward_allocs=allocs,
                  note=f"max pool {kernel}: a comparison per window element")
    return _with_backward(node, cost, numel(out.shape), saves_input=True)


@TABLE.register("call_module", nn.MaxPool2d)
def max_pool2d_module(node: OpNode) -> OpCost | None:
    pool = node.module
    if pool is None or pool.return_indices:
        return None
    return max_pool2d_cost(node, pool.kernel_size)


@TABLE.register("call_function", F.max_pool2d, torch.max_pool2d)
def max_pool2d_function(node: OpNode) -> OpCost | None:
    if node.arg(6, "return_indices", False):
        return None
    return max_pool2d_cost(node, node.arg(1, "kernel_size"))


def avg_pool2d_cost(node: OpNode, kernel_size: int | tuple[int, int]) -> OpCost | None:
    kernel = _pair(kernel_size)
    if kernel is None:
        return None
    out = node.outputs[0]
    per_window = math.prod(kernel) + 1
    cost = OpCost(forward=Flops(torch=0, exact=numel(out.shape) * per_window), forward_allocs=new_output(node),
                  note=f"avg pool {kernel}: a mean per window")
    return _with_backward(node, cost, numel(out.shape) * per_window, saves_input=True)


@TABLE.register("call_module", nn.AvgPool2d)
def avg_pool2d_module(node: OpNode) -> OpCost | None:
    return None if node.module is None else avg_pool2d_cost(node, node.module.kernel_size)


@TABLE.register("call_function", F.avg_pool2d)
def avg_pool2d_function(node: OpNode) -> OpCost | None:
    return avg_pool2d_cost(node, node.arg(1, "kernel_size"))


def adaptive_window_total(in_size: int, out_size: int) -> int:
    """Sum of the adaptive pool's window lengths along one dim: window ``i`` spans
    ``[floor(i*in/out), ceil((i+1)*in/out))``."""
    return sum(-((-(i + 1) * in_size) // out_size) - (i * in_size) // out_size for i in range(out_size))


def adaptive_avg_pool2d_cost(node: OpNode) -> OpCost | None:
    x, out = node.inputs[0], node.outputs[0]
    if len(x.shape) not in (3, 4) or len(out.shape) != len(x.shape):
        return None
    (in_h, in_w), (out_h, out_w) = x.shape[-2:], out.shape[-2:]
    if (out_h, out_w) == (1, 1):
        cost = OpCost(forward=Flops(torch=0, exact=numel(x.shape) + numel(out.shape)),
                      forward_allocs=new_output(node), note="global average pool: mean over H, W")
        return _with_backward(node, cost, numel(x.shape), saves_input=False)
    planes = numel(x.shape[:-2])
    window_elements = planes * adaptive_window_total(in_h, out_h) * adaptive_window_total(in_w, out_w)
    flops = window_elements + numel(out.shape)
    cost = OpCost(forward=Flops(torch=0, exact=flops), forward_allocs=new_output(node),
                  note="adaptive avg pool: a mean per window")
    return _with_backward(node, cost, flops, saves_input=True)


@TABLE.register("call_module", nn.AdaptiveAvgPool2d)
@TABLE.register("call_function", F.adaptive_avg_pool2d)
def adaptive_avg_pool2d(node: OpNode) -> OpCost | None:
    """The output's spatial size decides the kernel: ``1 x 1`` is a ``mean``."""
    if not node.inputs or len(node.outputs) != 1:
        return None
    return adaptive_avg_pool2d_cost(node)


@TABLE.register("call_function", F.interpolate)
def interpolate_nearest(node: OpNode) -> OpCost | None:
    """``F.interpolate(x, size | scale_factor, mode="nearest")`` on N x C x H x W: one
    ``upsample_nearest2d`` (a copy per output element, 0 FLOPs) that saves no tensor; its backward
    sums each output gradient into its source element (``numel(out)`` adds) into one new
    input-sized gradient."""
    if not node.inputs or len(node.outputs) != 1 or len(node.inputs[0].shape) != 4:
        return None
    if node.arg(3, "mode", "nearest") != "nearest" or node.arg(6, "antialias", False):
        return None
    out = node.outputs[0]
    cost = OpCost(forward=Flops(torch=0, exact=0), forward_allocs=new_output(node),
                  note="nearest upsampling: a copy per output element")
    return _with_backward(node, cost, numel(out.shape), saves_input=False)


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
