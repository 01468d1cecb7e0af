"""Layer and group normalisation: ``nn.LayerNorm`` / ``F.layer_norm`` and ``nn.GroupNorm`` /
``F.group_norm``, with or without affine parameters, trainable or frozen.

What torch 2.14.1 runs on CPU (checked in ``tests/test_op_norms.py``): one
``native_layer_norm(input, normalized_shape, weight, bias, eps)`` returning ``(out, mean, rstd)``,
or one ``native_group_norm(input, weight, bias, N, C, HxW, group, eps)`` returning the same three;
the backward is one ``native_layer_norm_backward`` / ``native_group_norm_backward`` whose
``output_mask`` asks for exactly the gradients needed (input, weight, bias). Both arrive whole at
``FlopCounterMode`` (no ``CompositeImplicitAutograd`` decomposition).

Notation: ``E = numel(input)``; ``R`` = the number of normalised groups of elements, i.e.
``numel(mean)``: for layer norm the product of the sizes before the normalised dims
(``E / prod(normalized_shape)``), for group norm ``N * G`` (batch times groups); ``w``, ``b``: the
op has a weight / a bias (trainable or not).

FLOPs. ``torch``: 0 (the stock counter has no formula for either op). ``exact``
(docs/flop-convention.md, counted term by term the way batch norm's rows are; the statistics are
per group of ``M = E / R`` elements instead of per channel, and the affine parameters vary inside
a group, so nothing factors out per group):

- forward: ``E*(6 + w + b) + 5*R``. Per element: mean accumulate 1, variance ``(x - mean)^2``
  accumulate 3, normalise ``(x - mean) * rstd`` 2, scale ``w``, shift ``b``. Per group: mean divide
  1, variance divide 1, ``rstd = 1/sqrt(var + eps)`` 3.
- backward, with ``g_i, g_w, g_b`` = ``output_mask``: ``g_i*(E*(9 + w) + 4*R) + 4*E*g_w + E*g_b``.
  ``grad_input`` with ``dy' = dy * weight`` (``w`` per element): ``s = sum(dy')`` 1 and
  ``d = sum(dy' * (x - mean))`` 3 per element, ``(dy' - s/M - (x - mean) * d*rstd^2/M) * rstd`` 5
  per element; per group ``s/M`` 1 and ``d*rstd^2/M`` 3. ``grad_weight = sum(dy * (x - mean) *
  rstd)`` over everything but the weight's own dims: 4 per element (``rstd`` varies along that sum).
  ``grad_bias = sum(dy)``: 1 per element. Unlike batch norm no term is shared between gradients:
  ``grad_input`` reduces over a group, ``grad_weight``/``grad_bias`` across groups.

Memory (torch 2.14.1, CPU): the forward allocates the output (``E`` elements), then ``mean`` and
``rstd`` (``R`` elements each, the input's dtype). When autograd records the op it keeps both and
saves the input, the weight and (layer norm only) the bias, which exist anyway, for every
combination of gradients; otherwise mean and rstd die as the op returns. The backward allocates
exactly the gradients of its ``output_mask`` (input-sized, weight-sized, bias-sized) and nothing
else that MemTracker can see.

Not modelled (answer None, a coverage gap): an input dtype that is not floating point, and weight or
bias of another dtype than the input. For a reduced-precision input with float32 parameters the CPU
kernel keeps float32 statistics while ``FakeTensorMode`` and the meta kernels give the input's
dtype, so the measured bytes would depend on the mode. A layer norm whose ``normalized_shape`` is
not the input's trailing sizes, a group norm whose channels are not ``num_groups`` groups: aten
refuses them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch._prims_common import suggest_memory_format
from torch.nn import functional as F

from costmodel.authoring import (HandleTable, add_tensor_argument_grads, input_index, is_float, module_param,
                                 needs_grad, new_input_grad, new_output, no_grads, numel, saved_or_transient,
                                 tensor_input, trainable_param)
from costmodel.costs import Flops, OpCost, OpNode, ParamMeta, SavedRef, TensorMeta
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()

# Per-element and per-group counts of the exact convention (module docstring, docs/flop-convention.md).
FORWARD_PER_ELEMENT = 6  # mean accumulate 1, variance 3, normalise 2
FORWARD_PER_GROUP = 5  # mean divide 1, variance divide 1, rstd 3
GRAD_INPUT_PER_ELEMENT = 9  # sum(dy') 1, sum(dy' * (x - mean)) 3, the combination 5
GRAD_INPUT_PER_GROUP = 4  # s/M 1, d*rstd^2/M 3
GRAD_WEIGHT_PER_ELEMENT = 4  # (x - mean) * rstd * dy, accumulated
GRAD_BIAS_PER_ELEMENT = 1  # dy accumulated


def norm_forward_flops(elements: int, groups: int, has_weight: bool, has_bias: bool) -> int:
    """``E*(6 + w + b) + 5*R`` (module docstring)."""
    return elements * (FORWARD_PER_ELEMENT + has_weight + has_bias) + FORWARD_PER_GROUP * groups


def norm_backward_flops(elements: int, groups: int, has_weight: bool, need_input: bool, need_weight: bool,
                        need_bias: bool) -> int:
    """``g_i*(E*(9 + w) + 4*R) + 4*E*g_w + E*g_b`` (module docstring)."""
    grad_input = elements * (GRAD_INPUT_PER_ELEMENT + has_weight) + GRAD_INPUT_PER_GROUP * groups
    return (need_input * grad_input + need_weight * GRAD_WEIGHT_PER_ELEMENT * elements
            + need_bias * GRAD_BIAS_PER_ELEMENT * elements)


def _same_float_dtype(x: TensorMeta, *affine: TensorMeta | ParamMeta | None) -> bool:
    """The statistics' dtype is the input's for every mode (CPU, fake, meta) only when the input is
    floating point and the affine parameters share its dtype (module docstring)."""
    return is_float(x.dtype) and all(p is None or p.dtype == x.dtype for p in affine)


def norm_cost(node: OpNode, x: TensorMeta, groups: int, has_weight: bool, has_bias: bool,
              needs: tuple[bool, bool, bool], kind: str) -> OpCost:
    """One ``native_layer_norm`` / ``native_group_norm`` over ``x`` with ``groups`` statistics;
    ``needs`` = (input, weight, bias) gradients required (the backward's ``output_mask``)."""
    elements = numel(x.shape)
    stat_bytes = groups * x.dtype.itemsize
    # Allocation order is the op's output tuple: (out, mean, rstd).
    allocs = new_output(node) + (saved_or_transient(stat_bytes, node), saved_or_transient(stat_bytes, node))
    cost = OpCost(forward=Flops(torch=0, exact=norm_forward_flops(elements, groups, has_weight, has_bias)),
                  forward_allocs=allocs, note=f"{kind}: E={elements}, R={groups} groups")
    if not node.records_autograd:
        return cost
    cost.backward = Flops(torch=0, exact=norm_backward_flops(elements, groups, has_weight, *needs))
    cost.saved = (SavedRef("input", input_index(node, x)),)
    cost.input_grads = new_input_grad(node, x, needs[0])
    return cost


def _normalized(shape: object) -> tuple[int, ...] | None:
    """``normalized_shape`` as a tuple (an int means one trailing dim), or None if it is neither."""
    if isinstance(shape, int):
        return (shape,)
    if isinstance(shape, Sequence) and all(isinstance(size, int) for size in shape):
        return tuple(shape)
    return None


def _layer_norm_groups(x: TensorMeta, normalized_shape: object) -> int | None:
    """R = E / prod(normalized_shape): the leading sizes, or None when the trailing sizes differ."""
    dims = _normalized(normalized_shape)
    if dims is None or not dims or len(dims) > len(x.shape) or tuple(x.shape[len(x.shape) - len(dims):]) != dims:
        return None
    return math.prod(x.shape[:len(x.shape) - len(dims)])


def _group_norm_groups(x: TensorMeta, num_groups: object) -> int | None:
    """R = N * G, or None when the channels do not split into ``num_groups`` groups."""
    if not isinstance(num_groups, int) or num_groups < 1 or len(x.shape) < 2 or x.shape[1] % num_groups:
        return None
    return x.shape[0] * num_groups


def _module_cost(node: OpNode, groups: int | None, kind: str) -> OpCost | None:
    """A norm module: weight and bias are the module's parameters (saved for free, gradients as
    parameter gradients)."""
    x = node.inputs[0] if node.inputs else None
    if x is None or groups is None:
        return None
    weight, bias = module_param(node, "weight"), module_param(node, "bias")
    if not _same_float_dtype(x, weight[1] if weight else None, bias[1] if bias else None):
        return None
    trained_weight, trained_bias = trainable_param(node, "weight"), trainable_param(node, "bias")
    cost = norm_cost(node, x, groups, weight is not None, bias is not None,
                     needs=(node.needs_input_grad[0], trained_weight is not None, trained_bias is not None), kind=kind)
    if node.records_autograd:
        cost.param_grads = {found[0]: found[1].nbytes for found in (trained_weight, trained_bias) if found is not None}
    return cost


def _function_cost(node: OpNode, x: TensorMeta | None, groups: int | None, weight: TensorMeta | None,
                   bias: TensorMeta | None, kind: str, saves_bias: bool) -> OpCost | None:
    """A functional norm: weight and bias are node inputs (autograd keeps the weight, and for layer
    norm the bias; each gets a new gradient of its size when it needs one)."""
    if x is None or groups is None or not _same_float_dtype(x, weight, bias):
        return None
    needs = (needs_grad(node, x), needs_grad(node, weight), needs_grad(node, bias))
    cost = norm_cost(node, x, groups, weight is not None, bias is not None, needs=needs, kind=kind)
    if node.records_autograd:
        kept = (weight, bias) if saves_bias else (weight,)
        cost.saved += tuple(SavedRef("input", input_index(node, t)) for t in kept if t is not None)
        add_tensor_argument_grads(node, cost, weight, bias)
    return cost


def _tensor_or_none(node: OpNode, index: int, name: str) -> tuple[bool, TensorMeta | None]:
    """(acceptable, tensor): an argument that is a tensor or absent/None; anything else is not."""
    value = node.arg(index, name)
    return (value is None or isinstance(value, TensorMeta)), tensor_input(node, index, name)


@TABLE.register("call_module", nn.LayerNorm)
def layer_norm_module(node: OpNode) -> OpCost | None:
    """``nn.LayerNorm(normalized_shape, eps, elementwise_affine, bias)``."""
    if node.module is None or not node.inputs:
        return None
    groups = _layer_norm_groups(node.inputs[0], tuple(node.module.normalized_shape))
    return _module_cost(node, groups, "layer norm")


@TABLE.register("call_module", nn.GroupNorm)
def group_norm_module(node: OpNode) -> OpCost | None:
    """``nn.GroupNorm(num_groups, num_channels, eps, affine)``."""
    if node.module is None or not node.inputs:
        return None
    x = node.inputs[0]
    if len(x.shape) < 2 or x.shape[1] != node.module.num_channels:
        return None
    return _module_cost(node, _group_norm_groups(x, node.module.num_groups), "group norm")


@TABLE.register("call_function", F.layer_norm, torch.layer_norm)
def layer_norm_function(node: OpNode) -> OpCost | None:
    """``F.layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5)`` (and
    ``torch.layer_norm``, the same leading arguments): torchvision's ``LayerNorm2d`` (ConvNeXt)
    calls it on a channels-last permute of its input."""
    x = tensor_input(node, 0, "input")
    ok_weight, weight = _tensor_or_none(node, 2, "weight")
    ok_bias, bias = _tensor_or_none(node, 3, "bias")
    if x is None or not (ok_weight and ok_bias):
        return None
    return _function_cost(node, x, _layer_norm_groups(x, node.arg(1, "normalized_shape")), weight, bias,
                          "layer norm", saves_bias=True)


@TABLE.register("call_function", F.group_norm, torch.group_norm)
def group_norm_function(node: OpNode) -> OpCost | None:
    """``F.group_norm(input, num_groups, weight=None, bias=None, eps=1e-5)`` (and
    ``torch.group_norm``, the same leading arguments)."""
    x = tensor_input(node, 0, "input")
    ok_weight, weight = _tensor_or_none(node, 2, "weight")
    ok_bias, bias = _tensor_or_none(node, 3, "bias")
    if x is None or not (ok_weight and ok_bias):
        return None
    return _function_cost(node, x, _group_norm_groups(x, node.arg(1, "num_groups")), weight, bias,
                          "group norm", saves_bias=False)


def group_norm_in_cpu_layout(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out`` in the memory format CPU's group norm writes: its input's (channels-last for a
    channels-last input), where the meta kernel writes a contiguous result (checked against the
    CPU kernel in tests/test_op_norms.py)."""
    layout = suggest_memory_format(x)
    return out.contiguous(memory_format=layout) if layout is not torch.contiguous_format else out


def _group_norm_function_on_cpu(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return group_norm_in_cpu_layout(F.group_norm(x, *args, **kwargs), x)


def _group_norm_module_on_cpu(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return group_norm_in_cpu_layout(module(x), x)


@hookimpl
def costmodel_meta_function(target: Any) -> Any:
    """Shape propagation of a group norm gives CPU's layout (:func:`group_norm_in_cpu_layout`)."""
    if target is F.group_norm or target is torch.group_norm:
        return _group_norm_function_on_cpu
    if isinstance(target, type) and issubclass(target, nn.GroupNorm):
        return _group_norm_module_on_cpu
    return None


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
