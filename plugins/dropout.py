"""Dropout: ``nn.Dropout`` and ``F.dropout``.

On CPU (torch 2.14.1) a training dropout with ``0 < p < 1`` decomposes into
``noise = empty_like(x).bernoulli_(1 - p); noise.div_(1 - p); x * noise`` (``mul_`` in place):

- FLOPs, ``exact``: ``div_`` and ``mul``: ``2 * numel(x)`` (drawing random numbers counts 0);
  backward ``grad * noise``: ``numel(x)``. ``torch``: 0.
- Memory: the noise (the mask, input-sized in the input's dtype, not bool) is allocated first and
  kept for backward when autograd records the op (freed at once otherwise); then the output, unless
  in place. Autograd saves only the noise. The backward allocates one input-sized gradient.

In eval mode, with ``p == 0`` or an empty input, dropout returns its input itself: nothing runs,
nothing is allocated, and the gradient passes through.

Not modelled (answer None): ``p == 1``, channel-wise (``Dropout1d/2d/3d``) and alpha dropout.
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from costmodel.costs import Flops, OpCost, OpNode
from costmodel.hookspecs import hookimpl

from ._handles import HandleTable, is_float, new_output, no_grads, numel, saved_or_transient

TABLE = HandleTable()


def dropout_cost(node: OpNode, p: float, training: bool, inplace: bool) -> OpCost | None:
    if not node.inputs or len(node.outputs) != 1 or not 0 <= p < 1:
        return None
    x = node.inputs[0]
    if not training or p == 0 or x.numel == 0:
        cost = OpCost(forward=Flops(), note="dropout off: returns its input")
        if node.records_autograd:
            cost.input_grads = (0 if node.needs_input_grad[0] else None,) + no_grads(node)[1:]
        return cost
    if not is_float(x.dtype):
        return None
    elements = numel(x.shape)
    allocs = (saved_or_transient(x.nbytes, node),) + (() if inplace else new_output(node))
    cost = OpCost(forward=Flops(torch=0, exact=2 * elements), forward_allocs=allocs,
                  note=f"dropout p={p}: mask draw, scale, multiply")
    if node.records_autograd:
        cost.backward = Flops(torch=0, exact=elements)
        cost.input_grads = (x.nbytes if node.needs_input_grad[0] else None,) + no_grads(node)[1:]
    return cost


@TABLE.register("call_module", nn.Dropout)
def dropout_module(node: OpNode) -> OpCost | None:
    drop = node.module
    if drop is None:
        return None
    return dropout_cost(node, drop.p, drop.training, drop.inplace)


@TABLE.register("call_function", F.dropout)
def dropout_function(node: OpNode) -> OpCost | None:
    """``F.dropout(input, p=0.5, training=True, inplace=False)``."""
    return dropout_cost(node, node.arg(1, "p", 0.5), node.arg(2, "training", True), node.arg(3, "inplace", False))


@hookimpl
def costmodel_op_cost(node: OpNode, config: object) -> OpCost | None:
    return TABLE.cost(node)
