"""Tracing one training step's forward pass with torch.fx, on the meta device.

The model is built on ``meta`` (no weight memory, no initialisation arithmetic), the method plugin
prepares it (adds adapters, freezes what the method freezes), and the model and its loss are traced
together as one graph. Shape propagation runs that graph on meta tensors with autograd enabled, so
every value's shape, dtype, storage (aliasing) and ``requires_grad`` come out exactly as eager
PyTorch would give them, without any arithmetic.
"""

from __future__ import annotations

import copy
import functools
import os
import operator
import sys
import sysconfig
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten

from costmodel.config import EVALUATION, StepConfig
from costmodel.costs import LossSpec, PreparedMethod
from costmodel.errors import CostModelError
from costmodel.meta_memo import meta_kernel_memo
from costmodel.models import (TrainingStep, autocast_dtype, check_checkpointed, checkpointed_modules, in_step_dtype,
                              step_dtype, step_model)
from costmodel.plugin_calls import (AUTOCAST_POLICY, META_FUNCTION, MODULE_FORWARD, PREPARE_METHOD, HookAsker,
                                    ask_first, loss_spec)

# Qualified names of the traced step module: the model is its child ``model``, the loss ``criterion``.
MODEL_PREFIX = "model."


class _InPlaceProxy(fx.Proxy):
    """A proxy that records ``a += b`` as ``operator.iadd``.

    A plain ``fx.Proxy`` has no ``__iadd__``, so Python falls back to ``a = a + b`` and the graph
    shows an out-of-place add; eager PyTorch runs ``Tensor.__iadd__`` (``add_``) instead, which
    allocates nothing and changes what autograd saves. Op plugins see ``operator.iadd`` (etc.) as
    the node's target.
    """

    def _inplace(self, op: Callable[[Any, Any], Any], other: Any) -> "fx.Proxy":
        return self.tracer.create_proxy("call_function", op, (self, other), {})

    def __iadd__(self, other: Any) -> "fx.Proxy":
        return self._inplace(operator.iadd, other)

    def __isub__(self, other: Any) -> "fx.Proxy":
        return self._inplace(operator.isub, other)

    def __imul__(self, other: Any) -> "fx.Proxy":
        return self._inplace(operator.imul, other)

    def __itruediv__(self, other: Any) -> "fx.Proxy":
        return self._inplace(operator.itruediv, other)


@dataclass(frozen=True)
class AutocastState:
    """The CPU autocast state a node was created in (``node.meta[AUTOCAST_STATE]``): the lower
    precision ``dtype``, and the weight-cache ``region`` (a number per outermost
    ``torch.autocast`` region; None when the cache is off): casts of trainable parameters are made
    once per region and kept until it ends."""

    dtype: torch.dtype
    region: int | None


# The node meta key of the autocast state the node was created in.
AUTOCAST_STATE = "costmodel_autocast"


@dataclass(frozen=True)
class CheckpointCall:
    """One call of a module ``StepConfig.checkpoint`` names: the graph nodes recorded inside it
    (``first`` .. ``last`` in graph order) and the nodes of its tensor arguments, which
    ``torch.utils.checkpoint`` keeps for the recomputation."""

    qualname: str
    arguments: tuple[fx.Node, ...]
    first: fx.Node
    last: fx.Node


@dataclass(frozen=True)
class ModuleCall:
    """One call of a traced-through (non-leaf) module: eager PyTorch keeps the call's arguments
    alive (the caller's frame and ``Module.__call__`` hold them) until the call returns, i.e. until
    the last graph node recorded inside it has run."""

    qualname: str
    arguments: tuple[fx.Node, ...]
    last_node: fx.Node


