"""Reductions over dims: ``mean`` and ``sum`` (``torch.mean(x, dim, keepdim)``, ``x.mean(...)``,
``torch.sum``, ``x.sum``), e.g. the global average pool ``x.mean([2, 3])`` of MNASNet, ShuffleNetV2
and EfficientNet heads.

FLOPs: 0 in the ``torch`` convention (stock ``FlopCounterMode`` counts no reduction). ``exact``
(docs/flop-convention.md, the reference's ``sum_flop`` and ``mean_flop``):

- ``sum(x, dim)``: every input element accumulated once: ``numel(x)``. Backward: ``expand`` of the
  incoming gradient back to the input's shape (after ``unsqueeze`` of each reduced dim when
  ``keepdim=False``): 0.
- ``mean(x, dim)``: the sum and a divide per output: ``numel(x) + numel(out)``. Backward:
  ``expand`` then ``div`` by the reduced count (``div.Scalar``): one divide per input element,
  ``numel(x)``.

Memory (torch 2.14.1, CPU): the forward allocates the output; autograd saves sizes only
(``MeanBackward1``/``SumBackward1`` keep ``self.sizes()`` and the dims). ``mean``'s backward
allocates one input-sized gradient (the ``div``'s output); ``sum``'s hands the producer an expanded
view of the incoming gradient: 0 new bytes.

The reference counts ``sum`` as ``numel(x)`` whatever the dtype (its row has no floating-point
test), so this rule does too. Not modelled (answer None): a ``dtype=`` argument that changes the
result's dtype (the backward then casts), ``out=``.
"""

from __future__ import annotations

import torch

from costmodel.authoring import HandleTable, new_output, no_grads, numel
from costmodel.costs import Flops, OpCost, OpNode, TensorMeta
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()


def _reduction(node: OpNode) -> tuple[TensorMeta, TensorMeta] | None:
    """``(x, out)`` of a plain reduction of one tensor, or None outside what is modelled."""
    x = node.arg(0, "input")
    if not isinstance(x, TensorMeta) or len(node.inputs) != 1 or len(node.outputs) != 1:
        return None
    out = node.outputs[0]
    if "out" in node.kwargs or out.storage == x.storage:
        return None
    dtype = node.kwargs.get("dtype")
    if dtype is not None and dtype != x.dtype:
        return None
    return x, out


@TABLE.register("call_function", torch.mean)
@TABLE.register("call_method", "mean")
def mean(node: OpNode) -> OpCost | None:
    """``mean(x, dim, keepdim)``: forward ``numel(x)`` adds and ``numel(out)`` divides; backward
    ``expand`` (a view) and ``div`` by the count: ``numel(x)`` FLOPs into a new input-sized tensor."""
    found = _reduction(node)
    if found is None:
        return None
    x, out = found
    cost = OpCost(forward=Flops(torch=0, exact=numel(x.shape) + numel(out.shape)), forward_allocs=new_output(node),
                  note="mean: a sum and a divide per output")
    if node.records_autograd:
        cost.backward = Flops(torch=0, exact=numel(x.shape) if node.needs_input_grad[0] else 0)
        cost.input_grads = (x.nbytes if node.needs_input_grad[0] else None,) + no_grads(node)[1:]
    return cost


@TABLE.register("call_function", torch.sum)
@TABLE.register("call_method", "sum")
def sum_(node: OpNode) -> OpCost | None:
    """``sum(x, dim, keepdim)``: forward ``numel(x)`` adds; backward an ``expand`` of the incoming
    gradient: 0 FLOPs, 0 new bytes (the producer receives a view)."""
    found = _reduction(node)
    if found is None:
        return None
    x, _ = found
    cost = OpCost(forward=Flops(torch=0, exact=numel(x.shape)), forward_allocs=new_output(node),
                  note="sum: one add per input element")
    if node.records_autograd:
        cost.input_grads = (0 if node.needs_input_grad[0] else None,) + no_grads(node)[1:]
    return cost


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
