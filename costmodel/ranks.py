"""Predicting one configuration at many ranks at once.

A rank sweep asks for the same step again and again with only the rank changed. Rank by rank,
each prediction builds, prepares, traces and propagates the model anew and simulates its whole
memory timeline (a few hundred milliseconds for a MobileNet with adapters). :func:`predict_ranks`
does that work once and only the rank-dependent rest per rank:

1. **One structure.** The method is prepared at three probe ranks. Where the method promises it
   (``PreparedMethod.affine_in_rank``) and the three prepared models confirm it - the same
   modules, attributes and parameter groups, except integer sizes (parameter dimensions,
   integer attributes of modules the tracer keeps whole, integer optimizer options), each affine
   in the rank - every rank has the same traced graph: the modules the tracer traces through are
   identical, and parameter sizes reach the graph only as traced values.
2. **Sizes as formulas.** The graph is propagated once on meta tensors, at the first probe. The
   nodes that depend on the rank (one that reads a rank-sized parameter, a leaf module with a
   rank-sized attribute, a node fed a rank-sized value) run again with the rank as a symbol
   (meta tensors with sizes from a ``ShapeEnv``): each rank-dependent size becomes a formula in the
   rank and each decision a kernel took on it a guard. A rank whose guards fail (rank 1, say: a
   size of 1 is specialised) gets a template of its own.
3. **Costs as arrays.** Op plugins answer once for every node that does not depend on the rank,
   and once for all ranks for each node that does: every rank-dependent size is then a numpy
   integer array with one entry per rank (``costmodel.hookspecs.costmodel_op_cost``), and the
   answer is checked against the plugin's own answer at the first rank. A plugin that cannot
   answer so (it branches on a size) is asked rank by rank and its answers stacked into arrays.
   Optimizer plugins likewise. The memory simulation (``costmodel.memory``) then runs once over
   the arrays.

Nothing is approximated: every number equals what ``predict_config`` gives for that rank alone
(``tests/test_engine_ranks.py`` compares every field). Wherever a condition above does not hold
(no promise, probes that differ otherwise, a failed guard, a plugin whose answer changes form
with the rank, a size the simulation branches on that is zero at some ranks only) the ranks
concerned are predicted one by one with ``predict_config``.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import time
from collections import ChainMap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pluggy
import sympy
import torch
from torch import fx, nn
from torch._dispatch.python import enable_python_dispatcher
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch.utils._pytree import tree_flatten, tree_map

from costmodel.config import StepConfig
from costmodel.costs import MemEvent, OpCost, OptimizerCost, ParamGroup, ParamMeta, TensorMeta
from costmodel.errors import CostModelError
from costmodel.graph import StepGraph, Value, _tensor_meta, build_step_graph, node_op
from costmodel.meta_memo import meta_kernel_memo
from costmodel.memory import GradientFlow, MixedSizes, OptimizerStep, gradient_flow, simulate
from costmodel.models import meta_model
from costmodel.plugin_calls import OP_COST, HookAsker, PluginFailure
from costmodel.prediction import (Prediction, cost_nodes, first_answer, optimizer_timeline, predict_config, step_flops,
                                  traced_step)
from costmodel.registry import default_plugin_manager
from costmodel.shapes import (_Slot, _TensorTemplate, Propagation, SymbolicSizes, TensorFacts, compile_formulas,
                              fill_slots, recorded_facts)
from costmodel.trace import _CONTAINERS, MODEL_PREFIX, TracedStep, _state_key, prepare_method, propagate

RANK = sympy.Symbol("rank", integer=True, positive=True)
PROBES = 3


class _NotShared(Exception):
    """The ranks asked for cannot share one structure (the reason is the message)."""


# -- 1. one structure: what the rank changes in the prepared model

@dataclass(frozen=True)
class Affine:
    """An integer size ``slope * rank + intercept`` (exact rationals)."""

    slope: Fraction
    intercept: Fraction

    @staticmethod
    def through(points: Sequence[tuple[int, int]]) -> "Affine | None":
        """The line through every ``(rank, value)`` point, if there is one."""
        (r0, v0), (r1, v1) = points[0], points[1]
        slope = Fraction(v1 - v0, r1 - r0)
        line = Affine(slope, v0 - slope * r0)
        return line if all(line.exact(r) == v for r, v in points) else None

    def __post_init__(self) -> None:
        # at() in integer arithmetic: (numerator_slope * rank + numerator_intercept) / denominator
        denominator = self.slope.denominator * self.intercept.denominator
        object.__setattr__(self, "_integers", (int(self.slope * denominator), int(self.intercept * denominator),
                                               denominator))

    def exact(self, rank: int) -> Fraction:
        return self.slope * rank + self.intercept

    def at(self, rank: Any) -> Any:
        """The size at an int ``rank`` (refused where it is not an integer), or as a ``SymInt`` of
        a symbolic one (exact wherever the int form is)."""
        slope, intercept, denominator = self._integers  # type: ignore[attr-defined]
        if not isinstance(rank, int):
            numerator = slope * rank + intercept
            return numerator if denominator == 1 else numerator // denominator
        value, remainder = divmod(slope * rank + intercept, denominator)
        if remainder:
            raise _NotShared(f"a size {self} is not an integer at rank {rank}")
        return value


_PLAIN = frozenset({int, float, str, bool, type(None)})


def _vary(values: Sequence[Any], probes: Sequence[int], where: str) -> Any:
    """One template for the same thing at each probe rank: equal parts as they are, integers that
    differ as an :class:`Affine`, containers and dataclasses part by part."""
    first = values[0]
    kind = type(first)
    if any(type(v) is not kind for v in values):
        raise _NotShared(f"{where} changes type with the rank")
    if kind in _PLAIN and all(v == first for v in values[1:]):
        return first
    if kind is int:
        if all(v == first for v in values):
            return first
        line = Affine.through(list(zip(probes, values)))
        if line is None:
            raise _NotShared(f"{where} is not affine in the rank ({', '.join(map(str, values))})")
        return line
    if isinstance(first, dict):
        if any(list(v) != list(first) for v in values):
            raise _NotShared(f"{where} has other keys at another rank")
        return type(first)((k, _vary([v[k] for v in values], probes, f"{where}[{k!r}]")) for k in first)
    if isinstance(first, (list, tuple)) and not hasattr(first, "_fields"):
        if any(len(v) != len(first) for v in values):
            raise _NotShared(f"{where} has another length at another rank")
        return type(first)(_vary([v[i] for v in values], probes, f"{where}[{i}]") for i in range(len(first)))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: _vary([getattr(v, f.name) for v in values], probes,
                                                           f"{where}.{f.name}")
                                             for f in dataclasses.fields(first)})
    if isinstance(first, torch.Tensor):
        keys = [_state_key(v) for v in values]
    else:
        keys = [v if isinstance(v, (str, float, bool, type(None))) else _state_key(v) for v in values]
    if any(k != keys[0] for k in keys):
        raise _NotShared(f"{where} changes with the rank")
    return first


def _has_affine(template: Any) -> bool:
    if isinstance(template, Affine):
        return True
    if isinstance(template, dict):
        return any(_has_affine(v) for v in template.values())
    if isinstance(template, (list, tuple)):
        return any(_has_affine(v) for v in template)
    if dataclasses.is_dataclass(template) and not isinstance(template, type):
        return any(_has_affine(getattr(template, f.name)) for f in dataclasses.fields(template))
    return False


def _instantiator(template: Any) -> Callable[[int], Any]:
    """``rank -> the template's value at rank`` (an int, or a ``SymInt`` of a symbolic rank), with the
    walk over the template's unchanging parts done once."""
    if not _has_affine(template):
        return lambda rank: template
    if isinstance(template, Affine):
        return template.at
    if isinstance(template, dict):
        kind, parts = type(template), [(k, _instantiator(v)) for k, v in template.items()]
        return lambda rank: kind((k, part(rank)) for k, part in parts)
    if isinstance(template, (list, tuple)):
        kind, items = type(template), [_instantiator(v) for v in template]
        return lambda rank: kind(item(rank) for item in items)
    varying = [(f.name, _instantiator(getattr(template, f.name))) for f in dataclasses.fields(template)
               if _has_affine(getattr(template, f.name))]
    return lambda rank: dataclasses.replace(template, **{name: part(rank) for name, part in varying})


