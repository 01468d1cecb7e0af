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
   rank-sized attribute, a node fed a rank-sized value) run again with the rank as a symbol,
   through the engine's one symbolic mechanism (``costmodel.shapes``: ``symbolic_mode``, a
   :class:`~costmodel.shapes.SizeTemplate`, the same as shape templates over batch and resolution):
   each rank-dependent size becomes a formula in the rank and each decision a kernel took on it a
   guard. A rank whose guards fail (rank 1, say: a
   size of 1 is specialised) gets a template of its own.
3. **Costs as arrays.** Op plugins answer once for every node that does not depend on the rank,
   and once for all ranks for each node that does: every rank-dependent size is then a numpy
   integer array with one entry per rank (``costmodel.hookspecs.costmodel_op_cost``), and the
   answer is checked against the plugin's own answer at the first rank. A plugin that cannot
   answer so (it branches on a size) is asked rank by rank and its answers stacked into arrays.
   Optimizer plugins likewise. The memory simulation (``costmodel.memory``) then runs once over
   the arrays.

Nothing is approximated: every number equals what ``predict_config`` gives for that rank alone
(``tests/test_engine_ranks.py`` compares every field, details included). Wherever a condition above does not hold
(no promise, probes that differ otherwise, a failed guard, a plugin whose answer changes form
with the rank, a size the simulation branches on that is zero at some ranks only) the ranks
concerned are predicted one by one with ``predict_config``.
"""

from __future__ import annotations

import dataclasses
import functools
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
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._pytree import tree_flatten, tree_map

from costmodel import nested
from costmodel.config import TRAINING, StepConfig
from costmodel.costs import MemEvent, OpCost, OptimizerCost, ParamGroup, ParamMeta, TensorMeta
from costmodel.errors import CostModelError
from costmodel.graph import StepGraph, Value, tensor_meta, build_step_graph, node_op
from costmodel.memory import GradientFlow, MemoryResult, MixedSizes, OptimizerStep, Snapshot, gradient_flow, simulate
from costmodel.models import step_model
from costmodel.plugin_calls import OP_COST, HookAsker, PluginFailure
from costmodel.prediction import (Deferred, NodeCost, Prediction, at_index, build_prediction, cost_nodes, coverage,
                                  first_answer, node_costs, optimizer_timeline, predict_config, step_totals, traced_step)
from costmodel.registry import default_plugin_manager
from costmodel.shapes import (BATCH, RESOLUTION, Propagation, SizeTemplate, Slot, SymbolicSizes, TensorFacts,
                              TensorTemplate, column_size, recorded_facts, symbolic_mode, symbolic_size, template_of)
from costmodel.trace import (MODEL_PREFIX, MODULE_CONTAINERS, MetaInterpreter, TracedStep, altered_copy,
                             prepare_method, propagate, state_key, step_inputs)

RANK = sympy.Symbol("rank", integer=True, positive=True)
POINT = (BATCH, RESOLUTION, RANK)
# One configuration of many predicted together: (batch, resolution, rank).
Point = tuple[int, int, int]
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

    @functools.cached_property
    def _integers(self) -> tuple[int, int, int]:
        """at() in integer arithmetic: (numerator_slope * rank + numerator_intercept) / denominator."""
        denominator = self.slope.denominator * self.intercept.denominator
        return int(self.slope * denominator), int(self.intercept * denominator), denominator

    def exact(self, rank: int) -> Fraction:
        return self.slope * rank + self.intercept

    def at(self, rank: Any) -> Any:
        """The size at an int ``rank`` (refused where it is not an integer), or as a ``SymInt`` of
        a symbolic one (exact wherever the int form is)."""
        slope, intercept, denominator = self._integers
        if not isinstance(rank, int):
            numerator = slope * rank + intercept
            return numerator if denominator == 1 else numerator // denominator
        value, remainder = divmod(slope * rank + intercept, denominator)
        if remainder:
            raise _NotShared(f"a size {self} is not an integer at rank {rank}")
        return value


def _flatten(value: Any) -> tuple[list[Any], nested.Structure]:
    return nested.flatten(value, leaf_types=(Affine,))


def _vary_leaf(column: Sequence[Any], probes: Sequence[int], where: str) -> Any:
    """One leaf at each probe rank -> the leaf (the same at every rank) or an :class:`Affine`."""
    first = column[0]
    if any(type(v) is not type(first) for v in column):
        raise _NotShared(f"{where} changes type with the rank")
    if type(first) is int:
        if all(v == first for v in column):
            return first
        line = Affine.through(list(zip(probes, column)))
        if line is None:
            raise _NotShared(f"{where} is not affine in the rank ({', '.join(map(str, column))})")
        return line
    keys = [v if isinstance(v, (str, float, bool, type(None))) else state_key(v) for v in column]
    if any(k != keys[0] for k in keys):
        raise _NotShared(f"{where} changes with the rank")
    return first


def _same_structure(values: Sequence[Any], where: str) -> tuple[list[list[Any]], nested.Structure]:
    """The leaves of each value and their one structure (refused if the values differ in it)."""
    flat = [_flatten(v) for v in values]
    structure = flat[0][1]
    if any(f[1] != structure for f in flat[1:]):
        raise _NotShared(f"{where} changes form with the rank")
    return [leaves for leaves, _ in flat], structure


def _vary(values: Sequence[Any], probes: Sequence[int], where: str) -> Any:
    """One template for the same thing at each probe rank: equal leaves as they are, integers
    that differ as an :class:`Affine`."""
    rows, structure = _same_structure(values, where)
    return nested.unflatten(structure, [_vary_leaf(column, probes, where) for column in zip(*rows)])


def _has_affine(template: Any) -> bool:
    return any(isinstance(leaf, Affine) for leaf in _flatten(template)[0])


def _instantiator(template: Any) -> Callable[[int], Any]:
    """``rank -> the template's value at rank`` (an int, or a ``SymInt`` of a symbolic rank)."""
    leaves, structure = _flatten(template)
    if not any(isinstance(leaf, Affine) for leaf in leaves):
        return lambda rank: template
    return lambda rank: nested.unflatten(structure, [leaf.at(rank) if isinstance(leaf, Affine) else leaf
                                                     for leaf in leaves])


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
        states = [{k: v for k, v in vars(m).items() if k not in MODULE_CONTAINERS} for _, m in entries]
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
                      hint: Point, shapes_vary: bool) -> tuple[SizeTemplate, set[fx.Node]]:
    """Run the nodes that depend on what varies, with symbolic sizes hinted ``hint`` (batch,
    resolution, rank): the rank always (a rank of 1 is specialised: a template for rank 1 alone),
    the batch and resolution when ``shapes_vary`` (then every node fed the images depends on them);
    the other nodes keep the results of ``base`` (the concrete propagation at the first point).
    Returns the template, in (batch, resolution, rank), and the nodes that depend on them."""
    env = ShapeEnv()
    batch, resolution, rank = hint
    rank = symbolic_size(env, "rank", rank)
    if shapes_vary:
        batch, resolution = symbolic_size(env, "batch", batch), symbolic_size(env, "resolution", resolution)
    mode = symbolic_mode(env)
    gm = traced.graph_module
    interpreter = MetaInterpreter(gm, garbage_collect_values=False)

    def module_prefix(node: fx.Node) -> str:
        target = str(node.target)
        return target[len(MODEL_PREFIX):] if target.startswith(MODEL_PREFIX) else "\0"

    dependent: set[fx.Node] = set()  # nodes run with symbolic sizes
    rank_sized: set[fx.Node] = set()  # nodes whose result still depends on what varies
    templates: dict[fx.Node, Any] = {}
    symbols = ((batch, BATCH), (resolution, RESOLUTION), (rank, RANK))
    formulas = SymbolicSizes(env, {v.node.expr: name for v, name in symbols if isinstance(v, torch.SymInt)}, POINT,
                             _NotShared)
    size = formulas.size

    def template(node: fx.Node, result: Any) -> Any:
        # Each tensor keeps the storage id the concrete run gave it (aliasing is the same).
        storages = iter([f.storage for f in tree_flatten(base_facts.results[node])[0] if isinstance(f, TensorFacts)])
        return tree_map(lambda leaf: template_of(leaf, size, next(storages)) if isinstance(leaf, torch.Tensor)
                        else size(leaf), result)

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
        inputs = iter(step_inputs(traced, batch, resolution) if shapes_vary else ())
        for node in gm.graph.nodes:
            if node.op == "placeholder" and shapes_vary:  # the images, then the labels
                interpreter.env[node] = result = next(inputs)
                dependent.add(node)
                rank_sized.add(node)
                templates[node] = template(node, result)
                continue
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
                raise _NotShared(f"node {node.name} returns another structure at another size")
            fake_tensors = [t for t in fake_leaves if isinstance(t, torch.Tensor)]
            base_tensors = [t for t in base_leaves if isinstance(t, torch.Tensor)]
            for fake, concrete in zip(fake_tensors, base_tensors):
                if (fake.dtype, bool(fake.requires_grad), fake.is_leaf, fake.dim()) != \
                        (concrete.dtype, bool(concrete.requires_grad), concrete.is_leaf, concrete.dim()):
                    raise _NotShared(f"node {node.name} changes more than sizes with the size")
            fake_inputs = [t for t in tree_flatten((_args_of(interpreter, node)))[0] if isinstance(t, torch.Tensor)]
            base_inputs = [t for t in tree_flatten(_args_of_base(base, node))[0] if isinstance(t, torch.Tensor)]
            if _alias_pattern(fake_tensors, fake_inputs) != _alias_pattern(base_tensors, base_inputs):
                raise _NotShared(f"node {node.name} aliases its inputs differently at another size")
            templates[node] = template(node, result)
            if _mentions_slot(templates[node]) or not _same_facts(templates[node], base_facts.results[node]):
                rank_sized.add(node)
            else:
                interpreter.env[node] = base_result  # the same at every point from here on

    conditions = [c for (value, name), h in zip(symbols, hint) for c in formulas.ranges(value, h, name)]
    conditions += formulas.guards()
    return SizeTemplate(POINT, conditions, formulas, templates, f"template of {type(traced.model).__name__}"), \
        dependent


