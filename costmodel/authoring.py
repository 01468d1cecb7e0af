"""The plugin author's toolkit: what an op plugin needs besides the hook and the data classes.

An op plugin answers ``costmodel_op_cost(node)`` (``costmodel.hookspecs``) with an
:class:`~costmodel.costs.OpCost` for the nodes it knows and None for all others. The built-in op
plugins (``costmodel.plugins.conv``, ``linear``, ...) are written with this module, exactly as a
third-party plugin would be; ``docs/plugin-authoring.md`` walks through a whole plugin, its entry
point and its tests.

Writing an op plugin with a handle table
----------------------------------------

Keep one :class:`HandleTable` per plugin module. Register one small function per op - a *handle*,
``OpNode -> OpCost | None`` - under the node keys it covers: ``("call_module", nn.Conv2d)`` for a
module class (matched exactly: a subclass may override ``forward``), ``("call_function",
F.conv2d)`` for a function, ``("call_method", "view")`` for a tensor method. The hook
implementation is then one line, :meth:`HandleTable.cost`, which finds the node's handle (or
answers None for a node the table does not know, so that the next plugin is asked).

A handle answers None too when the node looks like what it knows but falls outside what it models
exactly (a transposed convolution, a loss with label smoothing...): the engine then reports a
clear coverage gap instead of a guessed number. Never guess.

The helpers below answer the questions every handle asks: which argument is which tensor
(:func:`tensor_input`, :func:`input_index`), whether autograd wants its gradient
(:func:`needs_grad`), which of the module's parameters train (:func:`module_param`,
:func:`trainable_param`), what the forward allocates (:func:`new_output`,
:func:`saved_or_transient`) and what the backward allocates (:func:`no_grads`,
:func:`new_input_grad`, :func:`add_tensor_argument_grads`).

Worked example (``nn.Softplus`` with the default ``threshold``; ``K_FORWARD``/``K_BACKWARD`` stand
for the per-element counts your plugin documents)::

    from torch import nn

    from costmodel.authoring import HandleTable, new_input_grad, new_output, numel
    from costmodel.costs import Flops, OpCost, OpNode, SavedRef
    from costmodel.hookspecs import hookimpl

    TABLE = HandleTable()

    @TABLE.register("call_module", nn.Softplus)
    def softplus(node: OpNode) -> OpCost | None:
        if node.module.beta != 1:
            return None                                 # outside what this rule models: a gap
        x, out = node.inputs[0], node.outputs[0]
        cost = OpCost(forward=Flops(torch=0, exact=K_FORWARD * numel(out.shape)),
                      forward_allocs=new_output(node))  # () if the output aliased the input
        if node.records_autograd:                       # autograd saves x for the backward
            cost.saved = (SavedRef("input", 0),)
            cost.backward = Flops(torch=0, exact=K_BACKWARD * numel(x.shape))
            cost.input_grads = new_input_grad(node, x, node.needs_input_grad[0])
        return cost

    @hookimpl
    def costmodel_op_cost(node: OpNode) -> OpCost | None:
        return TABLE.cost(node)

Memory facts the helpers rest on (all checked against torch 2.14.1 on CPU in
``tests/test_op_plugins.py``):

- An op's result that aliases an input (a view, an in-place op) allocates nothing.
- Autograd saves tensors only when it records the op (some input or own parameter requires grad);
  otherwise op-internal tensors that it would save (batch norm's statistics, max-pool indices, a
  dropout mask) are freed as soon as the op returns ("transient").
- Saving a parameter or a buffer costs nothing new: it exists anyway. Only inputs/outputs
  (:class:`~costmodel.costs.SavedRef`) and op-internal tensors (``Alloc(lifetime="saved")``)
  matter.
- The gradient reaching an input is ``0`` new bytes when it is the incoming gradient itself or a
  view of it (add, flatten, cat), otherwise the input's size.
- ``OpCost.param_grads`` is keyed by the node's local parameter key (a key of ``node.params``,
  as :func:`module_param` and :func:`trainable_param` return it), not by a qualified name.

Sizes may be numpy integer arrays when the engine predicts many ranks at once (see
``costmodel_op_cost`` in ``costmodel.hookspecs``). The helpers that only count, index or compare
storages work on both; :func:`broadcast_reduced` compares sizes and raises on such arrays, which
the engine takes as "ask this plugin rank by rank".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from costmodel.costs import Alloc, OpCost, OpNode, ParamGroup, ParamMeta, TensorMeta

__all__ = [
    "Handle",
    "HandleTable",
    "add_tensor_argument_grads",
    "broadcast_reduced",
    "input_index",
    "is_float",
    "module_param",
    "needs_grad",
    "new_input_grad",
    "new_output",
    "no_grads",
    "numel",
    "optimizer_group",
    "output_aliases_input",
    "saved_or_transient",
    "tensor_input",
    "trainable_param",
]

Handle = Callable[[OpNode], "OpCost | None"]
"""One op's rule: the node's cost, or None when the node is outside what the rule models exactly."""


class HandleTable:
    """Handles keyed by ``(kind, target)``, the node's ``OpNode.kind`` and ``OpNode.target``.

    ``call_module`` keys are module classes (matched exactly, since a subclass may override
    ``forward``), ``call_function`` keys are the callables, ``call_method`` keys are method names.
    A key may hold one handle only: registering a second is a ``ValueError`` at import time, so two
    rules for one op in the same plugin cannot shadow each other silently.
    """

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, Any], Handle] = {}

    def register(self, kind: str, *targets: Any) -> Callable[[Handle], Handle]:
        """A decorator registering a handle for ``kind`` and each of ``targets``; it returns the
        handle unchanged, so decorators stack (one handle for a function and a method alike)."""

        def add(handle: Handle) -> Handle:
            for target in targets:
                key = (kind, target)
                if key in self._by_key:
                    raise ValueError(f"two handles for {kind} {target!r}")
                self._by_key[key] = handle
            return handle

        return add

    def handle_for(self, node: OpNode) -> Handle | None:
        """The handle registered for the node's ``(kind, target)``, or None."""
        try:
            return self._by_key.get((node.kind, node.target))
        except TypeError:  # an unhashable target is nothing a table knows
            return None

    def cost(self, node: OpNode) -> OpCost | None:
        """The node's cost by its handle; None for a node the table does not know or whose handle
        declines it. This is what a plugin's ``costmodel_op_cost`` returns."""
        handle = self.handle_for(node)
        return None if handle is None else handle(node)

    def registered(self) -> list[tuple[str, Any]]:
        """Every ``(kind, target)`` the table holds a handle for, in registration order (what the
        plugin covers; ``tests/test_flop_convention_doc.py`` checks each is documented)."""
        return list(self._by_key)

    def keys(self) -> list[tuple[str, Any]]:
        """The same as :meth:`registered`."""
        return self.registered()


