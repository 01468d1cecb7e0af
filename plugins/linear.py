"""Matrix products: ``nn.Linear``, ``F.linear``, ``mm``, ``addmm``, ``bmm`` and ``matmul``.

FLOPs (docs/flop-convention.md): a product ``(m x k) @ (k x n)`` is ``2*m*k*n`` in both
conventions (``m*n`` dot products of length ``k``). ``addmm``'s bias add is ``m*n`` more in
``exact`` only (the stock counter ignores it).

- ``nn.Linear`` on ``x: (..., in)`` is one product with ``R = numel(x) / in`` rows: ``addmm`` with a
  bias, ``mm`` without (an N-d input is viewed as ``R x in`` and back: no copy).
  forward: ``2*R*in*out`` (+ ``R*out`` exact, with a bias).
  backward: ``grad_x = grad @ W``: ``2*R*out*in``; ``grad_W = grad^T @ x``: ``2*out*R*in``;
  ``grad_b = sum over rows``: ``R*out`` exact, 0 torch.
- ``mm``/``bmm``: backward ``grad_a = grad @ b^T`` and ``grad_b = a^T @ grad``, each the forward count.
- ``matmul``: as ``mm`` for 2-d operands, ``(..., m, k) @ (k, n)`` folds the batch into rows (one
  ``mm``), and equal-batch N-d operands run one ``bmm``.

Memory (torch 2.14.1, CPU): the forward allocates only its output. Autograd saves each operand
only if the *other* operand needs its gradient (``grad_a`` needs ``b``, ``grad_b`` needs ``a``);
a saved weight or bias is a parameter (no new bytes). Each needed gradient is a new tensor of its
operand's size: the bias gradient is the sum's result, no temporary; ``addmm`` with a full-size
bias passes the incoming gradient through (0 new bytes). ``nn.Linear``'s bias gradient is made
last: ``AddmmBackward0`` passes the full incoming gradient for the broadcast bias, autograd
releases the node's saved input, and only then sums it down to the bias's shape
(``OpCost.late_param_grads``).

Not modelled (answer None): ``addmm``/``baddbmm`` with ``alpha``/``beta`` other than 1,
``matmul`` with 1-d operands or broadcast batch dimensions, and ``nn.Linear``/``F.linear`` on a
non-contiguous input of more than two dimensions (``x.transpose(1, 2)`` fed to a projection): its
``reshape`` to rows copies the input first (a ``clone`` that autograd saves for the weight
gradient) and the biased product runs as ``mm`` + ``add``, another timeline.
"""

from __future__ import annotations

import operator

import torch
from torch import nn
from torch.nn import functional as F

from costmodel.authoring import (HandleTable, input_index, module_param, needs_grad, new_output, no_grads, numel,
                                 tensor_input, trainable_param)
from costmodel.costs import Flops, OpCost, OpNode, SavedRef, TensorMeta
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()


def product_flops(rows: int, inner: int, cols: int, batch: int = 1) -> int:
    """``batch`` products ``(rows x inner) @ (inner x cols)``: ``2*rows*inner*cols`` each."""
    return 2 * batch * rows * inner * cols


def _product_cost(node: OpNode, a: TensorMeta, b: TensorMeta | None, flops: int, *, need_a: bool, need_b: bool,
                  bias_add: int = 0, note: str = "") -> OpCost:
    """A product whose two operands are ``a`` and ``b`` (``b`` None when it is the module's weight).

    ``need_a``/``need_b``: whether each operand's gradient is computed; each costs one more product
    of the same size, and keeps the other operand alive."""
    cost = OpCost(forward=Flops(torch=flops, exact=flops + bias_add), forward_allocs=new_output(node), note=note)
    if not node.records_autograd:
        return cost
    cost.backward = Flops.both(need_a * flops + need_b * flops)
    saved = []
    if need_a and b is not None:
        saved.append(SavedRef("input", input_index(node, b)))
    if need_b:
        saved.append(SavedRef("input", input_index(node, a)))
    cost.saved = tuple(saved)
    grads = list(no_grads(node))
    for meta, needed in ((a, need_a), (b, need_b)):
        if needed and meta is not None:
            grads[input_index(node, meta)] = meta.nbytes
    cost.input_grads = tuple(grads)
    return cost


def _bias_grad(node: OpNode, cost: OpCost, bias: TensorMeta, out: TensorMeta) -> None:
    """``grad_bias`` is the incoming gradient summed to the bias's shape (``numel(out)`` adds, a
    bias-sized result), or the incoming gradient itself when the bias is full-size."""
    reduced = tuple(bias.shape) != tuple(out.shape)
    cost.backward = cost.backward + Flops(torch=0, exact=numel(out.shape) if reduced else 0)
    grads = list(cost.input_grads)
    grads[input_index(node, bias)] = bias.nbytes if reduced else 0
    cost.input_grads = tuple(grads)


def viewed_as_rows(x: TensorMeta) -> bool:
    """Whether a linear layer takes ``x`` as its rows without a copy: a contiguous input, or a 2-d
    one (``addmm`` reads a transposed matrix as it is)."""
    return x.contiguous or len(x.shape) <= 2


