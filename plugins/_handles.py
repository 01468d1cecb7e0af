"""What every op plugin module shares: a table of small named handles, and the few facts about
tensors and autograd that all of them rest on.

Each op family (``conv``, ``linear``, ...) keeps a :class:`HandleTable` that maps a node's
``(kind, target)`` to one handle, a plain function ``OpNode -> OpCost | None``. A handle answers
None when the node is similar to what it knows but outside what it models exactly (a transposed
convolution, a loss with label smoothing...): the engine then reports a clear coverage gap
instead of a guessed number.

Memory facts shared by the handles (all checked against torch 2.14.1 on CPU in
``tests/test_op_plugins.py``):

- An op's result that aliases an input (a view, an in-place op) allocates nothing.
- Autograd saves tensors only when it records the op (some input or own parameter requires grad);
  otherwise op-internal tensors that it would save (batch norm's statistics, max-pool indices, a
  dropout mask) are freed as soon as the op returns ("transient").
- Saving a parameter or a buffer costs nothing new: it exists anyway. Only inputs/outputs
  (``SavedRef``) and op-internal tensors (``Alloc(lifetime="saved")``) matter.
- The gradient reaching an input is ``0`` new bytes when it is the incoming gradient itself or a
  view of it (add, flatten, cat), otherwise the input's size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from costmodel.costs import Alloc, OpCost, OpNode, ParamMeta, TensorMeta

Handle = Callable[[OpNode], "OpCost | None"]


class HandleTable:
    """Handles keyed by ``(kind, target)``: ``call_module`` keys are module classes (matched
    exactly, since a subclass may override ``forward``), ``call_function`` keys are the callables,
    ``call_method`` keys are method names."""

    def __init__(self) -> None:
        self._handles: dict[tuple[str, Any], Handle] = {}

    def register(self, kind: str, *targets: Any) -> Callable[[Handle], Handle]:
        def add(handle: Handle) -> Handle:
            for target in targets:
                key = (kind, target)
                if key in self._handles:
                    raise ValueError(f"two handles for {kind} {target!r}")
                self._handles[key] = handle
            return handle

        return add

    def handle_for(self, node: OpNode) -> Handle | None:
        try:
            return self._handles.get((node.kind, node.target))
        except TypeError:  # an unhashable target is nothing a table knows
            return None

    def cost(self, node: OpNode) -> OpCost | None:
        handle = self.handle_for(node)
        return None if handle is None else handle(node)

    def keys(self) -> list[tuple[str, Any]]:
        return list(self._handles)


# ---------------------------------------------------------------------------------------------
# Tensors


def numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def is_float(dtype: torch.dtype) -> bool:
    """Whether element-wise arithmetic on this dtype counts in the exact convention."""
    return dtype.is_floating_point or dtype.is_complex


def tensor_input(node: OpNode, index: int, name: str) -> TensorMeta | None:
    """The call argument at ``index``/``name`` if it is a tensor, else None."""
    value = node.arg(index, name)
    return value if isinstance(value, TensorMeta) else None


def input_index(node: OpNode, meta: TensorMeta | None) -> int | None:
    """Position of ``meta`` in ``node.inputs`` (by identity first, then by equality)."""
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
    index = input_index(node, meta)
    return index is not None and node.needs_input_grad[index]


def add_tensor_argument_grads(node: OpNode, cost: OpCost, *metas: TensorMeta | None) -> None:
    """A functional form takes its weight and bias as node inputs: each one that needs a gradient
    gets a new tensor of its own size as its input gradient."""
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
    ``running_mean``...), as ``(key in node.params, meta)``; keys may be local or qualified."""
    for key, meta in node.params.items():
        if key == local_name or key.endswith("." + local_name):
            return key, meta
    return None


def trainable_param(node: OpNode, local_name: str) -> tuple[str, ParamMeta] | None:
    found = module_param(node, local_name)
    if found is None or found[1].is_buffer or not found[1].trainable:
        return None
    return found


def saved_or_transient(nbytes: int, node: OpNode) -> Alloc:
    """An op-internal tensor that autograd keeps for backward if it records the op, else frees
    when the op returns."""
    return Alloc(nbytes, "saved" if node.records_autograd else "transient")


def new_output(node: OpNode, index: int = 0) -> tuple[Alloc, ...]:
    """Output ``index`` as a fresh storage, or nothing if it aliases an input."""
    out = node.outputs[index]
    if any(out.storage == t.storage for t in node.inputs):
        return ()
    return (Alloc(out.storage_nbytes, "output", index),)


def no_grads(node: OpNode) -> tuple[None, ...]:
    return (None,) * len(node.inputs)


def new_input_grad(node: OpNode, x: TensorMeta, needed: bool) -> tuple[int | None, ...]:
    """``input_grads`` where only ``x`` may get one: a new tensor of its size when ``needed``."""
    grads: list[int | None] = list(no_grads(node))
    if needed:
        grads[input_index(node, x)] = x.nbytes
    return tuple(grads)


def broadcast_reduced(shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
    """Whether a gradient of ``out_shape`` must be summed down to ``shape`` (broadcasting)."""
    return tuple(shape) != tuple(out_shape)
