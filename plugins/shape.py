"""Ops that move or describe data without arithmetic: views, reshapes and permutations, ``expand``,
``chunk``/``split``, ``cat``, indexing into a tensor, ``roll``, constant ``F.pad``, ``nn.Identity``,
and nodes that return no tensor (``x.size()``, ``x.shape``, indexing into a size, shape arithmetic
such as ``channels // groups``, ``torch._assert``).

FLOPs: 0 in both conventions (docs/flop-convention.md lists ``view``, ``reshape``, ``cat``... as
zero-FLOP ops), except ``expand``'s backward: a ``sum`` down to the input's shape, ``numel(out)``
in the exact convention when the shapes differ.

Memory (torch 2.14.1, CPU; every rule checked against the live op in tests/test_op_shapes.py):

- ``view``, ``flatten``, ``reshape``, ``contiguous``, ``squeeze``, ``unsqueeze``, ``permute``,
  ``transpose``/``swapaxes``/``swapdims``, ``t`` (method and function forms): the result is a view
  of the input (no allocation) when the layout allows; ``reshape``/``flatten``/``contiguous`` of a
  non-contiguous input copy it (``clone``), which shape propagation shows as an output in a storage
  of its own: that output is then allocated. Nothing is saved (only sizes). The backward views the
  incoming gradient back (``view``/``reshape``/``permute``/``transpose``/``squeeze``: 0 new bytes;
  ``clone``'s backward passes the gradient itself). Assumption: a ``view``/``reshape`` receives a
  gradient whose layout lets it be viewed back; one that receives a permuted gradient (ShuffleNet's
  ``view`` in front of ``transpose``) copies it in backward (``clone`` + ``_unsafe_view``), which a
  plugin cannot see from the node alone (see ``view_or_copy``).
- ``expand``/``expand_as``: a view; the backward is ``sum_to_size``: one new input-sized gradient
  (``sum.dim_IntList``, keepdim, then a ``view``), or the incoming gradient itself when the shapes
  are equal.
- ``chunk``/``split``/``split_with_sizes``/``unbind``: views of the input; the backward is ``cat``
  (``stack`` for ``unbind``) of the pieces' gradients: one new input-sized tensor. (A piece that receives no gradient is first
  filled with ``zeros`` of its size, a backward transient the node alone cannot tell; every piece
  is assumed to receive one, as in ShuffleNet.)
- ``cat`` allocates its output, saves nothing, and hands each input a slice (a view) of the
  incoming gradient: 0 new bytes.
- Indexing a tensor with basic indices (ints, slices, ``None``, ``...``): a view (``select``,
  ``slice``, ``unsqueeze``, or ``alias`` when nothing else runs; within a tuple of indices a slice
  ``[0 or None : >= size or None : 1 or None]`` dispatches nothing, while a lone ``x[:]`` is a
  ``slice``). Its backward allocates a zero-filled input-sized
  gradient and copies the incoming one into it (``select_backward`` / ``slice_backward``), or
  passes a view back when no ``select``/``slice`` runs. Indexing into a tuple of tensors (a
  ``chunk``'s result) selects an existing tensor: nothing runs.
- ``roll`` and constant ``F.pad`` (``constant_pad_nd``) allocate a new output; their backward
  allocates one new input-sized gradient (``roll`` back, ``constant_pad_nd`` with negated pads).
- ``nn.Identity`` returns its input: no allocation, and its gradient is the incoming one.
- Nodes whose result is not a tensor cost nothing and pass no gradient.

Not modelled (answer None): advanced indexing (tensor, list or bool indices: a gather, with an
``index_put`` in backward), indexing that runs two or more ``select``/``slice`` ops (``x[:, 1:, 0]``:
each backward step allocates its own zero-filled gradient, two snapshots that one node's cost
cannot express), ``roll`` without explicit shifts, non-constant padding modes.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from costmodel.authoring import HandleTable, new_output, no_grads, numel
from costmodel.costs import Flops, OpCost, OpNode, TensorMeta, differ
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()


def _gradients_alias(node: OpNode) -> tuple[int | None, ...]:
    """Each input that needs a gradient receives a view of the incoming gradient: 0 new bytes."""
    return tuple(0 if need else None for need in node.needs_input_grad)


def _new_input_gradient(node: OpNode) -> tuple[int | None, ...]:
    """Input 0 receives a new tensor of its own size (the others, if any, no gradient)."""
    return (node.inputs[0].nbytes if node.needs_input_grad[0] else None,) + no_grads(node)[1:]


def output_is_view(node: OpNode) -> bool:
    """Output 0 lives in input 0's storage."""
    return node.outputs[0].storage == node.inputs[0].storage


