"""Precision: casts (``Tensor.to(dtype)``, ``.float()``, ``.half()``, ``.bfloat16()``,
``.double()``) and which ops CPU autocast casts for (``costmodel_autocast_policy``).

A cast costs 0 FLOPs in both conventions (``aten._to_copy`` is a zero-FLOP row of
docs/flop-convention.md: a conversion, no arithmetic).

Memory (torch 2.14.1, CPU): a cast to the tensor's own dtype returns the tensor itself (no
allocation, no autograd node: shape propagation shows the same tensor, and its consumers'
gradients go straight to it). Otherwise ``_to_copy`` allocates the output in the new dtype, with
the input's layout; autograd saves nothing (``ToCopyBackward0`` keeps only the input's options),
and its backward casts the incoming gradient back: one new tensor of the input's size and dtype.
A trainable parameter's cast therefore hands the parameter a gradient in its own dtype, which
becomes its ``.grad``.

Autocast (``aten/src/ATen/autocast_mode.cpp``, the CPU lists of torch 2.14.1; each entry below
checked on this machine by the dtype the op returns under ``torch.autocast("cpu")``):

- lower precision: ``conv1d/2d/3d``, ``conv_transpose1d/2d/3d``, ``linear``, ``mm``, ``bmm``,
  ``addmm``, ``baddbmm``, ``addbmm``, ``matmul``, ``prelu``, ``scaled_dot_product_attention``;
  the modules that reach them (``nn.ConvNd``, ``nn.ConvTransposeNd``, ``nn.Linear``,
  ``nn.PReLU``) are traced through so that the casts go on their functional calls;
- float32: the losses (``cross_entropy_loss``, ``nll_loss``, ``mse_loss``, ``l1_loss``,
  ``smooth_l1_loss``, ``huber_loss``, ``kl_div``, ``binary_cross_entropy(_with_logits)``, and the
  other ``*_loss`` ops), their modules traced through; ``F.pad`` in reflect or replicate mode;
- promote: ``cat``, ``stack``, ``index_copy``;
- composites that cast inside, where no node shows it, are refused under autocast: ``einsum``
  (its ``bmm``), ``tensordot`` and ``nn.MultiheadAttention``'s functional form.
Every other op runs in its inputs' dtypes (batch norm, layer norm, activations, pooling, ...).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from costmodel.authoring import HandleTable, new_output
from costmodel.costs import Flops, OpCost, OpNode
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()

# The dtype each conversion method casts to (``Tensor.to`` takes it as an argument).
_CONVERSIONS: dict[str, torch.dtype] = {"float": torch.float32, "half": torch.float16,
                                        "bfloat16": torch.bfloat16, "double": torch.float64}


def _cast_dtype(node: OpNode) -> torch.dtype | None:
    """The dtype a cast node converts to, or None for a form this rule does not cover
    (``to(device)``, ``to(other)``, a copy or memory-format argument)."""
    if node.target in _CONVERSIONS:
        return _CONVERSIONS[node.target] if len(node.args) == 1 and not node.kwargs else None
    if set(node.kwargs) - {"dtype"} or len(node.args) > 2:
        return None
    dtype = node.args[1] if len(node.args) == 2 else node.kwargs.get("dtype")
    return dtype if isinstance(dtype, torch.dtype) else None


@TABLE.register("call_method", "to", *_CONVERSIONS)
def cast(node: OpNode) -> OpCost | None:
    """``x.to(dtype)``: the tensor itself when it has the dtype, else a copy in it (``_to_copy``);
    the backward casts the gradient back (a new tensor of the input's size and dtype)."""
    dtype = _cast_dtype(node)
    if dtype is None or len(node.inputs) != 1 or node.outputs[0].dtype != dtype:
        return None
    x = node.inputs[0]
    copies = node.outputs[0].storage != x.storage
    cost = OpCost(forward=Flops(), forward_allocs=new_output(node),
                  note=f"cast {x.dtype} -> {dtype}" if copies else "cast to its own dtype: the tensor itself")
    if node.records_autograd:
        cost.input_grads = (x.nbytes if copies else 0,)
    return cost


# CPU autocast's lists (see the module docstring), by graph target.
_LOWER_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                    F.linear, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.addbmm, torch.matmul,
                    operator.matmul, F.prelu, torch.prelu, F.scaled_dot_product_attention)
_LOWER_METHODS = ("mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "prelu")
_LOWER_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                  nn.Linear, nn.PReLU)
_FP32_FUNCTIONS = (F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.kl_div,
                   F.binary_cross_entropy, F.binary_cross_entropy_with_logits, F.poisson_nll_loss,
                   F.hinge_embedding_loss, F.cosine_embedding_loss, F.margin_ranking_loss, F.soft_margin_loss,
                   F.triplet_margin_loss, F.multi_margin_loss, F.multilabel_margin_loss,
                   F.multilabel_soft_margin_loss, F.ctc_loss)
_FP32_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.KLDivLoss,
                 nn.BCELoss, nn.BCEWithLogitsLoss, nn.PoissonNLLLoss, nn.HingeEmbeddingLoss, nn.CosineEmbeddingLoss,
                 nn.MarginRankingLoss, nn.SoftMarginLoss, nn.TripletMarginLoss, nn.MultiMarginLoss,
                 nn.MultiLabelMarginLoss, nn.MultiLabelSoftMarginLoss, nn.CTCLoss)
_PROMOTE_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate, torch.stack, torch.index_copy)
_UNMODELLED_FUNCTIONS = (torch.einsum, torch.tensordot, F.multi_head_attention_forward)


@hookimpl
def costmodel_autocast_policy(kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    if kind == "call_module":
        if issubclass(target, _LOWER_MODULES + _FP32_MODULES):
            return "through"
        return "unmodelled" if issubclass(target, nn.MultiheadAttention) else None
    if kind == "call_method":
        if target in _LOWER_METHODS:
            return "lower"
        return "promote" if target == "index_copy" else None
    if target in _LOWER_FUNCTIONS:
        return "lower"
    if target in _FP32_FUNCTIONS:
        return "fp32"
    if target is F.pad:
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        return "fp32" if mode in ("reflect", "replicate") else None
    if target in _PROMOTE_FUNCTIONS:
        return "promote"
    return "unmodelled" if target in _UNMODELLED_FUNCTIONS else None


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
