"""Asking the plugins: every hook call of the engine goes through here, so that a broken plugin is
named in a one-line :class:`CostModelError` instead of surfacing as an internal error or as a
wrong number.

A ``firstresult`` hook is asked implementation by implementation, in the order pluggy itself would
ask them (last registered first, ``tryfirst`` / ``trylast`` respected: the reverse of
``HookCaller.get_hookimpls()``), so the engine knows which plugin answered. Each hook has a
:class:`HookContract`: how to describe what a call is about (a node and its op, an optimizer's
parameter group, a method, a loss) and how to check an answer (its type; every FLOP and byte count a
non-negative integer, or a numpy integer array of them where ``costmodel.ranks`` asks for many
ranks at once). An exception from a plugin, or an answer that breaks the contract, becomes a
:class:`PluginFailure` naming the plugin, the hook and the subject.

A ``CostModelError`` a plugin raises itself passes through unchanged: it is the documented way
for a plugin to refuse bad input (a rank a layer cannot take), with a message already meant for
the user.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pluggy
import torch
from torch import nn

from costmodel.costs import (Alloc, Flops, LossSpec, MemEvent, OpCost, OptimizerCost, ParamGroup, ParamMeta,
                             PreparedMethod, SavedRef, describe_op, differ)
from costmodel.errors import CostModelError


class PluginFailure(CostModelError):
    """A plugin raised, or answered a hook with something that breaks the hook's contract.

    ``plugins`` holds the registered name (entry point name, or module name) of the plugin that
    failed - or, where a hook wrapper made pluggy run the implementations together, of every
    plugin that may have; ``hook`` is the hook, ``subject`` what the call was about."""

    def __init__(self, plugins: Sequence[str], hook: str, subject: str, problem: str) -> None:
        who = f"plugin {plugins[0]!r}" if len(plugins) == 1 else \
            f"one of the plugins {', '.join(map(repr, plugins))} (run together around a hook wrapper)"
        super().__init__(one_line(f"{who} failed in {hook} for {subject}: {problem}"))
        self.plugins = tuple(plugins)
        self.hook = hook
        self.subject = subject


def one_line(text: str) -> str:
    """``text`` with its line breaks folded, for a message the CLI prints on one line."""
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


class BadAnswer(Exception):
    """Raised by a contract's check: the message says which part of the answer is wrong and why."""


# -- checking answers. The checks run on every answer (the op hook answers once per node), so the
# common case - a plain int, a tuple of the right dataclasses - is tested first and cheaply.

_COUNT_TYPES = (int, np.integer)


def _check_count(value: Any, where: str) -> None:
    """A FLOP or byte count: a non-negative integer (not a bool), or - for many ranks at once - a
    numpy integer array of them."""
    if type(value) is int:
        if value >= 0:
            return
    elif isinstance(value, np.ndarray):
        if value.dtype.kind in "iu" and (value.size == 0 or value.min() >= 0):
            return
    elif isinstance(value, _COUNT_TYPES) and not isinstance(value, bool) and value >= 0:
        return
    raise BadAnswer(f"{where} is {_shown(value)}, not a non-negative integer")


def _check_signed(value: Any, where: str) -> None:
    """A byte change that may be negative (a freed allocation): an integer or integer array."""
    if type(value) is int or (isinstance(value, np.integer) and not isinstance(value, bool)):
        return
    if isinstance(value, np.ndarray) and value.dtype.kind in "iu":
        return
    raise BadAnswer(f"{where} is {_shown(value)}, not an integer")


def _check_type(value: Any, kind: type | tuple[type, ...], where: str) -> None:
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise BadAnswer(f"{where} is {_shown(value)}, not {names}")


def _check_sequence(value: Any, where: str) -> None:
    if not isinstance(value, (tuple, list)):
        raise BadAnswer(f"{where} is {_shown(value)}, not a tuple or list")