def _same_facts(template: Any, facts: Any) -> bool:
    """Whether a template without slots says what the concrete propagation found."""
    def plain(leaf: Any) -> Any:
        if isinstance(leaf, (TensorTemplate, TensorFacts)):
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
    return any(isinstance(leaf, Slot) or (isinstance(leaf, TensorTemplate) and (
        isinstance(leaf.storage_nbytes, Slot) or any(isinstance(s, Slot) for s in leaf.shape))) for leaf in leaves)


def _args_of(interpreter: fx.Interpreter, node: fx.Node) -> tuple[Any, ...]:
    return interpreter.fetch_args_kwargs_from_env(node)


def _args_of_base(base: Any, node: fx.Node) -> tuple[Any, ...]:
    return fx.node.map_arg((node.args, node.kwargs), lambda n: base.results.get(n))


def _relative(changes: dict[Any, Any], prefix: str) -> dict[Any, Any]:
    """Changes keyed by qualified names (or ``(qualified owner, attribute)``) re-keyed relative
    to the module ``prefix``."""
    def below(name: str) -> str:
        return "" if name == prefix else name[len(prefix) + 1:]

    return {(below(key[0]), key[1]) if isinstance(key, tuple) else below(key): value for key, value in changes.items()}


def _run_with(interpreter: fx.Interpreter, node: fx.Node, model: nn.Module, tensors: dict[str, torch.Tensor],
              attributes: dict[tuple[str, str], Any]) -> Any:
    """Run ``node`` as if some of the model's parameters and attributes were others: a
    ``call_module`` node calls a copy of its module with them replaced (``trace.altered_copy``);
    the shared, cached model is never modified."""
    if node.op != "call_module" or not (tensors or attributes):
        return interpreter.run_node(node)
    prefix = str(node.target)[len(MODEL_PREFIX):]
    module = altered_copy(model.get_submodule(prefix), _relative(tensors, prefix), _relative(attributes, prefix))
    args, kwargs = interpreter.fetch_args_kwargs_from_env(node)
    return module(*args, **kwargs)


