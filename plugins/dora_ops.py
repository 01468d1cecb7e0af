"""Ops that only the DoRA mirror issues among the built-in methods, with their cost rules.

Checked on this machine against peft 0.21.2's DoRA layers (aten ops under a logging dispatch mode,
``saved_tensors_hooks``, MemTracker; see ``method_lora``) and against docs/flop-convention.md:

``Tensor.detach()``
    A view that autograd does not record: 0 FLOPs, nothing allocated, no gradient flows back.
``Tensor.norm(p=2, dim, keepdim)``, ``torch.linalg.norm(x, dim=...)`` (``aten.linalg_vector_norm``,
ord 2)
    ``2 * numel(x) + numel(out)`` exact FLOPs (square, accumulate; one square root per output), 0 in
    the stock convention; one new output. DoRA takes it of a weight that needs no gradient (the
    frozen base weight plus the *detached* LoRA product); a norm that autograd records is not
    modelled (a coverage gap, never a guess).
``a / b`` (``operator.truediv``, ``torch.div``, ``Tensor.div``; ``aten.div.Tensor``)
    ``numel(out)`` exact FLOPs forward, one new output. DoRA divides the trainable magnitude by the
    detached weight norm: the backward computes ``grad / b`` for ``a`` (``numel(out)`` FLOPs, a new
    tensor; if ``a`` was broadcast, summed down to its shape: ``numel(out)`` more and a full-size
    temporary), and autograd saves ``b``. A divisor that needs a gradient is not modelled.
``torch.eye(n)``
    Only the Linear DoRA mirror: an ``n x n`` output, 0 FLOPs (writing ones and zeros is no
    arithmetic, like ``zeros``/``ones`` in the convention's zero list), not recorded by autograd.
"""

from __future__ import annotations

import operator

import torch

from costmodel.authoring import HandleTable, broadcast_reduced, input_index, is_float, new_output, no_grads, numel
from costmodel.costs import Alloc, Flops, OpCost, OpNode, SavedRef, TensorMeta
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()


@TABLE.register("call_method", "detach")
@TABLE.register("call_function", torch.detach)
def detach_cost(node: OpNode) -> OpCost | None:
    """A view outside autograd: nothing allocated, no gradient."""
    if len(node.inputs) != 1 or len(node.outputs) != 1:
        return None
    return OpCost(forward=Flops(), forward_allocs=new_output(node), input_grads=no_grads(node), note="detach")


def _is_two_norm(node: OpNode) -> bool:
    if node.kind == "call_method":  # Tensor.norm(p="fro", dim=None, keepdim=False, dtype=None)
        p = node.arg(1, "p", "fro")
        return p == 2 or (p == "fro" and node.arg(2, "dim") is not None)
    ord_ = node.arg(1, "ord")  # torch.linalg.norm(A, ord=None, dim=None, ...)
    dim = node.arg(2, "dim")
    return ord_ in (None, 2) and (ord_ is None or isinstance(dim, int) or (dim is not None and len(dim) == 1))


@TABLE.register("call_method", "norm")
@TABLE.register("call_function", torch.linalg.norm, torch.norm)
def two_norm_cost(node: OpNode) -> OpCost | None:
    """``linalg_vector_norm(x, 2, dim)``: ``2 * numel(x) + numel(out)``; not recorded by autograd."""
    if len(node.outputs) != 1 or not node.inputs or node.records_autograd or not _is_two_norm(node):
        return None
    x, out = node.inputs[0], node.outputs[0]
    flops = 2 * numel(x.shape) + numel(out.shape) if is_float(out.dtype) else 0
    return OpCost(forward=Flops(torch=0, exact=flops), forward_allocs=new_output(node), note="2-norm over dims")


@TABLE.register("call_function", operator.truediv, torch.div, torch.true_divide)
@TABLE.register("call_method", "div", "true_divide")
def divide_cost(node: OpNode) -> OpCost | None:
    """``a / b`` with ``b`` a tensor that needs no gradient, or a number."""
    if node.kwargs.get("rounding_mode") is not None or len(node.outputs) != 1:
        return None
    left, right = node.arg(0, "input"), node.arg(1, "other")
    if not isinstance(left, TensorMeta) or not isinstance(right, (TensorMeta, int, float)):
        return None
    out = node.outputs[0]
    elements = numel(out.shape) if is_float(out.dtype) else 0
    cost = OpCost(forward=Flops(torch=0, exact=elements), forward_allocs=new_output(node), note="divide")
    if not node.records_autograd:
        return cost
    right_index = input_index(node, right) if isinstance(right, TensorMeta) else None
    if right_index is not None and node.needs_input_grad[right_index]:
        return None  # -grad * a / b^2: not modelled
    grads: list[int | None] = list(no_grads(node))
    left_index = input_index(node, left)
    backward = 0
    transients: tuple[Alloc, ...] = ()
    if left_index is not None and node.needs_input_grad[left_index]:
        backward = elements  # grad / b
        if broadcast_reduced(left.shape, out.shape):
            transients = (Alloc(out.nbytes, "transient"),)
            backward += numel(out.shape)
            grads[left_index] = left.nbytes
        else:
            grads[left_index] = out.nbytes
    cost.backward = Flops(torch=0, exact=backward)
    cost.input_grads = tuple(grads)
    cost.backward_allocs = transients
    if right_index is not None:
        cost.saved = (SavedRef("input", right_index),)
    return cost


@TABLE.register("call_function", torch.eye)
def eye_cost(node: OpNode) -> OpCost | None:
    """An identity matrix: a new output, no arithmetic."""
    if len(node.outputs) != 1 or node.inputs:
        return None
    return OpCost(forward=Flops(), forward_allocs=new_output(node), note="eye")


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
