"""A quantized frozen base: bitsandbytes 0.50.2's ``nn.Linear4bit`` and ``nn.Linear8bitLt`` on the
CPU, mirrored.

``StepConfig.quantize`` (``--quantize nf4|fp4``) stores every frozen ``nn.Linear`` outside the head
as ``Linear4bit(in, out, bias, compute_dtype=float32, quant_type=...)`` with bitsandbytes'
defaults: blocks of 64 weights, nested ("compressed") statistics. The mirror, :class:`Linear4bit`,
holds the same tensors and its forward is one graph node, :func:`linear_4bit`, costed here.
``--quantize int8`` stores them as ``Linear8bitLt(has_fp16_weights=False)``: :class:`Linear8bit`
and :func:`linear_8bit` (their rule's docstring says what its training-mode forward runs).

What bitsandbytes holds, per layer with ``N`` outputs and ``K`` inputs (``n = N*K`` weights,
``b = ceil(n / 64)`` blocks, ``c = ceil(b / 256)``), checked on this machine:

- the packed weight, a frozen ``Params4bit`` of ``ceil(n / 2)`` uint8 (two 4-bit codes a byte):
  PARAM, and ``ceil(n / 2)`` elements of ``total_params``, as ``named_parameters`` counts it;
- its ``quant_state``: the blocks' maxima quantized to uint8 (``b`` bytes), their offset (one
  float32), the second-level maxima (``c`` float32) and the 8-bit code that decodes them (256
  float32), and the 16-entry 4-bit code (16 float32): each layer its own tensors, not module
  buffers in bitsandbytes (the reference counts them as BUFFER, as the mirror's buffers are);
- the bias, a float32 parameter (frozen).

What one forward runs (``matmul_4bit``; the CPU kernel of ``bitsandbytes::gemm_4bit`` is its
Python default implementation): the blocks' maxima dequantized (``dequantize_blockwise``, ``b``
float32) plus the offset (another ``b``, the first freed), the weight dequantized
(``dequantize_4bit``, ``N x K`` in the input's dtype), then ``F.linear`` with the bias; the
dequantized tensors die as it returns. With an input that requires grad it runs inside the
autograd function ``MatMul4Bit``, which saves only the packed weight (a parameter: no bytes); its
backward dequantizes again (``b`` float32, the offset added in place; ``N x K``; the maxima freed
as ``dequantize_4bit`` returns) and multiplies: ``grad_x = grad @ W``, a new input-sized tensor.
A bias that trains is refused (LoRA freezes it).

FLOPs, ``exact`` (docs/flop-convention.md): ``dequantize_blockwise`` and ``dequantize_4bit`` one
multiply per element (a code lookup times the block's maximum), the offset one add per block; the
product ``2 R N K`` with ``R`` rows (``+ R N`` for the bias). ``torch`` counts the products only.

Modelled for a float32 step (``compute_dtype`` float32, the input in it: no casts) without
autocast; a quantized Linear under autocast is refused by node (its ``F.linear`` would be cast).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from costmodel.authoring import HandleTable, input_index, new_output, no_grads, tensor_input
from costmodel.costs import Alloc, Flops, OpCost, OpNode, SavedRef, smaller
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()

BLOCKSIZE = 64  # Linear4bit's default ``blocksize``
NESTED_BLOCKSIZE = 256  # the second level of compressed statistics
CODE_4BIT = 16  # entries of the nf4/fp4 code
CODE_8BIT = 256  # entries of the dynamic map that decodes the blocks' maxima


def blocks(weights: int) -> tuple[int, int]:
    """The first- and second-level block counts of ``weights`` quantized weights."""
    first = math.ceil(weights / BLOCKSIZE)
    return first, math.ceil(first / NESTED_BLOCKSIZE)


def linear_4bit(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor,
                code2: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None, out_features: int,
                in_features: int) -> torch.Tensor:
    """``bnb.matmul_4bit(x, weight, bias, quant_state)`` as one graph node; on meta tensors (shape
    propagation), a ``F.linear`` with a dequantized-shaped weight, which gives the result's shape,
    dtype and layout."""
    return F.linear(x, torch.empty(out_features, in_features, dtype=x.dtype, device=x.device), bias)


torch.fx.wrap("linear_4bit")


class Linear4bit(nn.Module):
    """bitsandbytes' ``nn.Linear4bit`` as the engine sees it: the packed weight (a frozen uint8
    parameter), the quantisation state as buffers, the bias; ``forward`` is :func:`linear_4bit`."""

    def __init__(self, linear: nn.Linear, quant_type: str) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type = quant_type
        device = linear.weight.device
        weights = self.in_features * self.out_features
        first, second = blocks(weights)
        self.weight = nn.Parameter(torch.empty((weights + 1) // 2, 1, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.register_buffer("absmax", torch.empty(first, dtype=torch.uint8, device=device))
        self.register_buffer("offset", torch.empty((), dtype=torch.float32, device=device))
        self.register_buffer("absmax2", torch.empty(second, dtype=torch.float32, device=device))
        self.register_buffer("code2", torch.empty(CODE_8BIT, dtype=torch.float32, device=device))
        self.register_buffer("code", torch.empty(CODE_4BIT, dtype=torch.float32, device=device))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_4bit(x, self.weight, self.absmax, self.absmax2, self.code2, self.offset, self.bias,
                           self.out_features, self.in_features)


def linear_8bit(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
                ) -> torch.Tensor:
    """``bnb.matmul(x, weight, bias, state)`` of a training-mode ``Linear8bitLt`` on the CPU
    (``MatMul8bitFp``) as one graph node; on meta tensors a ``F.linear`` with a float weight."""
    return F.linear(x, torch.empty(weight.shape, dtype=x.dtype, device=x.device), bias)


torch.fx.wrap("linear_8bit")


class Linear8bit(nn.Module):
    """bitsandbytes' ``nn.Linear8bitLt(has_fp16_weights=False)`` as the engine sees it: the int8
    weight (a frozen parameter), its per-row scales ``SCB`` as a buffer, the bias."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        device = linear.weight.device
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("SCB", torch.empty(self.out_features, dtype=torch.float32, device=device))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_8bit(x, self.weight, self.SCB, self.bias)


