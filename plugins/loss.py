"""The training losses the step can use, and their op rules.

Losses (``costmodel_loss``, ``StepConfig.loss``): ``cross_entropy`` (the default) is
``nn.CrossEntropyLoss()`` on class indices of shape ``(batch,)``, int64; ``mse`` is ``nn.MSELoss()``
on a float32 target of shape ``(batch, classes)``, the shape of a classifier's logits.

Cross-entropy: ``nn.CrossEntropyLoss`` and ``F.cross_entropy`` = ``_log_softmax`` + ``nll_loss``.

For logits ``x: (B, C)`` and class-index targets ``(B,)``: ``E = B*C`` elements, ``R = B`` rows,
``N = B`` targets. FLOPs, ``exact`` (docs/flop-convention.md); the stock counter counts 0:

- forward: ``_log_softmax`` ``5*E + R`` (max comparison, subtract, exp, accumulate, subtract the
  log-sum per element; a log per row), ``nll_loss_forward`` ``N + [reduction == mean]``.
- backward: ``nll_loss_backward`` ``N + [mean]`` (one value per sample, the divide once),
  ``_log_softmax_backward_data`` ``4*E``.

Memory (torch 2.14.1, CPU): the forward allocates the log-probabilities (``E`` elements), then the
loss (a 0-d output) and ``total_weight`` (0-d). When autograd records the loss it keeps the
log-probabilities and ``total_weight`` (and the targets, which exist anyway); otherwise both die at
once. The backward allocates the log-probabilities' gradient (``E`` elements, a temporary freed
when the node's backward ends) and then the logits' gradient (``E`` elements). The seed gradient
``ones_like(loss)`` that ``loss.backward()`` creates belongs to the engine's backward start, not
to this node.

Not modelled (answer None): class weights, label smoothing, ``reduction="none"``, probability
targets, inputs other than ``(B, C)``.

Mean squared error: ``nn.MSELoss`` (reduction ``mean`` or ``sum``) = one ``aten.mse_loss``
forward, one ``aten.mse_loss_backward`` backward (both arrive whole at the counters: neither has a
``CompositeImplicitAutograd`` decomposition). For an input ``x`` and a target of the same shape and
dtype, ``E = numel(x)``:

- FLOPs, ``exact``: forward ``3*E + [reduction == mean]`` (per element subtract, square,
  accumulate; the mean's divide once); backward ``3*E`` (``grad_input = norm * (x - target) *
  grad``: subtract, two multiplies per element; ``norm = 2/E`` or ``2`` is a scalar computed once
  from integers, 0). ``torch``: 0 for both (the stock counter has no rule for either op; checked
  in ``tests/test_engine_loss.py``).
- Memory (torch 2.14.1, CPU): the forward allocates one storage, the loss - a 0-d tensor whose
  storage holds ``E`` elements: the CPU kernel writes the squared differences into its output and
  reduces them there, keeping the storage (``FakeTensorMode`` and the meta kernel give the 0-d
  tensor its own one-element storage instead, so a fake measurement of an MSE step counts
  ``(E - 1)`` elements less wherever the loss is alive; the engine predicts the real step). It lives
  as the loss does, to the end of the step. When autograd records the op (``x`` requires grad),
  ``MseLossBackward0`` saves ``self`` (the input) and ``target`` - both exist anyway, nothing new is
  kept (``grad_fn._saved_self`` / ``_saved_target`` are the very tensors). The backward allocates
  the input's gradient (``E`` elements) and nothing else MemTracker can see.

Not modelled (answer None): ``reduction="none"``, an input and a target of different shapes
(broadcasting) or dtypes, a target that requires grad, a non-floating-point input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from costmodel.authoring import HandleTable, input_index, is_float, new_output, no_grads, numel, saved_or_transient
from costmodel.costs import Alloc, Flops, LossSpec, OpCost, OpNode, SavedRef, TensorMeta
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()


def class_indices(batch: Any, classes: int) -> tuple[Any, ...]:
    """Cross-entropy's target: one class index per sample."""
    return (batch,)


def like_logits(batch: Any, classes: int) -> tuple[Any, ...]:
    """MSE's target: one value per sample and class, the shape of a classifier's logits."""
    return (batch, classes)


