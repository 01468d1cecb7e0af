"""The facts shape propagation gives about every traced value, computed once per structure.

Propagating a graph on meta tensors costs the same whatever the batch and resolution, but it runs
PyTorch's meta kernels in Python (batch norm's is a decomposition): a few hundred milliseconds for a
MobileNet. Everything else a prediction does is cheaper. So the facts are cached on the traced step:

- per ``(batch, resolution)`` (an exact repeat costs nothing);
- as a *shape template*: once a structure has been propagated at ``TEMPLATE_AFTER`` shapes and is
  asked for another, it is propagated once more with a symbolic batch and resolution
  (``FakeTensorMode`` with a ``ShapeEnv``; a few seconds, the price of about ten concrete
  propagations). Every size and storage size becomes a formula in the two, compiled to one
  Python function; every decision the kernels took on a size became a guard. A template serves
  any batch and resolution its guards accept (e.g. "the last stage is larger than 1x1") in about
  a millisecond; shapes outside them get another template or, failing that, a concrete
  propagation. Templates never approximate: a guard that does not hold means the template is not
  used.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sympy
import torch
from torch import fx
from torch.utils._pytree import tree_map

from costmodel.trace import TracedStep, step_inputs, Recorder, flatten_tensors, iter_params, propagate

TEMPLATE_AFTER = 3  # distinct shapes propagated concretely before a template is worth its cost
MAX_TEMPLATES = 4  # per traced structure: batch 1 vs larger, a last stage of 1x1 vs larger...
CACHED_SHAPES = 16  # per traced structure


@dataclass(frozen=True)
class TensorFacts:
    """What propagation tells about one tensor. ``storage`` is a small integer that identifies
    its storage within one propagation: equal ids alias."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool
    is_leaf: bool
    storage: int
    storage_nbytes: int
    contiguous: bool = True


# (node, k) -> (the tensor object, the base object of a differentiable view or None), as small ids.
Identities = dict[tuple[fx.Node, int], tuple[int, int | None]]


@dataclass
class Propagation:
    """Every node's result with tensors replaced by :class:`TensorFacts`, the step module's
    parameters and buffers ``(qualified name, facts, is_buffer)`` in registration order, the
    results that are an earlier value's very tensor (``Recorder.same_tensor``; structural), and
    which tensor object each result is and, for a view, which object is its base
    (:func:`tensor_identities`; structural)."""

    results: dict[fx.Node, Any]
    params: list[tuple[str, TensorFacts, bool]]
    same_tensor: dict[tuple[fx.Node, int], tuple[fx.Node, int]]
    identities: Identities = field(default_factory=dict)


def tensor_identities(results: dict[fx.Node, Any]) -> Identities:
    """For every tensor of every node's result: a small id of the tensor object and, when it is a
    differentiable view (``_is_view()``: autograd tracks its base), the id of its base (``_base``,
    always a non-view). Storage ids cannot tell these apart: an in-place op and a view op both
    return the input's storage, but only the in-place op returns the input object itself, and
    autograd treats an in-place op on a view specially (``CopySlices``; see ``costmodel.memory``).
    The results must be alive together (the recorder never frees them), so ids are not reused."""
    ids: dict[int, int] = {}
    identities: Identities = {}
    for node, result in results.items():
        for k, tensor in enumerate(flatten_tensors(result)):
            base = tensor._base if tensor._is_view() else None
            identities[(node, k)] = (ids.setdefault(id(tensor), len(ids)),
                                     None if base is None else ids.setdefault(id(base), len(ids)))
    return identities


