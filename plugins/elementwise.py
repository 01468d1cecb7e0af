"""Element-wise ops: activations (ReLU, ReLU6/hardtanh, Hardswish, Hardsigmoid, SiLU, Sigmoid, Tanh,
GELU) and arithmetic (add, sub, mul), as modules, functions, operators and tensor methods, in place or not.

FLOPs: 0 in the ``torch`` convention (the stock counter counts none of them). ``exact``
(docs/flop-convention.md): ``k`` per output element of floating dtype, forward and backward each:

=============  =======  ========  ===========================================================
op             forward  backward  autograd saves
=============  =======  ========  ===========================================================
relu           1        1         the output (also in place: it is the input's storage)
hardtanh/ReLU6 2        2         the input
hardswish      5        6         the input
hardsigmoid    4        3         the input
silu           5        9         the input
sigmoid        4        3         the output (also in place)
tanh           5        3         the output (also in place)
gelu           5        11        the input (``approximate="none"``)
gelu (tanh)    13       22        the input (``approximate="tanh"``)
=============  =======  ========  ===========================================================

The smooth activations (docs/flop-convention.md, "Smooth activations"; the reference's formulas
in ``validation/flops.py``) count the primitive operations of their CPU kernels, exp and erf 1
each: sigmoid ``1/(1+exp(-x))`` is negate, exp, add, reciprocal (4); its backward
``sigmoid_backward(grad, y) = grad*(1-y)*y`` 3. silu ``x*sigmoid(x)`` 5; its backward
``silu_backward(grad, x) = grad*(s*(1 + x*(1-s)))`` with ``s = sigmoid(x)`` recomputed: 4 + 5 (it
allocates only the gradient: the fused CPU kernel; the reference keeps the op whole). tanh
``(exp(2x)-1)/(exp(2x)+1)``: multiply, exp, subtract, add, divide (5); ``tanh_backward(grad, y) =
grad*(1-y*y)`` 3. gelu ``x*0.5*(1+erf(x/sqrt(2)))`` 5; backward ``grad*(cdf + x*pdf)``: cdf 4,
pdf ``exp(-x*x/2)/sqrt(2*pi)`` 4, 3 more: 11. gelu tanh ``0.5*x*(1+tanh(sqrt(2/pi)*(x +
0.044715*x^3)))``: 8 + tanh's 5 = 13; its backward 17 + tanh's 5 = 22 (the derivations in
``validation/flops.py``). Every one of them runs as one aten op forward (``sigmoid``, ``silu``,
``tanh``, ``gelu``, or its in-place twin) and one backward, and allocates only its output (none
in place) and the input's gradient.

Arithmetic: ``add``/``sub`` ``1 + [alpha != 1]`` per output element, ``mul`` 1. Backward, per
operand that needs its gradient: ``add`` passes the incoming gradient through (0 FLOPs, 0 new
bytes), times ``alpha`` for ``other`` when ``alpha != 1`` (1 per element); ``sub`` negates it for
``other`` (1); ``mul`` multiplies it by the other operand (1). An operand that was broadcast gets
its gradient summed down to its shape (``numel(out)`` more, a full-size temporary freed after
the sum). Autograd saves nothing for add/sub; for ``mul`` it saves each operand whose partner needs a
gradient.

In-place variants (torch 2.14.1, CPU): the result aliases the input (no allocation). When the
backward needs the *original* input (hardtanh, hardswish, hardsigmoid, silu, gelu; ``mul_`` when the
other operand needs its gradient), autograd first clones the input and keeps the clone: an
input-sized ``saved`` allocation. relu_, sigmoid_ and tanh_ need only their result: no clone. Without
autograd nothing is cloned. An add traced as ``operator.add`` whose result shares the input's
storage (``out += x`` under a tracer that keeps in-place semantics) is treated as in place.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from costmodel.authoring import (HandleTable, broadcast_reduced, input_index, is_float, new_output, no_grads, numel,
                                 output_aliases_input)
from costmodel.costs import Alloc, Flops, OpCost, OpNode, SavedRef, TensorMeta
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()


# ---------------------------------------------------------------------------------------------
# Activations


@dataclass(frozen=True)
class Activation:
    """One unary activation: exact FLOPs per element, and what its backward reads."""

    name: str
    forward_k: int
    backward_k: int
    backward_reads_output: bool  # relu/sigmoid: in place needs no clone of the input


RELU = Activation("relu", 1, 1, backward_reads_output=True)
HARDTANH = Activation("hardtanh", 2, 2, backward_reads_output=False)
HARDSWISH = Activation("hardswish", 5, 6, backward_reads_output=False)
HARDSIGMOID = Activation("hardsigmoid", 4, 3, backward_reads_output=False)
SILU = Activation("silu", 5, 9, backward_reads_output=False)
SIGMOID = Activation("sigmoid", 4, 3, backward_reads_output=True)
TANH = Activation("tanh", 5, 3, backward_reads_output=True)  # tanh_backward(grad, output)
GELU = Activation("gelu", 5, 11, backward_reads_output=False)  # gelu_backward(grad, input)
GELU_TANH = Activation("gelu_tanh", 13, 22, backward_reads_output=False)


def activation_cost(node: OpNode, act: Activation, inplace: bool) -> OpCost:
    x, out = node.inputs[0], node.outputs[0]
    elements = numel(out.shape) if is_float(out.dtype) else 0
    inplace = inplace or output_aliases_input(node)
    cost = OpCost(forward=Flops(torch=0, exact=act.forward_k * elements),
                  note=f"{act.name}{'_' if inplace else ''}: {act.forward_k}/element")
    if not node.records_autograd:
        cost.forward_allocs = () if inplace else new_output(node)
        return cost
    if inplace and not act.backward_reads_output:
        cost.forward_allocs = (Alloc(x.nbytes, "saved"),)  # autograd's clone of the original input
    elif not inplace:
        cost.forward_allocs = new_output(node)
    if act.backward_reads_output:
        cost.saved = (SavedRef("output", 0),)
    elif not inplace:
        cost.saved = (SavedRef("input", 0),)
    cost.backward = Flops(torch=0, exact=act.backward_k * elements)
    cost.input_grads = (x.nbytes if node.needs_input_grad[0] else None,) + no_grads(node)[1:]
    return cost


InplaceRule = Callable[[OpNode], bool]


def _module_inplace(node: OpNode) -> bool:
    return bool(getattr(node.module, "inplace", False))


def _arg_inplace(index: int) -> InplaceRule:
    return lambda node: bool(node.arg(index, "inplace", False))


def _always(node: OpNode) -> bool:
    return True


def _never(node: OpNode) -> bool:
    return False


ACTIVATION_TARGETS: list[tuple[str, object, Activation, InplaceRule]] = [
    ("call_module", nn.ReLU, RELU, _module_inplace),
    ("call_module", nn.ReLU6, HARDTANH, _module_inplace),
    ("call_module", nn.Hardtanh, HARDTANH, _module_inplace),
    ("call_module", nn.Hardswish, HARDSWISH, _module_inplace),
    ("call_module", nn.Hardsigmoid, HARDSIGMOID, _module_inplace),
    ("call_module", nn.SiLU, SILU, _module_inplace),
    ("call_module", nn.Sigmoid, SIGMOID, _never),
    ("call_function", F.relu, RELU, _arg_inplace(1)),
    ("call_function", torch.relu, RELU, _never),
    ("call_function", torch.relu_, RELU, _always),
    ("call_function", F.relu6, HARDTANH, _arg_inplace(1)),
    ("call_function", F.hardtanh, HARDTANH, _arg_inplace(3)),
    ("call_function", F.hardtanh_, HARDTANH, _always),
    ("call_function", F.hardswish, HARDSWISH, _arg_inplace(1)),
    ("call_function", F.hardsigmoid, HARDSIGMOID, _arg_inplace(1)),
    ("call_function", F.silu, SILU, _arg_inplace(1)),
    ("call_function", torch.sigmoid, SIGMOID, _never),
    ("call_function", F.sigmoid, SIGMOID, _never),
    ("call_function", torch.sigmoid_, SIGMOID, _always),
    ("call_method", "relu", RELU, _never),
    ("call_method", "relu_", RELU, _always),
    ("call_method", "sigmoid", SIGMOID, _never),
    ("call_method", "sigmoid_", SIGMOID, _always),
    ("call_module", nn.Tanh, TANH, _never),
    ("call_function", torch.tanh, TANH, _never),
    ("call_function", F.tanh, TANH, _never),
    ("call_function", torch.tanh_, TANH, _always),
    ("call_method", "tanh", TANH, _never),
    ("call_method", "tanh_", TANH, _always),
]


def _activation_handle(act: Activation, inplace: InplaceRule) -> Callable[[OpNode], OpCost | None]:
    def handle(node: OpNode) -> OpCost | None:
        if not node.inputs or not node.outputs or node.inputs[0].shape != node.outputs[0].shape:
            return None
        return activation_cost(node, act, inplace(node))

    handle.__name__ = f"{act.name}_handle"
    handle.__doc__ = f"{act.name}: {act.forward_k} FLOPs per element forward, {act.backward_k} backward (exact)."
    return handle


for _kind, _target, _act, _rule in ACTIVATION_TARGETS:
    TABLE.register(_kind, _target)(_activation_handle(_act, _rule))


# GELU: the count depends on ``approximate`` ("none": erf; "tanh": the tanh approximation).
GELU_BY_APPROXIMATE: dict[str, Activation] = {"none": GELU, "tanh": GELU_TANH}


def _gelu_handle(approximate: Callable[[OpNode], object], inplace: InplaceRule) -> Callable[[OpNode], OpCost | None]:
    def handle(node: OpNode) -> OpCost | None:
        act = GELU_BY_APPROXIMATE.get(approximate(node))  # None for a value torch rejects
        if act is None:
            return None
        return _activation_handle(act, inplace)(node)

    handle.__name__ = "gelu_handle"
    handle.__doc__ = ("gelu: 5 FLOPs per element forward, 11 backward (approximate='none'); 13 and 22 with "
                      "approximate='tanh' (exact).")
    return handle


TABLE.register("call_module", nn.GELU)(
    _gelu_handle(lambda node: getattr(node.module, "approximate", None), _never))
# F.gelu(input, approximate='none') is the builtin torch._C._nn.gelu; gelu_ is its in-place twin
# (no Tensor method exists for either). ``approximate`` is keyword-only.
TABLE.register("call_function", F.gelu)(_gelu_handle(lambda node: node.kwargs.get("approximate", "none"), _never))
TABLE.register("call_function", torch._C._nn.gelu_)(
    _gelu_handle(lambda node: node.kwargs.get("approximate", "none"), _always))


# ---------------------------------------------------------------------------------------------
# Arithmetic: add, sub, mul


@dataclass(frozen=True)
class Operands:
    """The two operands of a binary op: a ``TensorMeta`` or a Python number each."""

    left: TensorMeta | float
    right: TensorMeta | float
    alpha: float


def _operands(node: OpNode) -> Operands | None:
    left, right = node.arg(0, "input"), node.arg(1, "other")
    if not isinstance(left, (TensorMeta, int, float)) or not isinstance(right, (TensorMeta, int, float)):
        return None
    if not isinstance(left, TensorMeta) and not isinstance(right, TensorMeta):
        return None
    alpha = node.kwargs.get("alpha", 1)  # keyword-only in torch.add/sub and Tensor.add/sub
    if len(node.args) > 2 or not isinstance(alpha, (int, float)) or set(node.kwargs) - {"input", "other", "alpha"}:
        return None
    return Operands(left, right, alpha)


def _gradient_of(node: OpNode, operand: TensorMeta, out: TensorMeta, computed: bool,
                 cost: OpCost, grads: list[int | None], transients: list[Alloc]) -> int:
    """Record the gradient of ``operand``: ``computed`` says whether the op's backward makes a new
    full-size tensor (else it passes the incoming gradient); broadcasting adds a sum. Returns the
    backward FLOPs of this gradient (the element-wise op, if any, is counted by the caller)."""
    index = input_index(node, operand)
    if index is None or not node.needs_input_grad[index]:
        return 0
    # An operand of another dtype than the result (type promotion: a bf16 activation added to a
    # float32 residual under autocast) gets its gradient in the result's dtype from the formula;
    # autograd's engine then casts it to the operand's (``validate_outputs``): a new tensor.
    # Its steps (``OpCost.input_grad_steps``): what the apply returns (the product, or the incoming
    # gradient itself), the sum to its shape if broadcast (in the result's dtype), the cast.
    cast = operand.dtype != out.dtype
    reduced = broadcast_reduced(operand.shape, out.shape)
    grads[index] = operand.nbytes if reduced or cast else out.nbytes if computed else 0
    if reduced or cast:
        sizes = [out.nbytes if computed else 0]
        if reduced and cast:  # the sum in the result's dtype, then its cast
            sizes.append(numel(operand.shape) * out.dtype.itemsize)
        cost.input_grad_steps[index] = (*sizes, operand.nbytes)
    return numel(out.shape) if reduced else 0


def binary_cost(node: OpNode, op: str, inplace: bool) -> OpCost | None:
    operands = _operands(node)
    if operands is None or not node.outputs:
        return None
    left, right, alpha = operands.left, operands.right, operands.alpha
    out = node.outputs[0]
    if op != "add" and alpha != 1:
        return None  # sub with alpha: neg and a multiply; not modelled
    inplace = inplace or (isinstance(left, TensorMeta) and output_aliases_input(node, input_index(node, left)))
    elements = numel(out.shape) if is_float(out.dtype) else 0
    per_element = 1 + (op == "add" and alpha != 1)
    cost = OpCost(forward=Flops(torch=0, exact=per_element * elements), note=f"{op}{'_' if inplace else ''}")
    allocs: list[Alloc] = [] if inplace else list(new_output(node))
    if not node.records_autograd:
        cost.forward_allocs = tuple(allocs)
        return cost
    grads, transients = list(no_grads(node)), []
    backward = 0
    left_t = left if isinstance(left, TensorMeta) else None
    right_t = right if isinstance(right, TensorMeta) else None
    needs = {side: t is not None and node.needs_input_grad[input_index(node, t)]
             for side, t in (("left", left_t), ("right", right_t))}
    if op == "mul":
        saved = []
        if needs["left"] and right_t is not None:
            saved.append(SavedRef("input", input_index(node, right_t)))
        if needs["right"] and left_t is not None:
            if inplace:
                allocs.insert(0, Alloc(left_t.nbytes, "saved"))  # clone of the original self
            else:
                saved.append(SavedRef("input", input_index(node, left_t)))
        cost.saved = tuple(saved)
        for side, t in (("left", left_t), ("right", right_t)):
            if needs[side]:
                backward += elements + _gradient_of(node, t, out, True, cost, grads, transients)
    else:
        if needs["left"]:
            backward += _gradient_of(node, left_t, out, False, cost, grads, transients)
        if needs["right"]:
            scaled = op == "sub" or alpha != 1
            backward += scaled * elements + _gradient_of(node, right_t, out, scaled, cost, grads, transients)
    cost.forward_allocs = tuple(allocs)
    cost.backward = Flops(torch=0, exact=backward)
    cost.input_grads = tuple(grads)
    cost.backward_allocs = tuple(transients)
    return cost


def _binary_handle(op: str, inplace: bool) -> Callable[[OpNode], OpCost | None]:
    def handle(node: OpNode) -> OpCost | None:
        return binary_cost(node, op, inplace)

    handle.__name__ = f"{op}{'_' if inplace else ''}_handle"
    handle.__doc__ = f"{op}{' in place' if inplace else ''}: see the module docstring."
    return handle


BINARY_TARGETS: list[tuple[str, object, str, bool]] = [
    ("call_function", operator.add, "add", False),
    ("call_function", torch.add, "add", False),
    ("call_function", operator.iadd, "add", True),
    ("call_method", "add", "add", False),
    ("call_method", "add_", "add", True),
    ("call_function", operator.sub, "sub", False),
    ("call_function", torch.sub, "sub", False),
    ("call_function", operator.isub, "sub", True),
    ("call_method", "sub", "sub", False),
    ("call_method", "sub_", "sub", True),
    ("call_function", operator.mul, "mul", False),
    ("call_function", torch.mul, "mul", False),
    ("call_function", operator.imul, "mul", True),
    ("call_method", "mul", "mul", False),
    ("call_method", "mul_", "mul", True),
]

for _kind, _target, _op, _inplace in BINARY_TARGETS:
    TABLE.register(_kind, _target)(_binary_handle(_op, _inplace))


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