# -- 3. costs as arrays

def _stack_leaf(column: Sequence[Any], where: str) -> Any:
    first = column[0]
    if type(first) is int:
        if any(type(v) is not int for v in column):
            raise _NotShared(f"{where} changes type with the rank")
        return first if all(v == first for v in column) else np.array(column, dtype=np.int64)
    if any(type(v) is not type(first) or v != first for v in column):
        raise _NotShared(f"{where} changes with the rank")
    return first


def _stack(values: Sequence[Any], where: str) -> Any:
    """One value per rank -> one value whose sizes are arrays over the ranks (equal ones stay
    ints; notes are the first rank's)."""
    rows, structure = _same_structure(values, where)
    return nested.unflatten(structure, [_stack_leaf(column, where) for column in zip(*rows)])


def _optimizer_steps(shared: _Shared, flow: GradientFlow, ranks: list[Point]) -> tuple[list[OptimizerStep], Any]:
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
        events = [MemEvent(column_size(sizes[:, j]), group, label) for j, (group, label) in enumerate(form)]
        cost = OptimizerCost(_stack([c.flops for c in costs], "the optimizer FLOPs"),
                             _stack([c.state_bytes for c in costs], "the optimizer state"), events, step.cost.note,
                             _stack([c.resident_bytes for c in costs], "the optimizer's resident memory"))
        stacked.append(OptimizerStep(step.label, cost))
    return stacked