def _aliases_input(node: OpNode) -> bool:
    """Every output lives in input 0's storage (views only: nothing allocated)."""
    return bool(node.outputs) and all(out.storage == node.inputs[0].storage for out in node.outputs)


@TABLE.register("call_function", torch.flatten, torch.reshape, torch.transpose, torch.swapaxes, torch.swapdims,
                torch.permute, torch.t, torch.squeeze, torch.unsqueeze)
@TABLE.register("call_method", "view", "view_as", "reshape", "reshape_as", "flatten", "contiguous", "squeeze",
                "unsqueeze", "permute", "transpose", "swapaxes", "swapdims", "t")
@TABLE.register("call_module", nn.Flatten)
def view_or_copy(node: OpNode) -> OpCost | None:
    """A view of input 0, or a copy when the output lives in a storage of its own.

    Forward: ``view``/``transpose``/``permute``/... return a view (0 bytes); ``reshape``,
    ``flatten`` and ``contiguous`` of a non-contiguous input run ``clone`` (one output-sized
    storage, which shape propagation shows as a fresh output storage). Autograd saves sizes only.
    Backward: the inverse view of the incoming gradient (``permute`` by the inverse permutation,
    ``transpose`` of the same dims, ``reshape`` to the input's sizes, ``squeeze``/``unsqueeze``);
    ``clone``'s gradient is the incoming one itself: 0 new bytes in every case, given an incoming
    gradient that ``reshape`` can view (the module docstring says when it cannot).
    """
    if not node.inputs or len(node.outputs) != 1 or differ(node.outputs[0].numel, node.inputs[0].numel):
        return None
    cost = OpCost(forward=Flops(), forward_allocs=new_output(node),
                  note="view" if not new_output(node) else "reshape of a non-contiguous input: copy")
    if node.records_autograd:
        cost.input_grads = _gradients_alias(node)
    return cost


@TABLE.register("call_method", "expand", "expand_as")
def expand(node: OpNode) -> OpCost | None:
    """``x.expand(*sizes)``: a view with stride 0 along the expanded dims (no allocation, nothing
    saved). Backward ``sum_to_size``: when the shapes differ, one ``sum`` over the expanded and the
    new leading dims (keepdim) - every incoming element accumulated once, ``numel(out)`` exact
    FLOPs - into a new tensor with the input's element count, then a ``view``; when they are equal
    the incoming gradient itself (0 bytes, 0 FLOPs)."""
    if not node.inputs or len(node.outputs) != 1 or not output_is_view(node):
        return None
    x, out = node.inputs[0], node.outputs[0]
    cost = OpCost(forward=Flops(), note="expand: a view")
    if node.records_autograd:
        reduced = tuple(x.shape) != tuple(out.shape)
        cost.backward = Flops(torch=0, exact=numel(out.shape) if reduced and node.needs_input_grad[0] else 0)
        cost.input_grads = _new_input_gradient(node) if reduced else _gradients_alias(node)
    return cost


@TABLE.register("call_method", "chunk", "split", "split_with_sizes", "unbind")
@TABLE.register("call_function", torch.chunk, torch.split, torch.unbind)
def chunk_or_split(node: OpNode) -> OpCost | None:
    """``x.chunk(n, dim)`` / ``x.split(size_or_sizes, dim)`` / ``x.unbind(dim)``: ``split.Tensor`` /
    ``split_with_sizes`` / ``unbind.int``, every piece a view of ``x`` (nothing allocated or saved).
    Backward (``SplitBackward0``: ``cat`` of the pieces' gradients along ``dim``; ``UnbindBackward0``:
    ``stack`` of them): one new tensor of the input's size, 0 FLOPs (data movement). A piece without a gradient would first get
    ``zeros`` of its size (a transient this node cannot know of: every piece is assumed to get one).
    """
    if not node.inputs or not _aliases_input(node):
        return None
    cost = OpCost(forward=Flops(), note=f"{node.target if node.kind == 'call_method' else 'split'}: views")
    if node.records_autograd:
        cost.input_grads = _new_input_gradient(node)
    return cost


