"""``F.scaled_dot_product_attention`` on CPU: the flash kernel torch 2.14.1 picks for it.

Covered: 4-D ``q (B, H, L, d)``, ``k``/``v`` ``(B, H, S, d)`` of one floating dtype, no
``attn_mask``, ``dropout_p == 0``, not causal, no ``enable_gqa``, any ``scale`` (what timm's
``Attention`` calls in its fused path). ``scaled_dot_product_attention`` is
CompositeImplicitAutograd; on CPU it dispatches ``_scaled_dot_product_flash_attention_for_cpu(q,
k, v)`` -> ``(out, logsumexp)`` (checked against the live op in tests/test_op_attention.py).

FLOPs, per batch-head ``B*H`` (docs/flop-convention.md, "Attention"): ``torch`` counts 0 (the stock
counter has formulas only for the CUDA attention kernels); ``exact`` forward
``4*L*S*d + 5*L*S + L*d + 2*L``, backward ``10*L*S*d + 6*L*S + 2*L*d``.

Memory. Forward: ``out`` (q's shape, a storage of its own) and ``logsumexp`` ``(B, H, L)`` in
float32; autograd keeps ``q``, ``k``, ``v``, ``out`` and ``logsumexp`` for backward (without
autograd ``logsumexp`` is dropped as the op returns). Backward:
``_scaled_dot_product_flash_attention_for_cpu_backward`` returns ``dq``, ``dk``, ``dv``, each a new
tensor of its input's size; the kernel's own work buffers are allocated inside the C++ kernel,
below the dispatcher, where neither a memory tracker nor this rule sees them. Only all three
gradients or none are modelled (the kernel computes all three whenever it runs).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from costmodel.authoring import HandleTable, is_float, no_grads, saved_or_transient, tensor_input
from costmodel.costs import Alloc, Flops, OpCost, OpNode, SavedRef
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()
LOGSUMEXP_BYTES = 4  # float32: the kernel's accumulation type


def sdpa_forward_flops(batch_heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """``Q K^T`` 2LSd, scale LS, row max LS, ``exp(s - max)`` 2LS, row sum LS, ``P V`` 2LSd, divide by
    the row sum Ld, ``logsumexp = max + log(sum)`` 2L."""
    l, s, d = q_len, kv_len, head_dim
    return batch_heads * (4 * l * s * d + 5 * l * s + l * d + 2 * l)


def sdpa_backward_flops(batch_heads: int, q_len: int, kv_len: int, head_dim: int) -> int:
    """``D = rowsum(dO * O)`` 2Ld; recompute the scaled scores 2LSd + LS and ``P = exp(s - lse)`` 2LS;
    ``dV = P^T dO`` 2LSd; ``dP = dO V^T`` 2LSd; ``dS = P * (dP - D)`` 2LS, times scale LS;
    ``dQ = dS K`` 2LSd; ``dK = dS^T Q`` 2LSd."""
    l, s, d = q_len, kv_len, head_dim
    return batch_heads * (10 * l * s * d + 6 * l * s + 2 * l * d)


@TABLE.register("call_function", F.scaled_dot_product_attention)
def scaled_dot_product_attention(node: OpNode) -> OpCost | None:
    """The CPU flash kernel (module docstring), or None outside what it covers."""
    q, k, v = (tensor_input(node, i, name) for i, name in enumerate(("query", "key", "value")))
    if q is None or k is None or v is None or len(node.inputs) != 3 or node.inputs[:3] != (q, k, v):
        return None  # a mask (a fourth tensor), or a tensor elsewhere than q, k, v
    if node.arg(4, "dropout_p", 0.0) != 0.0 or node.arg(5, "is_causal", False) or node.kwargs.get("enable_gqa"):
        return None
    if node.arg(3, "attn_mask", None) is not None:
        return None
    if not (len(q.shape) == len(k.shape) == len(v.shape) == 4 and q.dtype == k.dtype == v.dtype and is_float(q.dtype)):
        return None
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        return None
    batch_heads, q_len, kv_len, head_dim = math.prod(q.shape[:2]), q.shape[2], k.shape[2], q.shape[3]
    out = node.outputs[0]
    lse = saved_or_transient(batch_heads * q_len * LOGSUMEXP_BYTES, node)
    cost = OpCost(forward=Flops(torch=0, exact=sdpa_forward_flops(batch_heads, q_len, kv_len, head_dim)),
                  forward_allocs=(Alloc(out.storage_nbytes, "output", 0), lse),
                  note=f"flash attention (CPU): B*H={batch_heads}, L={q_len}, S={kv_len}, d={head_dim}")
    if not node.records_autograd:
        return cost
    if not all(node.needs_input_grad[:3]):
        return None  # the kernel's three gradients, some then dropped: not modelled
    cost.saved = (SavedRef("input", 0), SavedRef("input", 1), SavedRef("input", 2), SavedRef("output", 0))
    cost.backward = Flops(torch=0, exact=sdpa_backward_flops(batch_heads, q_len, kv_len, head_dim))
    grads = list(no_grads(node))
    grads[0], grads[1], grads[2] = q.nbytes, k.nbytes, v.nbytes
    cost.input_grads = tuple(grads)
    return cost


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)


def flash_attention_for_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None,
                            dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                            enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as CPU runs it, for shape propagation on meta tensors:
    ``_scaled_dot_product_flash_attention_for_cpu``, whose output keeps the query's layout
    (``empty_like``: a permuted query, timm's ``qkv.permute(2, 0, 3, 1, 4).unbind(0)``, gives a
    ``(B, L, H, d)``-ordered output). On the meta device the composite takes the math path instead
    (its output contiguous), so what a later ``reshape`` copies would differ. Outside what the
    flash kernel covers here, the function itself."""
    if attn_mask is not None or dropout_p != 0.0 or is_causal or enable_gqa or query.dim() != 4:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                      scale=scale)[0]


@hookimpl
def costmodel_meta_function(target: Any) -> Any:
    return flash_attention_for_cpu if target is F.scaled_dot_product_attention else None