# StepConfig.quantize -> the mirror of its bitsandbytes layer.
MIRRORS: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "nf4": lambda linear: Linear4bit(linear, "nf4"),
    "fp4": lambda linear: Linear4bit(linear, "fp4"),
    "int8": Linear8bit,
}


def quantize_frozen_linears(model: nn.Module, quant_type: str, keep: set[str]) -> int:
    """Replace every frozen ``nn.Linear`` of ``model`` whose name is not in ``keep`` (the head) by
    the mirror of ``quant_type``'s layer (:data:`MIRRORS`), as the reference's quantization does;
    the number replaced."""
    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and name not in keep and not module.weight.requires_grad]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MIRRORS[quant_type](getattr(parent, child)))
    return len(names)


@TABLE.register("call_function", linear_4bit)
def linear_4bit_cost(node: OpNode) -> OpCost | None:
    """One quantized Linear's forward and, when its input needs a gradient, its backward (module
    docstring)."""
    x, weight = tensor_input(node, 0, "x"), tensor_input(node, 1, "weight")
    bias = tensor_input(node, 6, "bias")
    if x is None or weight is None or (bias is not None and bias.requires_grad):
        return None
    out_features, in_features = node.arg(7, "out_features"), node.arg(8, "in_features")
    rows = math.prod(x.shape) // in_features
    weights = out_features * in_features
    first, _ = blocks(weights)
    product = 2 * rows * in_features * out_features
    dequantize = first + first + weights  # the maxima, their offset, the weights
    maxima = Alloc(first * torch.float32.itemsize, "transient")
    dequantized = Alloc(weights * x.dtype.itemsize, "transient")
    bias_add = rows * out_features if bias is not None else 0
    cost = OpCost(forward=Flops(torch=product, exact=dequantize + product + bias_add),
                  forward_allocs=(maxima, dequantized, *new_output(node)),
                  note=f"4-bit linear: dequantize {weights:,} weights, 2*{rows}*{in_features}*{out_features}")
    if not node.records_autograd:
        return cost
    grads = list(no_grads(node))
    if node.needs_input_grad[input_index(node, x)]:
        cost.backward = Flops(torch=product, exact=dequantize + product)
        # ``F.dequantize_4bit`` frees the maxima as it returns, before the product makes grad_x:
        # the backward's largest moment holds the dequantized weight and the larger of the two.
        # The engine's one moment holds its transients and the gradient together, so the maxima
        # count only by what they exceed the gradient by.
        excess = maxima.nbytes - smaller(maxima.nbytes, x.nbytes)
        cost.backward_allocs = (dequantized, Alloc(excess, "transient"))
        grads[input_index(node, x)] = x.nbytes
    cost.input_grads = tuple(grads)
    return cost