@TABLE.register("call_function", torch.cat, torch.concat, torch.concatenate)
def cat(node: OpNode) -> OpCost | None:
    """``torch.cat(tensors, dim)``: a new output; each input's gradient is a slice of the incoming one."""
    if not node.inputs or len(node.outputs) != 1:
        return None
    cost = OpCost(forward=Flops(), forward_allocs=new_output(node), note="cat: copy, no arithmetic")
    if node.records_autograd:
        cost.input_grads = _gradients_alias(node)
    return cost


@TABLE.register("call_module", nn.Identity)
def identity(node: OpNode) -> OpCost | None:
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.outputs[0].storage != node.inputs[0].storage:
        return None
    cost = OpCost(forward=Flops(), note="identity")
    if node.records_autograd:
        cost.input_grads = _gradients_alias(node)
    return cost


# ---------------------------------------------------------------------------------------------
# Indexing


def _is_full_slice(part: slice, size: int) -> bool:
    """Whether ``x[..., part, ...]`` (a slice within a tuple of indices) dispatches nothing along
    this dim: torch skips a slice whose start is 0 (or omitted), whose step is 1 (or omitted) and
    whose stop reaches the size (or is omitted). The check is on the slice as written: ``-size:``
    still dispatches ``slice``; so does a lone ``x[:]`` (not in a tuple)."""
    start, stop, step = part.start, part.stop, part.step
    return start in (None, 0) and step in (None, 1) and (stop is None or stop >= size)


def view_ops_of_index(shape: tuple[int, ...], index: Any) -> tuple[int, int] | None:
    """``(select/slice ops, unsqueeze ops)`` that ``x[index]`` dispatches for basic indices, or None
    for anything else (tensors, lists, bools: advanced indexing)."""
    if isinstance(index, slice):  # a lone slice takes torch's one-slice path: always ``slice``
        return (1, 0) if view_ops_of_index(shape, (index,)) is not None and shape else None
    parts = index if isinstance(index, tuple) else (index,)
    consumed = 0
    for part in parts:
        if isinstance(part, bool) or not (part is None or part is Ellipsis or isinstance(part, (int, slice))):
            return None
        if isinstance(part, slice) and not all(v is None or isinstance(v, int) and not isinstance(v, bool)
                                              for v in (part.start, part.stop, part.step)):
            return None
        consumed += isinstance(part, (int, slice))
    if sum(part is Ellipsis for part in parts) > 1 or consumed > len(shape):
        return None
    selects = unsqueezes = 0
    dim = 0
    for part in parts:
        if part is None:
            unsqueezes += 1
        elif part is Ellipsis:
            dim += len(shape) - consumed
        elif isinstance(part, int):
            selects += 1
            dim += 1
        else:
            selects += not _is_full_slice(part, shape[dim])
            dim += 1
    return selects, unsqueezes


