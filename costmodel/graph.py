"""The traced step as per-node records: what each op plugin is asked about, plus liveness.

A *value* is one tensor a node produces: ``(node, k)`` for the ``k``-th tensor of its result.
Several values may share a storage (views, in-place results); memory is counted per storage.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx
from torch.utils._pytree import tree_flatten

from costmodel.costs import OpNode, ParamMeta, TensorMeta
from costmodel.shapes import Propagation, TensorFacts
from costmodel.trace import MODEL_PREFIX, TracedStep, iter_params

Value = tuple[fx.Node, int]
COSTED_OPCODES = ("call_module", "call_function", "call_method")


@dataclass
class NodeRecord:
    """One costed node: the :class:`OpNode` plugins see, and where its tensors come from."""

    index: int
    op: OpNode
    # The value behind ``op.inputs[i]`` and ``op.outputs[k]``; an input that is an earlier value's
    # very tensor (``Propagation.same_tensor``) is that earlier value.
    input_values: tuple[Value, ...]
    output_values: tuple[Value, ...]
    # Output indices whose storage this node allocates (not an alias of an existing storage).
    fresh_outputs: tuple[int, ...]
    # The module qualified name (call_module) or the function / method name, for display.
    label: str
    # An in-place op on a differentiable view that autograd records (its first output is its first
    # input's very tensor object, a view): autograd rebases the view's history, and the backward
    # runs through ``CopySlices`` (``costmodel.memory``), whose gradient is that of the view's
    # *base*, not of the view. This is the value autograd's edge to the base leads to: the base
    # object's latest value before this node. None for every other node.
    copy_slices_base: Value | None = None

    @property
    def name(self) -> str:
        return self.op.name


@dataclass(frozen=True)
class CheckpointRegion:
    """One checkpointed module call (``StepConfig.checkpoint``): the records run inside it, in
    order, and the values of its tensor arguments (``torch.utils.checkpoint`` keeps them for the
    recomputation)."""

    name: str
    records: tuple[int, ...]
    inputs: tuple[Value, ...]


@dataclass
class StepGraph:
    """Every costed node in execution order, the step's inputs, parameters and liveness."""

    records: list[NodeRecord]
    images: TensorMeta
    labels: TensorMeta
    loss: Value
    loss_meta: TensorMeta
    params: list[ParamMeta]
    buffers: list[ParamMeta]
    # Storage id -> bytes of every parameter and buffer storage (they are never freed).
    param_storages: dict[int, int]
    buffer_storages: dict[int, int]
    # After record i has run, these values are no longer referenced by the forward code.
    released_after: dict[int, list[Value]] = field(default_factory=dict)
    metas: dict[Value, TensorMeta] = field(default_factory=dict)
    # Values that are trainable parameters used as plain inputs (get_attr): their gradient is the
    # parameter's gradient.
    param_values: dict[Value, str] = field(default_factory=dict)
    # The checkpointed module calls, in order; a record is in at most one.
    checkpoint_regions: list[CheckpointRegion] = field(default_factory=list)

    def __iter__(self) -> Iterator[NodeRecord]:
        return iter(self.records)


def tensor_meta(facts: TensorFacts) -> TensorMeta:
    return TensorMeta(facts.shape, facts.dtype, facts.requires_grad, facts.storage, facts.storage_nbytes,
                      facts.contiguous)


def _flatten_facts(value: Any) -> list[TensorFacts]:
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, TensorFacts)]


def _param_name(qualified: str) -> str:
    return qualified[len(MODEL_PREFIX):] if qualified.startswith(MODEL_PREFIX) else qualified