# ---------------------------------------------------------------------------------------------
# Tensors


def numel(shape: Iterable[int]) -> int:
    """The number of elements of a tensor of ``shape`` (1 for ``()``)."""
    return math.prod(shape)


def is_float(dtype: torch.dtype) -> bool:
    """Whether element-wise arithmetic on this dtype counts in the exact convention (floating
    point or complex; an op whose output is an integer tensor counts 0 FLOPs)."""
    return dtype.is_floating_point or dtype.is_complex


def tensor_input(node: OpNode, index: int, name: str) -> TensorMeta | None:
    """The call argument given at position ``index`` or as keyword ``name`` if it is a tensor,
    else None (an absent bias, a Python number in its place)."""
    value = node.arg(index, name)
    return value if isinstance(value, TensorMeta) else None


def input_index(node: OpNode, meta: TensorMeta | None) -> int | None:
    """The position of ``meta`` in ``node.inputs`` (by identity first, then by equality), or None.

    ``OpCost.input_grads`` and :class:`~costmodel.costs.SavedRef` address inputs by this position,
    which differs from the argument position when a non-tensor argument comes first."""
    if meta is None:
        return None
    for i, candidate in enumerate(node.inputs):
        if candidate is meta:
            return i
    for i, candidate in enumerate(node.inputs):
        if candidate == meta:
            return i
    return None


def needs_grad(node: OpNode, meta: TensorMeta | None) -> bool:
    """Whether autograd computes the gradient of input ``meta`` (False for None or a non-input)."""
    index = input_index(node, meta)
    return index is not None and node.needs_input_grad[index]