class StepTracer(fx.Tracer):
    """A tracer that keeps method modules (``PreparedMethod.leaf_modules``) whole, records in-place
    operators, and remembers each traced-through module call for liveness."""

    def __init__(self, leaf_modules: tuple[type[nn.Module], ...] = (), checkpointed: frozenset[int] = frozenset(),
                 forward_for: Callable[[nn.Module], Callable[..., Any] | None] | None = None,
                 meta_function_for: Callable[[Any], Callable[..., Any] | None] | None = None,
                 traced_through_under_autocast: Callable[[type[nn.Module]], bool] | None = None) -> None:
        super().__init__()
        # Whether a module class is traced through while CPU autocast is on (its forward reaches
        # an op autocast casts for: ``costmodel_autocast_policy`` answers "through"), so that the
        # casts go on its functional call (``costmodel.autocast``).
        self.traced_through_under_autocast = traced_through_under_autocast
        # Autocast cache regions seen so far: a region begins when the autocast nesting level
        # leaves 0 (``AutocastState.region``).
        self._autocast_regions = 0
        self._autocast_nested = False
        self.leaf_modules = leaf_modules
        # A plugin's traceable stand-in for a module's forward (``costmodel_module_forward``), or None.
        self.forward_for = forward_for
        # A plugin's replacement for a function in shape propagation (``costmodel_meta_function``),
        # kept in the node's meta under PROPAGATE_AS; asked once per function.
        self.meta_function_for = meta_function_for
        self._meta_functions: dict[Any, Callable[..., Any] | None] = {}
        self.module_calls: list[ModuleCall] = []
        # ``id()`` of the modules whose calls are checkpointed, and each such (outermost) call.
        self.checkpointed = checkpointed
        self.checkpoint_calls: list[CheckpointCall] = []
        self.checkpointed_called: set[int] = set()
        self._in_checkpoint = False
        # The model's own checkpoint calls: id(frame) -> [module name, arguments, first, last, frame]
        # (the frame is kept so that its id stays unique while tracing).
        self._own_calls: dict[int, list[Any]] = {}
        self._parameter_names: tuple[nn.Module, dict[int, str]] | None = None

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        """fx's own lookup, with the parameter's name found in a dict: fx walks ``named_parameters()``
        on every parameter attribute read, quadratic in the model's size (DoRA reads the adapter
        weights in its forward: most of a trace's time otherwise). Same names, same proxies."""
        if isinstance(attr_val, nn.Parameter):
            names = self._parameter_names
            if names is None or names[0] is not self.root:
                index: dict[int, str] = {}
                for name, param in self.root.named_parameters():
                    index.setdefault(id(param), name)
                names = self._parameter_names = (self.root, index)
            name = names[1].get(id(attr_val))
            if name is not None:
                if name not in parameter_proxy_cache:
                    parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
                return parameter_proxy_cache[name]
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.leaf_modules and isinstance(m, self.leaf_modules):
            return True
        if (self.traced_through_under_autocast is not None and torch.is_autocast_enabled("cpu")
                and self.traced_through_under_autocast(type(m))):
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InPlaceProxy(node, self)

    def create_node(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                    name: str | None = None, type_expr: Any | None = None) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind not in ("placeholder", "output"):
            own = self._own_checkpoint(node)
            refuse_unmodelled_context(node, self.module_stack, checkpointed=own)
            state = self._autocast_state()
            if state is not None:
                node.meta[AUTOCAST_STATE] = state
        if kind in ("call_function", "call_module") and self.meta_function_for is not None:
            replacement = self._meta_function(target if kind == "call_function"
                                              else type(self.root.get_submodule(str(target))))
            if replacement is not None:
                node.meta[PROPAGATE_AS] = replacement
        return node

    def _autocast_state(self) -> "AutocastState | None":
        """The CPU autocast state a node is created in (None: autocast off). fx records no
        context manager, so it is read here, as the node is made."""
        # torch.autocast counts its nesting for the weight cache, which it clears when the count
        # returns to 0; the count has no getter, but incrementing returns it.
        nested = torch.autocast_increment_nesting() > 1
        torch.autocast_decrement_nesting()
        if nested and not self._autocast_nested:
            self._autocast_regions += 1
        self._autocast_nested = nested
        if not torch.is_autocast_enabled("cpu"):
            return None
        cached = nested and torch.is_autocast_cache_enabled()
        return AutocastState(torch.get_autocast_dtype("cpu"), self._autocast_regions if cached else None)

    def _meta_function(self, target: Any) -> Callable[..., Any] | None:
        try:
            if target not in self._meta_functions:
                self._meta_functions[target] = self.meta_function_for(target)
            return self._meta_functions[target]
        except TypeError:  # an unhashable target: asked every time
            return self.meta_function_for(target)

    def _own_checkpoint(self, node: fx.Node) -> bool:
        """Whether ``node`` is created inside the model's own ``torch.utils.checkpoint(module, ...,
        use_reentrant=False)``: its saved-tensor hooks are checkpoint's, whose frame holds the
        module (the function it recomputes) and the call's arguments. The node joins that call's
        region, modelled as ``--checkpoint`` models one. A checkpoint of a plain function (whose
        recomputation allocates ACT or TEMP by the modules it calls) or inside another
        checkpointed region is left to ``refuse_unmodelled_context``."""
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
        if hooks is None or not getattr(hooks[0], "_checkpoint_internal", False) or self._in_checkpoint:
            return False
        frame = _closure_value(hooks[0], "frame")
        module = _closure_value(getattr(frame, "recompute_fn", None), "fn")
        if not isinstance(module, nn.Module):
            return False
        call = self._own_calls.get(id(frame))
        if call is None:
            arguments = tuple(a.node for a in getattr(frame, "saved_args", ()) if isinstance(a, fx.Proxy))
            call = self._own_calls[id(frame)] = [self.path_of_module(module), arguments, node, node, frame]
        call[3] = node
        return True

    def own_checkpoint_calls(self) -> list[CheckpointCall]:
        """The model's own checkpointed calls (``_own_checkpoint``), in graph order."""
        return [CheckpointCall(name, arguments, first, last) for name, arguments, first, last, _ in self._own_calls.values()]

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        qualname = self.path_of_module(m)
        if id(m) in self.checkpointed and not self._in_checkpoint:
            self.checkpointed_called.add(id(m))
            self._in_checkpoint = True
            before = _last_node(self.graph)
            try:
                result = self.call_module(m, forward, args, kwargs)
            finally:
                self._in_checkpoint = False
            last = _last_node(self.graph)
            if last is not before:
                arguments = tuple(a.node for a in tree_flatten((args, kwargs))[0] if isinstance(a, fx.Proxy))
                self.checkpoint_calls.append(CheckpointCall(qualname, arguments, before.next, last))
            return result
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        stand_in = self.forward_for(m) if self.forward_for is not None else None
        if stand_in is not None:
            forward = stand_in
        before = _last_node(self.graph)
        result = super().call_module(m, forward, args, kwargs)
        last = _last_node(self.graph)
        arguments = tuple(a.node for a in tree_flatten((args, kwargs))[0] if isinstance(a, fx.Proxy))
        if last is not before and arguments:
            self.module_calls.append(ModuleCall(qualname, arguments, last))
        return result