@dataclass
class RankDependence:
    """What the rank changes in a prepared model, as templates in the rank."""

    # Qualified parameter or buffer name -> its shape (ints and Affine sizes); only those that vary.
    tensors: dict[str, tuple[Any, ...]]
    # (module qualified name, attribute) -> its value template; only those that vary.
    attributes: dict[tuple[str, str], Any]
    # The optimizer's parameter groups, as templates.
    groups: list[ParamGroup]

    def __post_init__(self) -> None:
        self.shape_at = {name: _instantiator(shape) for name, shape in self.tensors.items()}
        self.attributes_at = _instantiator(self.attributes)
        self.groups_at = _instantiator(self.groups)


def rank_dependence(models: Sequence[nn.Module], groups: Sequence[list[ParamGroup]],
                    probes: Sequence[int]) -> RankDependence:
    """Compare one model prepared at the ``probes`` ranks; raise :class:`_NotShared` unless only
    integer sizes differ, affinely."""
    tensors: dict[str, tuple[Any, ...]] = {}
    attributes: dict[tuple[str, str], Any] = {}
    walks = [list(m.named_modules(remove_duplicate=False)) for m in models]
    if any(len(w) != len(walks[0]) for w in walks):
        raise _NotShared("the prepared models have other modules at other ranks")
    for entries in zip(*walks):
        name, module = entries[0]
        if any(n != name or type(m) is not type(module) for n, m in entries):
            raise _NotShared(f"module {name!r} differs between ranks")
        states = [{k: v for k, v in vars(m).items() if k not in _CONTAINERS} for _, m in entries]
        for attribute in states[0].keys() | set().union(*states[1:]):
            if any(attribute not in s for s in states):
                raise _NotShared(f"attribute {name}.{attribute} exists at some ranks only")
            template = _vary([s[attribute] for s in states], probes, f"{name or 'model'}.{attribute}")
            if _has_affine(template):
                attributes[(name, attribute)] = template
        for container in ("_parameters", "_buffers"):
            owned = [getattr(m, container) for _, m in entries]
            if any(list(o) != list(owned[0]) for o in owned):
                raise _NotShared(f"module {name!r} has other parameters at other ranks")
            for local in owned[0]:
                qualified = f"{name}.{local}" if name else local
                found = [o[local] for o in owned]
                if found[0] is None:
                    if any(t is not None for t in found):
                        raise _NotShared(f"{qualified} exists at some ranks only")
                    continue
                if any((t.dtype, t.requires_grad, t.device.type, t.dim()) !=
                       (found[0].dtype, found[0].requires_grad, found[0].device.type, found[0].dim()) for t in found):
                    raise _NotShared(f"{qualified} differs between ranks beyond its size")
                shape = _vary([tuple(t.shape) for t in found], probes, qualified)
                if _has_affine(shape):
                    tensors[qualified] = shape
    shared = [[n for n, _ in m.named_parameters(remove_duplicate=False)] for m in models]
    if any(s != shared[0] for s in shared):
        raise _NotShared("parameter sharing differs between ranks")
    return RankDependence(tensors, attributes, _vary(list(groups), probes, "parameter groups"))