def _conforms(value: Any, count: int) -> bool:
    """Whether an answer given for many ranks holds only integers, flags, text and integer arrays
    with one entry per rank (notes aside)."""
    return all(leaf is None or isinstance(leaf, (bool, int, str)) or (
        isinstance(leaf, np.ndarray) and leaf.ndim == 1 and len(leaf) == count and np.issubdtype(leaf.dtype, np.integer))
        for leaf in _flatten(value)[0])


def _agrees(together: Any, alone: Any, i: int) -> bool:
    """Whether entry ``i`` of an answer for many ranks is the answer for that rank alone (notes
    left out)."""
    leaves, structure = _flatten(together)
    alone_leaves, alone_structure = _flatten(alone)
    if structure != alone_structure:
        return False
    return all(type(b) is int and int(a[i]) == b if isinstance(a, np.ndarray) else (type(a) is type(b) and a == b)
               for a, b in zip(leaves, alone_leaves))


def _batch(shared: _Shared, template: SizeTemplate, ranks: list[Point]) -> _RankCosts:
    """The answers for the points ``ranks`` (all covered by ``template``), each plugin asked once
    for all of them where it can answer so: an answer for many points is checked against the
    plugin's own answer at the first, and a node whose plugin cannot answer for many points, or
    answers otherwise, is asked point by point."""
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

    config: StepConfig  # at the first point's batch and resolution, and the traced probe rank
    manager: pluggy.PluginManager
    traced: TracedStep
    dependence: RankDependence
    base: Any  # the concrete propagation's recorder at the first probe
    facts: Propagation
    graph: StepGraph
    nodes: list[fx.Node]  # record index -> its graph node
    images: fx.Node  # the step's two placeholders
    labels: fx.Node
    shapes_vary: bool  # whether the points have more than one (batch, resolution)
    templates: list[SizeTemplate] = field(default_factory=list)
    dependent: set[fx.Node] = field(default_factory=set)
    static_costs: dict[int, OpCost] = field(default_factory=dict)
    # Filled once the dependent nodes are known: (record index, node, its static facts) of each,
    # the rank-sized parameters' metas at the first probe, and the modules with rank-sized attributes.
    dependent_records: list[tuple[int, fx.Node, tuple[Any, ...]]] = field(default_factory=list)
    rank_sized: dict[str, ParamMeta] = field(default_factory=dict)
    # Leaf module name -> the rank-sized attributes ``(owner, attribute)`` at or below it.
    attributes_below: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)