LOSSES: dict[str, LossSpec] = {
    "cross_entropy": LossSpec(nn.CrossEntropyLoss, class_indices, torch.int64),
    "mse": LossSpec(nn.MSELoss, like_logits, torch.float32),
}


@hookimpl
def costmodel_loss(name: str) -> LossSpec | None:
    return LOSSES.get(name)


@hookimpl
def costmodel_loss_names() -> list[str]:
    return list(LOSSES)


def cross_entropy_cost(node: OpNode, logits: TensorMeta | None, target: TensorMeta | None, reduction: str,
                       has_weight: bool, label_smoothing: float) -> OpCost | None:
    if logits is None or target is None or has_weight or label_smoothing != 0 or reduction not in ("mean", "sum"):
        return None
    if len(logits.shape) != 2 or target.shape != logits.shape[:1] or is_float(target.dtype) or len(node.outputs) != 1:
        return None
    elements, rows, samples = numel(logits.shape), logits.shape[0], target.numel
    mean = reduction == "mean"
    scalar_bytes = logits.dtype.itemsize
    allocs = (saved_or_transient(logits.nbytes, node),) + new_output(node) + (saved_or_transient(scalar_bytes, node),)
    cost = OpCost(forward=Flops(torch=0, exact=5 * elements + rows + samples + mean), forward_allocs=allocs,
                  note=f"cross entropy: log_softmax over {logits.shape}, nll_loss ({reduction})")
    if not node.records_autograd:
        return cost
    cost.saved = (SavedRef("input", input_index(node, target)),)
    cost.backward = Flops(torch=0, exact=samples + mean + 4 * elements)
    cost.backward_allocs = (Alloc(logits.nbytes, "transient"),)  # gradient of the log-probabilities
    grads = list(no_grads(node))
    grads[input_index(node, logits)] = logits.nbytes if node.needs_input_grad[input_index(node, logits)] else None
    cost.input_grads = tuple(grads)
    return cost


@TABLE.register("call_module", nn.CrossEntropyLoss)
def cross_entropy_module(node: OpNode) -> OpCost | None:
    loss = node.module
    if loss is None:
        return None
    logits, target = node.arg(0, "input"), node.arg(1, "target")
    return cross_entropy_cost(node, logits if isinstance(logits, TensorMeta) else None,
                              target if isinstance(target, TensorMeta) else None, loss.reduction,
                              getattr(loss, "weight", None) is not None, loss.label_smoothing)


@TABLE.register("call_function", F.cross_entropy)
def cross_entropy_function(node: OpNode) -> OpCost | None:
    """``F.cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
    reduce=None, reduction="mean", label_smoothing=0.0)``."""
    if node.arg(3, "size_average") is not None or node.arg(5, "reduce") is not None:
        return None  # legacy reduction flags
    logits, target = node.arg(0, "input"), node.arg(1, "target")
    return cross_entropy_cost(node, logits if isinstance(logits, TensorMeta) else None,
                              target if isinstance(target, TensorMeta) else None, node.arg(6, "reduction", "mean"),
                              node.arg(2, "weight") is not None, node.arg(7, "label_smoothing", 0.0))


@TABLE.register("call_module", nn.MSELoss)
def mse_module(node: OpNode) -> OpCost | None:
    loss = node.module
    if loss is None or loss.reduction not in ("mean", "sum"):
        return None
    x, target = node.arg(0, "input"), node.arg(1, "target")
    if not isinstance(x, TensorMeta) or not isinstance(target, TensorMeta) or len(node.outputs) != 1:
        return None
    if x.shape != target.shape or x.dtype != target.dtype or not is_float(x.dtype) or target.requires_grad:
        return None
    elements, mean = numel(x.shape), loss.reduction == "mean"
    # The 0-d loss in a storage of E elements (module docstring), an output of the node.
    cost = OpCost(forward=Flops(torch=0, exact=3 * elements + mean), forward_allocs=(Alloc(x.nbytes, "output", 0),),
                  note=f"mse loss over {x.shape} ({loss.reduction})")
    if not node.records_autograd:
        return cost
    cost.saved = (SavedRef("input", input_index(node, x)), SavedRef("input", input_index(node, target)))
    cost.backward = Flops(torch=0, exact=3 * elements)
    grads = list(no_grads(node))
    grads[input_index(node, x)] = x.nbytes if node.needs_input_grad[input_index(node, x)] else None
    cost.input_grads = tuple(grads)
    return cost


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
