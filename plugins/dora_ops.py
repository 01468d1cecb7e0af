"""Ops that only the DoRA mirror issues, with their cost rules.

``release(result, *locals_)``: the end of a Python scope. peft's DoRA forward keeps
``lora_weight`` (a weight-sized tensor; for a Linear also ``eye(in)`` and its ``(in, r)`` product,
held by ``lora_weight``'s autograd graph) in local variables until the function returns, long
after their last use as data. A torch.fx graph frees a value after its last use, so the mirror
passes those locals to ``release`` where peft's function returns: the marker runs no aten op
(0 FLOPs in both conventions), allocates nothing and returns ``result`` itself (an alias), so its
only effect is to end the locals' lifetimes at the right node. Autograd does not see it (the
gradient of ``result`` passes through untouched).
"""

from __future__ import annotations

import torch
import torch.fx

from costmodel.config import StepConfig
from costmodel.costs import Flops, OpCost, OpNode
from costmodel.hookspecs import hookimpl


@torch.fx.wrap
def release(result: torch.Tensor, *locals_: torch.Tensor) -> torch.Tensor:
    """Return ``result``; ``locals_`` are the Python locals that die here (see the module doc)."""
    return result


@hookimpl
def costmodel_op_cost(node: OpNode, config: StepConfig) -> OpCost | None:
    if node.kind == "call_function" and node.target is release:
        # The gradient of input 0 is the incoming gradient itself; the locals get none.
        grads = (0,) + (None,) * (len(node.inputs) - 1) if node.records_autograd else ()
        return OpCost(forward=Flops(), input_grads=grads,
                      note="end of peft's DoRA forward scope: frees its locals, no op")
    return None