# Device types whose autocast state is checked while tracing (torch.autocast's own device types).
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def refuse_unmodelled_context(node: fx.Node, module_stack: Mapping[str, Any], checkpointed: bool = False) -> None:
    """Refuse a node that the model's forward creates in a context fx does not record.

    fx traces by running the forward with proxies, so a context manager in it (another device's
    ``torch.autocast``, ``torch.no_grad``, the saved-tensor hooks ``torch.utils.checkpoint``
    installs) changes nothing in the graph: its nodes would be predicted as plain fp32 ops that
    autograd records and saves for, a silently wrong number. The state is visible while the node
    is created, so such a node is refused by name. (CPU autocast is recorded instead, as
    ``AutocastState``, and made explicit by ``costmodel.autocast``.) Gradients disabled covers
    ``torch.no_grad()``, ``torch.utils.checkpoint(..., use_reentrant=True)`` and a custom
    ``torch.autograd.Function`` (its forward runs with grad mode off); saved-tensor hooks cover ``use_reentrant=False`` checkpoints and
    ``torch.autograd.graph.save_on_cpu``, except a checkpointed module call the tracer models
    (``checkpointed``: ``StepTracer._own_checkpoint``)."""
    where = f"node {node.name!r}"
    module = next(reversed(module_stack), "") if module_stack else ""
    if module:
        where += f" (in module {module.removeprefix(MODEL_PREFIX)!r})"
    for device in _AUTOCAST_DEVICES:
        if device != "cpu" and torch.is_autocast_enabled(device):
            raise CostModelError(
                f"{where} runs under torch.autocast({device!r}, dtype={torch.get_autocast_dtype(device)}) in the "
                f"model's forward: the engine models the CPU step, whose autocast is torch.autocast('cpu'); "
                f"remove the region, or make it a CPU one")
    if not torch.is_grad_enabled():
        raise CostModelError(
            f"{where} runs with gradients disabled in the model's forward (torch.no_grad, a custom "
            f"torch.autograd.Function or torch.utils.checkpoint(use_reentrant=True)): the engine cannot model "
            f"what autograd records there; remove it to predict the step without it")
    if not checkpointed and torch._C._autograd._top_saved_tensors_default_hooks(True) is not None:
        raise CostModelError(
            f"{where} runs under saved-tensor hooks in the model's forward (torch.autograd.graph.saved_tensors_hooks, "
            f"save_on_cpu, or torch.utils.checkpoint of a function rather than a module, or nested): the engine "
            f"models checkpoint(module, ..., use_reentrant=False) only; checkpoint modules (--checkpoint)")