# -- 2. sizes as formulas: the rank-dependent nodes, run with a symbolic rank

@dataclass
class RankTemplate:
    """Every rank-dependent value's facts as formulas in the rank, valid where ``applies`` says."""

    applies: Callable[[int], bool]
    values: Callable[[int], tuple[int, ...]]
    results: dict[fx.Node, Any]  # node -> its result with _Slot sizes and _TensorTemplate tensors
    source: str

    def covers(self, rank: int) -> bool:
        try:
            return bool(self.applies(rank))
        except (ArithmeticError, ValueError):
            return False

    def evaluate(self, rank: int) -> dict[fx.Node, Any]:
        return self.fill(self.values(rank))

    def evaluate_many(self, ranks: Sequence[int]) -> dict[fx.Node, Any]:
        """The results at every rank at once: each rank-dependent size an array over ``ranks``."""
        rows = [self.values(rank) for rank in ranks]
        columns = [_column(np.array(column, dtype=np.int64)) for column in zip(*rows)]
        return self.fill(columns)

    def fill(self, values: Sequence[Any]) -> dict[fx.Node, Any]:
        """The results with each slot's value (an int, or an array over ranks) filled in."""
        return fill_slots(self.results, values)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _alias_pattern(outputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> list[tuple[int, int]]:
    """For each output: the first input it *is* and the first input whose storage it shares (-1: none)."""
    pattern = []
    for out in outputs:
        same = next((i for i, t in enumerate(inputs) if t is out), -1)
        shares = next((i for i, t in enumerate(inputs) if _storage(t) == _storage(out)), -1)
        pattern.append((same, shares))
    return pattern


def symbolic_template(traced: TracedStep, base: Any, base_facts: Propagation, dependence: RankDependence,
                      hint: int, symbolic: bool = True) -> tuple[RankTemplate, set[fx.Node]]:
    """Run the rank-dependent nodes with a symbolic rank hinted ``hint`` (or, without
    ``symbolic``, on meta tensors at rank ``hint``: a template for that rank alone); the other
    nodes keep the results of ``base`` (the concrete propagation at another rank). Returns the
    template and the nodes that depend on the rank."""
    env = ShapeEnv()
    symbol: sympy.Basic = sympy.Integer(hint)
    if symbolic:
        symbol = env.create_symbol(hint, ConstantSource("rank"), dynamic_dim=DimDynamic.DYNAMIC)
    rank = env.create_symintnode(symbol, hint=hint) if isinstance(symbol, sympy.Symbol) else hint
    gm = traced.graph_module
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    # Meta tensors with symbolic sizes: PyTorch's meta kernels compute on SymInts directly (the
    # Python dispatcher routes the ops decomposed in Python); FakeTensorMode would add only cost.
    mode = enable_python_dispatcher() if symbolic else meta_kernel_memo()

    def module_prefix(node: fx.Node) -> str:
        target = str(node.target)
        return target[len(MODEL_PREFIX):] if target.startswith(MODEL_PREFIX) else "\0"

    dependent: set[fx.Node] = set()  # nodes run with the symbolic rank
    rank_sized: set[fx.Node] = set()  # nodes whose result still depends on the rank
    templates: dict[fx.Node, Any] = {}
    formulas = SymbolicSizes(env, {symbol: RANK} if isinstance(symbol, sympy.Symbol) else {}, (RANK,), _NotShared)
    size = formulas.size

    # Module name -> the rank-sized tensors and attributes at or below it.
    below: dict[str, tuple[list[str], list[tuple[str, str]]]] = {}
    for name in dependence.tensors:
        for prefix in _prefixes(name, include_self=True):
            below.setdefault(prefix, ([], []))[0].append(name)
    for key in dependence.attributes:
        for prefix in _prefixes(key[0], include_self=True):
            below.setdefault(prefix, ([], []))[1].append(key)
    tensors = {**dict(traced.model.named_parameters()), **dict(traced.model.named_buffers())}
    attributes = dependence.attributes_at(rank)
    with mode, torch.enable_grad():
        fake_params: dict[str, torch.Tensor] = {}
        for qualified in dependence.tensors:
            original = tensors[qualified]
            empty = torch.empty(dependence.shape_at[qualified](rank), dtype=original.dtype, device="meta")
            fake_params[qualified] = nn.Parameter(empty, requires_grad=original.requires_grad) \
                if isinstance(original, nn.Parameter) else empty
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                interpreter.env[node] = base.results.get(node)
                continue
            prefix = module_prefix(node) if node.op in ("call_module", "get_attr") else "\0"
            own_tensors, own_attributes = below.get(prefix, ([], []))
            if not (own_tensors or own_attributes or any(arg in rank_sized for arg in node.all_input_nodes)):
                interpreter.env[node] = base.results[node]
                continue
            dependent.add(node)
            if node.op == "get_attr":
                result = fake_params[prefix]
            else:
                result = _run_with(interpreter, node, traced.model, {n: fake_params[n] for n in own_tensors},
                                   {key: attributes[key] for key in own_attributes})
            interpreter.env[node] = result
            # Compare with the concrete run: same structure, dtypes, autograd facts and aliasing.
            base_result = base.results[node]
            fake_leaves, fake_spec = tree_flatten(result)
            base_leaves, base_spec = tree_flatten(base_result)
            if fake_spec != base_spec:
                raise _NotShared(f"node {node.name} returns another structure at another rank")
            fake_tensors = [t for t in fake_leaves if isinstance(t, torch.Tensor)]
            base_tensors = [t for t in base_leaves if isinstance(t, torch.Tensor)]
            for fake, concrete in zip(fake_tensors, base_tensors):
                if (fake.dtype, bool(fake.requires_grad), fake.is_leaf, fake.dim()) != \
                        (concrete.dtype, bool(concrete.requires_grad), concrete.is_leaf, concrete.dim()):
                    raise _NotShared(f"node {node.name} changes more than sizes with the rank")
            fake_inputs = [t for t in tree_flatten((_args_of(interpreter, node)))[0] if isinstance(t, torch.Tensor)]
            base_inputs = [t for t in tree_flatten(_args_of_base(base, node))[0] if isinstance(t, torch.Tensor)]
            if _alias_pattern(fake_tensors, fake_inputs) != _alias_pattern(base_tensors, base_inputs):
                raise _NotShared(f"node {node.name} aliases its inputs differently at another rank")
            facts = [f for f in tree_flatten(base_facts.results[node])[0] if isinstance(f, TensorFacts)]
            tensor_index = iter(range(len(fake_tensors)))

            def template(leaf: Any) -> Any:
                if isinstance(leaf, torch.Tensor):
                    k = next(tensor_index)
                    return _TensorTemplate(tuple(size(s) for s in leaf.shape), leaf.dtype, bool(leaf.requires_grad),
                                           leaf.is_leaf, facts[k].storage, size(leaf.untyped_storage().nbytes()))
                return size(leaf)

            templates[node] = tree_map(template, result)
            if _mentions_slot(templates[node]) or not _same_facts(templates[node], base_facts.results[node]):
                rank_sized.add(node)
            else:
                interpreter.env[node] = base_result  # the same at every rank from here on

    conditions = formulas.ranges(rank, hint, RANK) + formulas.guards()
    applies, values, source = compile_formulas(conditions, formulas.expressions, (RANK,),
                                               f"rank template of {type(traced.model).__name__}")
    return RankTemplate(applies, values, templates, source), dependent


def _same_facts(template: Any, facts: Any) -> bool:
    """Whether a template without slots says what the concrete propagation found."""
    def plain(leaf: Any) -> Any:
        if isinstance(leaf, (_TensorTemplate, TensorFacts)):
            return (leaf.shape, leaf.dtype, leaf.requires_grad, leaf.is_leaf, leaf.storage, leaf.storage_nbytes)
        return leaf

    return tree_map(plain, template) == tree_map(plain, facts)


def _prefixes(name: str, include_self: bool) -> list[str]:
    """``"a.b.c"`` -> ``["", "a", "a.b"]`` (and ``"a.b.c"`` with ``include_self``)."""
    parts = name.split(".")
    found = [""] + [".".join(parts[:i]) for i in range(1, len(parts))]
    return found + [name] if include_self else found


def _mentions_slot(template: Any) -> bool:
    leaves = tree_flatten(template)[0]
    return any(isinstance(leaf, _Slot) or (isinstance(leaf, _TensorTemplate) and (
        isinstance(leaf.storage_nbytes, _Slot) or any(isinstance(s, _Slot) for s in leaf.shape))) for leaf in leaves)


def _args_of(interpreter: fx.Interpreter, node: fx.Node) -> tuple[Any, ...]:
    return interpreter.fetch_args_kwargs_from_env(node)


def _args_of_base(base: Any, node: fx.Node) -> tuple[Any, ...]:
    return fx.node.map_arg((node.args, node.kwargs), lambda n: base.results.get(n))


def _run_with(interpreter: fx.Interpreter, node: fx.Node, model: nn.Module, tensors: dict[str, torch.Tensor],
              attributes: dict[tuple[str, str], Any]) -> Any:
    """Run ``node`` with some of the model's parameters and attributes swapped, then put them back."""
    saved: list[tuple[Any, str, Any, bool]] = []
    try:
        for qualified, tensor in tensors.items():
            owner_name, _, local = qualified.rpartition(".")
            owner = model.get_submodule(owner_name)
            container = owner._parameters if local in owner._parameters else owner._buffers
            saved.append((container, local, container[local], True))
            container[local] = tensor
        for (owner_name, attribute), value in attributes.items():
            owner = model.get_submodule(owner_name)
            saved.append((owner, attribute, getattr(owner, attribute), False))
            object.__setattr__(owner, attribute, value)
        return interpreter.run_node(node)
    finally:
        for target, key, value, is_item in reversed(saved):
            if is_item:
                target[key] = value
            else:
                object.__setattr__(target, key, value)


# -- 3. costs as arrays

def _stack(values: Sequence[Any], where: str) -> Any:
    """One value per rank -> one value whose sizes are arrays over the ranks (equal ones stay ints)."""
    first = values[0]
    if isinstance(first, bool) or first is None or isinstance(first, str):
        if any(v != first for v in values):
            raise _NotShared(f"{where} changes with the rank")
        return first
    if isinstance(first, int):
        if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
            raise _NotShared(f"{where} changes type with the rank")
        if all(v == first for v in values):
            return first
        return np.array(values, dtype=np.int64)
    if isinstance(first, dict):
        if any(list(v) != list(first) for v in values):
            raise _NotShared(f"{where} has other keys at another rank")
        return {k: _stack([v[k] for v in values], f"{where}[{k!r}]") for k in first}
    if isinstance(first, (list, tuple)):
        if any(len(v) != len(first) for v in values):
            raise _NotShared(f"{where} has another length at another rank")
        return type(first)(_stack([v[i] for v in values], f"{where}[{i}]") for i in range(len(first)))
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        if any(type(v) is not type(first) for v in values):
            raise _NotShared(f"{where} changes type with the rank")
        changes = {}
        for f in dataclasses.fields(first):
            column = [getattr(v, f.name) for v in values]
            changes[f.name] = column[0] if f.name == "note" else _stack(column, f"{where}.{f.name}")
        return dataclasses.replace(first, **changes)
    if any(v != first for v in values):
        raise _NotShared(f"{where} changes with the rank")
    return first


def _signature(value: Any) -> Any:
    """The form of a plugin's answer without its sizes: ranks whose answers share it stack."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_signature(v) for v in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, tuple(_signature(getattr(value, f.name)) for f in dataclasses.fields(value)
                                            if f.name != "note"))
    return repr(value)


def _optimizer_steps(shared: _Shared, flow: GradientFlow, ranks: list[int]) -> tuple[list[OptimizerStep], Any]:
    """The optimizer's steps and prior state over ``ranks``: asked once for all of them when the
    optimizer plugin can answer so (checked against its answer at the first rank), else rank by rank."""
    try:
        steps, state = _optimizer_at(shared, flow, ranks)
        if _conforms((steps, state), len(ranks)) and _agrees((steps, state), _optimizer_at(shared, flow, ranks[0]), 0):
            return steps, state
    except PluginFailure:  # an optimizer plugin that branches on a size: asked rank by rank
        pass
    except (_NotShared, CostModelError):  # no plugin covers a group, or one refused: true at every rank
        raise
    answers = [_optimizer_at(shared, flow, rank) for rank in ranks]
    return _stack_steps([steps for steps, _ in answers]), _stack([state for _, state in answers], "the state")


def _stack_steps(per_rank: list[list[OptimizerStep]]) -> list[OptimizerStep]:
    """The optimizer's steps over the ranks: their memory events (often thousands) column by column."""
    first = per_rank[0]
    if any(len(steps) != len(first) for steps in per_rank):
        raise _NotShared("the optimizer's parameter groups change with the rank")
    stacked = []
    for g, step in enumerate(first):
        costs = [steps[g].cost for steps in per_rank]
        form = [(e.group, e.label) for e in step.cost.events]
        if any(s[g].label != step.label or [(e.group, e.label) for e in c.events] != form
               for s, c in zip(per_rank, costs)):
            raise _NotShared("the optimizer's memory events change with the rank")
        sizes = np.array([[e.nbytes for e in c.events] for c in costs], dtype=np.int64).reshape(len(costs), -1)
        events = [MemEvent(_column(sizes[:, j]), group, label) for j, (group, label) in enumerate(form)]
        cost = OptimizerCost(_stack([c.flops for c in costs], "the optimizer FLOPs"),
                             _stack([c.state_bytes for c in costs], "the optimizer state"), events, step.cost.note)
        stacked.append(OptimizerStep(step.label, cost))
    return stacked


def _column(values: np.ndarray) -> int | np.ndarray:
    return int(values[0]) if (values == values[0]).all() else values


@functools.cache
def _compared_fields(kind: type) -> tuple[str, ...]:
    """A dataclass's fields that carry numbers (its free-text ``note`` left out)."""
    return tuple(f.name for f in dataclasses.fields(kind) if f.name != "note")


def _conforms(value: Any, count: int) -> bool:
    """Whether an answer given for many ranks holds only integers, flags, text and integer arrays
    with one entry per rank."""
    if value is None or isinstance(value, (bool, int, str)):
        return True
    if isinstance(value, np.ndarray):
        return value.ndim == 1 and len(value) == count and np.issubdtype(value.dtype, np.integer)
    if isinstance(value, dict):
        return all(_conforms(v, count) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_conforms(v, count) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return all(_conforms(getattr(value, name), count) for name in _compared_fields(type(value)))
    return False


def _agrees(together: Any, alone: Any, i: int) -> bool:
    """Whether entry ``i`` of an answer for many ranks is the answer for that rank alone (notes
    left out)."""
    if isinstance(together, np.ndarray):
        return type(alone) is int and int(together[i]) == alone
    if isinstance(together, dict):
        return (isinstance(alone, dict) and together.keys() == alone.keys()
                and all(_agrees(v, alone[k], i) for k, v in together.items()))
    if isinstance(together, (list, tuple)):
        return (type(alone) is type(together) and len(alone) == len(together)
                and all(_agrees(a, b, i) for a, b in zip(together, alone)))
    if dataclasses.is_dataclass(together) and not isinstance(together, type):
        return type(alone) is type(together) and all(
            _agrees(getattr(together, name), getattr(alone, name), i) for name in _compared_fields(type(together)))
    return type(together) is type(alone) and together == alone


def _batch(shared: _Shared, template: RankTemplate, ranks: list[int]) -> _RankCosts:
    """The answers for ``ranks`` (all covered by ``template``), each plugin asked once for all of
    them where it can answer so: an answer for many ranks is checked against the plugin's own
    answer at the first rank, and a node whose plugin cannot answer for many ranks, or answers
    otherwise, is asked rank by rank."""
    together = _rank_costs(shared, template, ranks)
    check = _rank_costs(shared, template, ranks[0])
    for index in list(together.costs):
        if not _agrees(together.costs[index], check.costs[index], 0):
            del together.costs[index]
    missing = [index for index, _, _ in shared.dependent_records if index not in together.costs]
    if missing:
        one_by_one = [_rank_costs(shared, template, rank, missing) for rank in ranks]
        for index in missing:
            together.costs[index] = _stack([answer.costs[index] for answer in one_by_one], f"record {index}")
    return together


@dataclass
class _Shared:
    """Everything the ranks of one configuration share, found once."""

    config: StepConfig
    manager: pluggy.PluginManager
    traced: TracedStep
    dependence: RankDependence
    base: Any  # the concrete propagation's recorder at the first probe
    facts: Propagation
    graph: StepGraph
    nodes: list[fx.Node]  # record index -> its graph node
    templates: list[RankTemplate] = field(default_factory=list)
    dependent: set[fx.Node] = field(default_factory=set)
    static_costs: dict[int, OpCost] = field(default_factory=dict)
    # Filled once the dependent nodes are known: (record index, node, its static facts) of each,
    # the rank-sized parameters' metas at the first probe, and the modules with rank-sized attributes.
    dependent_records: list[tuple[int, fx.Node, tuple[Any, ...]]] = field(default_factory=list)
    rank_sized: dict[str, ParamMeta] = field(default_factory=dict)
    owners: dict[str, nn.Module] = field(default_factory=dict)


@dataclass
class _RankCosts:
    """One rank's answers for the rank-dependent nodes (or many ranks' answers: every size an
    array over ``rank``, a list)."""

    rank: int | list[int]
    metas: dict[Value, TensorMeta]
    params: dict[str, ParamMeta]
    costs: dict[int, OpCost]
    steps: list[OptimizerStep] | None = None
    state_before: int = 0


def _rank_costs(shared: _Shared, template: RankTemplate, rank: int | Sequence[int],
                records: Iterable[int] | None = None) -> _RankCosts:
    """Ask the op plugins about the rank-dependent nodes (all, or those of ``records``) at ``rank``,
    or at many ranks at once (every rank-dependent size an array over them; see
    ``costmodel.hookspecs.costmodel_op_cost``). The rank-sized attributes of leaf modules are set
    to the rank's values while the plugins answer; :func:`predict_ranks` puts the model's own back."""
    dependence, graph = shared.dependence, shared.graph
    many = not isinstance(rank, int)
    overlay = template.evaluate_many(rank) if many else template.evaluate(rank)
    results = ChainMap(overlay, shared.facts.results)
    metas: dict[Value, TensorMeta] = {}
    for node, result in overlay.items():
        if isinstance(result, TensorFacts):
            metas[(node, 0)] = _tensor_meta(result)
            continue
        for k, facts in enumerate(f for f in tree_flatten(result)[0] if isinstance(f, TensorFacts)):
            metas[(node, k)] = _tensor_meta(facts)
    all_metas = ChainMap(metas, graph.metas)
    if many:
        params = {name: dataclasses.replace(meta, shape=_stack([dependence.shape_at[name](r) for r in rank], name))
                  for name, meta in shared.rank_sized.items()}
        attributes = _stack([dependence.attributes_at(r) for r in rank], "the rank-sized attributes")
        config = shared.config
    else:
        params = {name: dataclasses.replace(meta, shape=dependence.shape_at[name](rank))
                  for name, meta in shared.rank_sized.items()}
        attributes = dependence.attributes_at(rank)
        config = shared.config.replace(rank=rank)
    for (owner, attribute), value in attributes.items():
        object.__setattr__(shared.owners[owner], attribute, value)
    costs: dict[int, OpCost] = {}
    ask = HookAsker(shared.manager, OP_COST).first
    wanted = None if records is None else set(records)
    for index, node, (module, node_params, target, label) in shared.dependent_records:
        if wanted is not None and index not in wanted:
            continue
        record = graph.records[index]
        if any(p.name in params for p in node_params.values()):
            node_params = {local: params.get(p.name, p) for local, p in node_params.items()}
        outputs = tuple(all_metas[v] for v in record.output_values)
        op, _ = node_op(node, results, all_metas, shared.facts.same_tensor, outputs,
                        (module, node_params, target, label))
        if many:
            try:
                cost = ask(node=op, config=config)
            except CostModelError:
                # A plugin that branches on a size (its exception arrives as a PluginFailure), or
                # whose answer for the arrays breaks the contract: asked rank by rank, where a
                # failure at one plain rank is the plugin's own and reported as such.
                continue
            if cost is not None and _conforms(cost, len(rank)):
                costs[index] = cost
            continue
        cost = ask(node=op, config=config)
        if cost is None:
            raise _NotShared(f"no plugin covers node {record.name} at rank {rank}")
        costs[index] = cost
    return _RankCosts(rank, metas, params, costs)


def _optimizer_at(shared: _Shared, flow: GradientFlow, rank: int | Sequence[int]) -> tuple[list[OptimizerStep], Any]:
    """The optimizer's steps at ``rank`` and the state that exists before them; for many ranks,
    asked once with every rank-dependent size and option an array over them."""
    if isinstance(rank, int):
        config = shared.config.replace(rank=rank)
        groups = shared.dependence.groups_at(rank)
    else:
        config = shared.config
        groups = _stack([shared.dependence.groups_at(r) for r in rank], "the parameter groups")
    steps, state_before, _ = optimizer_timeline(groups, flow, shared.manager, config)
    return steps, state_before


def _stack_answers(answers: list[_RankCosts]) -> _RankCosts:
    """Answers rank by rank -> one answer for all of them (arrays over the ranks)."""
    first = answers[0]
    return _RankCosts(
        [a.rank for a in answers],
        {value: _stack([a.metas[value] for a in answers], f"value {value[0].name}") for value in first.metas},
        {name: _stack([a.params[name] for a in answers], name) for name in first.params},
        {index: _stack([a.costs[index] for a in answers], f"record {index}") for index in first.costs})


def _vector_graph(shared: _Shared, batch: _RankCosts) -> tuple[StepGraph, list[OpCost | None]]:
    """The shared graph with every rank-dependent size an array over the batch's ranks, and its costs."""
    graph = shared.graph
    metas = {**graph.metas, **batch.metas}
    params = batch.params
    storage_of = {name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else name: facts.storage
                  for name, facts, _ in shared.facts.params}
    param_storages, buffer_storages = dict(graph.param_storages), dict(graph.buffer_storages)
    for name, meta in params.items():
        (buffer_storages if meta.is_buffer else param_storages)[storage_of[name]] = meta.nbytes
    records, costs = [], []
    for record in graph.records:
        if shared.nodes[record.index] not in shared.dependent:
            records.append(record)
            costs.append(shared.static_costs[record.index])
            continue
        op = dataclasses.replace(record.op, inputs=tuple(metas[v] for v in record.input_values),
                                 outputs=tuple(metas[v] for v in record.output_values),
                                 params={local: params.get(p.name, p) for local, p in record.op.params.items()})
        records.append(dataclasses.replace(record, op=op))
        costs.append(batch.costs[record.index])
    vector = dataclasses.replace(
        graph, records=records, metas=metas, param_storages=param_storages, buffer_storages=buffer_storages,
        params=[params.get(p.name, p) for p in graph.params], buffers=[params.get(p.name, p) for p in graph.buffers],
        loss_meta=metas[graph.loss])
    return vector, costs


def _pick(value: int | np.ndarray, i: int) -> int:
    return int(value[i]) if isinstance(value, np.ndarray) else int(value)


def _predict_together(shared: _Shared, batch: _RankCosts, started: float) -> dict[int, Prediction]:
    """One simulation over the ranks of a batch of answers."""
    graph, costs = _vector_graph(shared, batch)
    flow = gradient_flow(graph, costs)
    steps, state_before = _optimizer_steps(shared, flow, batch.rank)
    grads_before = sum(flow.gradient_bytes.values()) if shared.config.step > 1 else 0
    memory = simulate(graph, costs, flow, steps, state_before, grads_before, record_timeline=False)
    flops = step_flops(graph, costs, memory, steps)
    fields = memory.fields()
    trainable = sum(p.numel for p in graph.params if p.trainable)
    total = sum(p.numel for p in graph.params)
    seconds = (time.perf_counter() - started) / len(batch.rank)
    predictions = {}
    for i, rank in enumerate(batch.rank):
        predictions[rank] = Prediction(
            config=shared.config.replace(rank=rank),
            source="predict",
            flops={conv: {phase: _pick(v, i) for phase, v in phases.items()} for conv, phases in flops.items()},
            memory={name: _pick(v, i) for name, v in fields.items()},
            trainable_params=_pick(trainable, i),
            total_params=_pick(total, i),
            seconds=seconds,
            details={"batched": f"one of {len(batch.rank)} ranks predicted together (costmodel.ranks)"},
        )
    return predictions


def _predict_groups(shared: _Shared, answers: list[_RankCosts], started: float) -> dict[int, Prediction]:
    """All ranks in one simulation if their answers stack; else one per form of the plugins'
    answers; a group that still cannot share a timeline is left to rank-by-rank prediction."""
    if not answers:
        return {}
    try:
        return _predict_together(shared, _stack_answers(answers), started)
    except (_NotShared, MixedSizes, CostModelError):
        if len(answers) == 1:
            return {}
    groups: dict[Any, list[_RankCosts]] = {}
    for answer in answers:
        key = _signature([answer.costs[i] for i in sorted(answer.costs)])
        groups.setdefault(key, []).append(answer)
    found: dict[int, Prediction] = {}
    for together in groups.values():
        if len(together) < len(answers):
            found.update(_predict_groups(shared, together, started))
    return found


def _choose_probes(ranks: Sequence[int]) -> tuple[int, int, int]:
    """Three ranks >= 2 of those asked for: the middle one (traced) and the two ends."""
    candidates = sorted({r for r in ranks if r >= 2})
    if len(candidates) < PROBES:
        raise _NotShared("fewer than three ranks >= 2 to compare")
    middle = candidates[len(candidates) // 2]
    return middle, candidates[0], candidates[-1]


def _share(config: StepConfig, ranks: Sequence[int], manager: pluggy.PluginManager) -> _Shared:
    """Prepare at the probe ranks, compare, trace and propagate once: what every rank shares."""
    probes = _choose_probes(ranks)
    traced = traced_step(config.replace(rank=probes[0]), manager)
    if not traced.prepared.affine_in_rank:
        raise _NotShared(f"method {config.method!r} does not promise sizes affine in the rank for this configuration")
    models, groups = [traced.model], [traced.prepared.param_groups]
    for probe in probes[1:]:
        model = meta_model(config.model, config.classes)
        prepared = prepare_method(manager, model, config.replace(rank=probe))
        if not prepared.affine_in_rank:
            raise _NotShared(f"method {config.method!r} does not promise sizes affine in rank {probe}")
        models.append(model)
        groups.append(prepared.param_groups)
    dependence = rank_dependence(models, groups, probes)
    gm = traced.graph_module
    leaves = [str(n.target)[len(MODEL_PREFIX):] for n in gm.graph.nodes
              if n.op == "call_module" and str(n.target).startswith(MODEL_PREFIX)]
    for owner, attribute in dependence.attributes:
        if not any(owner == leaf or owner.startswith(leaf + ".") for leaf in leaves):
            raise _NotShared(f"{owner}.{attribute} changes with the rank in a module the tracer traces through")
    base = propagate(traced, config.batch, config.resolution)
    facts = recorded_facts(traced, base)
    for name, tensor_facts, _ in facts.params:
        local = name[len(MODEL_PREFIX):] if name.startswith(MODEL_PREFIX) else name
        if local in dependence.tensors and \
                tensor_facts.storage_nbytes != int(np.prod(tensor_facts.shape)) * tensor_facts.dtype.itemsize:
            raise _NotShared(f"{local} is not a tensor of its own")
    graph = build_step_graph(traced, facts)
    by_name = {n.name: n for n in gm.graph.nodes}
    shared = _Shared(config.replace(rank=probes[0]), manager, traced, dependence, base, facts, graph,
                     [by_name[r.name] for r in graph.records])
    template, shared.dependent = symbolic_template(traced, base, facts, dependence, probes[0])
    shared.templates.append(template)
    static = traced.graph_cache["static"]
    shared.dependent_records = [(record.index, node, static[node]) for record, node in zip(graph.records, shared.nodes)
                                if node in shared.dependent]
    shared.rank_sized = {p.name: p for p in (*graph.params, *graph.buffers) if p.name in dependence.tensors}
    shared.owners = {owner: traced.model.get_submodule(owner) for owner, _ in dependence.attributes}
    # Every node as a prediction at the first probe costs it (an uncovered one raises there too);
    # those that do not depend on the rank keep that answer for all ranks.
    costs, _ = cost_nodes(graph, manager, shared.config, allow_unknown=False)
    shared.static_costs = {record.index: cost for record, node, cost in zip(graph.records, shared.nodes, costs)
                           if node not in shared.dependent}
    return shared


def _template_for(shared: _Shared, rank: int) -> RankTemplate | None:
    """A template that covers ``rank``: the symbolic one, or one run on meta tensors at this rank
    alone (where the symbolic run's guards exclude it: rank 1, whose sizes of 1 are specialised)."""
    for template in shared.templates:
        if template.covers(rank):
            return template
    try:
        template, dependent = symbolic_template(shared.traced, shared.base, shared.facts, shared.dependence, rank,
                                                symbolic=False)
    except (_NotShared, RuntimeError):
        return None
    if dependent != shared.dependent or not template.covers(rank):
        return None
    shared.templates.append(template)
    return template


def _predict_shared(shared: _Shared, ranks: list[int], started: float) -> dict[int, Prediction]:
    """The ranks that share ``shared``'s structure: those of one template together (each plugin
    asked once for all of them where it can), and where a batch does not hold together, rank by
    rank answers grouped by form."""
    by_template: dict[int, tuple[RankTemplate, list[int]]] = {}
    for rank in ranks:
        template = _template_for(shared, rank)
        if template is not None:
            by_template.setdefault(id(template), (template, []))[1].append(rank)
    found: dict[int, Prediction] = {}
    for template, members in by_template.values():
        try:
            found.update(_predict_together(shared, _batch(shared, template, members), started))
            continue
        except (_NotShared, MixedSizes, CostModelError):
            pass
        answers = []
        for rank in members:
            try:
                answers.append(_rank_costs(shared, template, rank))
            except (_NotShared, CostModelError):
                continue
        found.update(_predict_groups(shared, answers, started))
    return found


# Ranks asked together are sizes in numpy int64 arrays, whose arithmetic wraps around silently
# past 2**63. Within these bounds no FLOP or byte count of a vision model can come near it (a
# count is at most ~ images x pixels x channels^2 x kernel area x rank x a small factor:
# 2**32 x 2**11 x 2**12 x 2**4 = 2**59); beyond them every rank is predicted alone, in Python's
# exact integers.
_BATCHED_MAX_RANK = 2**12
_BATCHED_MAX_PIXELS = 2**32  # batch x resolution^2


def _int64_safe(config: StepConfig, ranks: Sequence[int]) -> bool:
    return bool(ranks) and max(ranks) <= _BATCHED_MAX_RANK and config.batch * config.resolution**2 <= _BATCHED_MAX_PIXELS


def predict_ranks(config: StepConfig, ranks: Iterable[int], *,
                  manager: pluggy.PluginManager | None = None) -> dict[int, Prediction | CostModelError]:
    """Predict ``config`` at each of ``ranks`` (its own rank is ignored): the same numbers as
    ``predict_config(config.replace(rank=r))`` for every ``r``, found together. A rank the method
    refuses maps to the :class:`CostModelError` that says why."""
    if gc.isenabled():  # a batch allocates many objects and few cycles: collect after, not during
        gc.disable()
        try:
            return predict_ranks(config, ranks, manager=manager)
        finally:
            gc.enable()
    started = time.perf_counter()
    manager = manager or default_plugin_manager()
    wanted = list(dict.fromkeys(int(r) for r in ranks))
    found: dict[int, Prediction | CostModelError] = {}
    shared = None
    if _int64_safe(config, wanted):
        try:
            shared = _share(config, wanted, manager)
        except (_NotShared, CostModelError, MixedSizes):
            shared = None
    if shared is not None:
        model_own = {key: getattr(shared.owners[key[0]], key[1]) for key in shared.dependence.attributes}
        try:
            found.update(_predict_shared(shared, wanted, started))
        finally:
            for (owner, attribute), value in model_own.items():
                object.__setattr__(shared.owners[owner], attribute, value)
    pending = [rank for rank in wanted if rank not in found]
    if pending:
        first, refused_alike = first_answer(
            lambda rank: predict_config(config.replace(rank=rank), manager=manager), pending)
        found[pending[0]] = first
        for rank in pending[1:]:
            if refused_alike:  # the first and last rank refused for one reason: every rank is
                found[rank] = first
                continue
            try:
                found[rank] = predict_config(config.replace(rank=rank), manager=manager)
            except CostModelError as error:
                found[rank] = error
    return {rank: found[rank] for rank in wanted}
