"""Ops that move or describe data without arithmetic: views and reshapes, ``cat``, ``nn.Identity``,
and nodes that return no tensor (``x.size()``, ``x.shape``, indexing into a size).

FLOPs: 0 in both conventions (docs/flop-convention.md lists ``view``, ``reshape``, ``cat``... as
zero-FLOP ops).

Memory (torch 2.14.1, CPU):
- ``view``, ``flatten``, ``reshape``, ``contiguous``, ``squeeze``, ``unsqueeze``, ``permute``,
  ``transpose``, ``t``: the result is a view of the input (no allocation) when the layout allows;
  ``reshape``/``flatten``/``contiguous`` of a non-contiguous input copy it, which shape
  propagation shows as an output in a storage of its own: that output is then allocated. Nothing
  is saved. The backward views the incoming gradient back (0 new bytes; a contiguous incoming
  gradient is assumed, as every op of the covered models produces one).
- ``cat`` allocates its output, saves nothing, and hands each input a slice (a view) of the
  incoming gradient: 0 new bytes.
- ``nn.Identity`` returns its input: no allocation, and its gradient is the incoming one.
- Nodes whose result is not a tensor (``size``, ``dim``, ``getattr(x, "shape")``, an index into
  a size) cost nothing and pass no gradient.

Not modelled (answer None): indexing into a tensor (``operator.getitem`` on a tensor: a view or a
gather, with a zero-filled gradient in backward), ``expand`` (its backward is a sum).
"""

from __future__ import annotations

import builtins
import operator

import torch
from torch import nn

from costmodel.costs import Flops, OpCost, OpNode, differ
from costmodel.hookspecs import hookimpl

from ._handles import HandleTable, new_output, no_grads

TABLE = HandleTable()


def _gradients_alias(node: OpNode) -> tuple[int | None, ...]:
    """Each input that needs a gradient receives a view of the incoming gradient: 0 new bytes."""
    return tuple(0 if need else None for need in node.needs_input_grad)


@TABLE.register("call_function", torch.flatten, torch.reshape)
@TABLE.register("call_method", "view", "view_as", "reshape", "reshape_as", "flatten", "contiguous", "squeeze",
                "unsqueeze", "permute", "transpose", "t")
@TABLE.register("call_module", nn.Flatten)
def view_or_copy(node: OpNode) -> OpCost | None:
    """A view of input 0, or a copy when the output lives in a storage of its own."""
    if not node.inputs or len(node.outputs) != 1 or differ(node.outputs[0].numel, node.inputs[0].numel):
        return None
    cost = OpCost(forward=Flops(), forward_allocs=new_output(node),
                  note="view" if not new_output(node) else "reshape of a non-contiguous input: copy")
    if node.records_autograd:
        cost.input_grads = _gradients_alias(node)
    return cost


@TABLE.register("call_function", torch.cat, torch.concat, torch.concatenate)
def cat(node: OpNode) -> OpCost | None:
    """``torch.cat(tensors, dim)``: a new output; each input's gradient is a slice of the incoming one."""
    if not node.inputs or len(node.outputs) != 1:
        return None
    cost = OpCost(forward=Flops(), forward_allocs=new_output(node), note="cat: copy, no arithmetic")
    if node.records_autograd:
        cost.input_grads = _gradients_alias(node)
    return cost


@TABLE.register("call_module", nn.Identity)
def identity(node: OpNode) -> OpCost | None:
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.outputs[0].storage != node.inputs[0].storage:
        return None
    cost = OpCost(forward=Flops(), note="identity")
    if node.records_autograd:
        cost.input_grads = _gradients_alias(node)
    return cost


@TABLE.register("call_function", builtins.getattr, operator.getitem, builtins.len)
@TABLE.register("call_method", "size", "dim", "numel", "ndimension")
def no_tensor_result(node: OpNode) -> OpCost | None:
    """Metadata reads (``x.size(0)``, ``x.shape``, ``shape[1]``): no tensor comes out, nothing runs."""
    if node.outputs:
        return None  # e.g. indexing into a tensor: a view or a gather, not modelled here
    cost = OpCost(forward=Flops(), note="metadata: no op runs")
    if node.records_autograd:
        cost.input_grads = no_grads(node)
    return cost


@hookimpl
def costmodel_op_cost(node: OpNode, config: object) -> OpCost | None:
    return TABLE.cost(node)