def _closure_value(function: Any, name: str) -> Any:
    """The value of free variable ``name`` in ``function``'s closure, or None."""
    code = getattr(function, "__code__", None)
    if code is None or name not in code.co_freevars or function.__closure__ is None:
        return None
    try:
        return function.__closure__[code.co_freevars.index(name)].cell_contents
    except ValueError:  # an empty cell
        return None


def _last_node(graph: fx.Graph) -> fx.Node | None:
    return next(iter(reversed(graph.nodes)), None)


# Code that is not the model's own: PyTorch (fx's machinery, Module.__call__, functionals), the
# standard library (imports, weak-reference callbacks that run while tracing) and frozen modules.
# Only frames of model code called from the traced forward are watched; others are never touched.
_TORCH_CODE = os.path.dirname(torch.__file__) + os.sep
_STDLIB_CODE = sysconfig.get_paths()["stdlib"] + os.sep
_INSTALLED_CODE = tuple({sysconfig.get_paths()[key] + os.sep for key in ("purelib", "platlib")})


def _is_model_code(filename: str) -> bool:
    if filename.startswith(("<", _TORCH_CODE)):
        return False
    return not filename.startswith(_STDLIB_CODE) or filename.startswith(_INSTALLED_CODE)


def _proxy_nodes(values: Iterable[Any]) -> set[fx.Node]:
    """The graph nodes behind the proxies among ``values`` (and one level into lists, tuples, dicts)."""
    nodes: set[fx.Node] = set()
    for value in values:
        if isinstance(value, fx.Proxy):
            nodes.add(value.node)
        elif isinstance(value, (list, tuple)):
            nodes.update(item.node for item in value if isinstance(item, fx.Proxy))
        elif isinstance(value, dict):
            nodes.update(item.node for item in value.values() if isinstance(item, fx.Proxy))
    return nodes


_NOT_MODEL_CODE: set[types.CodeType] = set()


