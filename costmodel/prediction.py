"""Predicting one training step: trace, ask the plugins, add up FLOPs, simulate memory.

Nothing here runs backward, an optimizer, ``FlopCounterMode`` or ``MemTracker``: the model is built
on the meta device, traced with torch.fx, its shapes propagated on meta tensors, and every FLOP and
byte comes from a plugin rule (``costmodel.hookspecs``).

What is cached, by which key (everything here; nothing else in the engine keeps state between
predictions). Every cache holds what a pure function of its key gives, so a hit never changes a
number (``tests/test_engine_speed.py`` holds each against the path it short-cuts):

====================  ==========================================  ==========================================
cache                 key                                         holds
====================  ==========================================  ==========================================
traced steps          the configuration without batch,            the prepared, traced step
(``traced_step``)     resolution and step, and the plugin manager (``trace.TracedStep``)
structures            the prepared model's structure fingerprint  one traced step per structure, shared by
                      (``trace.structure_key``)                   configurations that prepare alike
shapes                (batch, resolution), per structure          propagated facts (``shapes.shape_facts``)
shape templates       per structure; a template covers the        facts as formulas in batch and resolution
                      (batch, resolution) its guards accept       (``shapes.ShapeTemplate``)
graph statics         per structure                               what a node is without its sizes, and
                                                                  when each value dies (``graph``)
meta kernels          an op and its inputs' sizes, dtypes,        the op's meta outputs
                      strides (``meta_memo``)                     (``meta_memo.meta_kernel_memo``)
pristine models       model name and classes                      the torchvision model built on the meta
                                                                  device, copied before each use
====================  ==========================================  ==========================================

:func:`clear_cache` empties the first two (and with them the per-structure ones);
``meta_memo.clear_meta_memo`` the meta kernels.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pluggy
from torch import nn

from costmodel.config import EVALUATION, TRAINING, StepConfig
from costmodel.costs import Flops, OpCost, OpNode, ParamGroup, describe_op
from costmodel.errors import CostModelError
from costmodel.graph import StepGraph, build_step_graph
from costmodel.memory import (GradientFlow, MemoryResult, OptimizerStep, Snapshot, gradient_flow, simulate,
                              simulate_evaluation)
from costmodel.plugin_calls import OP_COST, OPTIMIZER_COST, HookAsker, loss_spec
from costmodel.registry import default_plugin_manager, optimizer_names
from costmodel.result import FLOP_CONVENTIONS, StepCost, evaluation_flops, phase_flops
from costmodel.shapes import shape_facts
from costmodel.models import autocast_dtype, step_dtype, step_model
from costmodel.trace import TracedStep, prepare_step, structure_key, trace_config, trace_model


@dataclass(frozen=True)
class NodeCost:
    """One node's share of the step, for breakdowns: what ran, what it cost, and why."""

    name: str
    label: str
    op: str
    forward: Flops
    backward: Flops
    ran_backward: bool
    allocated: int  # bytes the forward allocated (outputs, saved and transient tensors)
    covered: bool
    note: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "op": self.op,
                "forward": {"torch": self.forward.torch, "exact": self.forward.exact},
                "backward": {"torch": self.backward.torch, "exact": self.backward.exact},
                "ran_backward": self.ran_backward, "allocated": self.allocated, "covered": self.covered,
                "note": self.note}


class Deferred:
    """A detail computed on first use: a prediction of many ranks at once (``costmodel.ranks``)
    finds each rank's per-node breakdown, timeline and notes only when someone reads them."""

    def __init__(self, compute: Callable[[], Any]) -> None:
        self._compute: Callable[[], Any] | None = compute
        self._value: Any = None

    def value(self) -> Any:
        if self._compute is not None:
            self._value, self._compute = self._compute(), None
        return self._value