@dataclass
class _RankCosts:
    """One point's answers for the nodes that depend on what varies (or many points' answers:
    every size an array over ``point``, a list)."""

    point: Point | list[Point]
    metas: dict[Value, TensorMeta]
    params: dict[str, ParamMeta]
    costs: dict[int, OpCost]
    steps: list[OptimizerStep] | None = None
    state_before: int = 0


def _rank_costs(shared: _Shared, template: SizeTemplate, point: Point | Sequence[Point],
                records: Iterable[int] | None = None) -> _RankCosts:
    """Ask the op plugins about the dependent nodes (all, or those of ``records``) at ``point``,
    or at many points at once (every size that varies an array over them; see
    ``costmodel.hookspecs.costmodel_op_cost``). The rank-sized attributes of leaf modules are
    seen by the plugins through a copy of their module with the rank's values (``trace.altered_copy``)."""
    dependence, graph = shared.dependence, shared.graph
    many = isinstance(point, list)
    wanted = None if records is None else set(records)
    if many:
        overlay = template.evaluate_many(point)
    elif wanted is None:
        overlay = template.evaluate(*point)
    else:  # a few nodes asked point by point: only what they see (inputs, and the values they are)
        nodes = {shared.nodes[i] for i in wanted}
        inputs = {arg for n in nodes for arg in n.all_input_nodes}
        seen = {value[0] for (node, _), value in shared.facts.same_tensor.items() if node in inputs}
        overlay = template.evaluate(*point, nodes=nodes | inputs | seen)
    results = ChainMap(overlay, shared.facts.results)
    metas: dict[Value, TensorMeta] = {}
    for node, result in overlay.items():
        if isinstance(result, TensorFacts):
            metas[(node, 0)] = tensor_meta(result)
            continue
        for k, facts in enumerate(f for f in tree_flatten(result)[0] if isinstance(f, TensorFacts)):
            metas[(node, k)] = tensor_meta(facts)
    all_metas = ChainMap(metas, graph.metas)
    if many:
        ranks = [p[2] for p in point]
        params = {name: dataclasses.replace(meta, shape=_stack([dependence.shape_at[name](r) for r in ranks], name))
                  for name, meta in shared.rank_sized.items()}
        attributes = _stack([dependence.attributes_at(r) for r in ranks], "the rank-sized attributes")
    else:
        params = {name: dataclasses.replace(meta, shape=dependence.shape_at[name](point[2]))
                  for name, meta in shared.rank_sized.items()}
        attributes = dependence.attributes_at(point[2])
    costs: dict[int, OpCost] = {}
    ask = HookAsker(shared.manager, OP_COST).first
    for index, node, (module, node_params, target, label) in shared.dependent_records:
        if wanted is not None and index not in wanted:
            continue
        record = graph.records[index]
        if any(p.name in params for p in node_params.values()):
            node_params = {local: params.get(p.name, p) for local, p in node_params.items()}
        outputs = tuple(all_metas[v] for v in record.output_values)
        prefix = str(node.target)[len(MODEL_PREFIX):] if node.op == "call_module" else None
        own = shared.attributes_below.get(prefix, ()) if prefix is not None else ()
        if own:  # the plugin sees the module with this rank's attributes (a copy; the model stays)
            module = altered_copy(module, {}, _relative({key: attributes[key] for key in own}, prefix))
        op, _ = node_op(node, results, all_metas, shared.facts.same_tensor, outputs,
                        (module, node_params, target, label))
        if many:
            try:
                cost = ask(node=op)
            except CostModelError:
                # A plugin that branches on a size (its exception arrives as a PluginFailure), or
                # whose answer for the arrays breaks the contract: asked rank by rank, where a
                # failure at one plain rank is the plugin's own and reported as such.
                continue
            if cost is not None and _conforms(cost, len(point)):
                costs[index] = cost
            continue
        cost = ask(node=op)
        if cost is None:
            raise _NotShared(f"no plugin covers node {record.name} at {point}")
        costs[index] = cost
    return _RankCosts(point, metas, params, costs)