def _check_flops(value: Any, where: str) -> None:
    _check_type(value, Flops, where)
    _check_count(value.torch, f"{where}.torch")
    _check_count(value.exact, f"{where}.exact")


_LIFETIMES = frozenset({"output", "saved", "transient"})
_SAVED_FROM = frozenset({"input", "output"})


def _check_allocs(allocs: Any, where: str) -> None:
    _check_sequence(allocs, where)
    for i, alloc in enumerate(allocs):
        if type(alloc) is not Alloc:
            _check_type(alloc, Alloc, f"{where}[{i}]")
        _check_count(alloc.nbytes, f"{where}[{i}].nbytes")
        if alloc.lifetime not in _LIFETIMES:
            raise BadAnswer(f"{where}[{i}].lifetime is {_shown(alloc.lifetime)}, not one of "
                            f"{', '.join(sorted(_LIFETIMES))}")
        _check_count(alloc.index, f"{where}[{i}].index")


def _plain_op_cost(answer: Any) -> bool:
    """Whether ``answer`` is an ``OpCost`` of plain non-negative ints throughout: the common case,
    tested without building a message or descending through the detailed checks (the op hook
    answers once per node of every prediction)."""
    if type(answer) is not OpCost:
        return False
    forward, backward = answer.forward, answer.backward
    if type(forward) is not Flops or type(backward) is not Flops:
        return False
    counts = (forward.torch, forward.exact, backward.torch, backward.exact)
    if any(type(count) is not int or count < 0 for count in counts):
        return False
    for allocs in (answer.forward_allocs, answer.backward_allocs):
        if type(allocs) is not tuple:
            return False
        for alloc in allocs:
            if (type(alloc) is not Alloc or type(alloc.nbytes) is not int or alloc.nbytes < 0
                    or alloc.lifetime not in _LIFETIMES or type(alloc.index) is not int or alloc.index < 0):
                return False
    if type(answer.saved) is not tuple or type(answer.input_grads) is not tuple or type(answer.param_grads) is not dict:
        return False
    if answer.input_grad_steps or answer.kept_by_node:  # rare: the detailed checks
        return False
    for ref in answer.saved:
        if type(ref) is not SavedRef or ref.of not in _SAVED_FROM or type(ref.index) is not int or ref.index < 0:
            return False
    for nbytes in answer.input_grads:
        if nbytes is not None and (type(nbytes) is not int or nbytes < 0):
            return False
    for name, nbytes in answer.param_grads.items():
        if type(name) is not str or type(nbytes) is not int or nbytes < 0:
            return False
    late = answer.late_param_grads
    if type(late) is not tuple or any(name not in answer.param_grads for name in late):
        return False
    return type(answer.note) is str


def check_op_cost(answer: Any) -> None:
    """An :class:`OpCost` whose FLOPs and bytes are non-negative integers."""
    if _plain_op_cost(answer):
        return
    # Arrays over ranks, numpy scalars, lists, subclasses - or a broken answer: the detailed
    # checks accept the first and say what is wrong with the last.
    if type(answer) is not OpCost:
        _check_type(answer, OpCost, "the answer")
    _check_flops(answer.forward, "OpCost.forward")
    _check_flops(answer.backward, "OpCost.backward")
    _check_allocs(answer.forward_allocs, "OpCost.forward_allocs")
    _check_allocs(answer.backward_allocs, "OpCost.backward_allocs")
    _check_refs(answer.saved, "OpCost.saved")
    grads = answer.input_grads
    _check_sequence(grads, "OpCost.input_grads")
    for i, nbytes in enumerate(grads):
        if nbytes is not None:
            _check_count(nbytes, f"OpCost.input_grads[{i}]")
    _check_type(answer.param_grads, dict, "OpCost.param_grads")
    for name, nbytes in answer.param_grads.items():
        _check_type(name, str, "a key of OpCost.param_grads")
        _check_count(nbytes, f"OpCost.param_grads[{name!r}]")
    _check_late_grads(answer)
    _check_refs(answer.kept_by_node, "OpCost.kept_by_node")
    _check_type(answer.input_grad_steps, dict, "OpCost.input_grad_steps")
    for i, steps in answer.input_grad_steps.items():
        if type(i) is not int or not 0 <= i < len(grads) or grads[i] is None:
            raise BadAnswer(f"OpCost.input_grad_steps has key {_shown(i)}, not the index of an input with a gradient")
        _check_sequence(steps, f"OpCost.input_grad_steps[{i}]")
        if not steps:
            raise BadAnswer(f"OpCost.input_grad_steps[{i}] is empty")
        for k, nbytes in enumerate(steps):
            _check_count(nbytes, f"OpCost.input_grad_steps[{i}][{k}]")
        if differ(steps[-1], grads[i]):
            raise BadAnswer(f"OpCost.input_grad_steps[{i}] ends at {_shown(steps[-1])} bytes, not at "
                            f"OpCost.input_grads[{i}] = {_shown(grads[i])}")
    _check_type(answer.note, str, "OpCost.note")


