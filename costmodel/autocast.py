"""CPU autocast made explicit: the casts ``torch.autocast("cpu", dtype=...)`` inserts, as graph nodes.

fx records no context manager, so the tracer notes on each node the autocast state it was created
in (``trace.AutocastState``). Autocast itself acts at the dispatcher, op by op: an op on its
lower-precision list first casts every floating-point (not float64) tensor argument to the lower
precision, an op on its float32 list casts them up, an op on its promote list casts them to the
widest dtype among them; an op on no list runs in whatever dtypes its inputs have
(``aten/src/ATen/autocast_mode.cpp``, ``cached_cast``). Which list an op is on is the plugins'
answer (``costmodel_autocast_policy``); this pass turns it into ``Tensor.to(dtype)`` nodes before
the node, so that everything after it - shape propagation, the op rules, the memory timeline - sees
an ordinary graph in which a cast is an op like any other (costed by the cast rule of the op
plugins).

What autocast does that the pass mirrors:

- a cast happens only where the dtype differs (``cached_cast`` returns the tensor itself
  otherwise), which needs the dtypes: the pass runs the graph once on meta tensors of a probe size
  (dtypes do not depend on sizes) and places each cast as it goes, so that later nodes see the
  cast dtypes;
- the weight cache: a float32 leaf tensor that requires grad (a trainable parameter) cast to the
  lower precision is cast once per autocast region, and the cache keeps that copy until the
  outermost ``torch.autocast`` exits;
  every other tensor (an activation, a frozen parameter) is cast at each use, and the copy dies
  with its last user like any value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from costmodel.errors import CostModelError
from costmodel.trace import AUTOCAST_STATE, AutocastState, MetaInterpreter

# policy(kind, target, args, kwargs) -> "lower" | "fp32" | "promote" | "through" | "unmodelled" | None,
# with tensors in args and kwargs as meta tensors (``costmodel_autocast_policy``).
Policy = Callable[[str, Any, tuple[Any, ...], dict[str, Any]], "str | None"]


def has_autocast(graph: fx.Graph) -> bool:
    """Whether any node of ``graph`` was created under CPU autocast."""
    return any(AUTOCAST_STATE in node.meta for node in graph.nodes)


def _eligible(value: Any) -> bool:
    """Whether autocast may cast ``value``: a floating-point tensor other than float64."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


def _target_dtype(policy: str, state: AutocastState, values: list[torch.Tensor]) -> torch.dtype | None:
    if policy == "lower":
        return state.dtype
    if policy == "fp32":
        return torch.float32
    widest: torch.dtype | None = None  # "promote"
    for value in values:
        widest = value.dtype if widest is None else torch.promote_types(widest, value.dtype)
    return widest