class Details(dict):
    """A prediction's details; a :class:`Deferred` value is computed when first read."""

    def __getitem__(self, key: Any) -> Any:
        value = super().__getitem__(key)
        if isinstance(value, Deferred):
            value = value.value()
            super().__setitem__(key, value)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default

    def items(self):  # type: ignore[override]
        return [(key, self[key]) for key in self]

    def values(self):  # type: ignore[override]
        return [self[key] for key in self]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, dict) and dict(self.items()) == dict(other.items() if not isinstance(other, Details)
                                                                      else other.items())

    __hash__ = None  # type: ignore[assignment]


class Prediction(StepCost):
    """A :class:`StepCost` computed analytically, with a per-node breakdown (``nodes``), the memory
    timeline (``timeline``: one snapshot per simulated op) and the plugin coverage (``coverage``)."""

    @property
    def nodes(self) -> list[NodeCost]:
        return self.details.get("nodes", [])

    @property
    def timeline(self) -> list[Snapshot]:
        return self.details.get("timeline", [])

    @property
    def coverage(self) -> dict[str, Any]:
        return self.details.get("coverage", {})

    @property
    def lower_bound(self) -> bool:
        """True when some node was not covered (``allow_unknown``): every FLOP and byte is then at
        most the true one (see :func:`lower_bound_cost`), not the step's cost."""
        return bool(self.coverage.get("unknown"))

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if self.coverage.get("allow_unknown"):
            data["coverage"] = {k: v for k, v in self.coverage.items() if k != "allow_unknown"}
            data["lower_bound"] = self.lower_bound
        return data

    def render(self, conventions: tuple[str, ...] = FLOP_CONVENTIONS) -> str:
        text = super().render(conventions)
        coverage = self.coverage
        if coverage.get("allow_unknown"):
            text += f"\n\nplugin coverage: {coverage['covered']} of {coverage['nodes']} nodes ({coverage['share']:.1%})"
            if self.lower_bound:
                text += ("\nEVERY FIGURE ABOVE IS A LOWER BOUND: the nodes below are not covered (0 FLOPs, "
                         "nothing saved, gradients passed through)")
            for gap in coverage["unknown"]:
                text += f"\n  not covered: {gap['op']} at node {gap['node']} ({gap['label']})"
        return text


# -- tracing cache: everything that does not depend on batch, resolution or step

_TRACE_CACHE: OrderedDict[tuple[Any, ...], TracedStep] = OrderedDict()
_TRACE_CACHE_SIZE = 32


def _trace_key(config: StepConfig, manager: pluggy.PluginManager) -> tuple[Any, ...]:
    shape_free = {k: v for k, v in config.to_dict().items() if k not in ("batch", "resolution", "step")}
    return (manager, json.dumps(shape_free, sort_keys=True, default=repr))


# Structure fingerprint (costmodel.trace.structure_key) -> a traced step of that structure: configs
# that prepare the same module tree (e.g. GaLore at any rank: only its optimizer groups change)
# share one trace, its shape templates and its structure-only caches.
_STRUCTURE_CACHE: OrderedDict[tuple[Any, ...], TracedStep] = OrderedDict()


def _remember(cache: OrderedDict[Any, TracedStep], key: Any, traced: TracedStep) -> None:
    cache[key] = traced
    cache.move_to_end(key)
    while len(cache) > _TRACE_CACHE_SIZE:
        cache.popitem(last=False)