def _check_refs(refs: Any, field: str) -> None:
    """A sequence of :class:`SavedRef` to an input or an output."""
    _check_sequence(refs, field)
    for i, ref in enumerate(refs):
        _check_type(ref, SavedRef, f"{field}[{i}]")
        if ref.of not in _SAVED_FROM:
            raise BadAnswer(f"{field}[{i}].of is {_shown(ref.of)}, not 'input' or 'output'")
        _check_count(ref.index, f"{field}[{i}].index")


def _check_late_grads(answer: OpCost) -> None:
    _check_sequence(answer.late_param_grads, "OpCost.late_param_grads")
    for name in answer.late_param_grads:
        if name not in answer.param_grads:
            raise BadAnswer(f"OpCost.late_param_grads names {_shown(name)}, which is not a key of OpCost.param_grads")


def check_optimizer_cost(answer: Any) -> None:
    """An :class:`OptimizerCost` with non-negative FLOPs and state, and integer memory events."""
    _check_type(answer, OptimizerCost, "the answer")
    _check_flops(answer.flops, "OptimizerCost.flops")
    _check_count(answer.state_bytes, "OptimizerCost.state_bytes")
    _check_count(answer.resident_bytes, "OptimizerCost.resident_bytes")
    _check_sequence(answer.events, "OptimizerCost.events")
    for i, event in enumerate(answer.events):
        if type(event) is not MemEvent:
            _check_type(event, MemEvent, f"OptimizerCost.events[{i}]")
        _check_signed(event.nbytes, f"OptimizerCost.events[{i}].nbytes")  # a free is negative
        _check_type(event.group, str, f"OptimizerCost.events[{i}].group")
    _check_type(answer.note, str, "OptimizerCost.note")


def check_prepared_method(answer: Any) -> None:
    """A :class:`PreparedMethod` whose parameter groups are :class:`ParamGroup` of :class:`ParamMeta`."""
    _check_type(answer, PreparedMethod, "the answer")
    _check_sequence(answer.param_groups, "PreparedMethod.param_groups")
    for i, group in enumerate(answer.param_groups):
        where = f"PreparedMethod.param_groups[{i}]"
        _check_type(group, ParamGroup, where)
        _check_type(group.optimizer, str, f"{where}.optimizer")
        _check_sequence(group.params, f"{where}.params")
        for j, param in enumerate(group.params):
            _check_type(param, ParamMeta, f"{where}.params[{j}]")
        _check_type(group.options, dict, f"{where}.options")
    _check_sequence(answer.leaf_modules, "PreparedMethod.leaf_modules")
    for i, kind in enumerate(answer.leaf_modules):
        if not (isinstance(kind, type) and issubclass(kind, nn.Module)):
            raise BadAnswer(f"PreparedMethod.leaf_modules[{i}] is {_shown(kind)}, not an nn.Module subclass")
    _check_type(answer.affine_in_rank, bool, "PreparedMethod.affine_in_rank")
    _check_type(answer.note, str, "PreparedMethod.note")


