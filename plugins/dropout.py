"""Dropout: ``nn.Dropout`` and ``F.dropout``.

On CPU (torch 2.14.1) a training dropout with ``0 < p < 1`` decomposes into
``noise = empty_like(x).bernoulli_(1 - p); noise.div_(1 - p); x * noise`` (``mul_`` in place):

- FLOPs, ``exact``: ``div_`` and ``mul``: ``2 * numel(x)`` (drawing random numbers counts 0);
  backward ``grad * noise``: ``numel(x)``. ``torch``: 0.
- Memory: the noise (the mask, input-sized in the input's dtype, not bool) is allocated first and
  kept for backward when autograd records the op (freed at once otherwise); then the output, unless
  in place. Autograd saves only the noise. The backward allocates one input-sized gradient.

In eval mode, with ``p == 0`` or an empty input, dropout returns its input itself: nothing runs,
nothing is allocated, and the gradient passes through.

Not modelled (answer None): ``p == 1``, channel-wise (``Dropout1d/2d/3d``) and alpha dropout.

Stochastic depth (``torchvision.ops.stochastic_depth(input, p, mode, training)``, a ``torch.fx``
wrapped function, and the ``StochasticDepth`` module that calls it; EfficientNet's residual
branches). In training with ``p > 0`` it draws one mask value per sample (``mode="row"``: shape
``[N, 1, ..., 1]``) or one for the whole batch (``"batch"``: ``[1, ..., 1]``). On CPU (torch
2.14.1) that is ``noise = empty(size); noise.bernoulli_(1 - p)``, then ``noise.div_(1 - p)`` when
``1 - p > 0``, then ``input * noise`` (always out of place):

- FLOPs, ``exact``: ``bernoulli_`` 0 (the convention's zero list: drawing random numbers is not
  arithmetic), ``div_`` ``numel(noise) * [p < 1]``, the broadcast ``mul`` ``numel(input)``; backward
  ``grad * noise`` (the gradient of ``input``; the noise needs none): ``numel(input)``, and no sum,
  since the product has the input's shape. ``torch``: 0.
- Memory: the noise (``numel(noise)`` elements of the input's dtype) is allocated first; ``mul``
  saves it (its partner ``input`` needs a gradient) and not ``input`` (the noise needs none), so it
  is ``saved`` when autograd records the op and freed at once otherwise; then the input-sized
  output. The backward allocates one input-sized gradient and nothing else.

In eval mode or with ``p == 0`` it returns its input itself (as dropout does).
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F
from torchvision.ops import StochasticDepth, stochastic_depth

from costmodel.authoring import HandleTable, is_float, new_output, no_grads, numel, saved_or_transient
from costmodel.costs import Flops, OpCost, OpNode, TensorMeta
from costmodel.hookspecs import hookimpl

TABLE = HandleTable()


def dropout_cost(node: OpNode, p: float, training: bool, inplace: bool) -> OpCost | None:
    if not node.inputs or len(node.outputs) != 1 or not 0 <= p < 1:
        return None
    x = node.inputs[0]
    if not training or p == 0 or x.numel == 0:
        cost = OpCost(forward=Flops(), note="dropout off: returns its input")
        if node.records_autograd:
            cost.input_grads = (0 if node.needs_input_grad[0] else None,) + no_grads(node)[1:]
        return cost
    if not is_float(x.dtype):
        return None
    elements = numel(x.shape)
    allocs = (saved_or_transient(x.nbytes, node),) + (() if inplace else new_output(node))
    cost = OpCost(forward=Flops(torch=0, exact=2 * elements), forward_allocs=allocs,
                  note=f"dropout p={p}: mask draw, scale, multiply")
    if node.records_autograd:
        cost.backward = Flops(torch=0, exact=elements)
        cost.input_grads = (x.nbytes if node.needs_input_grad[0] else None,) + no_grads(node)[1:]
    return cost


@TABLE.register("call_module", nn.Dropout)
def dropout_module(node: OpNode) -> OpCost | None:
    drop = node.module
    if drop is None:
        return None
    return dropout_cost(node, drop.p, drop.training, drop.inplace)


@TABLE.register("call_function", F.dropout)
def dropout_function(node: OpNode) -> OpCost | None:
    """``F.dropout(input, p=0.5, training=True, inplace=False)``."""
    return dropout_cost(node, node.arg(1, "p", 0.5), node.arg(2, "training", True), node.arg(3, "inplace", False))


def stochastic_depth_cost(node: OpNode, p: object, mode: object, training: object) -> OpCost | None:
    """``torchvision.ops.stochastic_depth``: see the module docstring. None for arguments the
    function itself rejects (it raises there), for a non-tensor input and for integer inputs."""
    if (not node.inputs or not isinstance(node.arg(0, "input"), TensorMeta) or len(node.outputs) != 1
            or not isinstance(p, (int, float)) or not 0 <= p <= 1 or mode not in ("row", "batch")
            or not isinstance(training, bool)):
        return None
    x, out = node.inputs[0], node.outputs[0]
    if not training or p == 0:
        # The function returns ``input`` itself: no op runs, the gradient passes through.
        cost = OpCost(forward=Flops(), note="stochastic depth off: returns its input")
        if node.records_autograd:
            cost.input_grads = (0 if node.needs_input_grad[0] else None,) + no_grads(node)[1:]
        return cost
    if not is_float(x.dtype) or tuple(out.shape) != tuple(x.shape) or not x.shape:
        return None
    # One mask value per sample ("row") or one for the batch ("batch"), broadcast over the rest.
    noise_numel = x.shape[0] if mode == "row" else 1
    elements = numel(x.shape)
    # div_ by the survival rate runs only when it is > 0 (p < 1); the product always runs.
    forward = noise_numel * (p < 1) + elements
    allocs = (saved_or_transient(noise_numel * x.dtype.itemsize, node),) + new_output(node)
    cost = OpCost(forward=Flops(torch=0, exact=forward), forward_allocs=allocs,
                  note=f"stochastic depth p={p} mode={mode}: {noise_numel}-element mask, scale, multiply")
    if node.records_autograd:
        # grad * noise: the mask is the only saved tensor; the input needs a new gradient.
        cost.backward = Flops(torch=0, exact=elements)
        cost.input_grads = (x.nbytes if node.needs_input_grad[0] else None,) + no_grads(node)[1:]
    return cost


@TABLE.register("call_function", stochastic_depth)
def stochastic_depth_function(node: OpNode) -> OpCost | None:
    """``stochastic_depth(input, p, mode, training=True)``."""
    return stochastic_depth_cost(node, node.arg(1, "p"), node.arg(2, "mode"), node.arg(3, "training", True))


@TABLE.register("call_module", StochasticDepth)
def stochastic_depth_module(node: OpNode) -> OpCost | None:
    """A ``StochasticDepth`` module kept whole: it calls ``stochastic_depth(input, p, mode, training)``."""
    module = node.module
    if module is None:
        return None
    return stochastic_depth_cost(node, module.p, module.mode, module.training)


@hookimpl
def costmodel_op_cost(node: OpNode) -> OpCost | None:
    return TABLE.cost(node)