def traced_step(config: StepConfig, manager: pluggy.PluginManager) -> TracedStep:
    """The prepared, traced step of ``config`` (cached: it does not depend on batch, resolution or
    step; a configuration whose prepared model has the structure of one traced before reuses that
    trace with its own parameter groups)."""
    key = _trace_key(config, manager)
    traced = _TRACE_CACHE.get(key)
    if traced is None:
        loss = loss_spec(manager, config.loss)  # an unknown loss is refused before any work
        model = step_model(config)
        prepared, checkpointed = prepare_step(manager, model, config)
        # The criterion and its target (whose shape may follow the classes) are not part of the
        # model's structure fingerprint.
        structure = (manager, config.channels, config.loss, config.classes, config.micro_batches, config.dtype,
                     config.autocast, config.checkpoint if checkpointed else "", structure_key(model, prepared))
        same = _STRUCTURE_CACHE.get(structure)
        if same is None:
            traced = trace_model(model, prepared, config.model, config.channels, loss=loss, classes=config.classes,
                                 micro_batches=config.micro_batches, dtype=step_dtype(config),
                                 checkpointed=checkpointed, manager=manager, autocast=autocast_dtype(config),
                                 probe=(config.batch, config.resolution))
            _remember(_STRUCTURE_CACHE, structure, traced)
        else:
            traced = dataclasses.replace(same, prepared=prepared)  # shares the structure's caches
        _remember(_TRACE_CACHE, key, traced)
    else:
        _TRACE_CACHE.move_to_end(key)
    return traced


def clear_cache() -> None:
    _TRACE_CACHE.clear()
    _STRUCTURE_CACHE.clear()


# -- costing

def cost_nodes(graph: StepGraph, manager: pluggy.PluginManager, allow_unknown: bool) -> tuple[list[OpCost | None], list[dict[str, str]]]:
    """Ask the op plugins about every node; an unanswered node is an error unless ``allow_unknown``,
    and a plugin that raises or answers wrongly is one naming it (``costmodel.plugin_calls``)."""
    ask = HookAsker(manager, OP_COST).first
    costs: list[OpCost | None] = []
    unknown: list[dict[str, str]] = []
    for record in graph.records:
        cost = ask(node=record.op)
        if cost is None:
            gap = {"node": record.name, "label": record.label, "op": describe_op(record.op)}
            if not allow_unknown:
                raise CostModelError(
                    f"no plugin covers op {gap['op']} at node {gap['node']!r} ({gap['label']}); "
                    f"add an op plugin for it, or pass --allow-unknown for a lower bound")
            unknown.append(gap)
            cost = lower_bound_cost(record.op)
        costs.append(cost)
    return costs, unknown


UNCOVERED_NOTE = "not covered by any plugin: a lower bound (0 FLOPs, nothing saved; gradients pass through)"


def lower_bound_cost(op: OpNode) -> OpCost:
    """What an op no plugin covers is taken to cost under ``--allow-unknown``: the least it can.

    Its outputs are new tensors (the engine allocates every fresh output a plugin does not list),
    it does no arithmetic, saves nothing and allocates nothing else. Its backward still passes
    the gradient on - to every input and trainable parameter of its own that autograd would give
    one, as a gradient that aliases the incoming one (0 new bytes) for inputs and a new tensor of
    the parameter's size for parameters (a ``.grad`` always exists) - so that the nodes before it
    keep their backward, and the parameters their gradients and optimizer state. Every figure is
    then at most the true one: a lower bound, and marked as such."""
    grads = tuple(0 if needed else None for needed in op.needs_input_grad)
    params = {key: meta.nbytes for key, meta in op.params.items() if meta.trainable and not meta.is_buffer}
    return OpCost(forward=Flops(), input_grads=grads, param_grads=params, note=UNCOVERED_NOTE)


def updated_groups(groups: list[ParamGroup], flow: GradientFlow) -> list[ParamGroup]:
    """The method's parameter groups as the optimizer steps them: only parameters that receive a
    gradient (torch's optimizers skip a parameter whose ``.grad`` is None: no state, no update), and
    no group left empty."""
    trained = flow.parameters
    kept = [dataclasses.replace(group, params=[p for p in group.params if p.name in trained]) for group in groups]
    return [group for group in kept if group.params]


def optimizer_steps(groups: list[ParamGroup], manager: pluggy.PluginManager, config: StepConfig,
                    step: int) -> list[OptimizerStep]:
    ask = HookAsker(manager, OPTIMIZER_COST).first
    steps = []
    for index, group in enumerate(groups):
        cost = ask(group=group, step=step, config=config)
        if cost is None:
            raise CostModelError(f"no optimizer plugin covers {group.optimizer!r}; optimizers the plugins cost: "
                                 f"{', '.join(optimizer_names(manager))} "
                                 f"(parameter group {index} of method {config.method!r})")
        steps.append(OptimizerStep(f"{group.optimizer}[{index}]", cost))
    return steps


