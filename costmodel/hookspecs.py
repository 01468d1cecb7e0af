"""The hooks through which every cost rule reaches the engine.

The engine knows no op, optimizer or method by name: it asks these hooks. Built-in plugins
(``costmodel.plugins``) implement them exactly as a third-party package would, registered through
the ``costmodel`` entry-point group. A plugin module implements any subset; misspelt hook names
are caught at start-up by ``PluginManager.check_pending()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from torch import nn

    from costmodel.config import StepConfig
    from costmodel.costs import OpCost, OpNode, OptimizerCost, ParamGroup, PreparedMethod

PROJECT_NAME = "costmodel"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def costmodel_op_cost(node: "OpNode", config: "StepConfig") -> "OpCost | None":
    """Cost one node of the traced graph, or return None if this plugin does not cover it.

    Called for every ``call_module``, ``call_function`` and ``call_method`` node, in graph order.
    The answer gives forward FLOPs; when ``node.records_autograd``, the backward FLOPs of exactly
    the gradients needed (``node.needs_input_grad`` and the trainable ``node.params``); the bytes
    the forward allocates and which tensors autograd saves; the backward's gradient and temporary
    allocations. The first plugin that answers wins (plugins registered later are asked first,
    so a third-party plugin can override a built-in rule). A node that no plugin answers is an
    error naming the op, or a reported coverage gap under ``--allow-unknown``.

    The graph is the model and its loss traced together: ``criterion(model(images), labels)`` with
    ``criterion = nn.CrossEntropyLoss()`` as a ``call_module`` node. Python's in-place operators
    (``out += identity`` in ResNet, ``result += input`` in MobileNetV3) appear as ``call_function``
    nodes whose target is ``operator.iadd`` / ``isub`` / ``imul`` / ``itruediv``: eager PyTorch runs
    the in-place tensor method there (output aliases input 0), not an out-of-place op.
    """


@hookspec(firstresult=True)
def costmodel_optimizer_cost(group: "ParamGroup", step: int, config: "StepConfig") -> "OptimizerCost | None":
    """Cost ``optimizer.step()`` over one parameter group on step number ``step`` (1-based;
    step 1 creates the optimizer state), or None if this plugin does not know ``group.optimizer``.

    ``group.params`` holds only the parameters that receive a gradient in the step (a trainable
    parameter the forward never uses has ``.grad`` None, and torch's optimizers skip it); it is
    never empty.
    """


@hookspec(firstresult=True)
def costmodel_prepare_method(name: str, model: "nn.Module", config: "StepConfig") -> "PreparedMethod | None":
    """Apply fine-tuning method ``name`` to ``model`` (on the meta device), or return None if this
    plugin does not provide it.

    The plugin mutates the model as the real method would (adds adapter modules whose forward
    mirrors the real library op for op, sets ``requires_grad`` to freeze what the method freezes)
    and returns the optimizer's parameter groups. A rank a layer cannot take raises
    ``CostModelError`` naming the layer.
    """


@hookspec
def costmodel_method_names() -> "list[str]":
    """The names of the fine-tuning methods this plugin provides (for listings and messages)."""
