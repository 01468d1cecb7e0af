"""The memory timeline of one training step, group by group.

The simulation follows the memory groups' rules (the README's "What is predicted"; the runtime
reference holds every one against a measurement):

- The unit is a storage, counted once however many values view it, in the category it got when it
  was created: ACT in the forward pass, TEMP in backward, OPT inside ``optimizer.step()``;
  parameters, buffers, inputs (OTH) and the state that exists before the step are there at entry.
  A parameter's gradient is created as TEMP and moves to GRAD when autograd accumulates it.
- A snapshot is taken once at entry and after every op; a group's maximum and the simultaneous
  peak are maxima over snapshots. Frees happen between ops, so an op's outputs are always counted
  together with the inputs its caller frees afterwards.
- Forward: each node allocates what its op plugin lists, in order; outputs that alias an existing
  storage (views, in-place results) allocate nothing. The forward code drops a value after its last
  use (``graph.StepGraph.released_after``); autograd keeps what the plugin says it saves until the
  node's backward has run.
- Backward runs the recorded nodes in reverse order (autograd's ready queue orders by sequence
  number, and every consumer of a value was created after it). For each node: its backward
  allocates its transients and the gradients it computes (snapshot); the engine then drops the
  incoming gradients, releases the saved tensors, and hands each input gradient to its producer,
  accumulating out of place (``old + new``, one more snapshot) when one is already waiting.
  A parameter's gradients wait the same way, in the input buffer of the parameter's one
  ``AccumulateGrad`` node (a parameter used twice: ``old + new`` out of place, one more snapshot);
  that node runs once, right after the last backward node that produces a gradient for the
  parameter (it becomes ready then and is first in the ready queue), and moves the buffer into
  ``.grad`` (TEMP -> GRAD, one more snapshot).
- An in-place op on a differentiable view (``graph.NodeRecord.copy_slices_base``: an in-place
  ``Dropout``/``ReLU``/``+=`` after ``flatten``, ``view`` or indexing) runs its backward inside
  autograd's ``CopySlices`` (:func:`_copy_slices`): zeros of the base's storage, a base-sized
  result, a clone of the gradient's slice, the op's own backward, a copy back; the result is the
  base's gradient, so the view ops between base and view get none from it. An in-place op on a
  tensor that is not a view (``out += identity`` after a conv) is unchanged.
- A result that is an earlier value's very tensor (``nn.Identity``: no autograd node) is that value
  for its consumers (``graph.build_step_graph``), so their gradients meet at the earlier value.
- The gradient of the loss (``ones_like``) is created before autograd's engine starts (ACT) and held
  by the call that starts the backward pass until it returns.
- Optimizer: each parameter group's plugin gives its memory events in order.

Sizes may be numpy integer arrays instead of ints, one entry per rank of a batched prediction
(``costmodel.ranks``): the simulation's decisions never depend on a size except through
:func:`is_zero` and :func:`is_positive`, which refuse a size that is zero (or positive) at some
ranks only (:class:`MixedSizes`), so one pass simulates every rank exactly.

On request (``record_events=True``) the simulation also records its allocation event stream
(:class:`AllocEvent`), the input of the CUDA caching allocator model (``costmodel.allocator``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count
from typing import NamedTuple

import numpy as np

from costmodel.costs import OpCost, OptimizerCost, TensorMeta
from costmodel.errors import CostModelError
from costmodel.graph import NodeRecord, StepGraph, Value
from costmodel.result import MEMORY_GROUPS

GROUP_INDEX = {name: i for i, name in enumerate(MEMORY_GROUPS)}


class MixedSizes(Exception):
    """A size the simulation branches on is zero (or positive) at some ranks of a batched
    prediction and not at others: those ranks do not share one timeline."""


def _uniform(flags: np.ndarray) -> bool:
    if flags.all():
        return True
    if not flags.any():
        return False
    raise MixedSizes("a size is zero at some ranks only")


def is_zero(size: int | np.ndarray) -> bool:
    return _uniform(np.asarray(size) == 0) if isinstance(size, np.ndarray) else size == 0


def is_positive(size: int | np.ndarray) -> bool:
    return _uniform(np.asarray(size) > 0) if isinstance(size, np.ndarray) else size > 0


def _larger(a: int | np.ndarray, b: int | np.ndarray) -> int | np.ndarray:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.maximum(a, b)
    return a if a >= b else b
PARAM, BUFFER, GRAD, ACT, TEMP, OPT, OTH = (GROUP_INDEX[name] for name in MEMORY_GROUPS)


def refuse_arrays(nbytes: int | np.ndarray) -> None:
    """Allocation events are per tensor of one configuration: a batched prediction's sizes (arrays
    over ranks) would give one stream per rank, which the simulation does not record."""
    if isinstance(nbytes, np.ndarray):
        raise CostModelError("allocation events are recorded for one rank at a time, not for a batched "
                             "prediction (its sizes are arrays over ranks)")


@dataclass(frozen=True)
class Snapshot:
    """The bytes of every group right after one op: ``groups`` in ``MEMORY_GROUPS`` order."""

    phase: str  # "entry", "forward", "backward", "optimizer"; "evaluate" in an evaluation pass
    node: str  # the graph node (or optimizer group) that ran the op
    label: str  # what happened: "forward", "backward", "accumulate", "grad", an optimizer event
    groups: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.groups)

    def as_dict(self) -> dict[str, int | str]:
        return {"phase": self.phase, "node": self.node, "label": self.label,
                **dict(zip(MEMORY_GROUPS, self.groups)), "total": self.total}


class AllocEvent(NamedTuple):
    """One event of the simulated step's allocation stream, in the order it happens.

    ``kind`` is ``"alloc"`` (a storage of ``nbytes`` is created), ``"free"`` (the last reference to
    storage ``key`` is dropped; ``nbytes`` is its size) or ``"snapshot"`` (the simulation took
    snapshot number ``key`` of its timeline here; ``nbytes`` is 0), so that a consumer can compare
    what is live at every snapshot. A storage moving between groups (a gradient becoming ``.grad``)
    is no event: the allocator does not see it.

    Keys are hashable and unique among live storages; their first item says what they are:
    ``("storage", id)`` a traced storage (parameters, buffers, the batch, forward outputs: the same
    key in every step of one graph), ``("anonymous", n)`` a transient, saved tensor or gradient,
    ``("entry", group, n)`` a tensor that exists when the step starts (the optimizer state in
    ``"OPT"``, the previous step's gradients in ``"GRAD"``), ``("lump", group, n)`` an optimizer
    event's tensor (``costs.MemEvent``).

    Lump sums: the engine knows the entry gradients one per parameter (``GradientFlow``) and the
    entry optimizer state one per tensor when the caller passes ``state_tensors``; otherwise the
    state is one ``"entry"`` event of its total, which an allocator model then rounds (and places)
    once instead of once per tensor: an approximation. An optimizer ``MemEvent`` with negative bytes
    frees the most recent live lump (else entry tensor) of its group with exactly that size:
    ``MemEvent`` carries no identity, so among equal sizes the choice is a guess that changes
    addresses, never byte counts."""

    kind: str
    key: object
    nbytes: int


@dataclass
class MemoryResult:
    maxima: dict[str, int]
    peak: int
    timeline: list[Snapshot] = field(default_factory=list)
    # Indices of the records whose backward ran (autograd recorded them and a gradient reached them).
    ran_backward: set[int] = field(default_factory=set)
    # Record index -> elements of the gradients its backward accumulated into an existing one
    # (autograd's ``old + new``: one add per element in the exact FLOP convention).
    accumulated: dict[int, int] = field(default_factory=dict)
    # The allocation event stream, when the simulation was asked to record it (``record_events``).
    events: list[AllocEvent] | None = None
    # Gradient accumulation (``StepConfig.accumulate``): the micro-batches the step runs, and per
    # record the elements its backward adds into an existing ``.grad`` in each micro-batch after
    # the first (``AccumulateGrad``: ``grad += new``, one add per element in the exact convention).
    micro_batches: int = 1
    grad_accumulated: dict[int, int] = field(default_factory=dict)
    # Activation checkpointing (``StepConfig.checkpoint``): the records whose forward the backward
    # ran again (their forward FLOPs count in the backward too).
    recomputed: set[int] = field(default_factory=set)

    def fields(self) -> dict[str, int]:
        """The result schema's memory fields."""
        return {**self.maxima, "peak": self.peak, "sum_of_group_peaks": sum(self.maxima.values())}


class _Storages:
    """Live storages with reference counts and categories, and the running per-group totals.

    A total is replaced, never changed in place: with sizes as arrays over ranks, each snapshot of
    the timeline then keeps the arrays of its own moment."""

    def __init__(self, record_timeline: bool, record_events: bool = False) -> None:
        self.current = [0] * len(MEMORY_GROUPS)
        self.maxima = [0] * len(MEMORY_GROUPS)
        self.peak = 0
        self.nbytes: dict[object, int] = {}
        self.group: dict[object, int] = {}
        self.refs: dict[object, int] = {}
        self.timeline: list[Snapshot] | None = [] if record_timeline else None
        self._anonymous = count()
        self.events: list[AllocEvent] | None = [] if record_events else None
        self._snapshots = count()
        # Live tensors of lump sums, per group, in allocation order: (key, nbytes).
        self.lumps: dict[int, list[tuple[object, int]]] = {}
        # Record index -> the references its autograd node keeps as attributes
        # (``OpCost.kept_by_node``): released with the graph, which the loss holds.
        self.kept: dict[int, list[object]] = {}

    def _record(self, kind: str, key: object, nbytes: int) -> None:
        refuse_arrays(nbytes)
        self.events.append(AllocEvent(kind, key, int(nbytes)))

    def new_key(self) -> object:
        return ("anonymous", next(self._anonymous))

    def allocate(self, key: object, nbytes: int, group: int, refs: int = 1) -> object:
        if key in self.refs:
            raise AssertionError(f"storage {key!r} allocated twice")
        self.nbytes[key] = nbytes
        self.group[key] = group
        self.refs[key] = refs
        self.current[group] = self.current[group] + nbytes
        if self.events is not None:
            self._record("alloc", key, nbytes)
        return key

    def anonymous(self, nbytes: int, group: int) -> object:
        return self.allocate(self.new_key(), nbytes, group)

    def hold(self, key: object) -> None:
        self.refs[key] += 1

    def release(self, key: object) -> None:
        left = self.refs[key] - 1
        if left:
            self.refs[key] = left
            return
        del self.refs[key]
        group = self.group.pop(key)
        nbytes = self.nbytes.pop(key)
        self.current[group] = self.current[group] - nbytes
        if self.events is not None:
            self._record("free", key, nbytes)

    def rekey(self, key: object, new: object) -> None:
        """Give a live storage a new key, so that the value it was traced as can be allocated again
        while it lives on (the previous micro-batch's loss); no event: the allocator sees nothing."""
        if self.events is not None:
            raise CostModelError("the allocation event stream does not cover gradient accumulation")
        for table in (self.nbytes, self.group, self.refs):
            table[new] = table.pop(key)

    def retag(self, key: object, group: int) -> None:
        old = self.group[key]
        if old != group:
            self.group[key] = group
            self.current[old] = self.current[old] - self.nbytes[key]
            self.current[group] = self.current[group] + self.nbytes[key]

    def add(self, group: int, nbytes: int, parts: Sequence[int] | None = None, kind: str = "lump") -> None:
        """A lump sum into (or, negative, out of) ``group``; recording events, it is ``parts`` (the
        individual tensors, all of one sign, summing to ``nbytes``) or else one tensor of ``nbytes``:
        a positive part allocates a ``(kind, group, n)`` tensor, a negative one frees the most recent
        live tensor of that group and size (:class:`AllocEvent`)."""
        self.current[group] = self.current[group] + nbytes
        if self.events is None:
            return
        refuse_arrays(nbytes)
        live = self.lumps.setdefault(group, [])
        for part in ([nbytes] if parts is None else parts):
            refuse_arrays(part)
            if part == 0:
                continue
            if part > 0:
                key = (kind, MEMORY_GROUPS[group], next(self._anonymous))
                live.append((key, part))
                self._record("alloc", key, part)
                continue
            for i in range(len(live) - 1, -1, -1):  # lumps first (most recent), then entry tensors
                if live[i][1] == -part:
                    key, size = live.pop(i)
                    self._record("free", key, size)
                    break
            else:
                raise CostModelError(f"cannot record the allocation events: {-part} B leave group "
                                     f"{MEMORY_GROUPS[group]} but no live tensor of it has that size")

    def snapshot(self, phase: str, node: str, label: str) -> None:
        current = self.current
        maxima = self.maxima
        for i, value in enumerate(current):
            maxima[i] = _larger(maxima[i], value)
        self.peak = _larger(self.peak, sum(current))
        if self.events is not None:
            self.events.append(AllocEvent("snapshot", next(self._snapshots), 0))
        if self.timeline is not None:
            self.timeline.append(Snapshot(phase, node, label, tuple(current)))

    def result(self, ran_backward: set[int], accumulated: dict[int, int], micro_batches: int = 1,
               grad_accumulated: dict[int, int] | None = None, recomputed: set[int] | None = None) -> MemoryResult:
        return MemoryResult(dict(zip(MEMORY_GROUPS, self.maxima)), self.peak, self.timeline or [], ran_backward,
                            accumulated, self.events, micro_batches, grad_accumulated or {}, recomputed or set())


@dataclass(frozen=True)
class GradientFlow:
    """Where the step's gradients go, decided before simulating: the records whose backward runs
    (autograd reaches them from the loss), and for each parameter that receives a gradient, how many
    gradients its ``AccumulateGrad`` node waits for and the bytes of its ``.grad``. A trainable
    parameter not listed gets no gradient: its ``.grad`` stays None and optimizers skip it."""

    runs: frozenset[int]
    producers: dict[str, int]
    gradient_bytes: dict[str, int]

    @property
    def parameters(self) -> frozenset[str]:
        """The qualified names of the parameters that receive a gradient in this step."""
        return frozenset(self.producers)


def _param_grad_name(record: NodeRecord, local: str) -> str:
    meta = record.op.params.get(local)
    return meta.name if meta is not None else f"{record.label}.{local}"


def gradient_flow(graph: StepGraph, costs: list[OpCost | None]) -> GradientFlow:
    """Follow the gradient from the loss through the records in autograd's order (reversed)."""
    reached: set[Value] = {graph.loss}
    runs: set[int] = set()
    producers: dict[str, int] = {}
    gradient_bytes: dict[str, int] = {}
    for record in reversed(graph.records):
        cost = costs[record.index]
        op = record.op
        if cost is None or not op.records_autograd or not any(v in reached for v in record.output_values):
            continue
        runs.add(record.index)
        produced = [(_param_grad_name(record, local), nbytes) for local, nbytes in cost.param_grads.items()]
        for i, nbytes in enumerate(cost.input_grads):
            if nbytes is None or i >= len(op.inputs) or not op.needs_input_grad[i]:
                continue
            value = _gradient_target(record, i)
            parameter = graph.param_values.get(value)
            if parameter is None:
                reached.add(value)
            else:
                produced.append((parameter, nbytes))
        for parameter, nbytes in produced:
            producers[parameter] = producers.get(parameter, 0) + 1
            if not is_zero(nbytes):
                gradient_bytes[parameter] = nbytes
    return GradientFlow(frozenset(runs), producers, gradient_bytes)


@dataclass(frozen=True)
class OptimizerStep:
    """One parameter group's optimizer cost, labelled for the timeline."""

    label: str
    cost: OptimizerCost


def simulate(graph: StepGraph, costs: list[OpCost | None], flow: GradientFlow, optimizer_steps: list[OptimizerStep],
             state_before: int, grads_before: int, record_timeline: bool = True, *, record_events: bool = False,
             state_tensors: Sequence[int] | None = None, micro_batches: int = 1) -> MemoryResult:
    """Simulate the step's memory; ``costs[i]`` is record ``i``'s cost (None: an uncovered node,
    counted as allocating its fresh outputs only), ``flow`` is ``gradient_flow(graph, costs)``.
    ``state_before`` / ``grads_before`` are the optimizer state and parameter gradients that exist
    when the step starts.

    ``micro_batches``: gradient accumulation (``StepConfig.accumulate``). The inputs are that many
    micro-batches' (``chunk`` views of one batch, all alive from the start); each micro-batch runs
    the forward and backward, and the optimizer steps once. From the second micro-batch on, every
    ``.grad`` exists, so ``AccumulateGrad`` adds each new gradient into it in place (its tensor
    hook has tagged the new one GRAD; one snapshot at the ``add_``, then the new one goes), and the
    previous micro-batch's loss lives until the new one replaces it, after the forward. Micro-batches
    2..N start from the same state and run the same ops, so the second stands for all of them:
    two are simulated whatever N (``MemoryResult.micro_batches`` says how many there are).

    ``record_events``: also record the allocation event stream (``MemoryResult.events``, plain int
    sizes only). The entry gradients are then one tensor per parameter when ``grads_before`` is
    the sum of ``flow.gradient_bytes`` (what ``prediction.state_after`` gives), and the entry state
    one per entry of ``state_tensors`` when they sum to ``state_before``; else one lump each."""
    entry_grads = list(flow.gradient_bytes.values()) if record_events else None
    mem = _entry(graph, state_before, grads_before, record_timeline, zero_grad=True, record_events=record_events,
                 state_tensors=state_tensors, grad_tensors=entry_grads, micro_batches=micro_batches)
    checkpoints = _Checkpoints(graph, costs)
    saved = _forward_pass(mem, graph, costs, "forward", checkpoints)
    ran_backward, accumulated, _ = _backward_pass(mem, graph, costs, flow, saved, False, checkpoints)
    grad_accumulated: dict[int, int] = {}
    if micro_batches > 1:
        loss = _storage_key(graph)(graph.loss)
        previous_loss = mem.new_key()
        mem.rekey(loss, previous_loss)
        again_checkpoints = _Checkpoints(graph, costs)
        # The previous graph's kept tensors are its storages still: new keys, as for its loss.
        renamed: dict[object, object] = {}
        for keys in mem.kept.values():
            for key in keys:
                if key not in renamed:
                    renamed[key] = mem.new_key()
                    mem.rekey(key, renamed[key])
        previous_graph = [renamed[key] for keys in mem.kept.values() for key in keys]
        mem.kept = {}
        saved = _forward_pass(mem, graph, costs, "forward", again_checkpoints)
        mem.release(previous_loss)  # ``loss = ...`` rebinds the loop's name once the forward returns
        for key in previous_graph:  # ... and the previous graph goes with it
            mem.release(key)
        again, again_accumulated, grad_accumulated = _backward_pass(mem, graph, costs, flow, saved, True,
                                                                    again_checkpoints)
        assert again == ran_backward and again_accumulated == accumulated, "micro-batches differ"

    # -- optimizer
    for step in optimizer_steps:
        for event in step.cost.events:
            mem.add(GROUP_INDEX[event.group], event.nbytes)
            if is_positive(event.nbytes):
                mem.snapshot("optimizer", step.label, event.label or "step")
    return mem.result(ran_backward, accumulated, micro_batches, grad_accumulated, checkpoints.recomputed)


def _backward_pass(mem: _Storages, graph: StepGraph, costs: list[OpCost | None], flow: GradientFlow,
                   saved: dict[int, list[object]], grads_exist: bool, checkpoints: "_Checkpoints | None" = None
                   ) -> tuple[set[int], dict[int, int], dict[int, int]]:
    """The backward pass: the records whose backward ran, the gradient elements each accumulated
    out of place, and (``grads_exist``: every ``.grad`` is there from an earlier micro-batch) the
    elements each added into an existing ``.grad``."""
    ones_like = mem.anonymous(graph.loss_meta.storage_nbytes, ACT)  # created before the engine starts
    mem.snapshot("forward", "", "ones_like")
    grads: dict[Value, object] = {graph.loss: ones_like}
    mem.hold(ones_like)  # held by the backward pass's caller until it returns, besides the engine's buffer
    param_of_value = graph.param_values
    pending = dict(flow.producers)  # parameter -> gradients its AccumulateGrad still waits for
    param_buffers: dict[str, object] = {}  # parameter -> its AccumulateGrad's input buffer
    ran_backward: set[int] = set()
    accumulated: dict[int, int] = {}
    into_grad: dict[int, int] = {}
    for record in reversed(graph.records):
        cost = costs[record.index]
        if cost is None or not record.op.records_autograd:
            continue
        incoming = [grads.pop(value) for value in record.output_values if value in grads]
        if not incoming:
            continue
        ran_backward.add(record.index)
        if checkpoints is not None:  # its first unpack of a checkpointed region runs the recomputation
            checkpoints.before_backward(mem, record, saved)
        elements, added = _backward_node(mem, record, cost, incoming, saved.pop(record.index, ()), grads,
                                         graph.metas, param_of_value, pending, param_buffers, grads_exist,
                                         saved_die_with_apply=checkpoints is not None
                                         and checkpoints.saves_recomputed(record))
        if checkpoints is not None:
            checkpoints.after_backward(mem, record)
        if not is_zero(elements):
            accumulated[record.index] = elements
        if not is_zero(added):
            into_grad[record.index] = added
    for keys in saved.values():  # nodes whose backward never ran: their graph dies with the step
        for key in keys:
            mem.release(key)
    if checkpoints is not None:  # ... and with it the checkpoint frames still alive
        checkpoints.release_frames(mem)
    for key in grads.values():  # gradients that reached a value nothing consumes (a leaf input)
        mem.release(key)
    assert not param_buffers, f"AccumulateGrad never ran for {sorted(param_buffers)}"
    assert ran_backward == flow.runs
    mem.release(ones_like)
    return ran_backward, accumulated, into_grad


def simulate_evaluation(graph: StepGraph, costs: list[OpCost | None], state: int, grads: int,
                        record_timeline: bool = True, *, record_events: bool = False,
                        state_tensors: Sequence[int] | None = None,
                        grad_tensors: Sequence[int] | None = None) -> MemoryResult:
    """Simulate an evaluation pass (``StepConfig.phase == "evaluate"``): ``graph`` traced with the
    model in eval mode and no parameter requiring grad, as under ``torch.no_grad()`` (no op records
    autograd, so nothing is saved and every value is dropped after its last use). ``state`` and
    ``grads`` are the optimizer state and parameter gradients alive beside it (the last training
    step's; no ``zero_grad`` runs). Its snapshots are of phase ``evaluate``. ``record_events``,
    ``state_tensors``: as for :func:`simulate`; ``grad_tensors``: the gradients one per parameter
    (used when they sum to ``grads``)."""
    mem = _entry(graph, state, grads, record_timeline, zero_grad=False, record_events=record_events,
                 state_tensors=state_tensors, grad_tensors=grad_tensors)
    saved = _forward_pass(mem, graph, costs, "evaluate")
    assert not saved, "an evaluation graph in which autograd records an op"
    return mem.result(set(), {})


def _entry(graph: StepGraph, state: int, grads: int, record_timeline: bool, *, zero_grad: bool,
           record_events: bool = False, state_tensors: Sequence[int] | None = None,
           grad_tensors: Sequence[int] | None = None, micro_batches: int = 1) -> _Storages:
    """The storages at entry: parameters, buffers, the inputs (``micro_batches`` micro-batches'),
    the optimizer ``state`` and the gradients ``grads`` that exist before the first op;
    ``zero_grad``: a training step's ``zero_grad(set_to_none=True)`` then frees the gradients,
    without an op or a snapshot. Recording events, the state and gradients are their individual
    tensors where those are given and add up."""
    mem = _Storages(record_timeline, record_events)
    if record_events:
        refuse_arrays(state)
        refuse_arrays(grads)
    state_parts = _parts_if_they_sum(state_tensors, state)
    grad_parts = _parts_if_they_sum(grad_tensors, grads)
    for key, nbytes in graph.param_storages.items():
        mem.allocate(("storage", key), nbytes, PARAM)
    for key, nbytes in graph.buffer_storages.items():
        mem.allocate(("storage", key), nbytes, BUFFER)
    for meta in (graph.images, graph.labels):
        mem.allocate(("storage", meta.storage), meta.storage_nbytes * micro_batches, OTH)
    mem.add(OPT, state, state_parts, kind="entry")
    mem.add(GRAD, grads, grad_parts, kind="entry")
    mem.snapshot("entry", "", "entry")
    if zero_grad:  # ``zero_grad(set_to_none=True)`` drops them parameter by parameter
        mem.add(GRAD, -grads, None if grad_parts is None else [-part for part in grad_parts], kind="entry")
    return mem


def _forward_pass(mem: _Storages, graph: StepGraph, costs: list[OpCost | None], phase: str,
                  checkpoints: "_Checkpoints | None" = None) -> dict[int, list[object]]:
    """The forward of every record; what autograd saved, per record. In a checkpointed region
    (``checkpoints``) autograd saves nothing; the region's inputs are kept by its frame."""
    storage_key = _storage_key(graph)
    saved: dict[int, list[object]] = {}
    for record, cost in zip(graph.records, costs):
        inside = checkpoints is not None and checkpoints.enter(mem, record, storage_key)
        _forward_node(mem, record, cost, storage_key, saved, graph.released_after.get(record.index, ()), phase,
                      checkpointed=inside)
    return saved


def _saves(record: NodeRecord, cost: OpCost | None) -> tuple[bool, bool]:
    """Whether autograd saves tensors for ``record``'s backward, and whether it saves any after the
    op has computed (one of its outputs, or a ``"saved"`` allocation listed after an output:
    ``costs.Alloc``); its inputs, an in-place op's clone of its input and dropout's mask are saved
    before."""
    if cost is None or not record.op.records_autograd:
        return False, False
    after = any(ref.of != "input" for ref in cost.saved)
    seen_output = False
    for alloc in cost.forward_allocs:
        seen_output = seen_output or alloc.lifetime == "output"
        after = after or (alloc.lifetime == "saved" and seen_output)
    return after or bool(cost.saved) or any(a.lifetime == "saved" for a in cost.forward_allocs), after


class _Checkpoints:
    """The checkpointed regions of one forward and backward (``StepGraph.checkpoint_regions``),
    as ``torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)`` runs them
    (torch 2.14.1, ``_checkpoint_without_reentrant_generator`` and ``_checkpoint_hook``):

    - forward: the frame keeps the region's inputs (``save_inputs``) from the call on; every tensor
      autograd would save inside is packed into a placeholder instead, so nothing is kept for the
      backward (an op's extra saved outputs die with the op);
    - backward: the first unpack (the backward of the region's last record that saves anything)
      runs the region's forward again from the kept inputs, with gradients on. A module's forward
      run again in backward allocates ACT, not TEMP (the groups' rule). The recomputation keeps each tensor the
      original forward saved and stops as soon as the last one is saved (early stop): at the last
      saving record, before its computation when it saves only inputs (autograd packs those before
      the op runs), after it when it saves an output. Everything else it made dies when it stops;
    - a recomputed saved tensor goes when its record's backward has unpacked it (its handle is
      dropped); the frame, and with it the region's inputs, once every record of the region that
      saved has run its backward (their placeholders hold it), or with the step's graph.
    """

    def __init__(self, graph: StepGraph, costs: list[OpCost | None]) -> None:
        self.graph = graph
        self.costs = costs
        self.region_of: dict[int, int] = {}
        self.saves: dict[int, tuple[bool, bool]] = {}
        self.fresh: list[set[int]] = []
        for r, region in enumerate(graph.checkpoint_regions):
            storages: set[int] = set()
            for i in region.records:
                self.region_of[i] = r
                record = graph.records[i]
                self.saves[i] = _saves(record, costs[i])
                storages.update(graph.metas[record.output_values[k]].storage for k in record.fresh_outputs)
            self.fresh.append(storages)
        # Per region: the inputs its frame keeps, and the saving records whose backward is to come.
        self.frames: dict[int, list[object]] = {}
        self.pending: dict[int, set[int]] = {}
        self.done: set[int] = set()
        self.recomputed: set[int] = set()

    def enter(self, mem: _Storages, record: NodeRecord, storage_key: Callable[[Value], object]) -> bool:
        """Before ``record``'s forward: whether it is in a region; at a region's first record, the
        frame takes its inputs."""
        r = self.region_of.get(record.index)
        if r is None:
            return False
        region = self.graph.checkpoint_regions[r]
        if record.index == region.records[0]:
            keys = [storage_key(value) for value in region.inputs]
            for key in keys:
                mem.hold(key)
            self.frames[r] = keys
            self.pending[r] = {i for i in region.records if self.saves[i][0]}
        return True

    def before_backward(self, mem: _Storages, record: NodeRecord, saved: dict[int, list[object]]) -> None:
        r = self.region_of.get(record.index)
        if r is None or r in self.done or not self.saves[record.index][0]:
            return
        self.done.add(r)
        self._recompute(mem, r, saved)

    def saves_recomputed(self, record: NodeRecord) -> bool:
        """Whether the node's saved tensors are its region's recomputed ones (the region ran again)."""
        r = self.region_of.get(record.index)
        return r is not None and r in self.done

    def after_backward(self, mem: _Storages, record: NodeRecord) -> None:
        r = self.region_of.get(record.index)
        if r is None or r not in self.pending:
            return
        self.pending[r].discard(record.index)
        if not self.pending[r]:
            self._release_frame(mem, r)

    def release_frames(self, mem: _Storages) -> None:
        for r in list(self.frames):
            self._release_frame(mem, r)

    def _release_frame(self, mem: _Storages, r: int) -> None:
        for key in self.frames.pop(r, ()):
            mem.release(key)
        self.pending.pop(r, None)

    def _recompute(self, mem: _Storages, r: int, saved: dict[int, list[object]]) -> None:
        region = self.graph.checkpoint_regions[r]
        metas = self.graph.metas
        fresh = self.fresh[r]

        def key(value: Value) -> object:
            storage = metas[value].storage
            return ("recompute", r, storage) if storage in fresh else ("storage", storage)

        savers = [i for i in region.records if self.saves[i][0]]
        stop = savers[-1]
        held: list[object] = []  # the recomputation's own references (its locals), dropped when it stops
        for i in region.records:
            record, cost = self.graph.records[i], self.costs[i]
            if i == stop and not self.saves[i][1]:  # saves what it saves first, then the recomputation stops
                keys = [key(record.input_values[ref.index]) for ref in cost.saved]
                for k in keys:
                    mem.hold(k)
                keys += [mem.anonymous(alloc.nbytes, ACT) for alloc in cost.forward_allocs if alloc.lifetime == "saved"]
                saved[i] = keys
                mem.snapshot("backward", record.name, "recompute")
                break
            _run_node(mem, record, cost, key, saved, "backward", "recompute", record.op.records_autograd)
            held.extend(key(value) for value in record.output_values)
            self.recomputed.add(i)
            for value in self.graph.released_after.get(i, ()):
                k = key(value)
                if k in held:
                    held.remove(k)
                    mem.release(k)
            if i == stop:
                break
        for k in held:
            mem.release(k)


def _parts_if_they_sum(parts: Sequence[int] | None, total: int) -> list[int] | None:
    """``parts`` if they are the individual tensors of ``total`` (they add up), else None (one lump)."""
    if parts is None or isinstance(total, np.ndarray) or sum(parts) != total:
        return None
    return list(parts)


def _storage_key(graph: StepGraph) -> Callable[[Value], object]:
    metas = graph.metas

    def key(value: Value) -> object:
        return ("storage", metas[value].storage)

    return key


def _forward_node(mem: _Storages, record: NodeRecord, cost: OpCost | None, storage_key: Callable[[Value], object],
                  saved: dict[int, list[object]], released: tuple[Value, ...] | list[Value], phase: str,
                  checkpointed: bool = False) -> None:
    """One record's forward, then the values the forward code drops after it. In a checkpointed
    region autograd keeps a placeholder, not the tensor (``_Checkpoints``)."""
    _run_node(mem, record, cost, storage_key, saved, phase, "forward", record.op.records_autograd and not checkpointed,
              keeps=record.op.records_autograd)
    for value in released:
        mem.release(storage_key(value))


def _run_node(mem: _Storages, record: NodeRecord, cost: OpCost | None, storage_key: Callable[[Value], object],
              saved: dict[int, list[object]], phase: str, label: str, records_autograd: bool,
              keeps: bool = False) -> None:
    """What running ``record``'s op allocates (its plugin's list in order; fresh outputs it does not
    list), one reference to each output for the code that holds it, what autograd keeps
    (``records_autograd``) in ``saved``, what its node keeps as attributes (``keeps``:
    ``mem.kept``), a snapshot, and the transients freed."""
    op = record.op
    outputs = record.output_values
    fresh = set(record.fresh_outputs)
    transients: list[object] = []
    node_saved: list[object] = []
    if cost is not None:
        for alloc in cost.forward_allocs:
            if alloc.lifetime == "output":
                if alloc.index in fresh:
                    fresh.discard(alloc.index)
                    mem.allocate(storage_key(outputs[alloc.index]), alloc.nbytes, ACT, refs=0)
            elif alloc.lifetime == "saved" and records_autograd:
                node_saved.append(mem.anonymous(alloc.nbytes, ACT))
            else:
                transients.append(mem.anonymous(alloc.nbytes, ACT))
    for index in sorted(fresh):  # outputs the plugin did not list are still new storages
        meta = op.outputs[index]
        mem.allocate(storage_key(outputs[index]), meta.storage_nbytes, ACT, refs=0)
    for value in outputs:
        mem.hold(storage_key(value))
    if cost is not None and records_autograd:
        for ref in cost.saved:
            values = record.input_values if ref.of == "input" else outputs
            key = storage_key(values[ref.index])
            mem.hold(key)
            node_saved.append(key)
    if node_saved:
        saved[record.index] = node_saved
    if cost is not None and keeps and cost.kept_by_node:
        for ref in cost.kept_by_node:
            values = record.input_values if ref.of == "input" else outputs
            key = storage_key(values[ref.index])
            mem.hold(key)
            mem.kept.setdefault(record.index, []).append(key)
    mem.snapshot(phase, record.name, label)
    for key in transients:
        mem.release(key)


def _gradient_target(record: NodeRecord, index: int) -> Value:
    """The value that receives the gradient ``record``'s backward computes for input ``index``:
    the input itself, except for the first input of an in-place op on a view, whose gradient
    CopySlices turns into the base's (:func:`_copy_slices`)."""
    if index == 0 and record.copy_slices_base is not None:
        return record.copy_slices_base
    return record.input_values[index]


def _copy_slices(mem: _Storages, record: NodeRecord, incoming: list[object],
                 metas: dict[Value, TensorMeta]) -> tuple[list[object], object, object]:
    """The start of an in-place-on-view node's backward (torch 2.14.1, CPU), before the op's own.

    After an in-place op on a view, autograd rebases the view's history: the base's gradient edge
    becomes a ``CopySlices`` node wrapping the op's backward, and the view's ``grad_fn`` is
    regenerated from the base as ``AsStridedBackward0``. The view's gradient first goes through
    that: ``as_strided_backward`` allocates zeros of the base's storage size and scatters the
    gradient into them (the incoming gradient is then dropped). ``CopySlices::apply``
    (torch/csrc/autograd/functions/tensor.cpp) then allocates ``result =
    grad.new_empty_strided(base's sizes and strides)`` (the base's gradient), ``result.copy_(grad)``,
    takes ``grad_slice = result.as_strided(view geometry)`` and calls the op's backward on
    ``grad_slice.clone()`` (contiguous, view-sized). :func:`_finish_copy_slices` does the rest.

    Returns the op backward's incoming gradients (the clone), the gradient CopySlices itself holds
    (the scattered zeros) and ``result``. A snapshot after each allocating op.
    (With fake tensors the regenerated ``grad_fn`` replays the view op instead, a view of the
    gradient when the view spans its base: the same bytes from ``new_empty_strided`` on.)"""
    base = metas[record.copy_slices_base]
    name = record.name
    scattered = mem.anonymous(base.storage_nbytes, TEMP)
    mem.snapshot("backward", name, "as_strided_backward")
    for key in incoming:
        mem.release(key)
    result = mem.anonymous(base.nbytes, TEMP)
    mem.snapshot("backward", name, "copy_slices")
    clone = mem.anonymous(metas[record.input_values[0]].nbytes, TEMP)
    mem.snapshot("backward", name, "clone")
    return [clone], scattered, result


def _finish_copy_slices(mem: _Storages, record: NodeRecord, clone: list[object], first: object | None,
                        produced: list[tuple[Value, object]], result: object) -> list[tuple[Value, object]]:
    """The end of ``CopySlices::apply``, after the op's backward: the clone goes when the op's
    backward returns; ``grad_slice.copy_(res[0])`` writes the op's gradient of its first input into
    ``result`` (a snapshot), and ``res[0]`` goes when ``apply`` returns; ``result`` becomes the
    base's gradient. Without a gradient for the first input there is no ``copy_`` and ``result`` is
    dropped. The other inputs' gradients flow on as the op computed them. ``first`` is the op's
    gradient of its first input (``produced[0]``), None when it computed none."""
    for key in clone:
        mem.release(key)
    if first is not None:
        mem.snapshot("backward", record.name, "copy_")
        mem.release(first)
        return [(record.copy_slices_base, result)] + produced[1:]
    mem.release(result)
    return produced


def _backward_node(mem: _Storages, record: NodeRecord, cost: OpCost, incoming: list[object],
                   node_saved: list[object], grads: dict[Value, object], metas: dict[Value, TensorMeta],
                   param_of_value: dict[Value, str], pending: dict[str, int],
                   param_buffers: dict[str, object], grads_exist: bool = False,
                   saved_die_with_apply: bool = False) -> tuple[int, int]:
    """One node's backward; returns the number of gradient elements it accumulated out of place,
    and those it added into an existing ``.grad`` (``grads_exist``: a later micro-batch).
    ``saved_die_with_apply``: the node's saved tensors are a checkpoint's recomputed ones."""
    op = record.op
    name = record.name
    copy_slices = record.copy_slices_base is not None
    if copy_slices:
        incoming, scattered, result = _copy_slices(mem, record, incoming, metas)
    transients = [mem.anonymous(alloc.nbytes, TEMP) for alloc in cost.backward_allocs]
    produced: list[tuple[Value, object]] = []
    first: object | None = None  # the gradient of input 0, if computed (CopySlices copies it back)
    stepped: list[tuple[int, int]] = []  # (index into produced, input) of gradients made in steps
    for i, nbytes in enumerate(cost.input_grads):
        if nbytes is None or i >= len(op.inputs) or not op.needs_input_grad[i]:
            continue
        steps = cost.input_grad_steps.get(i)
        if steps is not None:  # what the apply returns first (OpCost.input_grad_steps)
            nbytes = steps[0]
            stepped.append((len(produced), i))
        if is_zero(nbytes):  # the incoming gradient itself (or a view of it) flows on
            key = incoming[0]
            mem.hold(key)
        else:
            key = mem.anonymous(nbytes, TEMP)
        if i == 0:
            first = key
        produced.append((_gradient_target(record, i), key))
    new_param_grads: list[tuple[str, object, int]] = []  # (qualified name, storage, elements)

    def param_grad(local: str, nbytes: int) -> None:
        meta = op.params.get(local)
        new_param_grads.append((_param_grad_name(record, local), mem.anonymous(nbytes, TEMP),
                                meta.numel if meta is not None else 0))

    late = cost.late_param_grads
    for local, nbytes in cost.param_grads.items():
        if local not in late:
            param_grad(local, nbytes)
    mem.snapshot("backward", name, "backward")

    for key in transients:
        mem.release(key)
    # After the apply, autograd's engine takes each such gradient through its steps, input by
    # input (``validate_outputs``: a sum to the input's shape, a cast to its dtype), each new
    # tensor made before the one it replaces is freed.
    for slot, i in stepped:
        target, key = produced[slot]
        for nbytes in cost.input_grad_steps[i][1:]:
            new = mem.anonymous(nbytes, TEMP)
            mem.snapshot("backward", name, "validate")
            mem.release(key)
            key = new
        produced[slot] = (target, key)
    if copy_slices:
        produced = _finish_copy_slices(mem, record, incoming, first, produced, result)
        incoming = [scattered]
    # After the node's apply, autograd's engine reduces a broadcast parameter's gradient to its
    # shape (``validate_outputs``, the incoming gradient still held), then releases the saved
    # tensors. A checkpointed node's saved tensors are the recomputed ones its apply unpacked: they
    # die with the apply, before the reduction.
    if saved_die_with_apply:
        for key in node_saved:
            mem.release(key)
    if late:
        for local in late:
            param_grad(local, cost.param_grads[local])
        mem.snapshot("backward", name, "reduced gradient")
    if not saved_die_with_apply:
        for key in node_saved:
            mem.release(key)
    for key in incoming:
        mem.release(key)
    accumulated = 0
    for value, key in produced:
        parameter = param_of_value.get(value)
        if parameter is not None:  # a parameter used as a plain input (get_attr): AccumulateGrad
            new_param_grads.append((parameter, key, metas[value].numel))
            continue
        waiting = grads.get(value)
        if waiting is None:
            grads[value] = key
            continue
        meta = metas[value]
        total = mem.anonymous(meta.nbytes, TEMP)  # InputBuffer: old + new, out of place
        accumulated += meta.numel
        mem.snapshot("backward", name, "accumulate")
        mem.release(waiting)
        mem.release(key)
        grads[value] = total
    ready: list[tuple[object, int]] = []
    for qualified, key, elements in new_param_grads:
        waiting = param_buffers.pop(qualified, None)
        if waiting is not None:  # a parameter used twice: AccumulateGrad's InputBuffer, old + new
            total = mem.anonymous(mem.nbytes[key], TEMP)
            accumulated += elements
            mem.snapshot("backward", name, "accumulate")
            mem.release(waiting)
            mem.release(key)
            key = total
        pending[qualified] -= 1
        if pending[qualified]:
            param_buffers[qualified] = key
        else:  # the last gradient arrived: AccumulateGrad runs
            ready.append((key, elements))
    added = 0
    if ready and grads_exist:  # ``.grad += new``: tagged GRAD by the tensor hook, dropped after the add_
        for key, elements in ready:
            mem.retag(key, GRAD)
            mem.snapshot("backward", name, "grad_add_")
            mem.release(key)
            added += elements
    elif ready:  # the buffer becomes ``.grad`` (TEMP -> GRAD)
        for key, _ in ready:
            mem.retag(key, GRAD)
        mem.snapshot("backward", name, "grad")
    return accumulated, added