@TABLE.register("call_function", linear_8bit)
def linear_8bit_cost(node: OpNode) -> OpCost | None:
    """One int8 Linear in training mode, ``MatMul8bitFp`` (bitsandbytes' CPU path, all torch ops):
    the int8 weight cast to float32 (``N x K``), the row scales times 1/127 (``N``, freed after)
    multiplied into it in place, ``F.linear`` with the bias. The function keeps its input as
    ``ctx.A`` (``OpCost.kept_by_node``). Its backward dequantizes again and multiplies:
    ``grad_x = grad @ W``. Checked on this machine: the int8 weight is the parameter (PARAM,
    ``N K`` elements of ``total_params``), its row scales ``SCB`` (``N`` float32) BUFFER."""
    x, weight = tensor_input(node, 0, "x"), tensor_input(node, 1, "weight")
    bias = tensor_input(node, 3, "bias")
    if x is None or weight is None or (bias is not None and bias.requires_grad):
        return None
    out_features, in_features = weight.shape
    rows = math.prod(x.shape) // in_features
    product = 2 * rows * in_features * out_features
    dequantize = out_features + out_features * in_features  # the scales / 127, the rows scaled
    dequantized = Alloc(out_features * in_features * x.dtype.itemsize, "transient")
    scales = out_features * torch.float32.itemsize  # SCB.unsqueeze(1).mul(1 / 127), gone after mul_
    out = node.outputs[0]
    bias_add = rows * out_features if bias is not None else 0
    cost = OpCost(forward=Flops(torch=product, exact=dequantize + product + bias_add),
                  forward_allocs=(dequantized, Alloc(scales - smaller(scales, out.nbytes), "transient"),
                                  *new_output(node)),
                  note=f"int8 linear: dequantize {out_features * in_features:,} weights, "
                       f"2*{rows}*{in_features}*{out_features}")
    if not node.records_autograd:
        return cost
    # ``ctx.A = A``: the function keeps its input as an attribute of its node (not a saved tensor:
    # a checkpoint does not drop it), until the node goes after its backward, though only a
    # weight gradient (never computed) would read it.
    cost.kept_by_node = (SavedRef("input", input_index(node, x)),)
    grads = list(no_grads(node))
    if node.needs_input_grad[input_index(node, x)]:
        cost.backward = Flops(torch=product, exact=dequantize + product)
        cost.backward_allocs = (dequantized, Alloc(scales - smaller(scales, x.nbytes), "transient"))
        grads[input_index(node, x)] = x.nbytes
    cost.input_grads = tuple(grads)
    return cost


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)


@hookimpl
def costmodel_autocast_policy(kind: str, target: object) -> str | None:
    # Under autocast the product inside (``F.linear``) runs in the lower precision, with casts of
    # the dequantized weight this one node does not show.
    return "unmodelled" if kind == "call_function" and target in (linear_4bit, linear_8bit) else None