class _StorageIds:
    """Small integer ids for storages, in order of first sight."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}

    def __call__(self, tensor: torch.Tensor) -> int:
        return self.ids.setdefault(tensor.untyped_storage()._cdata, len(self.ids))


def _params(traced: TracedStep, storage_of: _StorageIds) -> list[tuple[str, TensorFacts, bool]]:
    return [(name, TensorFacts(tuple(t.shape), t.dtype, bool(t.requires_grad), t.is_leaf, storage_of(t),
                               int(t.untyped_storage().nbytes()), t.is_contiguous()), is_buffer)
            for name, t, is_buffer in iter_params(traced.step_module)]


def concrete(traced: TracedStep, batch: int, resolution: int) -> Propagation:
    """Propagate on meta tensors at this batch and resolution."""
    return recorded_facts(traced, propagate(traced, batch, resolution))


def recorded_facts(traced: TracedStep, recorder: Recorder) -> Propagation:
    """The facts of a concrete propagation's results."""
    results = recorder.results
    storage_of = _StorageIds()
    params = _params(traced, storage_of)

    def facts(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return TensorFacts(tuple(int(s) for s in value.shape), value.dtype, bool(value.requires_grad),
                           value.is_leaf, storage_of(value), int(value.untyped_storage().nbytes()),
                           value.is_contiguous())

    return Propagation({node: tree_map(facts, result) for node, result in results.items()}, params,
                       recorder.same_tensor, tensor_identities(results))


# -- shape templates

@dataclass(frozen=True)
class Slot:
    """A size computed by the template's function: ``values[index]``."""

    index: int


@dataclass(frozen=True)
class TensorTemplate:
    shape: tuple[int | Slot, ...]
    dtype: torch.dtype
    requires_grad: bool
    is_leaf: bool
    storage: int
    storage_nbytes: int | Slot
    contiguous: bool = True


BATCH, RESOLUTION = sympy.symbols("batch resolution", integer=True, positive=True)


def fill_slots(results: dict[fx.Node, Any], values: Sequence[Any]) -> dict[fx.Node, Any]:
    """Template results with each slot's value filled in (tensors become :class:`TensorFacts`)."""

    def fill(leaf: Any) -> Any:
        if isinstance(leaf, Slot):
            return values[leaf.index]
        if isinstance(leaf, TensorTemplate):
            return TensorFacts(tuple(values[s.index] if isinstance(s, Slot) else s for s in leaf.shape),
                               leaf.dtype, leaf.requires_grad, leaf.is_leaf, leaf.storage,
                               values[leaf.storage_nbytes.index] if isinstance(leaf.storage_nbytes, Slot)
                               else leaf.storage_nbytes, leaf.contiguous)
        return leaf

    # Most nodes return one tensor: filled directly, the rest through pytree.
    return {node: fill(result) if isinstance(result, (TensorTemplate, Slot)) else tree_map(fill, result)
            for node, result in results.items()}


class UnsupportedTemplate(Exception):
    """A symbolic run produced something a template cannot express (left to concrete work)."""


def symbolic_mode(env: Any) -> Any:
    """The one way the engine runs ops with symbolic sizes: ``FakeTensorMode`` over the sizes of
    ``env`` (a ``ShapeEnv``). Its Python meta kernels keep every size a formula where PyTorch's
    C++ meta kernels would specialise one (the loss's ``nll_loss`` fixes the batch); inputs that
    are plain meta tensors (a concrete propagation's results) are taken in as they are."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)


def symbolic_size(env: Any, name: str, hint: int) -> Any:
    """A size named ``name`` that may take any value, hinted ``hint`` (a ``SymInt``; the int
    itself where the environment specialises it, as it does 0 and 1)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    symbol = env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
    return env.create_symintnode(symbol, hint=hint) if isinstance(symbol, sympy.Symbol) else hint


def template_of(value: Any, size: Callable[[Any], Any], storage: int) -> Any:
    """One result leaf of a symbolic run as a template: a tensor as a :class:`TensorTemplate`
    (``storage``: its storage id), a size as its slot or int (``size``: ``SymbolicSizes.size``)."""
    if isinstance(value, torch.Tensor):
        return TensorTemplate(tuple(size(s) for s in value.shape), value.dtype, bool(value.requires_grad),
                              value.is_leaf, storage, size(value.untyped_storage().nbytes()),
                              bool(value.is_contiguous()))
    return size(value)


def column_size(values: np.ndarray) -> int | np.ndarray:
    """One size over many configurations: an int where it is the same at all of them, else the
    array (one entry per configuration)."""
    return int(values[0]) if (values == values[0]).all() else values


class SizeTemplate:
    """Every size of a symbolic run as formulas in named parameters (``batch`` and
    ``resolution`` for a whole propagation, ``rank`` for the rank-dependent nodes of one), valid
    where ``covers`` says so: every guard the run's kernels took holds. ``results`` maps each
    node run to its result with :class:`Slot` sizes and :class:`TensorTemplate` tensors."""

    def __init__(self, parameters: tuple[sympy.Symbol, ...], conditions: list[sympy.Basic], formulas: "SymbolicSizes",
                 results: dict[fx.Node, Any], label: str) -> None:
        self.parameters = parameters
        self._applies, self._values, self.source = compile_formulas(conditions, formulas.expressions, parameters,
                                                                    label)
        self.results = results

    def covers(self, *values: int) -> bool:
        try:
            return bool(self._applies(*values))
        except (ArithmeticError, ValueError):
            return False

    def evaluate(self, *values: int, nodes: Iterable[fx.Node] | None = None) -> dict[fx.Node, Any]:
        """The results at these parameter values (tensors as :class:`TensorFacts`): of every node
        run, or of those of ``nodes`` that were."""
        results = self.results if nodes is None else {n: self.results[n] for n in nodes if n in self.results}
        return fill_slots(results, self._values(*values))

    def evaluate_many(self, rows: Sequence[tuple[int, ...]]) -> dict[fx.Node, Any]:
        """The results at many parameter values at once: each size that varies a numpy integer
        array with one entry per row (one that does not, an int)."""
        columns = [np.array(column, dtype=np.int64) for column in zip(*(self._values(*row) for row in rows))]
        return fill_slots(self.results, [column_size(c) for c in columns])


class ShapeTemplate:
    """A whole propagation's facts as formulas in the batch and the resolution."""

    def __init__(self, sizes: SizeTemplate, params: list[tuple[str, TensorFacts, bool]],
                 same_tensor: dict[tuple[fx.Node, int], tuple[fx.Node, int]], identities: Identities) -> None:
        self.sizes = sizes
        self._params = params
        self._same_tensor = same_tensor
        self._identities = identities
        self.source = sizes.source  # the generated code, for inspection

    def applies(self, batch: int, resolution: int) -> bool:
        return self.sizes.covers(batch, resolution)

    def evaluate(self, batch: int, resolution: int) -> Propagation:
        return Propagation(self.sizes.evaluate(batch, resolution), self._params, self._same_tensor, self._identities)

    @classmethod
    def build(cls, traced: TracedStep, batch: int, resolution: int) -> "ShapeTemplate | None":
        """Propagate once with a symbolic batch and resolution (hinted by these values); None if
        the run cannot be expressed as a template."""
        try:
            return cls._build(traced, batch, resolution)
        except (UnsupportedTemplate, RuntimeError, TypeError, ValueError, ArithmeticError, AssertionError):
            # What a symbolic run can meet and a concrete one does not: a kernel without symbolic
            # support (NotImplementedError, a RuntimeError), a size that depends on data
            # (GuardOnDataDependentSymNode, one too), a size the template cannot express. The
            # shapes are then propagated concretely; any other exception is a bug and propagates.
            return None

    @classmethod
    def _build(cls, traced: TracedStep, batch: int, resolution: int) -> "ShapeTemplate":
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        env = ShapeEnv()
        b, r = symbolic_size(env, "batch", batch), symbolic_size(env, "resolution", resolution)
        recorder = Recorder(traced.graph_module)
        with symbolic_mode(env), torch.enable_grad():
            recorder.run(*step_inputs(traced, b, r))

        formulas = SymbolicSizes(env, {v.node.expr: name for v, name in ((b, BATCH), (r, RESOLUTION))
                                       if isinstance(v, torch.SymInt)}, (BATCH, RESOLUTION), UnsupportedTemplate)
        conditions = formulas.ranges(b, batch, BATCH) + formulas.ranges(r, resolution, RESOLUTION) + formulas.guards()
        storage_of = _StorageIds()
        params = _params(traced, storage_of)
        results = {node: tree_map(lambda leaf: template_of(leaf, formulas.size, storage_of(leaf))
                                  if isinstance(leaf, torch.Tensor) else formulas.size(leaf), result)
                   for node, result in recorder.results.items()}
        sizes = SizeTemplate((BATCH, RESOLUTION), conditions, formulas, results,
                             f"shape template of {traced.step_module.model.__class__.__name__}")
        return cls(sizes, params, recorder.same_tensor, tensor_identities(recorder.results))


class SymbolicSizes:
    """The sizes of a run with symbolic sizes (a ``ShapeEnv``), as formulas in named symbols.

    ``rename`` maps the environment's symbols to the names the formulas use (``allowed``); a size
    in anything else raises ``error``. Each distinct non-constant size gets one slot
    (``expressions[slot.index]``)."""

    def __init__(self, env: Any, rename: dict[sympy.Basic, sympy.Symbol], allowed: tuple[sympy.Symbol, ...],
                 error: type[Exception]) -> None:
        self.env = env
        self.rename = rename
        self.allowed = set(allowed)
        self.error = error
        self.expressions: list[sympy.Basic] = []
        self._slots: dict[sympy.Basic, Slot] = {}

    def canonical(self, expr: sympy.Basic) -> sympy.Basic:
        expr = self.env.replace(expr).xreplace(self.rename)
        if not expr.free_symbols <= self.allowed:
            raise self.error(f"size {expr} depends on more than {', '.join(sorted(map(str, self.allowed)))}")
        return expr

    def size(self, value: Any) -> Any:
        """An int as it is, a symbolic size as its slot (or its value, if constant)."""
        if isinstance(value, torch.SymInt):
            expr = self.canonical(value.node.expr)
            if expr.is_Integer:
                return int(expr)
            if expr not in self._slots:
                self._slots[expr] = Slot(len(self.expressions))
                self.expressions.append(expr)
            return self._slots[expr]
        if isinstance(value, (torch.SymFloat, torch.SymBool)):
            raise self.error("a symbolic float or boolean result")
        return value

    def ranges(self, value: Any, hint: int, name: sympy.Symbol) -> list[sympy.Basic]:
        """Where the input ``value`` (a ``SymInt``, or ``hint`` itself when the environment
        specialised it: a size of 1) may range for the formulas to hold."""
        if not isinstance(value, torch.SymInt):
            return [sympy.Eq(name, hint)]
        bounds = self.env.var_to_range.get(value.node.expr)
        conditions: list[sympy.Basic] = []
        if bounds is not None:
            if isinstance(bounds.lower, sympy.Integer):  # not int_oo
                conditions.append(sympy.Ge(name, int(bounds.lower)))
            if isinstance(bounds.upper, sympy.Integer):
                conditions.append(sympy.Le(name, int(bounds.upper)))
        return conditions

    def guards(self) -> list[sympy.Basic]:
        """Every decision the run took on a size, as a condition on the named symbols."""
        return [self.canonical(guard.expr) for guard in self.env.guards]


def compile_formulas(conditions: list[sympy.Basic], expressions: list[sympy.Basic],
                     parameters: tuple[sympy.Symbol, ...], label: str) -> tuple[Callable[..., bool],
                                                                                 Callable[..., tuple[int, ...]], str]:
    """Compile the guards and sizes of a symbolic run into two Python functions of ``parameters``:
    ``applies(...)`` (every guard holds) and ``values(...)`` (every size, in order), and their source."""
    from torch.utils._sympy.printers import PythonPrinter

    printer = PythonPrinter()
    names = ", ".join(str(p) for p in parameters)
    condition = " and ".join(f"({printer.doprint(c)})" for c in conditions) or "True"
    values = ", ".join(printer.doprint(e) for e in expressions)
    source = (f"def applies({names}):\n    return {condition}\n\n"
              f"def values({names}):\n    return ({values}{',' if expressions else ''})\n")
    namespace: dict[str, Any] = {"math": math}
    exec(compile(source, f"<{label}>", "exec"), namespace)
    return namespace["applies"], namespace["values"], source


def shape_facts(traced: TracedStep, batch: int, resolution: int) -> Propagation:
    """The propagation facts of ``traced`` at this batch and resolution, from the cheapest source:
    the cache, a template whose guards hold, a new template (when this structure has already been
    propagated concretely at ``TEMPLATE_AFTER`` other shapes), or a concrete propagation."""
    cache: OrderedDict[tuple[int, int], Propagation] = traced.shape_cache
    key = (batch, resolution)
    found = cache.get(key)
    if found is None:
        for template in traced.shape_templates:
            if template.applies(batch, resolution):
                found = template.evaluate(batch, resolution)
                break
    if found is None and traced.concrete_shapes >= TEMPLATE_AFTER and traced.template_attempts < MAX_TEMPLATES:
        traced.template_attempts += 1
        template = ShapeTemplate.build(traced, batch, resolution)
        if template is not None:
            traced.shape_templates.append(template)
            if template.applies(batch, resolution):
                found = template.evaluate(batch, resolution)
    if found is None:
        found = concrete(traced, batch, resolution)
        traced.concrete_shapes += 1
    cache[key] = found
    cache.move_to_end(key)
    while len(cache) > CACHED_SHAPES:
        cache.popitem(last=False)
    return found