def _optimizer_at(shared: _Shared, flow: GradientFlow, point: Point | Sequence[Point]) -> tuple[list[OptimizerStep], Any]:
    """The optimizer's steps at ``point`` and the state that exists before them; for many points,
    asked once with every size and option that varies an array over them."""
    if isinstance(point, tuple):
        config = _config_at(shared.config, point)
        groups = shared.dependence.groups_at(point[2])
    else:
        config = shared.config
        groups = _stack([shared.dependence.groups_at(p[2]) for p in point], "the parameter groups")
    steps, state_before, _ = optimizer_timeline(groups, flow, shared.manager, config)
    return steps, state_before


def _config_at(config: StepConfig, point: Point) -> StepConfig:
    batch, resolution, rank = point
    return config.replace(batch=batch, resolution=resolution, rank=rank)


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
        loss_meta=metas[graph.loss], images=metas[(shared.images, 0)], labels=metas[(shared.labels, 0)])
    return vector, costs


def _predict_together(shared: _Shared, batch: _RankCosts, started: float) -> dict[Point, Prediction]:
    """One simulation over the points of a batch of answers, each point's prediction made by the
    engine's one builder (``prediction.build_prediction``) with the same details a prediction of
    that point alone has; its per-node breakdown, timeline and notes are found when first read."""
    graph, costs = _vector_graph(shared, batch)
    flow = gradient_flow(graph, costs)
    steps, state_before = _optimizer_steps(shared, flow, batch.point)
    grads_before = sum(flow.gradient_bytes.values()) if shared.config.step > 1 else 0
    memory = simulate(graph, costs, flow, steps, state_before, grads_before,
                      micro_batches=shared.config.micro_batches)
    totals = step_totals(graph, costs, memory, steps)
    seconds = (time.perf_counter() - started) / len(batch.point)
    note = f"one of {len(batch.point)} configurations predicted together (costmodel.ranks)"
    return {point: build_prediction(_config_at(shared.config, point), totals.at(i), seconds,
                                    _point_details(shared, graph, costs, memory, flow, point, i, note))
            for i, point in enumerate(batch.point)}


def _point_details(shared: _Shared, graph: StepGraph, costs: list[OpCost | None], memory: MemoryResult,
                   flow: GradientFlow, point: Point, index: int, note: str) -> dict[str, Any]:
    """A point's details (entry ``index`` of a simulation over many points), each computed when
    first read, as a prediction of that point alone computes it."""
    config = _config_at(shared.config, point)

    def method_note() -> str:  # the method's own words at this rank (it may name the rank)
        return prepare_method(shared.manager, step_model(config), config).note

    def optimizer_notes() -> list[str]:
        steps, _, _ = optimizer_timeline(shared.dependence.groups_at(point[2]), flow, shared.manager, config)
        return [step.cost.note for step in steps]

    def nodes() -> list[NodeCost]:
        # The plugins' notes may name sizes: the dependent nodes are asked again at this point.
        template = _template_for(shared, point)
        alone = _rank_costs(shared, template, point).costs if template is not None else {}
        own = [dataclasses.replace(cost, note=alone[i].note) if cost is not None and i in alone else cost
               for i, cost in enumerate(costs)]
        return node_costs(graph, own, memory, index=index)

    def timeline() -> list[Snapshot]:
        return [dataclasses.replace(s, groups=tuple(at_index(g, index) for g in s.groups)) for s in memory.timeline]

    return {"nodes": Deferred(nodes), "timeline": Deferred(timeline), "coverage": coverage(graph, [], False),
            "method": Deferred(method_note), "optimizer": Deferred(optimizer_notes), "batched": note}