@TABLE.register("call_function", operator.getitem)
def getitem(node: OpNode) -> OpCost | None:
    """``operator.getitem``: into a tuple of tensors, into a tensor, or into a size.

    - A tuple/list of tensors (``chunk``'s result): selects an existing tensor, nothing runs; the
      result is that tensor itself, so its consumers' gradients go straight to it.
    - A tensor with basic indices: a view (``select``/``slice``/``unsqueeze``/``alias``; nothing
      saved but sizes). Backward of one ``select``/``slice``: ``select_backward``/``slice_backward``
      allocate ``zeros`` of the input's size and copy the incoming gradient into the selected part:
      one new input-sized gradient, 0 FLOPs; with no ``select``/``slice`` (``x[None]``,
      ``x[...]``) the gradient is a view of the incoming one. Two or more: not modelled (None).
    - A size or any non-tensor: no tensor comes out, nothing runs.
    """
    container = node.arg(0, "a")
    if not node.outputs:
        return _metadata(node)
    if isinstance(container, (tuple, list)):
        index = node.arg(1, "b")
        if isinstance(index, bool) or not isinstance(index, (int, slice)):
            return None
        try:
            chosen = container[index]
        except IndexError:  # out of range: the forward itself fails, nothing to cost
            return None
        chosen = list(chosen) if isinstance(index, slice) else [chosen]
        if len(chosen) != len(node.outputs) or not all(isinstance(item, TensorMeta) for item in chosen):
            return None
        cost = OpCost(forward=Flops(), note="selects a tensor of a tuple: nothing runs")
        if node.records_autograd:
            # The selected tensor *is* the earlier value (the engine sends its consumers' gradients
            # there directly); were a gradient to reach this node, it would be that value's own.
            # Selected by identity: the pieces of a chunk are equal metas (same storage and shape).
            cost.input_grads = tuple(0 if need and any(meta is item for item in chosen) else None
                                     for meta, need in zip(node.inputs, node.needs_input_grad))
        return cost
    if not isinstance(container, TensorMeta) or len(node.inputs) != 1 or len(node.outputs) != 1:
        return None
    ops = view_ops_of_index(tuple(container.shape), node.arg(1, "b"))
    if ops is None or ops[0] > 1 or not output_is_view(node):
        return None
    cost = OpCost(forward=Flops(), note="basic indexing: a view")
    if node.records_autograd:
        cost.input_grads = _new_input_gradient(node) if ops[0] else _gradients_alias(node)
    return cost


# ---------------------------------------------------------------------------------------------
# Copies: roll, constant padding


@TABLE.register("call_function", torch.roll)
@TABLE.register("call_method", "roll")
def roll(node: OpNode) -> OpCost | None:
    """``torch.roll(x, shifts, dims)``: a new output (``roll``), nothing saved; backward rolls the
    gradient back (``roll`` by ``-shifts``): one new input-sized tensor, 0 FLOPs."""
    if not node.inputs or len(node.outputs) != 1 or node.arg(1, "shifts") is None or output_is_view(node):
        return None
    cost = OpCost(forward=Flops(), forward_allocs=new_output(node), note="roll: a copy")
    if node.records_autograd:
        cost.input_grads = _new_input_gradient(node)
    return cost


@TABLE.register("call_function", F.pad)
def pad(node: OpNode) -> OpCost | None:
    """``F.pad(x, pad, mode="constant", value)``: ``constant_pad_nd``, a new output filled with
    ``value`` around a copy of ``x`` (negative pads crop), nothing saved; backward
    ``constant_pad_nd`` of the gradient with the pads negated: one new input-sized tensor, 0 FLOPs."""
    if node.arg(2, "mode", "constant") != "constant" or not node.inputs or len(node.outputs) != 1 \
            or output_is_view(node) or not isinstance(node.arg(0, "input"), TensorMeta):
        return None
    cost = OpCost(forward=Flops(), forward_allocs=new_output(node), note="constant pad: a copy")
    if node.records_autograd:
        cost.input_grads = _new_input_gradient(node)
    return cost


# ---------------------------------------------------------------------------------------------
# Nodes without tensors


def _metadata(node: OpNode) -> OpCost | None:
    """No tensor comes out (and, for arithmetic, none goes in): nothing is dispatched."""
    if node.outputs:
        return None
    cost = OpCost(forward=Flops(), note="metadata: no op runs")
    if node.records_autograd:
        cost.input_grads = no_grads(node)
    return cost


@TABLE.register("call_function", builtins.getattr, builtins.len)
@TABLE.register("call_method", "size", "dim", "numel", "ndimension")
def no_tensor_result(node: OpNode) -> OpCost | None:
    """Metadata reads (``x.size(0)``, ``x.shape``, ``len(x)``): no tensor comes out, nothing runs."""
    return _metadata(node)


@TABLE.register("call_function", operator.floordiv, operator.truediv, operator.mod, operator.add, operator.sub,
                operator.mul, operator.neg, operator.abs, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                operator.ge, torch._assert)
def shape_arithmetic(node: OpNode) -> OpCost | None:
    """Python arithmetic and checks on sizes (``num_channels // groups``, ``H % window == 0``,
    ``torch._assert(cond, msg)``): with no tensor in or out, nothing is dispatched. The same
    operators on tensors belong to the element-wise plugin (None here)."""
    if node.inputs:
        return None
    return _metadata(node)


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