def _label(traced: TracedStep, node: fx.Node) -> str:
    if node.op == "call_module":
        return _param_name(str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return getattr(node.target, "__name__", None) or str(node.target)


def _canonical_names(traced: TracedStep) -> dict[int, str]:
    """Each parameter's and buffer's one qualified name (``named_parameters()``'s: the first path
    to it), by identity: a weight shared by two modules (``conv_b.weight = conv_a.weight``) is one
    parameter, with one ``.grad`` that both modules' gradients accumulate into, whichever module
    reads it."""
    names = traced.graph_cache.get("canonical_names")
    if names is None:
        module = traced.graph_module
        names = {id(tensor): name for name, tensor in [*module.named_parameters(), *module.named_buffers()]}
        traced.graph_cache["canonical_names"] = names
    return names


def _static(traced: TracedStep, node: fx.Node) -> tuple[Any, ...]:
    """What does not depend on shapes: (module, its parameters as ParamMeta, target, label)."""
    if node.op != "call_module":
        return None, {}, node.target, _label(traced, node)
    module = traced.graph_module.get_submodule(str(node.target))
    prefix = str(node.target) + "."
    canonical = _canonical_names(traced)
    params = {local: ParamMeta(_param_name(canonical.get(id(tensor), prefix + local)), tuple(tensor.shape),
                               tensor.dtype, bool(tensor.requires_grad) and not is_buffer, is_buffer)
              for local, tensor, is_buffer in iter_params(module)}
    return module, params, type(module), _label(traced, node)


def node_op(node: fx.Node, results: Mapping[fx.Node, Any], metas: Mapping[Value, TensorMeta],
            same_tensor: Mapping[Value, Value], outputs: tuple[TensorMeta, ...],
            static: tuple[Any, ...]) -> tuple[OpNode, tuple[Value, ...]]:
    """The :class:`OpNode` plugins are asked about for ``node``, and the values behind its inputs:
    tensors in the arguments replaced by their metas (``results`` and ``metas`` as propagated,
    ``static`` as :func:`_static` gives it)."""
    input_values: list[Value] = []

    def replace(arg: Any) -> Any:
        if not isinstance(arg, fx.Node):
            return arg
        value = results[arg]
        if isinstance(value, TensorFacts):
            input_values.append(same_tensor.get((arg, 0), (arg, 0)))
            return metas[(arg, 0)]
        if isinstance(value, (tuple, list)) and any(isinstance(v, TensorFacts) for v in value):
            replaced = []
            k = 0
            for item in value:
                if isinstance(item, TensorFacts):
                    input_values.append(same_tensor.get((arg, k), (arg, k)))
                    replaced.append(metas[(arg, k)])
                    k += 1
                else:
                    replaced.append(item)
            return type(value)(replaced) if isinstance(value, tuple) else replaced
        return value

    args = fx.node.map_aggregate(node.args, replace)
    kwargs = fx.node.map_aggregate(node.kwargs, replace)
    inputs = tuple(metas[v] for v in input_values)
    module, node_params, target, _ = static
    op = OpNode(
        name=node.name, kind=node.op, target=target, args=tuple(args), kwargs=dict(kwargs),
        inputs=inputs, outputs=outputs, needs_input_grad=tuple(t.requires_grad for t in inputs),
        module=module, params=node_params,
    )
    return op, tuple(input_values)


def build_step_graph(traced: TracedStep, propagation: Propagation) -> StepGraph:
    """Turn a propagated trace into records (shapes, aliasing, gradients needed) and liveness."""
    gm = traced.graph_module
    results = propagation.results
    seen: set[int] = set()
    static: dict[fx.Node, tuple[Any, ...]] = traced.graph_cache.setdefault("static", {})

    params: list[ParamMeta] = []
    buffers: list[ParamMeta] = []
    param_storages: dict[int, int] = {}
    buffer_storages: dict[int, int] = {}
    for qualified, facts, is_buffer in propagation.params:
        seen.add(facts.storage)
        meta = ParamMeta(_param_name(qualified), facts.shape, facts.dtype, facts.requires_grad and not is_buffer,
                         is_buffer)
        (buffers if is_buffer else params).append(meta)
        (buffer_storages if is_buffer else param_storages)[facts.storage] = facts.storage_nbytes

    metas: dict[Value, TensorMeta] = {}
    records: list[NodeRecord] = []
    position: dict[fx.Node, int] = {}
    placeholders: list[TensorMeta] = []
    param_values: dict[Value, str] = {}
    loss: Value | None = None

    # A result that is an earlier value's very tensor (no autograd node of its own) is that value
    # for its consumers: autograd sends their gradients straight to it.
    same_tensor = propagation.same_tensor
    identities = propagation.identities
    # Tensor object id -> the value it holds now (an in-place op gives the same object a new value).
    latest: dict[int, Value] = {}

    for node in gm.graph.nodes:
        if node.op == "output":
            loss_node = node.args[0]
            loss = same_tensor.get((loss_node, 0), (loss_node, 0))
            continue
        result = results[node]
        tensors = _flatten_facts(result)
        outputs: list[TensorMeta] = []
        fresh: list[int] = []
        for k, facts in enumerate(tensors):
            meta = tensor_meta(facts)
            metas[(node, k)] = meta
            outputs.append(meta)
            if facts.storage not in seen:
                seen.add(facts.storage)
                fresh.append(k)
        if node.op in ("placeholder", "get_attr"):
            _note_values(node, len(tensors), identities, same_tensor, latest)
        if node.op == "placeholder":
            placeholders.append(outputs[0])
            continue
        if node.op == "get_attr":  # a parameter or buffer used directly
            if isinstance(result, TensorFacts) and result.requires_grad and result.is_leaf:
                param_values[(node, 0)] = _param_name(str(node.target))
            continue

        op, input_values = node_op(node, results, metas, same_tensor, tuple(outputs),
                                   static.get(node) or static.setdefault(node, _static(traced, node)))
        base = _copy_slices_base(node, op, input_values, identities, same_tensor, latest)
        position[node] = len(records)
        records.append(NodeRecord(len(records), op, input_values,
                                  tuple((node, k) for k in range(len(tensors))), tuple(fresh), static[node][3],
                                  base))
        _note_values(node, len(tensors), identities, same_tensor, latest)
        if base is not None:
            # The base's gradient edge is CopySlices now: a later in-place op on another view of
            # it sends its base gradient into this node (exact when the views span the base).
            latest[identities[input_values[0]][1]] = (node, 0)

    if loss is None or len(placeholders) != 2:
        raise AssertionError("a traced training step has two placeholders and one output")

    released_after = traced.graph_cache.get("released_after")
    if released_after is None:  # it depends on the graph's structure only
        released_after = traced.graph_cache["released_after"] = _liveness(traced, records, position, loss)
    return StepGraph(records, placeholders[0], placeholders[1], loss, metas[loss], params, buffers,
                     param_storages, buffer_storages, released_after, metas, param_values,
                     _checkpoint_regions(traced, position, metas, same_tensor))


def _checkpoint_regions(traced: TracedStep, position: Mapping[fx.Node, int], metas: Mapping[Value, TensorMeta],
                        same_tensor: Mapping[Value, Value]) -> list[CheckpointRegion]:
    regions = []
    for call in traced.checkpoint_calls:
        inside: list[int] = []
        node = call.first
        while True:
            if node in position:
                inside.append(position[node])
            if node is call.last:
                break
            node = node.next
        inputs = []
        for argument in call.arguments:
            k = 0
            while (argument, k) in metas:
                value = same_tensor.get((argument, k), (argument, k))
                if value not in inputs:
                    inputs.append(value)
                k += 1
        if inside:
            regions.append(CheckpointRegion(_param_name(call.qualname), tuple(inside), tuple(inputs)))
    return regions


def _note_values(node: fx.Node, tensors: int, identities: Mapping[Value, tuple[int, int | None]],
                 same_tensor: Mapping[Value, Value], latest: dict[int, Value]) -> None:
    """Record that the tensor objects of ``node``'s result now hold its values."""
    for k in range(tensors):
        identity = identities.get((node, k))
        if identity is not None:
            latest[identity[0]] = same_tensor.get((node, k), (node, k))


def _copy_slices_base(node: fx.Node, op: OpNode, input_values: tuple[Value, ...],
                      identities: Mapping[Value, tuple[int, int | None]], same_tensor: Mapping[Value, Value],
                      latest: Mapping[int, Value]) -> Value | None:
    """The value CopySlices sends the gradient to when ``node`` is an in-place op on a view that
    autograd records (``NodeRecord.copy_slices_base``), else None. In place means the result is
    the very object of the first tensor input (a view op returns a new object on the same
    storage; only identity tells them apart) with a new autograd history: a node that hands its
    input back untouched (dropout with ``p=0``, ``nn.Identity``) is ``same_tensor``, no op at all."""
    if not op.records_autograd or not input_values or not op.outputs or (node, 0) in same_tensor:
        return None
    output, argument = identities.get((node, 0)), identities.get(input_values[0])
    if output is None or argument is None or output[0] != argument[0] or argument[1] is None:
        return None
    return latest.get(argument[1])


def _liveness(traced: TracedStep, records: list[NodeRecord], position: dict[fx.Node, int],
              loss: Value) -> dict[int, list[Value]]:
    """When the forward code drops its last reference to each produced value.

    A value dies after its last user has run, like fx's own liveness, except that the arguments of
    a traced-through module call live until that call returns (the caller holds them), a value bound
    to a local variable of model code lives until the variable is rebound or its function returns,
    and the loss lives to the end of the step (the training loop holds it).
    """
    last: dict[fx.Node, int] = {}
    for record in records:
        for value_node, _ in record.input_values:
            if value_node in position:
                last[value_node] = max(last.get(value_node, -1), record.index)
    for call in traced.module_calls:
        end = position.get(call.last_node)
        if end is None:
            continue
        for argument in call.arguments:
            if argument in position and argument in last:
                last[argument] = max(last[argument], end)
    for node, after in traced.local_releases.items():
        if node not in position:
            continue
        while after is not None and after not in position and after.op != "root":
            after = after.prev  # a get_attr or placeholder node: the costed node before it
        if after in position:
            last[node] = max(last.get(node, position[node]), position[after])
    released: dict[int, list[Value]] = {}
    for node, index in position.items():
        if node is loss[0]:
            continue
        record = records[index]
        end = last.get(node, index)  # an unused result dies right after its node
        released.setdefault(end, []).extend(record.output_values)
    return released