def _choose_probes(ranks: Sequence[int]) -> tuple[int, int, int]:
    """Three ranks >= 2 to compare the prepared models at: of those asked for, the middle one
    (traced) and the two ends; where fewer than three are asked for, the next ranks up (prepared
    only, to check the sizes are affine in the rank)."""
    candidates = sorted({r for r in ranks if r >= 2})
    top = max(candidates, default=1)
    candidates += [top + k for k in range(1, PROBES - len(candidates) + 1)] if len(candidates) < PROBES else []
    middle = candidates[len(candidates) // 2]
    return middle, candidates[0], candidates[-1]


def _share(config: StepConfig, points: Sequence[Point], manager: pluggy.PluginManager) -> _Shared:
    """Prepare at the probe ranks, compare, trace and propagate once: what every point shares.
    Points at one rank need no probes: nothing in the model changes between them."""
    ranks = sorted({p[2] for p in points})
    if len(ranks) == 1:
        traced = traced_step(config.replace(rank=ranks[0]), manager)
        probe = ranks[0]
        dependence = RankDependence({}, {}, traced.prepared.param_groups)
    else:
        probes = _choose_probes(ranks)
        probe = probes[0]
        traced = traced_step(config.replace(rank=probe), manager)
        if not traced.prepared.affine_in_rank:
            raise _NotShared(f"method {config.method!r} does not promise sizes affine in the rank for this configuration")
        models, groups = [traced.model], [traced.prepared.param_groups]
        for other in probes[1:]:
            model = step_model(config)
            prepared = prepare_method(manager, model, config.replace(rank=other))
            if not prepared.affine_in_rank:
                raise _NotShared(f"method {config.method!r} does not promise sizes affine in rank {other}")
            models.append(model)
            groups.append(prepared.param_groups)
        dependence = rank_dependence(models, groups, probes)
    # The base propagation at the largest batch and resolution asked for: sizes of 1 are
    # specialised by a symbolic run, so a base there would give a template for size 1 alone.
    batch, resolution = max(p[0] for p in points), max(p[1] for p in points)
    config = config.replace(batch=batch, resolution=resolution)
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
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shapes_vary = len({p[:2] for p in points}) > 1
    shared = _Shared(config.replace(rank=probe), manager, traced, dependence, base, facts, graph,
                     [by_name[r.name] for r in graph.records], placeholders[0], placeholders[1], shapes_vary)
    template, shared.dependent = symbolic_template(traced, base, facts, dependence, (batch, resolution, probe),
                                                   shapes_vary)
    shared.templates.append(template)
    static = traced.graph_cache["static"]
    shared.dependent_records = [(record.index, node, static[node]) for record, node in zip(graph.records, shared.nodes)
                                if node in shared.dependent]
    shared.rank_sized = {p.name: p for p in (*graph.params, *graph.buffers) if p.name in dependence.tensors}
    for leaf in leaves:
        own = tuple(key for key in dependence.attributes if key[0] == leaf or key[0].startswith(leaf + "."))
        if own:
            shared.attributes_below[leaf] = own
    # Every node as a prediction at the first point and probe rank costs it (an uncovered one
    # raises there too); those that depend on nothing that varies keep that answer for all points.
    costs, _ = cost_nodes(graph, manager, allow_unknown=False)
    shared.static_costs = {record.index: cost for record, node, cost in zip(graph.records, shared.nodes, costs)
                           if node not in shared.dependent}
    return shared


def _template_for(shared: _Shared, point: Point) -> SizeTemplate | None:
    """A template that covers ``point``: one made before, or a new one hinted at this point
    (where the others' guards exclude it: rank 1, whose sizes of 1 are specialised, a batch of 1
    or a last stage of 1x1 where the hint had more), if it depends on the same nodes."""
    for template in shared.templates:
        if template.covers(*point):
            return template
    try:
        template, dependent = symbolic_template(shared.traced, shared.base, shared.facts, shared.dependence, point,
                                                shared.shapes_vary)
    except (_NotShared, RuntimeError):
        return None
    if dependent != shared.dependent or not template.covers(*point):
        return None
    shared.templates.append(template)
    return template


def _predict_shared(shared: _Shared, points: list[Point], started: float) -> dict[Point, Prediction]:
    """The points that share ``shared``'s structure, those of one template together (each plugin
    asked once for all of them where it can). A batch that does not hold together (a size zero at
    some of its points only, a plugin whose answer changes form with the size) is left to
    :func:`predict_many`, which predicts its points one by one: one fallback, one level."""
    by_template: dict[int, tuple[SizeTemplate, list[Point]]] = {}
    for point in points:
        template = _template_for(shared, point)
        if template is not None:
            by_template.setdefault(id(template), (template, []))[1].append(point)
    found: dict[Point, Prediction] = {}
    for template, members in by_template.values():
        try:
            found.update(_predict_together(shared, _batch(shared, template, members), started))
        except (_NotShared, MixedSizes, CostModelError):
            continue
    return found


# Ranks asked together are sizes in numpy int64 arrays, whose arithmetic wraps around silently
# past 2**63. Within these bounds no FLOP or byte count of a vision model can come near it (a
# count is at most ~ images x pixels x channels^2 x kernel area x rank x a small factor:
# 2**32 x 2**11 x 2**12 x 2**4 = 2**59); beyond them every rank is predicted alone, in Python's
# exact integers.
_BATCHED_MAX_RANK = 2**12
_BATCHED_MAX_PIXELS = 2**32  # batch x resolution^2


def _int64_safe(points: Sequence[Point]) -> bool:
    return bool(points) and all(rank <= _BATCHED_MAX_RANK and batch * resolution**2 <= _BATCHED_MAX_PIXELS
                                for batch, resolution, rank in points)


def predict_many(config: StepConfig, points: Iterable[Point], *,
                 manager: pluggy.PluginManager | None = None) -> dict[Point, Prediction | CostModelError]:
    """Predict ``config`` at each ``(batch, resolution, rank)`` of ``points`` (its own batch,
    resolution and rank are ignored): the same numbers and details as ``predict_config`` of each
    alone, found together. A point refused (a rank the method refuses, a resolution too small for
    the model) maps to the :class:`CostModelError` that says why."""
    started = time.perf_counter()
    manager = manager or default_plugin_manager()
    wanted = list(dict.fromkeys((int(b), int(r), int(k)) for b, r, k in points))
    found: dict[Point, Prediction | CostModelError] = {}
    shared = None
    # An evaluation pass is predicted point by point (it is one forward; sharing is for training steps).
    if config.phase == TRAINING and _int64_safe(wanted):
        try:
            shared = _share(config, wanted, manager)
        except (_NotShared, CostModelError, MixedSizes):
            shared = None
    if shared is not None:
        found.update(_predict_shared(shared, wanted, started))
    pending = [point for point in wanted if point not in found]
    if pending:
        first, refused_alike = first_answer(
            lambda point: predict_config(_config_at(config, point), manager=manager), pending)
        found[pending[0]] = first
        for point in pending[1:]:
            if refused_alike:  # the first and last point refused for one reason: every point is
                found[point] = first
                continue
            try:
                found[point] = predict_config(_config_at(config, point), manager=manager)
            except CostModelError as error:
                found[point] = error
    return {point: found[point] for point in wanted}


def predict_ranks(config: StepConfig, ranks: Iterable[int], *,
                  manager: pluggy.PluginManager | None = None) -> dict[int, Prediction | CostModelError]:
    """Predict ``config`` at each of ``ranks`` (its own rank is ignored): :func:`predict_many` at
    its batch and resolution."""
    ranks = list(dict.fromkeys(int(r) for r in ranks))
    found = predict_many(config, [(config.batch, config.resolution, r) for r in ranks], manager=manager)
    return {point[2]: answer for point, answer in found.items()}