class _CastPlacer(MetaInterpreter):
    """Runs the graph on meta tensors and, before each node autocast casts for, inserts the casts."""

    def __init__(self, module: fx.GraphModule, policy: Policy, describe: Callable[[fx.Node], str],
                 trainable: Callable[[fx.Node], bool]) -> None:
        super().__init__(module, garbage_collect_values=False)  # the pass rewires arguments as it goes
        self.policy = policy
        self.trainable = trainable
        self.describe = describe
        # (parameter node, dtype, region) -> its cached cast.
        self.cached: dict[tuple[fx.Node, torch.dtype, int], fx.Node] = {}
        # Each cached cast and the region whose end releases it.
        self.cache_region: dict[fx.Node, int] = {}
        self.casts = 0

    def run_node(self, n: fx.Node) -> Any:
        state = n.meta.get(AUTOCAST_STATE)
        if state is not None and n.op in ("call_function", "call_method", "call_module"):
            self._place_casts(n, state)
        return super().run_node(n)

    def _place_casts(self, n: fx.Node, state: AutocastState) -> None:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        target = type(self.module.get_submodule(str(n.target))) if n.op == "call_module" else n.target
        policy = self.policy(n.op, target, args, kwargs)
        if policy is None:
            return
        if policy in ("through", "unmodelled"):
            raise CostModelError(
                f"node {n.name!r} ({self.describe(n)}) runs under torch.autocast, which casts inside it where the "
                f"engine cannot see: not modelled; run it outside the autocast region")
        arguments = _argument_nodes(n)
        sources = list(dict.fromkeys(a for a in arguments if _eligible(self.env.get(a))))
        dtype = _target_dtype(policy, state, [self.env[a] for a in sources])
        repeated = [a for a in sources if arguments.count(a) > 1 and self.env[a].dtype != dtype
                    and not self._cacheable(a, self.env[a], dtype, state)]
        if repeated:  # autocast casts each argument on its own: two copies, which one node cannot say
            raise CostModelError(
                f"node {n.name!r} ({self.describe(n)}) takes {repeated[0].name!r} twice under torch.autocast, which "
                f"casts it twice: not modelled; pass one cast copy (x.to(dtype)) for both")
        replaced: dict[fx.Node, fx.Node] = {}
        # The last argument first: autocast's kernel wrappers cast in C++ call arguments, which
        # this build evaluates right to left (logged: a conv's bias, then its weight, then its
        # input), and the order decides the backward's too (autograd runs later nodes first).
        for source in reversed(sources):
            value = self.env[source]
            if value.dtype == dtype:
                continue
            replaced[source] = self._cast(source, value, dtype, state, before=n)
        if replaced:
            n.args = fx.node.map_arg(n.args, lambda a: replaced.get(a, a))
            n.kwargs = fx.node.map_arg(n.kwargs, lambda a: replaced.get(a, a))

    def _cacheable(self, source: fx.Node, value: torch.Tensor, dtype: torch.dtype, state: AutocastState) -> bool:
        """Whether autocast's weight cache keeps this cast: a float32 leaf that requires grad, cast to
        the lower precision, in a region with the cache on. In an evaluation pass the engine's
        parameters require no grad (``trace.for_phase``) while the real ones still do under
        ``torch.no_grad()``, hence the method's trainable names rather than ``requires_grad``."""
        return (state.region is not None and dtype == state.dtype and value.dtype == torch.float32
                and source.op == "get_attr" and self.trainable(source))

    def _cast(self, source: fx.Node, value: torch.Tensor, dtype: torch.dtype, state: AutocastState,
              before: fx.Node) -> fx.Node:
        cacheable = self._cacheable(source, value, dtype, state)
        key = (source, dtype, state.region)
        if cacheable and key in self.cached:
            return self.cached[key]
        with self.module.graph.inserting_before(before):
            cast = self.module.graph.call_method("to", (source, dtype))
        cast.meta[AUTOCAST_STATE] = state
        self.env[cast] = value.to(dtype)
        self.casts += 1
        if cacheable:
            self.cached[key] = cast
            self.cache_region[cast] = state.region
        return cast


def _argument_nodes(n: fx.Node) -> list[fx.Node]:
    """The nodes among ``n``'s arguments (nested in lists and keyword arguments too), in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) or a)
    return found


def place_autocast_casts(module: fx.GraphModule, inputs: tuple[torch.Tensor, ...], policy: Policy,
                         describe: Callable[[fx.Node], str], trainable: Callable[[fx.Node], bool]
                         ) -> dict[fx.Node, fx.Node]:
    """Insert into ``module``'s graph the casts autocast makes (see the module's docstring), running
    it once on ``inputs`` (meta tensors of any valid size). Returns, for each cached cast of a
    trainable parameter (``trainable(get_attr node)``: one the method trains, a leaf that requires
    grad in the real step), the last node of its autocast region: the cache holds it until then.
    A node whose op casts inside (``"through"``, ``"unmodelled"``) is refused, naming it."""
    placer = _CastPlacer(module, policy, describe, trainable)
    try:
        with torch.enable_grad():
            placer.run(*inputs)
    except CostModelError as error:  # fx's interpreter appends the node's graph to the message
        raise CostModelError(str(error).strip().splitlines()[0]) from None
    module.graph.lint()
    module.recompile()
    last_in_region: dict[int, fx.Node] = {}
    for node in module.graph.nodes:
        state = node.meta.get(AUTOCAST_STATE)
        if state is not None and state.region is not None:
            last_in_region[state.region] = node
    return {cast: last_in_region[region] for cast, region in placer.cache_region.items()}