def optimizer_timeline(param_groups: list[ParamGroup], flow: GradientFlow, manager: pluggy.PluginManager,
                       config: StepConfig) -> tuple[list[OptimizerStep], int, int]:
    """The optimizer's steps over the groups as it sees them, and the optimizer state and parameter
    gradients that exist when step ``config.step`` starts."""
    groups = updated_groups(param_groups, flow)
    steps = optimizer_steps(groups, manager, config, config.step)
    state_before, grads_before = state_after(groups, flow, manager, config, config.step - 1)
    return steps, state_before, grads_before


def state_after(groups: list[ParamGroup], flow: GradientFlow, manager: pluggy.PluginManager, config: StepConfig,
                steps_done: int) -> tuple[int, int]:
    """The optimizer state and the parameter gradients alive after ``steps_done`` training steps
    (``groups`` as the optimizer sees them): what the optimizer holds from its construction
    (``OptimizerCost.resident_bytes``), and from the first step on the state the last step leaves
    (``OptimizerCost.state_bytes``) and every ``.grad`` it was given (``optimizer.step()`` does not
    free them; the next step's ``zero_grad`` does)."""
    done = optimizer_steps(groups, manager, config, max(steps_done, 1))
    resident = sum(s.cost.resident_bytes for s in done)
    if steps_done < 1:
        return resident, 0
    return resident + sum(s.cost.state_bytes for s in done), sum(flow.gradient_bytes.values())


def step_flops(graph: StepGraph, costs: list[OpCost | None], memory: MemoryResult,
               steps: list[OptimizerStep]) -> dict[str, dict[str, int]]:
    """FLOPs per convention and phase: every covered node's forward, the backward of the nodes
    whose backward ran, once per micro-batch, and the optimizer's steps."""
    forward, backward = Flops(), Flops()
    for record, cost in zip(graph.records, costs):
        if cost is None:
            continue
        node_forward, node_backward = record_flops(record.index, cost, memory)
        forward, backward = forward + node_forward, backward + node_backward
    optimizer = Flops()
    for step in steps:
        optimizer = optimizer + step.cost.flops
    return {conv: phase_flops(getattr(forward, conv), getattr(backward, conv), getattr(optimizer, conv))
            for conv in FLOP_CONVENTIONS}


def record_flops(index: int, cost: OpCost, memory: MemoryResult) -> tuple[Flops, Flops]:
    """Record ``index``'s FLOPs over the whole step, forward and backward: its forward once per
    micro-batch; its backward (when it ran) once per micro-batch with the gradient elements it
    accumulated out of place (autograd's ``old + new`` for a value used twice: one add per
    element, which the stock counter does not count), plus those it added into an existing
    ``.grad`` in each micro-batch after the first; and, when activation checkpointing recomputed
    it, its forward again in the backward."""
    micro = memory.micro_batches
    backward = Flops()
    if index in memory.ran_backward:
        backward = ((cost.backward + Flops(0, memory.accumulated.get(index, 0))) * micro
                    + Flops(0, (micro - 1) * memory.grad_accumulated.get(index, 0)))
    if index in memory.recomputed:
        backward = backward + cost.forward * micro
    return cost.forward * micro, backward


@dataclass(frozen=True)
class StepTotals:
    """What one simulated step adds up to: FLOPs per convention and phase, the memory fields and
    the parameter counts. Each number is an int, or (many ranks simulated at once) a numpy array
    with one entry per rank; :meth:`at` picks one rank's."""

    flops: dict[str, dict[str, Any]]
    memory: dict[str, Any]
    trainable_params: Any
    total_params: Any

    def at(self, index: int | None) -> "StepTotals":
        if index is None:
            return self
        return StepTotals({conv: {phase: at_index(v, index) for phase, v in phases.items()}
                           for conv, phases in self.flops.items()},
                          {name: at_index(v, index) for name, v in self.memory.items()},
                          at_index(self.trainable_params, index), at_index(self.total_params, index))


