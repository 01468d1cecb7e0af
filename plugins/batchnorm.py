"""Batch normalisation: ``nn.BatchNorm1d/2d/3d`` and ``F.batch_norm``, in train or eval mode.

One ``native_batch_norm`` runs on CPU. ``E = numel(input)``, ``C = input.shape[1]``, ``w``/``b``:
affine weight/bias present, ``r``: running statistics updated (train mode with
``track_running_stats``). The stock counter (``torch``) counts 0 for every batch-norm op.

FLOPs, ``exact`` (docs/flop-convention.md; the derivation per element and per channel is there):

- forward, train (batch statistics): ``E*(6 + w + b) + C*(5 + 7*r)``; eval (running statistics):
  ``E*(2 + w + b) + 3*C``. ``num_batches_tracked += 1`` (int64) counts 0.
- backward with ``g_i, g_w, g_b`` = gradients of input, weight, bias needed (the op's
  ``output_mask``): train: ``E*([g_i or g_b] + 3*[g_i or g_w] + 5*g_i) + C*(g_w + g_i*(4 + w))``;
  eval: ``3*C + g_i*(E + C*w) + 4*E*g_w + E*g_b``.

Memory (torch 2.14.1, CPU): the forward allocates the output, then (train mode) ``save_mean`` and
``save_invstd``, ``C`` elements each; in eval mode these are empty. Their dtype is the parameters' (the weight's or the running mean's; the
input's when the layer has neither): float32 for a half input into a float32 layer. When autograd records the op it keeps both statistics and saves the input
(and weight and running statistics, which exist anyway), for the input, weight and bias
gradients alike; otherwise the statistics die as the op returns. The backward allocates exactly the
gradients in its ``output_mask``: a frozen affine (``requires_grad=False``) in train mode still
costs the batch-statistics backward for the input gradient, but no weight/bias gradients.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from costmodel.authoring import (HandleTable, add_tensor_argument_grads, input_index, module_param, needs_grad,
                                 new_input_grad, new_output, no_grads, numel, saved_or_transient, tensor_input,
                                 trainable_param)
from costmodel.costs import Flops, OpCost, OpNode, SavedRef, TensorMeta
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()


def batch_norm_forward_flops(elements: int, channels: int, training: bool, affine_weight: bool,
                             affine_bias: bool, updates_running_stats: bool) -> int:
    if training:
        return elements * (6 + affine_weight + affine_bias) + channels * (5 + 7 * updates_running_stats)
    return elements * (2 + affine_weight + affine_bias) + 3 * channels


def batch_norm_backward_flops(elements: int, channels: int, training: bool, affine_weight: bool,
                              need_input: bool, need_weight: bool, need_bias: bool) -> int:
    if not (need_input or need_weight or need_bias):
        return 0
    if training:
        return (elements * ((need_input or need_bias) + 3 * (need_input or need_weight) + 5 * need_input)
                + channels * (need_weight + need_input * (4 + affine_weight)))
    return 3 * channels + need_input * (elements + channels * affine_weight) + 4 * elements * need_weight \
        + elements * need_bias


def batch_norm_cost(node: OpNode, x: TensorMeta, training: bool, has_weight: bool, has_bias: bool,
                    updates_running_stats: bool, needs: tuple[bool, bool, bool], stats_dtype: torch.dtype) -> OpCost:
    """One ``native_batch_norm`` over ``x``; ``needs`` = (input, weight, bias) gradients required;
    ``stats_dtype``: the dtype of the saved statistics."""
    elements, channels = numel(x.shape), x.shape[1]
    forward = batch_norm_forward_flops(elements, channels, training, has_weight, has_bias, updates_running_stats)
    allocs = list(new_output(node))
    if training:
        stat_bytes = channels * stats_dtype.itemsize
        allocs += [saved_or_transient(stat_bytes, node), saved_or_transient(stat_bytes, node)]
    cost = OpCost(forward=Flops(torch=0, exact=forward), forward_allocs=tuple(allocs),
                  note=f"batch norm ({'train' if training else 'eval'}): E={elements}, C={channels}")
    if not node.records_autograd:
        return cost
    cost.backward = Flops(torch=0, exact=batch_norm_backward_flops(elements, channels, training, has_weight, *needs))
    cost.saved = (SavedRef("input", input_index(node, x)),)
    cost.input_grads = new_input_grad(node, x, needs[0])
    return cost


@TABLE.register("call_module", nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm_module(node: OpNode) -> OpCost | None:
    """``nn.BatchNormNd``: batch statistics when training (or without running statistics), running
    statistics updated when training with ``track_running_stats``."""
    bn = node.module
    if bn is None:
        return None
    has_running = module_param(node, "running_mean") is not None
    training = bn.training or not has_running
    weight, bias = trainable_param(node, "weight"), trainable_param(node, "bias")
    typed = module_param(node, "weight") or module_param(node, "running_mean")
    cost = batch_norm_cost(node, node.inputs[0], training, module_param(node, "weight") is not None,
                           module_param(node, "bias") is not None, updates_running_stats=training and has_running,
                           needs=(node.needs_input_grad[0], weight is not None, bias is not None),
                           stats_dtype=typed[1].dtype if typed else node.inputs[0].dtype)
    if node.records_autograd:
        cost.param_grads = {found[0]: found[1].nbytes for found in (weight, bias) if found is not None}
    return cost


@TABLE.register("call_function", F.batch_norm)
def batch_norm_function(node: OpNode) -> OpCost | None:
    """``F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)``:
    the statistics, weight and bias are inputs of the node (autograd saves all but the bias)."""
    x = tensor_input(node, 0, "input")
    if x is None:
        return None
    running_mean, running_var = tensor_input(node, 1, "running_mean"), tensor_input(node, 2, "running_var")
    weight, bias = tensor_input(node, 3, "weight"), tensor_input(node, 4, "bias")
    training = bool(node.arg(5, "training", False))
    if not training and (running_mean is None or running_var is None):
        return None  # aten refuses eval mode without running statistics
    needs = (needs_grad(node, x), needs_grad(node, weight), needs_grad(node, bias))
    typed = weight if weight is not None else running_mean
    cost = batch_norm_cost(node, x, training, weight is not None, bias is not None,
                           updates_running_stats=training and running_mean is not None, needs=needs,
                           stats_dtype=(typed or x).dtype)
    if node.records_autograd:
        cost.saved += tuple(SavedRef("input", input_index(node, t)) for t in (weight, running_mean, running_var)
                            if t is not None)
        add_tensor_argument_grads(node, cost, weight, bias)
    return cost


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
