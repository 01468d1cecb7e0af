"""The hooks through which every cost rule reaches the engine.

The engine knows no op, optimizer, method or loss by name: it asks these hooks. Built-in plugins
(``costmodel.plugins``) implement them exactly as a third-party package would, registered through
the ``costmodel`` entry-point group. A plugin module implements any subset; misspelt hook names
are caught at start-up by ``PluginManager.check_pending()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from torch import nn

    from costmodel.config import StepConfig
    from costmodel.costs import LossSpec, MethodOptions, OpCost, OpNode, OptimizerCost, ParamGroup, PreparedMethod

PROJECT_NAME = "costmodel"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def costmodel_op_cost(node: "OpNode") -> "OpCost | None":
    """Cost one node of the traced graph, or return None if this plugin does not cover it.

    Called for every ``call_module``, ``call_function`` and ``call_method`` node, in graph order.
    The answer gives forward FLOPs; when ``node.records_autograd``, the backward FLOPs of exactly
    the gradients needed (``node.needs_input_grad`` and the trainable ``node.params``); the bytes
    the forward allocates and which tensors autograd saves; the backward's gradient and temporary
    allocations. ``OpCost.param_grads`` is keyed by the keys of ``node.params`` (the parameter's
    name relative to the node's module, such as ``weight``), which is how the engine looks each
    one up. ``costmodel.authoring`` has the helpers the built-in op plugins are written with
    (``docs/plugin-authoring.md``). The first plugin that answers wins (plugins registered later
    are asked first, so a third-party plugin can override a built-in rule). A node that no plugin
    answers is an error naming the op, or a reported coverage gap under ``--allow-unknown``.

    The graph is the model and its loss traced together (``costmodel.models.TrainingStep``):
    ``criterion(model(images), labels)`` with ``criterion`` the configured loss's module
    (``costmodel_loss``: ``nn.CrossEntropyLoss()`` by default) as a ``call_module`` node, for a model with auxiliary outputs the weighted sum of one such node per
    output (``costmodel.models.training_loss``). Python's in-place operators
    (``out += identity`` in ResNet, ``result += input`` in MobileNetV3) appear as ``call_function``
    nodes whose target is ``operator.iadd`` / ``isub`` / ``imul`` / ``itruediv``: eager PyTorch runs
    the in-place tensor method there (output aliases input 0), not an out-of-place op.

    The hook takes the node alone, and the answer must depend on the node alone: the step's
    configuration (its rank, its method) is not an argument, because one answer may serve many
    configurations. When the engine predicts many ranks together (``costmodel.ranks``), it asks
    once for all of them with every rank-dependent size - in shapes, in rank-sized module
    attributes, in size arguments - a numpy
    integer array with one entry per rank, and expects sizes in the answer as such arrays (or ints
    where they do not vary). Arithmetic, ``math.prod`` and ``costmodel.costs.smaller`` /
    ``differ`` / ``amount`` work on both; a plugin that branches on a size (``if``, ``min``,
    ``int()``) raises there and is then asked rank by rank, as is one whose answer for many ranks
    differs from its answer for the first of them. Never test a size's type.
    """


@hookspec(firstresult=True)
def costmodel_optimizer_cost(group: "ParamGroup", step: int, config: "StepConfig") -> "OptimizerCost | None":
    """Cost ``optimizer.step()`` over one parameter group on step number ``step`` (1-based;
    step 1 creates the optimizer state), or None if this plugin does not know ``group.optimizer``.

    ``group.params`` holds only the parameters that receive a gradient in the step (a trainable
    parameter the forward never uses has ``.grad`` None, and torch's optimizers skip it); it is
    never empty.

    As for ``costmodel_op_cost``, parameter sizes and integer options (a projection rank) may be
    numpy integer arrays over ranks; a plugin that cannot answer so is asked rank by rank.
    """


@hookspec
def costmodel_optimizer_names() -> "list[str]":
    """The names of the optimizers this plugin costs through ``costmodel_optimizer_cost`` (what
    ``StepConfig.optimizer`` / ``--optimizer`` may name), for listings and messages."""


@hookspec(firstresult=True)
def costmodel_prepare_method(name: str, model: "nn.Module", config: "StepConfig") -> "PreparedMethod | None":
    """Apply fine-tuning method ``name`` to ``model`` (on the meta device), or return None if this
    plugin does not provide it.

    ``config.options`` have been checked and coerced against the method's
    ``costmodel_method_options`` declaration (when it makes one): every key is declared and every
    value is of its declared kind, so the plugin reads them without checking again.

    The plugin mutates the model as the real method would (adds adapter modules whose forward
    mirrors the real library op for op, sets ``requires_grad`` to freeze what the method freezes)
    and returns the optimizer's parameter groups. A rank a layer cannot take raises
    ``CostModelError`` naming the layer.

    ``PreparedMethod.affine_in_rank`` lets the engine predict many ranks from one trace: set it
    only where preparing at every other rank succeeds and changes nothing but integer sizes
    (parameter dimensions, integer attributes of modules the tracer keeps whole, integer options
    of the parameter groups), each affine in the rank, and where the forward of modules the tracer
    traces through reads such sizes only off tensors (``w.shape[0]``, never ``self.rank``). The
    engine checks the promise at three ranks.
    """


@hookspec
def costmodel_method_names() -> "list[str]":
    """The names of the fine-tuning methods this plugin provides (for listings and messages)."""


@hookspec(firstresult=True)
def costmodel_method_options(name: str) -> "MethodOptions | None":
    """Declare what fine-tuning method ``name`` takes: whether it uses the rank, and its options.

    :param name: A method name, as given to ``costmodel_prepare_method``.
    :returns: A :class:`~costmodel.costs.MethodOptions` for a method this plugin provides, or None
        for any other name. The first non-None answer is used.

    Before ``costmodel_prepare_method`` runs (in ``costmodel.trace.prepare_method``, and in the CLI
    through ``costmodel.options.check_method_arguments``), the engine refuses an option key the
    method does not declare and any value not of its :class:`~costmodel.costs.OptionSpec` kind,
    with a one-line ``CostModelError`` naming ``--option KEY`` and the method, and hands the plugin
    the coerced values. A method with ``takes_rank=False`` is refused an explicit ``--rank``, and
    its predictions note that the rank is unused.

    A method that no plugin declares gets its options unchecked (its plugin checks them) and is
    assumed to use the rank.
    """


@hookspec(firstresult=True)
def costmodel_loss(name: str) -> "LossSpec | None":
    """Describe the training loss ``name`` (``StepConfig.loss``, the CLI's ``--loss``), or return
    None if this plugin does not provide it.

    :param name: A loss name, such as ``"cross_entropy"`` (the default) or ``"mse"``.
    :returns: A :class:`~costmodel.costs.LossSpec`: how to build the criterion module, and the
        target's shape (a function of the batch size and the number of classes, which must work on a
        symbolic batch size) and dtype. The first non-None answer is used.

    The engine builds the step ``criterion(model(images), target)`` from it and propagates a target
    of that shape and dtype; the criterion's node is then costed by ``costmodel_op_cost`` like any
    other, so a plugin that adds a loss also adds (or relies on) the op rule for its module. A name
    no plugin describes is refused in one line listing ``costmodel_loss_names``.
    """


@hookspec
def costmodel_loss_names() -> "list[str]":
    """The names of the losses this plugin describes through ``costmodel_loss`` (for listings and
    messages)."""


@hookspec(firstresult=True)
def costmodel_module_forward(module: "nn.Module") -> "Callable[..., Any] | None":
    """A forward for ``module`` that torch.fx can trace, dispatching exactly the ops the module's
    own forward dispatches, or None. For a module whose forward computes Python values from its
    inputs' sizes, which symbolic tracing cannot do (timm's ``Conv2dSame`` pads by its input's
    height and width): the tracer calls it with the module's arguments in place of
    ``module.forward``, and the ops it calls become nodes like any others.

    Sizes read in it (``x.size(-1)``) are graph values; arithmetic on them is recorded as free
    shape nodes (``costmodel.plugins.shape``), so write ``max(t, 0)`` and branches on sizes as
    arithmetic (``(t + abs(t)) // 2``). Asked for every module the tracer traces through (never
    for a leaf module, which an op rule costs whole)."""


@hookspec(firstresult=True)
def costmodel_meta_function(target: "Callable[..., Any]") -> "Callable[..., Any] | None":
    """What shape propagation calls, on meta tensors, for a graph node that calls ``target``, or
    None to call ``target`` itself. For a composite function that picks its kernel by device
    (``F.scaled_dot_product_attention``: on the meta device it decomposes into the math path,
    whose output is contiguous; on CPU it runs the flash kernel, whose output keeps the query's
    layout): the replacement dispatches what ``target`` dispatches on CPU, so that every result's
    shape, dtype, strides and storage are the CPU run's. It must take ``target``'s arguments and
    return what ``target`` returns. The node keeps ``target`` (op rules still see it). For a
    module the tracer keeps whole, ``target`` is its class and the replacement is called with the
    module first: ``replacement(module, *args, **kwargs)`` (a convolution whose CPU kernel writes
    a channels-last result for a channels-last input, where the meta kernel writes a contiguous
    one)."""


@hookspec(firstresult=True)
def costmodel_autocast_policy(kind: str, target: "Any", args: "tuple[Any, ...]", kwargs: "dict[str, Any]"
                              ) -> "str | None":
    """How ``torch.autocast("cpu", ...)`` treats a graph node's op, or None when this plugin does
    not list it (an op no plugin lists runs in the dtypes its inputs have, as autocast leaves it).

    :param kind: the torch.fx opcode: ``call_function``, ``call_method`` (``target`` the method's
        name) or ``call_module`` (``target`` the module's class).
    :param args: the node's arguments, tensors as meta tensors (``F.pad``'s mode decides its
        list); for a ``call_module`` asked while tracing (``"through"``), empty, as ``kwargs``.
    :returns: one of
        - ``"lower"``: autocast casts every floating-point (not float64) tensor argument to its
          lower precision first (``conv2d``, ``linear``, ``matmul``, ...);
        - ``"fp32"``: it casts every such argument in lower precision to float32 (the losses);
        - ``"promote"``: it casts every such argument to the widest floating dtype among them
          (``cat``, ``stack``);
        - ``"through"`` (``call_module`` only): the module's forward reaches an op autocast
          casts for; the tracer traces through it, so that its functional call gets the casts;
        - ``"unmodelled"``: the op casts somewhere inside (a composite function such as
          ``einsum``, whose inner ``bmm`` autocast casts): a node under autocast is refused,
          naming it.

    The engine turns the answer into explicit ``Tensor.to(dtype)`` nodes before shape propagation
    (``costmodel.autocast``), costed by ``costmodel_op_cost`` like any other node: a cast of a
    trainable parameter is made once per autocast region and kept until the region ends
    (autocast's weight cache), any other cast once per use. A plugin whose op reaches a listed
    aten op (torch's CPU lists in ``aten/src/ATen/autocast_mode.cpp``) must answer for it.
    """


@hookspec
def costmodel_exact_flop_formulas() -> "dict[Any, Callable[..., int]]":
    """Rows this plugin adds to the runtime reference's exact FLOP convention, for the ops its own
    op rules stand for and the convention's table lacks (a custom op of the plugin's library):
    ``{torch.ops.my_lib.my_op: formula}``, keyed by the op (its overload packet, or an overload
    of it), each ``formula(*args, out_val=out, **kwargs) -> int`` over the op's raw arguments
    (the reference's raw-argument form: docs/plugin-authoring.md).

    Only the reference asks (``costmodel.validation.flops``, when it builds its exact counter,
    from the installed plugins), so that ``costmodel compare`` can hold a plugin's op rule against
    the measurement: without a row, the reference refuses the op as outside the convention. A row
    for an op the built-in table defines is refused (the convention's own rows stay the
    reference), as is an op two plugins give; each is a one-line error naming the plugin. Every
    plugin is asked (no ``firstresult``); the plugin documents its rows, as
    docs/flop-convention.md documents the built-in ones.
    """


@hookspec
def costmodel_device_profiles() -> "list[dict]":
    """Device profiles this plugin adds (``costmodel.devices``): a list of dicts, each in the
    schema of the package's ``device_profiles.json`` entries.

    :returns: ``[{"id": "my-board", "name": "My board (2 GB)", "kind": "cpu" or "cuda",
        "memory_bytes": {"value": ..., "source": "..."}, "usable_bytes": {...}`` (or
        ``"usable_fraction"``), ``"peak_flops": {"fp32": {...}, ...}, "memory_bandwidth": {...}}]``;
        every figure carries the ``source`` it comes from (a datasheet, or the derivation or
        estimate it is).

    Every plugin is asked (no ``firstresult``) and the answers are collected; the built-in profiles
    come from the package's file, not from this hook. A profile whose id is a built-in one replaces
    it (as a plugin's op rule overrides a built-in rule); where two plugins give one id, the plugin
    asked first (registered last) wins. A profile that breaks the schema is a one-line
    ``CostModelError`` naming the plugin and the field. Profiles are looked up by id wherever a
    device is accepted (``--device ID``, ``costmodel.fits``, ``costmodel.maximize``).
    """