def check_method_names(answer: Any) -> None:
    """A list (or tuple) of method names; a bare string would be read as its letters."""
    _check_sequence(answer, "the answer")
    for i, name in enumerate(answer):
        _check_type(name, str, f"the answer[{i}]")


def check_loss_spec(answer: Any) -> None:
    """A :class:`LossSpec` whose criterion builds an ``nn.Module`` and whose target shape, for a
    batch of 1 and 2 classes, is a tuple of sizes >= 1, with a ``torch.dtype`` (the criterion and the
    shape are tried once here, so that a broken one is named now rather than deep in tracing)."""
    _check_type(answer, LossSpec, "the answer")
    _check_type(answer.target_dtype, torch.dtype, "LossSpec.target_dtype")
    for part in ("criterion", "target_shape"):
        if not callable(getattr(answer, part)):
            raise BadAnswer(f"LossSpec.{part} is {_shown(getattr(answer, part))}, not callable")
    try:
        criterion = answer.criterion()
    except Exception as error:
        raise BadAnswer(f"LossSpec.criterion() raised {type(error).__name__}: {error}") from None
    _check_type(criterion, nn.Module, "LossSpec.criterion()")
    try:
        shape = answer.target_shape(1, 2)
    except Exception as error:
        raise BadAnswer(f"LossSpec.target_shape(1, 2) raised {type(error).__name__}: {error}") from None
    _check_sequence(shape, "LossSpec.target_shape(1, 2)")
    for i, size in enumerate(shape):
        if type(size) is not int or size < 1:
            raise BadAnswer(f"LossSpec.target_shape(1, 2)[{i}] is {_shown(size)}, not an integer >= 1")


