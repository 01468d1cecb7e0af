"""Softmax and log-softmax over one dim: ``F.softmax``/``F.log_softmax``, ``torch.softmax``/
``torch.log_softmax``, ``x.softmax(dim)``/``x.log_softmax(dim)``, ``nn.Softmax``/``nn.LogSoftmax``
(an attention's scores in the unfused path: timm's ``attn.softmax(dim=-1)``).

They dispatch ``aten._softmax(x, dim, False)`` / ``aten._log_softmax``; the backward is
``_softmax_backward_data`` / ``_log_softmax_backward_data``. FLOPs (docs/flop-convention.md), with
``E = numel(x)`` and ``R = E / x.shape[dim]`` rows: ``torch`` 0 (the stock counter has none);
``exact`` softmax ``5*E`` (row max comparison, subtract, exp, accumulate, divide by the sum),
backward ``4*E`` (``out * (grad - sum(grad * out))``: multiply, accumulate, subtract, multiply);
log-softmax ``5*E + R`` and ``4*E`` (the loss plugin's rows).

Memory (torch 2.14.1, CPU): the forward allocates its output, which autograd keeps for backward
(``SoftmaxBackward0`` and ``LogSoftmaxBackward0`` save the result, not the input); the backward
allocates one input-sized gradient. Not modelled (answer None): a ``dtype=`` argument (a cast
first), an implicit dim.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from costmodel.authoring import HandleTable, is_float, new_input_grad, new_output, numel
from costmodel.costs import Flops, OpCost, OpNode, SavedRef, TensorMeta
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()

SOFTMAX_FORWARD_K, SOFTMAX_BACKWARD_K = 5, 4


def softmax_cost(node: OpNode, x: TensorMeta, dim: int, log: bool) -> OpCost | None:
    out = node.outputs[0]
    if not is_float(x.dtype) or out.dtype != x.dtype or out.shape != x.shape:
        return None
    elements = numel(x.shape)
    rows = elements // x.shape[dim] if x.shape else 1
    forward = SOFTMAX_FORWARD_K * elements + (rows if log else 0)
    cost = OpCost(forward=Flops(torch=0, exact=forward), forward_allocs=new_output(node),
                  note=f"{'log-' if log else ''}softmax over dim {dim} of {x.shape}")
    if node.records_autograd:
        cost.saved = (SavedRef("output", 0),)
        cost.backward = Flops(torch=0, exact=SOFTMAX_BACKWARD_K * elements)
        cost.input_grads = new_input_grad(node, x, True)
    return cost


def _function(log: bool):
    def handle(node: OpNode) -> OpCost | None:
        x, dim = node.arg(0, "input"), node.arg(1, "dim")
        if not isinstance(x, TensorMeta) or not isinstance(dim, int) or len(node.inputs) != 1:
            return None
        if node.kwargs.get("dtype") is not None or node.arg(3, "dtype", None) is not None \
                or node.kwargs.get("_stacklevel") not in (None, 3):
            return None
        return softmax_cost(node, x, dim, log)

    return handle


def _module(log: bool):
    def handle(node: OpNode) -> OpCost | None:
        dim = getattr(node.module, "dim", None)
        if not isinstance(dim, int) or len(node.inputs) != 1:
            return None
        return softmax_cost(node, node.inputs[0], dim, log)

    return handle


for _log, _functions, _method, _module_type in ((False, (F.softmax, torch.softmax), "softmax", nn.Softmax),
                                                (True, (F.log_softmax, torch.log_softmax), "log_softmax",
                                                 nn.LogSoftmax)):
    TABLE.register("call_function", *_functions)(_function(_log))
    TABLE.register("call_method", _method)(_function(_log))
    TABLE.register("call_module", _module_type)(_module(_log))


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