class _LocalsWatcher:
    """Which traced values the model's own Python frames keep in local variables, and until when.

    Eager PyTorch frees a tensor when its last reference goes; a local variable holds its value
    until it is rebound or its function returns (``y = f(x); return g(h(y))`` keeps ``y`` alive
    through ``g``), which the graph alone does not tell. While tracing, a ``sys.settrace`` hook looks
    at the locals of every frame of model code before each line and when the frame returns: a value
    that is no longer held was released after the last node created so far.
    """

    def __init__(self, tracer: "StepTracer") -> None:
        self.tracer = tracer
        self.held: dict[types.FrameType, set[fx.Node]] = {}
        # value node -> the last node created before a frame let go of it
        self.released_after: dict[fx.Node, fx.Node] = {}
        self._own_code = {f.__code__ for cls in (StepTracer, _InPlaceProxy, _LocalsWatcher)
                          for f in vars(cls).values() if isinstance(f, types.FunctionType)}
        self._elsewhere = _NOT_MODEL_CODE  # code objects that are not model code (shared: they stay so)

    def _called_from_model(self, frame: types.FrameType) -> bool:
        if frame.f_code is TrainingStep.forward.__code__:
            return True
        caller = frame.f_back
        while caller is not None:
            if caller in self.held:
                return True
            caller = caller.f_back
        return False

    def on_call(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        # Called for every Python call while tracing (a hundred thousand in PyTorch and fx for a
        # MobileNet with adapters): code that is not the model's is recognised by one set lookup.
        code = frame.f_code
        if code in self._elsewhere:
            return None
        if code in self._own_code or not _is_model_code(code.co_filename):
            self._elsewhere.add(code)
            return None
        if event != "call" or not self._called_from_model(frame):
            return None
        self.held[frame] = set()
        return self.on_line

    def on_line(self, frame: types.FrameType, event: str, arg: Any) -> Any:
        if event not in ("line", "return"):
            return self.on_line
        now = _proxy_nodes(frame.f_locals.values())
        before = self.held.get(frame, set())
        last = _last_node(self.tracer.graph)
        for node in (before - now) if event == "line" else (before | now):
            self.released_after[node] = last
        if event == "return":
            self.held.pop(frame, None)
        else:
            self.held[frame] = now
        return self.on_line

    def __enter__(self) -> "_LocalsWatcher":
        self._previous = sys.gettrace()
        sys.settrace(self.on_call)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(self._previous)


@dataclass
class TracedStep:
    """The prepared meta-device model and its traced training step (shape-independent)."""

    model: nn.Module
    step_module: TrainingStep
    graph_module: fx.GraphModule
    prepared: PreparedMethod
    module_calls: list[ModuleCall] = field(default_factory=list)
    # Value node -> the last node after which no local variable of model code holds it.
    local_releases: dict[fx.Node, fx.Node] = field(default_factory=dict)
    # Shape propagation results and templates, filled by costmodel.shapes.
    shape_cache: OrderedDict[tuple[int, int], Any] = field(default_factory=OrderedDict)
    shape_templates: list[Any] = field(default_factory=list)
    template_attempts: int = 0
    concrete_shapes: int = 0
    # What costmodel.graph derives from the structure alone (module parameters, liveness).
    graph_cache: dict[str, Any] = field(default_factory=dict)
    # The images' channels (``StepConfig.channels``): part of the structure, since every size
    # propagated from the input depends on it.
    channels: int = 3
    # The loss's target for a batch size (``StepConfig.loss`` through ``costmodel_loss``, with
    # ``StepConfig.classes`` bound): ``batch -> a meta placeholder`` of the target's shape and dtype,
    # the batch concrete or symbolic. Set by ``trace_model``.
    target: Callable[[Any], torch.Tensor] | None = None
    # The images' dtype (``StepConfig.dtype``), part of the structure like the channels.
    dtype: torch.dtype = torch.float32
    # The calls of the modules ``StepConfig.checkpoint`` names, in graph order.
    checkpoint_calls: list[CheckpointCall] = field(default_factory=list)

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def prepare_method(manager: pluggy.PluginManager, model: nn.Module, config: StepConfig) -> PreparedMethod:
    """Ask the method plugins to apply ``config.method`` to ``model`` (mutated in place); a plugin
    that raises or answers wrongly is a ``CostModelError`` naming it (``costmodel.plugin_calls``).

    The options are checked and coerced against the method's declaration first
    (``costmodel.options``), so that every entry point (the Python API, sweeps, the CLI) refuses a
    bad option in one line and the plugin reads ready values. A method that takes no rank still
    gets ``config.rank`` (the API always has one); its note says the rank is unused."""
    from dataclasses import replace

    from costmodel.options import checked_config, unknown_method

    config, declared = checked_config(manager, config)
    prepared = ask_first(manager, PREPARE_METHOD, name=config.method, model=model, config=config)
    if prepared is None:
        raise unknown_method(manager, config.method)
    if config.quantize and not prepared.quantized:
        raise CostModelError(f"--quantize {config.quantize}: method {config.method!r} does not train on a quantized "
                             f"base (a quantized base is frozen; LoRA trains adapters on top of it)")
    if declared is not None and not declared.takes_rank:
        prepared = replace(prepared, note=f"{prepared.note}; rank {config.rank} unused "
                                          f"({config.method} takes no rank)")
    return prepared


def for_phase(model: nn.Module, config: StepConfig) -> None:
    """Make a prepared model run what ``config.phase`` runs: unchanged for a training step; for an
    evaluation pass, eval mode (batch norm normalises with its running statistics, dropout passes
    its input through) and no parameter requiring grad, which is what ``torch.no_grad()`` amounts
    to for the forward: autograd records no op, so nothing is saved for a backward."""
    if config.phase == EVALUATION:
        model.eval()
        for parameter in model.parameters():
            parameter.requires_grad_(False)


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the meta device.

    The user's model is neither modified nor has its weights copied: each parameter and buffer is
    replaced by a meta tensor of the same shape, dtype and ``requires_grad`` before copying.
    """
    memo: dict[int, Any] = {}
    for tensor in model.parameters():
        memo[id(tensor)] = nn.Parameter(torch.empty_like(tensor, device="meta"), requires_grad=tensor.requires_grad)
    for tensor in model.buffers():
        memo[id(tensor)] = torch.empty_like(tensor, device="meta")
    return copy.deepcopy(model, memo)


# A module's own containers, fingerprinted separately (parameters, buffers) or through the walk
# (submodules).
MODULE_CONTAINERS = frozenset({"_parameters", "_buffers", "_modules"})


def state_key(value: Any) -> Any:
    """A hashable fingerprint of a module attribute's value: tensors by shape, dtype, device and
    ``requires_grad``; containers item by item; anything else by its repr."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type, bool(value.requires_grad))
    if isinstance(value, (dict, OrderedDict)):
        return tuple((repr(k), state_key(v)) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [state_key(v) for v in value]
        return (type(value).__name__, tuple(sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items))
    # Anything else by its repr: an object without a value-like repr shows its address, so two
    # different objects never look alike (no reuse rather than a wrong one).
    return repr(value)


def structure_key(model: nn.Module, prepared: PreparedMethod) -> tuple[Any, ...]:
    """Everything tracing and shape propagation can see of a prepared model: every module's class
    and attributes, every parameter's and buffer's name, shape, dtype and ``requires_grad``, and
    the leaf module types. Two models with equal keys trace to the same graph with the same facts,
    so they can share one trace (only ``prepared.param_groups`` may differ)."""
    modules = []
    for name, module in model.named_modules(remove_duplicate=False):
        state = tuple((attr, state_key(value)) for attr, value in sorted(vars(module).items())
                      if attr not in MODULE_CONTAINERS)
        tensors = tuple((local, state_key(t)) for local, t in
                        (*module._parameters.items(), *module._buffers.items()))
        modules.append((name, type(module), state, tensors))
    # Shared parameters: which names point at one tensor.
    shared = tuple(name for name, _ in model.named_parameters(remove_duplicate=False))
    return (tuple(modules), shared, tuple(prepared.leaf_modules))


def altered_copy(module: nn.Module, tensors: Mapping[str, torch.Tensor],
                 attributes: Mapping[tuple[str, str], Any]) -> nn.Module:
    """A copy of ``module`` in which some parameters or buffers (``tensors``: qualified name below
    ``module`` -> tensor) and some plain attributes (``(submodule name, attribute)`` -> value, ``""``
    for ``module`` itself) are replaced. Only the modules on the way to a change are copied
    (shallowly: their containers are new dicts); everything else, ``module`` included, is shared and
    never modified, so a cached traced model can be run or costed at another size by many callers."""
    copies: dict[str, nn.Module] = {}

    def copy_of(path: str) -> nn.Module:
        found = copies.get(path)
        if found is not None:
            return found
        if path:
            parent_path, _, local = path.rpartition(".")
            parent = copy_of(parent_path)
            duplicate = copy.copy(parent._modules[local])
            parent._modules[local] = duplicate
        else:
            duplicate = copy.copy(module)
        for container in MODULE_CONTAINERS:  # the copy's own dicts: changing them changes only it
            object.__setattr__(duplicate, container, dict(getattr(duplicate, container)))
        copies[path] = duplicate
        return duplicate

    for qualified, tensor in tensors.items():
        owner_path, _, local = qualified.rpartition(".")
        owner = copy_of(owner_path)
        container = owner._parameters if local in owner._parameters else owner._buffers
        container[local] = tensor
    for (owner_path, attribute), value in attributes.items():
        object.__setattr__(copy_of(owner_path), attribute, value)
    return copy_of("") if (tensors or attributes) else module


def trace_model(model: nn.Module, prepared: PreparedMethod, name: str = "", channels: int = 3, *,
                loss: LossSpec | None = None, classes: int = StepConfig.classes,
                micro_batches: int = StepConfig.accumulate, dtype: torch.dtype = torch.float32,
                checkpointed: Sequence[tuple[str, nn.Module]] = (),
                manager: pluggy.PluginManager | None = None, autocast: torch.dtype | None = None,
                probe: tuple[int, int] = (StepConfig.batch, StepConfig.resolution)) -> TracedStep:
    """Trace ``training_loss(criterion, model(images), labels)`` for a prepared meta-device model,
    ``criterion`` and the labels' shape and dtype from ``loss`` (None: the default configuration's
    loss, as the default plugins describe it) for ``classes`` classes; divided by ``micro_batches``
    when that is more than 1 (``StepConfig.accumulate``: ``models.TrainingStep``); the images, and
    a floating target, in ``dtype``; each call of the ``checkpointed`` modules recorded as a
    :class:`CheckpointCall` (``checkpoint_modules``); a module's forward replaced by the stand-in
    a plugin of ``manager`` gives (``costmodel_module_forward``; None: the default plugins), and a
    function node marked with what shape propagation calls for it (``costmodel_meta_function``).
    ``autocast``: the forward and the loss under ``torch.autocast("cpu", dtype=autocast)``; the
    casts autocast makes there, and in the model's own CPU autocast regions, become graph nodes
    (``costmodel.autocast``), placed by one run on ``probe`` = (batch, resolution) images."""
    if manager is None:
        from costmodel.registry import default_plugin_manager

        manager = default_plugin_manager()
    if loss is None:
        loss = loss_spec(manager, StepConfig.loss)
    step_module = TrainingStep(model, loss.criterion(), micro_batches, autocast)
    forwards, meta_functions = HookAsker(manager, MODULE_FORWARD), HookAsker(manager, META_FUNCTION)
    policies = HookAsker(manager, AUTOCAST_POLICY)

    def policy(kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return policies.first(kind=kind, target=target, args=args, kwargs=kwargs)

    tracer = StepTracer(tuple(prepared.leaf_modules), frozenset(id(module) for _, module in checkpointed),
                        forward_for=lambda module: forwards.first(module=module),
                        meta_function_for=lambda target: meta_functions.first(target=target),
                        traced_through_under_autocast=functools.lru_cache(None)(
                            lambda kind: policy("call_module", kind, (), {}) == "through"))
    watcher = _LocalsWatcher(tracer)
    try:
        # Traced with gradients on whatever the caller's mode: a node with them off is the forward's own.
        with watcher, torch.enable_grad():
            graph = tracer.trace(step_module)
    except CostModelError:
        raise
    except Exception as error:
        label = name or type(model).__name__
        raise CostModelError(
            f"cannot trace {label} with torch.fx ({type(error).__name__}: {error}); a method plugin "
            f"can keep the offending module whole by listing its type in PreparedMethod.leaf_modules"
        ) from None
    never = [name for name, module in checkpointed if id(module) not in tracer.checkpointed_called]
    if never:  # a container iterated by the forward (a ModuleList), or a module it does not use
        raise CostModelError(f"--checkpoint: the forward never calls {', '.join(never)}; checkpoint the modules it "
                             f"calls (for a container, its children: '{never[0]}.*')")
    graph_module = fx.GraphModule(step_module, graph, "TrainingStep")
    local_releases = watcher.released_after
    from costmodel.autocast import has_autocast, place_autocast_casts  # it builds on this module's interpreter

    if has_autocast(graph):
        trained = {param.name for group in prepared.param_groups for param in group.params}
        probe_step = TracedStep(model, step_module, graph_module, prepared, channels=channels,
                           target=functools.partial(loss.target, classes=classes, floating=dtype), dtype=dtype)
        try:
            local_releases.update(place_autocast_casts(
                graph_module, step_inputs(probe_step, probe[0] * micro_batches, probe[1]), policy,
                lambda node: f"{node.op} {getattr(node.target, '__name__', node.target)}",
                lambda node: str(node.target).removeprefix(MODEL_PREFIX) in trained))
        except CostModelError:
            raise
        except Exception as error:
            raise CostModelError(f"cannot place the autocast casts of {name or type(model).__name__} "
                                 f"({type(error).__name__}: {str(error).strip().splitlines()[0]})") from None
    return TracedStep(model, step_module, graph_module, prepared, tracer.module_calls, local_releases,
                      channels=channels, target=functools.partial(loss.target, classes=classes, floating=dtype),
                      dtype=dtype, checkpoint_calls=_in_graph_order(graph, tracer.checkpoint_calls
                                                                    + tracer.own_checkpoint_calls()))


def _in_graph_order(graph: fx.Graph, calls: list[CheckpointCall]) -> list[CheckpointCall]:
    position = {node: index for index, node in enumerate(graph.nodes)}
    return sorted(calls, key=lambda call: position[call.first])


def checkpoint_modules(model: nn.Module, config: StepConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``config.checkpoint`` names in ``model`` before its method is applied
    (``models.checkpointed_modules``; none for an evaluation pass, which saves nothing for a
    backward)."""
    if config.phase == EVALUATION:
        return []
    return checkpointed_modules(model, config.checkpoint, config.model)


def prepare_step(manager: pluggy.PluginManager, model: nn.Module,
                 config: StepConfig) -> tuple[PreparedMethod, list[tuple[str, nn.Module]]]:
    """Make ``model`` what ``config``'s step runs, in place: the modules to checkpoint found
    (``checkpoint_modules``, by the names the model has before its method), the method applied,
    those modules checked to be still there, and the phase's mode set (``for_phase``). The method's
    preparation and the checkpointed modules."""
    checkpointed = checkpoint_modules(model, config)
    prepared = prepare_method(manager, model, config)
    check_checkpointed(model, checkpointed)
    for_phase(model, config)
    return prepared, checkpointed


def trace_config(config: StepConfig, manager: pluggy.PluginManager, model: nn.Module | None = None) -> TracedStep:
    """Build (or copy to meta) the model, let the method plugin prepare it, and trace the step."""
    loss = loss_spec(manager, config.loss)  # an unknown loss is refused before any work
    if model is None:
        model = step_model(config)
    else:
        model = meta_copy(in_step_dtype(model, config, label=config.model)).train()
    prepared, checkpointed = prepare_step(manager, model, config)
    return trace_model(model, prepared, config.model, config.channels, loss=loss, classes=config.classes,
                       micro_batches=config.micro_batches, dtype=step_dtype(config), checkpointed=checkpointed,
                       manager=manager, autocast=autocast_dtype(config), probe=(config.batch, config.resolution))


# The node meta key of a plugin's replacement for the node's function in shape propagation.
PROPAGATE_AS = "costmodel_propagate_as"


class MetaInterpreter(fx.Interpreter):
    """An interpreter for shape propagation: a ``call_function`` or ``call_module`` node with a
    plugin's replacement (``costmodel_meta_function``, in ``node.meta[PROPAGATE_AS]``) calls the
    replacement (a module's with the module first)."""

    _running: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self._running = n
        return super().run_node(n)

    def call_function(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        replacement = self._running.meta.get(PROPAGATE_AS) if self._running is not None else None
        return (replacement or target)(*args, **kwargs)

    def call_module(self, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        replacement = self._running.meta.get(PROPAGATE_AS) if self._running is not None else None
        if replacement is None:
            return super().call_module(target, args, kwargs)
        return replacement(self.fetch_attr(str(target)), *args, **kwargs)


class Recorder(MetaInterpreter):
    """Runs the graph on meta tensors and keeps every node's result (never freed during the run,
    so that storage identities stay unique).

    ``same_tensor`` maps ``(node, k)``, the ``k``-th tensor of a node's result, to the earlier value
    it *is*: the very tensor object, with the same autograd history (``grad_fn``) and no in-place
    change since (``_version``). Such a node (``nn.Identity``, ``x.contiguous()`` on a contiguous
    tensor, a cast to the tensor's own dtype) makes no autograd node, so autograd sends the
    gradients of its consumers straight to the earlier value. An in-place op returns the same object
    too, but with a new ``grad_fn`` and version: it is a value of its own.
    """

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module, garbage_collect_values=False)
        self.results: dict[fx.Node, Any] = {}
        self.current: fx.Node | None = None
        self.same_tensor: dict[tuple[fx.Node, int], tuple[fx.Node, int]] = {}
        # id(tensor) -> (the value that produced it, its grad_fn and version then); results are
        # never freed during the run, so ids are not reused.
        self._history: dict[int, tuple[tuple[fx.Node, int], Any, int]] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        result = super().run_node(n)
        self.results[n] = result
        for k, tensor in enumerate(flatten_tensors(result)):
            seen = self._history.get(id(tensor))
            if seen is not None and seen[1] is tensor.grad_fn and seen[2] == tensor._version:
                self.same_tensor[(n, k)] = seen[0]
            else:
                self._history[id(tensor)] = ((n, k), tensor.grad_fn, tensor._version)
        return result


def step_inputs(traced: TracedStep, batch: Any, resolution: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's two inputs on the meta device: ``batch`` images of ``channels`` x ``resolution``
    x ``resolution`` and the loss's target (sizes may be symbolic). The one place they are made,
    for a concrete propagation, a shape template and a template over many configurations."""
    images = torch.empty(batch, traced.channels, resolution, resolution, dtype=traced.dtype, device="meta")
    return images, traced.target(batch)


def propagate(traced: TracedStep, batch: int, resolution: int) -> Recorder:
    """Run the graph on a batch of ``batch`` images of ``resolution`` pixels, on meta tensors: the
    recorder holds every node's result and which results are an earlier value itself."""
    recorder = Recorder(traced.graph_module)
    try:
        # Inside the try: a batch too large for any tensor (its storage size overflows) is the
        # user's size, said as such, not an internal error.
        images, labels = step_inputs(traced, batch, resolution)
        with torch.enable_grad(), meta_kernel_memo():  # repeated kernel calls: costmodel.meta_memo
            recorder.run(images, labels)
    except Exception as error:
        node = recorder.current
        where = f" at node {node.name!r}" if node is not None else ""
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""  # fx appends the graph
        raise CostModelError(
            f"shape propagation failed{where} for batch={batch}, resolution={resolution}"
            f"{'' if traced.channels == 3 else f', channels={traced.channels}'}: "
            f"{type(error).__name__}: {message}"
        ) from None
    return recorder


def flatten_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a (nested) node result or argument structure, in order."""
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, torch.Tensor)]


def iter_params(module: nn.Module) -> Iterable[tuple[str, torch.Tensor, bool]]:
    """(local name, tensor, is_buffer) for every parameter and buffer of ``module`` and below."""
    for name, param in module.named_parameters():
        yield name, param, False
    for name, buffer in module.named_buffers():
        yield name, buffer, True