def _shown(value: Any) -> str:
    """A value for a message: its repr, cut short, with its type where the repr hides it."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


# -- what each hook's calls are about, for messages (only built when something failed)

def _about_op(kwargs: Mapping[str, Any]) -> str:
    node = kwargs["node"]
    return f"node {node.name!r} (op {describe_op(node)})"


def _about_optimizer(kwargs: Mapping[str, Any]) -> str:
    group, config = kwargs["group"], kwargs["config"]
    params = getattr(group, "params", None) or []
    first = f", first {params[0].name!r}" if params and hasattr(params[0], "name") else ""
    method = f" of method {config.method!r}" if hasattr(config, "method") else ""
    return (f"the {getattr(group, 'optimizer', '?')!r} parameter group{method} ({len(params)} parameters{first}) "
            f"at step {kwargs['step']}")


def _about_method(kwargs: Mapping[str, Any]) -> str:
    config = kwargs["config"]
    model = f" on model {config.model!r}" if hasattr(config, "model") else ""
    return f"method {kwargs['name']!r}{model}"


@dataclass(frozen=True)
class HookContract:
    """One hook, how to say what a call of it is about, and what its answers must be."""

    hook: str
    about: Callable[[Mapping[str, Any]], str]
    check: Callable[[Any], None]  # raises BadAnswer


OP_COST = HookContract("costmodel_op_cost", _about_op, check_op_cost)
OPTIMIZER_COST = HookContract("costmodel_optimizer_cost", _about_optimizer, check_optimizer_cost)
PREPARE_METHOD = HookContract("costmodel_prepare_method", _about_method, check_prepared_method)
METHOD_NAMES = HookContract("costmodel_method_names", lambda kwargs: "the method listing", check_method_names)
LOSS = HookContract("costmodel_loss", lambda kwargs: f"loss {kwargs['name']!r}", check_loss_spec)
OPTIMIZER_NAMES = HookContract("costmodel_optimizer_names", lambda kwargs: "the optimizer listing",
                               check_method_names)
# A list of names, checked as the method listing is.
LOSS_NAMES = HookContract("costmodel_loss_names", lambda kwargs: "the loss listing", check_method_names)


def check_module_forward(answer: Any) -> None:
    """A callable (a traceable forward, a propagation replacement) or None."""
    if answer is not None and not callable(answer):
        raise BadAnswer(f"the answer is {_shown(answer)}, not a callable or None")


MODULE_FORWARD = HookContract("costmodel_module_forward",
                              lambda kwargs: f"the forward of module {type(kwargs['module']).__name__}",
                              check_module_forward)
META_FUNCTION = HookContract("costmodel_meta_function",
                             lambda kwargs: f"shape propagation of {getattr(kwargs['target'], '__name__', kwargs['target'])!r}",
                             check_module_forward)

# What ``costmodel_autocast_policy`` may answer (``costmodel.hookspecs``).
AUTOCAST_POLICIES: tuple[str, ...] = ("lower", "fp32", "promote", "through", "unmodelled")


def check_autocast_policy(answer: Any) -> None:
    if answer is not None and answer not in AUTOCAST_POLICIES:
        raise BadAnswer(f"the answer is {_shown(answer)}, not one of {', '.join(AUTOCAST_POLICIES)} or None")


AUTOCAST_POLICY = HookContract("costmodel_autocast_policy",
                               lambda kwargs: f"the autocast policy of {kwargs['kind']} "
                                              f"{getattr(kwargs['target'], '__name__', kwargs['target'])!r}",
                               check_autocast_policy)


def check_flop_formulas(answer: Any) -> None:
    """A dict of ops (torch.ops packets or overloads) to callables."""
    if not isinstance(answer, dict):
        raise BadAnswer(f"the answer is {_shown(answer)}, not a dict of ops to formulas")
    for op, formula in answer.items():
        if not isinstance(op, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
            raise BadAnswer(f"key {_shown(op)} is not a torch.ops op (an overload packet or overload)")
        if not callable(formula):
            raise BadAnswer(f"the formula of {op} is {_shown(formula)}, not a callable")


EXACT_FLOP_FORMULAS = HookContract("costmodel_exact_flop_formulas", lambda kwargs: "the exact FLOP formulas",
                                   check_flop_formulas)


def _arguments_for(names: Sequence[str]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """``kwargs -> the positional arguments of an implementation taking ``names``` (a subset of the
    hookspec's, as pluggy allows). ``operator.itemgetter`` is the cheapest such picker, but returns
    a bare value rather than a tuple for one name."""
    if len(names) == 0:
        return lambda kwargs: ()
    if len(names) == 1:
        only = names[0]
        return lambda kwargs: (kwargs[only],)
    return operator.itemgetter(*names)


class HookAsker:
    """Asks one hook of one manager, checking every answer against the hook's contract.

    Build it once per batch of calls (a prediction's nodes): the implementations and their order
    are read from pluggy here, not at every call. With a hook wrapper among the implementations
    (which pluggy runs around the others and which cannot be run alone) the call goes through
    pluggy, and a failure names every plugin implementing the hook.
    """

    def __init__(self, manager: pluggy.PluginManager, contract: HookContract) -> None:
        self.contract = contract
        self._hook = getattr(manager.hook, contract.hook)
        implementations = self._hook.get_hookimpls()
        self._through_pluggy = any(impl.wrapper or impl.hookwrapper for impl in implementations)
        # pluggy's own call order: the stored list is sorted trylast ... tryfirst, asked in reverse.
        self._order: list[tuple[str, Callable[..., Any], Callable[[Mapping[str, Any]], tuple[Any, ...]]]] = [
            (impl.plugin_name, impl.function, _arguments_for(impl.argnames)) for impl in reversed(implementations)]
        self._everyone = tuple(impl.plugin_name for impl in reversed(implementations))

    def first(self, **kwargs: Any) -> Any:
        """The first answer that is not None (a ``firstresult`` hook), checked; None if nobody answers."""
        if self._through_pluggy:
            return self._through_pluggy_call(kwargs, first=True)
        return next(self._answers(kwargs), None)

    def every(self, **kwargs: Any) -> list[Any]:
        """Every answer that is not None (a hook without ``firstresult``), each checked."""
        if self._through_pluggy:
            return self._through_pluggy_call(kwargs, first=False)
        return list(self._answers(kwargs))

    def every_by_plugin(self, **kwargs: Any) -> list[tuple[str, Any]]:
        """``every``, each answer with the name of the plugin that gave it (for a caller whose
        messages say who answered what); through pluggy, all the implementing plugins' names."""
        if self._through_pluggy:
            return [(", ".join(self._everyone), answer) for answer in self._through_pluggy_call(kwargs, first=False)
                    if answer is not None]
        return list(self._answers(kwargs, with_plugin=True))

    def _answers(self, kwargs: dict[str, Any], with_plugin: bool = False) -> Iterator[Any]:
        """The implementations' answers that are not None, in pluggy's order, each checked as it
        comes (lazily: ``first`` stops asking at the first one); ``with_plugin``: as
        ``(plugin name, answer)``."""
        check = self.contract.check
        for plugin, function, arguments in self._order:
            try:
                answer = function(*arguments(kwargs))
            except CostModelError:
                raise
            except Exception as error:
                raise self._raised((plugin,), kwargs, error) from error
            if answer is not None:
                try:
                    check(answer)
                except BadAnswer as bad:
                    raise self._bad((plugin,), kwargs, bad) from None
                yield (plugin, answer) if with_plugin else answer

    def _through_pluggy_call(self, kwargs: dict[str, Any], first: bool) -> Any:
        plugins = self._everyone
        try:
            result = self._hook(**kwargs)
        except CostModelError:
            raise
        except Exception as error:
            raise self._raised(plugins, kwargs, error) from error
        for answer in ([result] if first else result):
            if answer is None:
                continue
            try:
                self.contract.check(answer)
            except BadAnswer as bad:
                raise self._bad(plugins, kwargs, bad) from None
        return result

    def _raised(self, plugins: Sequence[str], kwargs: Mapping[str, Any], error: Exception) -> PluginFailure:
        return PluginFailure(plugins, self.contract.hook, self._about(kwargs), f"{type(error).__name__}: {error}")

    def _bad(self, plugins: Sequence[str], kwargs: Mapping[str, Any], bad: BadAnswer) -> PluginFailure:
        return PluginFailure(plugins, self.contract.hook, self._about(kwargs), f"bad answer: {bad}")

    def _about(self, kwargs: Mapping[str, Any]) -> str:
        try:
            return self.contract.about(kwargs)
        except Exception:  # describing a call must never hide the plugin's own failure
            return "a call"


def ask_first(manager: pluggy.PluginManager, contract: HookContract, **kwargs: Any) -> Any:
    """One ``firstresult`` call through :class:`HookAsker` (for a call site that asks once)."""
    return HookAsker(manager, contract).first(**kwargs)


def ask_every(manager: pluggy.PluginManager, contract: HookContract, **kwargs: Any) -> list[Any]:
    """One call of a hook without ``firstresult`` through :class:`HookAsker`."""
    return HookAsker(manager, contract).every(**kwargs)



def loss_names(manager: pluggy.PluginManager) -> list[str]:
    """Every loss some plugin describes, sorted (``costmodel_loss_names``)."""
    return sorted({name for names in ask_every(manager, LOSS_NAMES) for name in names})


def loss_spec(manager: pluggy.PluginManager, name: str) -> LossSpec:
    """The loss ``name`` as a plugin describes it (``costmodel_loss``); a name no plugin describes
    is a one-line ``CostModelError`` listing the ones they do."""
    spec = ask_first(manager, LOSS, name=name)
    if spec is None:
        known = ", ".join(loss_names(manager)) or "none registered"
        raise CostModelError(f"unknown loss {name!r}; losses provided by plugins: {known}")
    return spec