def add_tensor_argument_grads(node: OpNode, cost: OpCost, *metas: TensorMeta | None) -> None:
    """Set, in ``cost.input_grads``, a new gradient of its own size for each of ``metas`` that
    needs one.

    A functional form (``F.conv2d(x, weight, bias)``) takes its weight and bias as node inputs, so
    their gradients are input gradients rather than ``param_grads``. ``cost.input_grads`` must
    already have one entry per input (e.g. from :func:`no_grads`)."""
    grads = list(cost.input_grads)
    for meta in metas:
        if needs_grad(node, meta):
            grads[input_index(node, meta)] = meta.nbytes
    cost.input_grads = tuple(grads)


def output_aliases_input(node: OpNode, index: int = 0) -> bool:
    """Whether output 0 lives in the storage of input ``index`` (a view or an in-place result)."""
    return bool(node.outputs) and len(node.inputs) > index and node.outputs[0].storage == node.inputs[index].storage


def module_param(node: OpNode, local_name: str) -> tuple[str, ParamMeta] | None:
    """The module's own parameter or buffer called ``local_name`` (``weight``, ``bias``,
    ``running_mean``...) as ``(key, meta)``, or None if it has none.

    ``key`` is the parameter's key in ``node.params``: its name relative to the node's module
    (``weight``, or ``base_layer.weight`` below a wrapper), matched on its last component. It is
    the key ``OpCost.param_grads`` takes."""
    for key, meta in node.params.items():
        if key == local_name or key.endswith("." + local_name):
            return key, meta
    return None


def trainable_param(node: OpNode, local_name: str) -> tuple[str, ParamMeta] | None:
    """As :func:`module_param`, but only a trainable parameter (not a buffer, not frozen): the
    ones that get a gradient, so ``{key: meta.nbytes}`` is the ``param_grads`` entry."""
    found = module_param(node, local_name)
    if found is None or found[1].is_buffer or not found[1].trainable:
        return None
    return found


def saved_or_transient(nbytes: int, node: OpNode) -> Alloc:
    """An op-internal tensor (statistics, indices, a mask) that autograd keeps for backward if it
    records the op (``lifetime="saved"``), else frees when the op returns (``"transient"``)."""
    return Alloc(nbytes, "saved" if node.records_autograd else "transient")


def new_output(node: OpNode, index: int = 0) -> tuple[Alloc, ...]:
    """``forward_allocs`` for output ``index``: one ``Alloc(..., "output", index)`` of its
    storage's size, or ``()`` if it shares a storage with an input (a view, an in-place op)."""
    out = node.outputs[index]
    if any(out.storage == t.storage for t in node.inputs):
        return ()
    return (Alloc(out.storage_nbytes, "output", index),)


def no_grads(node: OpNode) -> tuple[None, ...]:
    """``input_grads`` with no gradient for any input (one None per input), to fill in."""
    return (None,) * len(node.inputs)


def new_input_grad(node: OpNode, x: TensorMeta, needed: bool) -> tuple[int | None, ...]:
    """``input_grads`` where only ``x`` may get one: a new tensor of its size when ``needed``,
    None for every other input."""
    grads: list[int | None] = list(no_grads(node))
    if needed:
        grads[input_index(node, x)] = x.nbytes
    return tuple(grads)


def broadcast_reduced(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """Whether a gradient of ``out_shape`` must be summed down to ``shape`` (the input was
    broadcast), which costs FLOPs and a new gradient tensor in the backward."""
    return tuple(shape) != tuple(out_shape)


# ---------------------------------------------------------------------------------------------
# Optimizers


def optimizer_group(group: ParamGroup, name: str, options_of: Callable[[ParamGroup], dict[str, Any]]
                    ) -> tuple[dict[str, Any], list[ParamMeta]] | None:
    """For an optimizer plugin's ``costmodel_optimizer_cost``: None when ``group`` is another
    optimizer's (``group.optimizer != name``); else the group's options as ``options_of`` checks
    and completes them (it raises a one-line CostModelError for a bad one), and the trainable
    parameters, the ones the step updates."""
    if group.optimizer != name:
        return None
    return options_of(group), [p for p in group.params if p.trainable]