def at_index(value: Any, index: int) -> int:
    """One rank's entry of a size that is an int (the same at every rank) or an array over ranks."""
    return int(value[index]) if hasattr(value, "shape") else int(value)


def step_totals(graph: StepGraph, costs: list[OpCost | None], memory: MemoryResult,
                steps: list[OptimizerStep]) -> StepTotals:
    return StepTotals(step_flops(graph, costs, memory, steps), memory.fields(),
                      sum(p.numel for p in graph.params if p.trainable), sum(p.numel for p in graph.params))


def build_prediction(config: StepConfig, totals: StepTotals, seconds: float, details: dict[str, Any]) -> Prediction:
    """The one place a :class:`Prediction` is made, for one rank or for each of many ranks
    predicted together (with the same details: ``nodes``, ``timeline``, ``coverage``, ``method``,
    ``optimizer``; any of them may be :class:`Deferred`)."""
    return Prediction(config=config, source="predict", flops=totals.flops, memory=totals.memory,
                      trainable_params=totals.trainable_params, total_params=totals.total_params,
                      seconds=seconds, details=Details(details))


def coverage(graph: StepGraph, unknown: list[dict[str, str]], allow_unknown: bool) -> dict[str, Any]:
    """Which share of the graph's nodes a plugin covered, and the ones none did."""
    covered = len(graph.records) - len(unknown)
    return {"allow_unknown": allow_unknown, "nodes": len(graph.records), "covered": covered,
            "share": covered / len(graph.records) if graph.records else 1.0, "unknown": unknown}


def node_costs(graph: StepGraph, costs: list[OpCost], memory: MemoryResult,
               uncovered: set[str] = frozenset(), index: int | None = None) -> list[NodeCost]:
    """Each node's share of the step (``index``: one rank's, where sizes are arrays over ranks)."""
    if index is not None:
        nodes = node_costs(graph, costs, memory, uncovered)
        return [dataclasses.replace(n, forward=Flops(at_index(n.forward.torch, index), at_index(n.forward.exact, index)),
                                    backward=Flops(at_index(n.backward.torch, index),
                                                   at_index(n.backward.exact, index)),
                                    allocated=at_index(n.allocated, index)) for n in nodes]
    nodes = []
    for record, cost in zip(graph.records, costs):
        ran = record.index in memory.ran_backward
        if record.name in uncovered:
            nodes.append(NodeCost(record.name, record.label, describe_op(record.op), Flops(), Flops(), ran,
                                  0, False, "not covered by any plugin"))
            continue
        allocated = sum(a.nbytes for a in cost.forward_allocs)
        forward, backward = record_flops(record.index, cost, memory)  # the step's, over its micro-batches
        nodes.append(NodeCost(record.name, record.label, describe_op(record.op), forward,
                              backward, ran, allocated, True, cost.note))
    return nodes


def predict_config(config: StepConfig, *, allow_unknown: bool = False, manager: pluggy.PluginManager | None = None,
                   model: nn.Module | None = None) -> Prediction:
    """Predict FLOPs per phase and per-group peak memory of step ``config.step`` of ``config``.

    ``model``: a user's module to predict instead of ``config.model`` (copied to the meta device,
    never modified). With ``allow_unknown`` a node no plugin covers counts as 0 FLOPs and only its
    fresh outputs' bytes, and ``coverage`` reports which share of the graph was covered.
    """
    started = time.perf_counter()
    manager = manager or default_plugin_manager()
    traced = trace_config(config, manager, model) if model is not None else traced_step(config, manager)
    graph = build_step_graph(traced, shape_facts(traced, config.batch, config.resolution))
    costs, unknown = cost_nodes(graph, manager, allow_unknown)
    if config.phase == EVALUATION:
        return _predict_evaluation(config, graph, costs, unknown, allow_unknown, manager, model, started)

    flow = gradient_flow(graph, costs)
    steps, state_before, grads_before = optimizer_timeline(traced.prepared.param_groups, flow, manager, config)
    memory = simulate(graph, costs, flow, steps, state_before, grads_before, micro_batches=config.micro_batches)
    details = {"nodes": node_costs(graph, costs, memory, {gap["node"] for gap in unknown}),
               "timeline": memory.timeline, "coverage": coverage(graph, unknown, allow_unknown), "method": traced.prepared.note,
               "optimizer": [step.cost.note for step in steps]}
    return build_prediction(config, step_totals(graph, costs, memory, steps), time.perf_counter() - started, details)