@TABLE.register("call_module", nn.Linear)
def linear_module(node: OpNode) -> OpCost | None:
    """``nn.Linear``: ``addmm(bias, x, W^T)`` (``mm`` without bias) over ``R`` rows."""
    weight_meta = module_param(node, "weight")
    if weight_meta is None:
        return None
    out_features, in_features = weight_meta[1].shape
    x = node.inputs[0]
    if not viewed_as_rows(x):
        return None
    rows = numel(x.shape) // in_features
    has_bias = module_param(node, "bias") is not None
    weight, bias = trainable_param(node, "weight"), trainable_param(node, "bias")
    flops = product_flops(rows, in_features, out_features)
    cost = _product_cost(node, x, None, flops, need_a=node.needs_input_grad[0], need_b=weight is not None,
                         bias_add=rows * out_features if has_bias else 0,
                         note=f"linear: 2*{rows}*{in_features}*{out_features}")
    if node.records_autograd:
        cost.param_grads = {found[0]: found[1].nbytes for found in (weight, bias) if found is not None}
        if bias is not None:
            cost.backward = cost.backward + Flops(torch=0, exact=rows * out_features)
            # addmm broadcasts the bias: autograd's engine sums its (rows x out) gradient down to
            # the bias's shape after the node's saved input is released.
            cost.late_param_grads = (bias[0],)
    return cost


@TABLE.register("call_function", F.linear)
def linear_function(node: OpNode) -> OpCost | None:
    """``F.linear(input, weight, bias)``: weight and bias are inputs of the node."""
    x, weight, bias = tensor_input(node, 0, "input"), tensor_input(node, 1, "weight"), tensor_input(node, 2, "bias")
    if x is None or weight is None or weight.shape[-1] != x.shape[-1] or len(weight.shape) != 2 or not viewed_as_rows(x):
        return None
    out_features, in_features = weight.shape
    rows = numel(x.shape) // in_features
    flops = product_flops(rows, in_features, out_features)
    cost = _product_cost(node, x, weight, flops, need_a=needs_grad(node, x), need_b=needs_grad(node, weight),
                         bias_add=rows * out_features if bias is not None else 0,
                         note=f"linear: 2*{rows}*{in_features}*{out_features}")
    if node.records_autograd and needs_grad(node, bias):
        _bias_grad(node, cost, bias, node.outputs[0])
    return cost


@TABLE.register("call_function", torch.mm)
@TABLE.register("call_method", "mm")
def mm(node: OpNode) -> OpCost | None:
    a, b = tensor_input(node, 0, "input"), tensor_input(node, 1, "mat2")
    if a is None or b is None or len(a.shape) != 2 or len(b.shape) != 2:
        return None
    return _product_cost(node, a, b, product_flops(a.shape[0], a.shape[1], b.shape[1]),
                         need_a=needs_grad(node, a), need_b=needs_grad(node, b))


@TABLE.register("call_function", torch.bmm)
@TABLE.register("call_method", "bmm")
def bmm(node: OpNode) -> OpCost | None:
    a, b = tensor_input(node, 0, "input"), tensor_input(node, 1, "mat2")
    if a is None or b is None or len(a.shape) != 3 or len(b.shape) != 3:
        return None
    return _product_cost(node, a, b, product_flops(a.shape[1], a.shape[2], b.shape[2], batch=a.shape[0]),
                         need_a=needs_grad(node, a), need_b=needs_grad(node, b))


@TABLE.register("call_function", torch.addmm)
@TABLE.register("call_method", "addmm")
def addmm(node: OpNode) -> OpCost | None:
    """``addmm(bias, a, b)`` with ``beta = alpha = 1``: the product plus ``m*n`` bias adds (exact)."""
    bias, a, b = tensor_input(node, 0, "input"), tensor_input(node, 1, "mat1"), tensor_input(node, 2, "mat2")
    if bias is None or a is None or b is None or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
        return None
    m, k, n = a.shape[0], a.shape[1], b.shape[1]
    cost = _product_cost(node, a, b, product_flops(m, k, n), need_a=needs_grad(node, a),
                         need_b=needs_grad(node, b), bias_add=m * n)
    if node.records_autograd and needs_grad(node, bias):
        _bias_grad(node, cost, bias, node.outputs[0])
    return cost


@TABLE.register("call_function", torch.matmul, operator.matmul)
@TABLE.register("call_method", "matmul")
def matmul(node: OpNode) -> OpCost | None:
    """``a @ b``: ``mm`` for 2-d operands; ``(..., m, k) @ (k, n)`` folds the batch into the rows of
    one ``mm`` (views, no copy, for contiguous ``a``); equal-batch N-d operands run one ``bmm``."""
    a, b = tensor_input(node, 0, "input"), tensor_input(node, 1, "other")
    if a is None or b is None or len(a.shape) < 2 or len(b.shape) < 2:
        return None
    if len(b.shape) == 2:
        rows = numel(a.shape[:-1])
        flops = product_flops(rows, a.shape[-1], b.shape[1])
    elif a.shape[:-2] == b.shape[:-2]:
        flops = product_flops(a.shape[-2], a.shape[-1], b.shape[-1], batch=numel(a.shape[:-2]))
    else:
        return None
    return _product_cost(node, a, b, flops, need_a=needs_grad(node, a), need_b=needs_grad(node, b))


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