def _predict_evaluation(config: StepConfig, graph: StepGraph, costs: list[OpCost | None], unknown: list[dict[str, str]],
                        allow_unknown: bool, manager: pluggy.PluginManager, model: nn.Module | None,
                        started: float) -> Prediction:
    """An evaluation pass: the forward of ``graph`` (traced in eval mode, nothing requiring grad)
    beside what the training so far leaves alive. Which parameters hold a gradient, and the
    optimizer's state after ``config.step`` steps, come from the training step's own graph."""
    # The gradients and the state have the parameters' sizes, whatever the batch; the training graph
    # is taken at two images or more, since batch norm cannot train on one value per channel while
    # an evaluation of one image is fine.
    training = config.replace(phase=TRAINING, step=max(config.step, 1), batch=max(config.batch, 2))
    train_traced = trace_config(training, manager, model) if model is not None else traced_step(training, manager)
    train_graph = build_step_graph(train_traced, shape_facts(train_traced, training.batch, config.resolution))
    train_costs, _ = cost_nodes(train_graph, manager, allow_unknown)
    flow = gradient_flow(train_graph, train_costs)
    groups = updated_groups(train_traced.prepared.param_groups, flow)
    state, grads = state_after(groups, flow, manager, training, config.step)
    memory = simulate_evaluation(graph, costs, state, grads)
    forward = Flops()
    for cost in costs:
        if cost is not None:
            forward = forward + cost.forward
    totals = StepTotals({conv: evaluation_flops(getattr(forward, conv)) for conv in FLOP_CONVENTIONS},
                        memory.fields(), sum(p.numel for p in train_graph.params if p.trainable),
                        sum(p.numel for p in train_graph.params))
    details = {"nodes": node_costs(graph, costs, memory, {gap["node"] for gap in unknown}),
               "timeline": memory.timeline, "coverage": coverage(graph, unknown, allow_unknown),
               "method": train_traced.prepared.note,
               "optimizer": [f"state after {config.step} training step{'' if config.step == 1 else 's'}: {state:,} B"]}
    return build_prediction(config, totals, time.perf_counter() - started, details)


def first_answer(predict_at: Callable[[int], StepCost], ranks: Sequence[int]) -> tuple[StepCost | CostModelError, bool]:
    """The answer at the first of ``ranks``, and whether the last rank is refused for the same
    reason: then the reason does not depend on the rank (a resolution too small for the model, an
    option the method rejects), and that error answers for every rank at once instead of after
    thousands of predictions that each say the same."""
    try:
        return predict_at(ranks[0]), False
    except CostModelError as error:
        first = error
    if len(ranks) == 1:
        return first, False
    try:
        predict_at(ranks[-1])
    except CostModelError as error:
        if str(error) == str(first):  # the same error (its own type: a plugin's failure stays one)
            return first, True
    return first, False


def predict(model_or_name: str | nn.Module, method: str = "fft", *, rank: int = 4, batch: int = 1,
            resolution: int = 224, classes: int = 10, step: int = 2, phase: str = TRAINING, channels: int = 3,
            loss: str = "cross_entropy",
            lr: float = 1e-3, alpha: float | None = None,
            galore_update_proj_gap: int | None = None, galore_scale: float | None = None,
            optimizer: str | None = None, optimizer_options: dict[str, Any] | None = None,
            accumulate: int = 1, dtype: str = "fp32", checkpoint: str = "", autocast: str = "", quantize: str = "",
            allow_unknown: bool = False, manager: pluggy.PluginManager | None = None,
            **options: Any) -> Prediction:
    """Predict one fine-tuning step of a torchvision model (by name) or of any ``nn.Module``.

    ``predict("mobilenet_v2", "lora", rank=8, batch=4)``; ``predict(my_model, "fft")``. A module is
    fed ``batch`` images of ``channels`` x ``resolution`` x ``resolution`` and a target through the
    loss ``loss`` (``"cross_entropy"``: integer labels through ``nn.CrossEntropyLoss``; ``"mse"``:
    ``nn.MSELoss`` on a target shaped like the logits; an unknown name is refused before any work);
    it is copied to the meta device and never modified. ``phase="evaluate"`` predicts the
    evaluation pass after ``step`` training steps instead (``StepConfig.phase``). Extra keyword
    arguments are method options (``StepConfig.options``). ``alpha``, ``galore_update_proj_gap``
    and ``galore_scale`` are shorthands for the options ``alpha`` (LoRA/DoRA; None: the rank),
    ``update_proj_gap`` and ``scale`` (GaLore; None: the method's defaults, 200 and 0.25); a method
    that does not declare the option refuses it. ``optimizer`` and ``optimizer_options`` choose the
    optimizer and its keyword arguments besides ``lr`` (``StepConfig.optimizer``, None: its default,
    and ``StepConfig.optimizer_options``: ``optimizer="sgd", optimizer_options={"momentum": 0.9}``).
    ``accumulate``: gradient accumulation over that many micro-batches of ``batch`` images per
    optimizer step (``StepConfig.accumulate``). ``dtype``: the step's precision, ``"fp32"``,
    ``"bf16"`` or ``"fp16"`` (``StepConfig.dtype``; a module must already be in it).
    ``checkpoint``: activation checkpointing of the outermost modules whose qualified name matches
    this fnmatch pattern (``StepConfig.checkpoint``). ``autocast``: ``"bf16"`` or ``"fp16"`` runs
    the forward and the loss under ``torch.autocast("cpu", dtype=...)`` (``StepConfig.autocast``).
    ``quantize``: ``"nf4"`` or ``"fp4"`` stores the frozen Linear layers outside the head in 4 bits
    under LoRA, as bitsandbytes' ``Linear4bit`` (``StepConfig.quantize``).
    """
    from costmodel.config import check_int, check_positive

    shorthands = {"alpha": ("alpha", alpha, check_positive),
                  "update_proj_gap": ("galore_update_proj_gap", galore_update_proj_gap, check_int),
                  "scale": ("galore_scale", galore_scale, check_positive)}
    for key, (keyword, value, check) in shorthands.items():
        if value is None:
            continue
        value = check(value, keyword)
        if key in options and options[key] != value:
            raise CostModelError(f"{keyword}={value!r} and {key}={options[key]!r} disagree: give one")
        options[key] = value
    module = None
    if isinstance(model_or_name, nn.Module):
        module = model_or_name
        name = type(module).__name__
    elif isinstance(model_or_name, str):
        name = model_or_name
    else:
        raise CostModelError(f"predict() takes a model name or an nn.Module, not {type(model_or_name).__name__}")
    config = StepConfig(model=name, method=method, rank=rank, batch=batch, resolution=resolution, classes=classes,
                        step=step, phase=phase, lr=lr, channels=channels, loss=loss, options=dict(options),
                        optimizer=StepConfig.optimizer if optimizer is None else optimizer,
                        optimizer_options={} if optimizer_options is None else optimizer_options,
                        accumulate=accumulate, dtype=dtype, checkpoint=checkpoint, autocast=autocast,
                        quantize=quantize)
    return predict_config(config, allow_unknown=allow_unknown, manager=manager, model=module)
