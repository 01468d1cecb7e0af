"""``torch.optim.Adafactor`` (torch 2.14): the single-tensor path (the default on CPU) and ``foreach=True``.

Which path runs: ``torch.optim._adafactor.adafactor`` with ``foreach=None`` asks
``_default_to_fused_or_foreach``, which never picks foreach for CPU tensors (the ``adamw`` plugin
gives the reason): ``_single_tensor_adafactor``. ``foreach=True`` runs ``_multi_tensor_adafactor``.
``maximize=True`` (``-grad``, a new tensor per parameter) is refused.

Per parameter ``p`` with ``n`` elements. A matrix (``p.dim() > 1``, shape ``(*batch, R, C)``, ``B =
prod(batch)``) keeps factored second moments ``row_var`` ``(*batch, R, 1)`` and ``col_var`` ``(*batch,
1, C)``; a vector (or a 0-d tensor) keeps ``variance`` of its own shape. State, created on the
first step for every parameter in order: ``step`` (a 0-d float32 tensor, 4 bytes), then
``row_var`` and ``col_var`` (``grad.new_zeros``), or ``variance`` (``zeros_like``): all in the
parameter's dtype.

The single-tensor update, as it dispatches (exact-convention FLOPs, docs/flop-convention.md):

- ``step_t += 1`` (1); ``param.norm(2).item()`` (a 0-d temporary, freed at once: ``2n + 1``);
  ``param.mul_(1 - lr*wd)`` when ``wd != 0`` (n);
- matrix: ``row_mean = vector_norm(grad, dim=-1, keepdim=True).square_().div_(C)`` (``2n + BR``,
  then ``BR + BR``), ``row_var.lerp_(row_mean, .)`` (3BR); the same over ``dim=-2`` for ``col_mean``
  (``2n + 3BC + 3BC``); ``var_estimate = row_var @ col_var`` (``mm``, or ``bmm`` over ``B`` for
  more than two dims: ``2n``, an ``n``-element tensor; the stock counter counts these ``2n`` too);
  ``var_estimate.div_(row_var.mean(dim=-2, keepdim=True).clamp_(min=eps1))`` (a ``B``-element
  temporary: ``BR + B``, ``B``, then ``n``);
- vector: ``grad_squared = grad * grad`` (n, an ``n``-element tensor), ``variance.lerp_`` (3n),
  ``var_estimate = variance.clone()`` (0, an ``n``-element tensor);
- ``update = var_estimate.clamp_(min=eps1**2).rsqrt_()`` (n + n, in place: ``update`` *is*
  ``var_estimate``), ``update.mul_(grad)`` (n), ``update.norm(2).item()`` (a 0-d temporary,
  ``2n + 1``), ``param.add_(update, alpha=-alpha/denom)`` (2n: the coefficient is negative, never 1).

Memory (all OPT). ``row_mean``, ``col_mean``, ``grad_squared``, ``var_estimate`` and ``update`` are
locals of the loop: each lives until the same name is bound again in a later iteration (after the
new value exists), or until the function returns. So a matrix's ``row_mean`` may outlive several
vectors, and when ``var_estimate`` is rebound the previous one stays alive through ``update``
until ``update`` is rebound in its turn.

``foreach=True`` groups tensors by (dtype, matrix or vector), groups in the order of first
appearance (``_group_tensors_by_device_dtype_and_is_multidim``), and runs the same arithmetic on
lists (the same FLOPs: ``_foreach_mul_(row_means, row_means)`` squares, ``_foreach_clamp_min_``
clamps, ``_foreach_mul_(updates, alphas)`` + ``_foreach_add_(params, updates)`` is the update's
``2n``), so its temporaries are lists: a 4-byte ``torch.tensor(1.0)`` for the step counters, the
``param.norm`` 0-d temporaries one at a time, ``row_means`` (deleted after its ``lerp_``),
``col_means`` (likewise), ``var_estimates`` (all of the group at once) and ``row_var_means``
(deleted after the division); for vectors ``grads_squared`` (deleted after its ``lerp_``) and the
clones. ``var_estimates`` (also bound as ``updates``) lives until the next group has built its own
and rebound ``updates``, or the function returns.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from costmodel.costs import Flops, MemEvent, OptimizerCost, ParamGroup, ParamMeta, amount
from costmodel.errors import CostModelError
from costmodel.authoring import optimizer_group
from costmodel.hookspecs import hookimpl

from .adamw import STEP_BYTES, checked_optimizer_options, is_number

NAME = "adafactor"
DEFAULTS: dict[str, Any] = {
    "lr": 1e-2, "beta2_decay": -0.8, "eps": (None, 1e-3), "d": 1.0, "weight_decay": 0.0,
    "foreach": None, "maximize": False,
}
MODELLED = {"maximize": False}


def options_of(group: ParamGroup) -> dict[str, Any]:
    """The group's Adafactor options completed with torch's defaults, or a one-line refusal.
    ``eps`` is a pair whose first value may be null (torch then takes the dtype's epsilon)."""
    given = dict(group.options)
    eps = given.pop("eps", DEFAULTS["eps"])
    if not (isinstance(eps, (list, tuple)) and len(eps) == 2 and (eps[0] is None or is_number(eps[0]))
            and is_number(eps[1])):
        raise CostModelError(f"--optimizer-option eps: Adafactor expects a pair [eps1 or null, eps2] "
                             f"(like [null, 0.001]), got {eps!r}")
    options = checked_optimizer_options("Adafactor", given, {k: v for k, v in DEFAULTS.items() if k != "eps"},
                                        MODELLED)
    return {**options, "eps": tuple(eps)}


def is_matrix(p: ParamMeta) -> bool:
    return len(p.shape) > 1


def factor_sizes(p: ParamMeta) -> tuple[Any, Any, Any]:
    """``(B, R, C)`` of a matrix: the batch of leading dimensions, rows and columns."""
    return math.prod(p.shape[:-2]), p.shape[-2], p.shape[-1]


def state_bytes_of(p: ParamMeta) -> Any:
    """``step`` and the factored (``B*R + B*C``) or full (``n``) second moment."""
    if is_matrix(p):
        batch, rows, cols = factor_sizes(p)
        return STEP_BYTES + batch * (rows + cols) * p.dtype.itemsize
    return STEP_BYTES + p.nbytes


def step_flops(p: ParamMeta, weight_decay: float) -> Any:
    """Exact-convention FLOPs of one parameter's update (module docstring); the same on every step."""
    n = p.numel
    flops = 1 + (2 * n + 1) + (n if weight_decay != 0 else 0)  # step, param.norm, decay
    if is_matrix(p):
        batch, rows, cols = factor_sizes(p)
        flops += (2 * n + batch * rows) + 2 * batch * rows + 3 * batch * rows  # row_mean, lerp_
        flops += (2 * n + batch * cols) + 2 * batch * cols + 3 * batch * cols  # col_mean, lerp_
        flops += 2 * n  # row_var @ col_var
        flops += (batch * rows + batch) + batch + n  # mean, clamp_, div_
    else:
        flops += n + 3 * n  # grad * grad, lerp_ (the clone: 0)
    return flops + 2 * n + n + (2 * n + 1) + 2 * n  # clamp_, rsqrt_, mul_(grad), update.norm, add_


def torch_flops(p: ParamMeta) -> Any:
    """The stock counter's: ``row_var @ col_var`` (``mm``/``bmm``, ``2*B*R*C*1``), nothing else."""
    return 2 * p.numel if is_matrix(p) else 0


class Locals:
    """The loop's local variables and the tensors they hold: binding a name to a new tensor frees
    the tensor it held once no other name holds it (CPython frees at the last reference)."""

    def __init__(self, events: list[MemEvent]) -> None:
        self.events = events
        self.held: dict[str, tuple[int, Any]] = {}  # name -> (tensor id, bytes)
        self.next_id = 0

    def new(self, name: str, nbytes: Any, label: str) -> None:
        self.events.append(MemEvent(nbytes, "OPT", label))
        self.next_id += 1
        self.bind(name, (self.next_id, nbytes))

    def alias(self, name: str, other: str) -> None:
        self.bind(name, self.held[other])

    def bind(self, name: str, tensor: tuple[int, Any]) -> None:
        previous = self.held.get(name)
        self.held[name] = tensor
        self._free_if_unheld(previous, name)

    def delete(self, name: str) -> None:
        self._free_if_unheld(self.held.pop(name, None), name)

    def release_all(self) -> None:
        for name in list(self.held):
            self.delete(name)

    def _free_if_unheld(self, tensor: tuple[int, Any] | None, name: str) -> None:
        if tensor is not None and all(held[0] != tensor[0] for held in self.held.values()):
            self.events.append(MemEvent(-tensor[1], "OPT", f"previous {name} freed"))


def transient(events: list[MemEvent], nbytes: Any, label: str) -> None:
    """A temporary freed as soon as the expression that made it ends."""
    events += [MemEvent(nbytes, "OPT", label), MemEvent(-nbytes, "OPT", f"{label} freed")]


def single_tensor_events(params: list[ParamMeta]) -> list[MemEvent]:
    events: list[MemEvent] = []
    local = Locals(events)
    for p in params:
        size = p.dtype.itemsize
        transient(events, size, f"{p.name}: param.norm(2)")
        if is_matrix(p):
            batch, rows, cols = factor_sizes(p)
            local.new("row_mean", batch * rows * size, f"{p.name}: row_mean")
            local.new("col_mean", batch * cols * size, f"{p.name}: col_mean")
            local.new("var_estimate", p.nbytes, f"{p.name}: row_var @ col_var")
            transient(events, batch * size, f"{p.name}: row_var.mean(dim=-2)")
        else:
            local.new("grad_squared", p.nbytes, f"{p.name}: grad * grad")
            local.new("var_estimate", p.nbytes, f"{p.name}: variance.clone()")
        local.alias("update", "var_estimate")
        transient(events, size, f"{p.name}: update.norm(2)")
    local.release_all()
    return events


def foreach_groups(params: list[ParamMeta]) -> Iterator[tuple[bool, list[ParamMeta]]]:
    """``_group_tensors_by_device_dtype_and_is_multidim`` on one device: by dtype in order of first
    appearance, each split into its matrices and its vectors in order of first appearance."""
    by_dtype: dict[Any, dict[bool, list[ParamMeta]]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, {}).setdefault(is_matrix(p), []).append(p)
    for kinds in by_dtype.values():
        yield from kinds.items()


def multi_tensor_events(params: list[ParamMeta]) -> list[MemEvent]:
    events: list[MemEvent] = []
    local = Locals(events)
    for matrices, group in foreach_groups(params):
        transient(events, STEP_BYTES, "torch.tensor(1.0) for _foreach_add_(steps)")
        for p in group:
            transient(events, p.dtype.itemsize, f"{p.name}: param.norm(2)")
        factors = [factor_sizes(p) for p in group] if matrices else []
        if matrices:
            local.new("row_means", sum(b * r * p.dtype.itemsize for p, (b, r, _) in zip(group, factors)),
                      f"row_means of {len(group)} tensors")
            local.delete("row_means")
            local.new("col_means", sum(b * c * p.dtype.itemsize for p, (b, _, c) in zip(group, factors)),
                      f"col_means of {len(group)} tensors")
            local.delete("col_means")
            local.new("var_estimates", sum(p.nbytes for p in group), f"row_var @ col_var of {len(group)} tensors")
            local.new("row_var_means", sum(b * p.dtype.itemsize for p, (b, _, _) in zip(group, factors)),
                      f"row_var.mean(dim=-2) of {len(group)} tensors")
            local.delete("row_var_means")
        else:
            local.new("grads_squared", sum(p.nbytes for p in group), f"_foreach_mul(grads, grads) of {len(group)}")
            local.delete("grads_squared")
            local.new("var_estimates", sum(p.nbytes for p in group), f"variance clones of {len(group)} tensors")
        local.alias("updates", "var_estimates")
        for p in group:
            transient(events, p.dtype.itemsize, f"{p.name}: update.norm(2)")
    local.release_all()
    return events


@hookimpl
def costmodel_optimizer_cost(group: ParamGroup, step: int, config: object) -> OptimizerCost | None:
    mine = optimizer_group(group, NAME, options_of)
    if mine is None:
        return None
    options, params = mine
    events: list[MemEvent] = []
    if step == 1:
        for p in params:
            events.append(MemEvent(STEP_BYTES, "OPT", f"{p.name}: state step"))
            if is_matrix(p):
                batch, rows, cols = factor_sizes(p)
                events += [MemEvent(batch * rows * p.dtype.itemsize, "OPT", f"{p.name}: row_var"),
                           MemEvent(batch * cols * p.dtype.itemsize, "OPT", f"{p.name}: col_var")]
            else:
                events.append(MemEvent(p.nbytes, "OPT", f"{p.name}: variance"))
    foreach = bool(options["foreach"])
    events += multi_tensor_events(params) if foreach else single_tensor_events(params)
    factored = sum(is_matrix(p) for p in params)
    return OptimizerCost(
        flops=Flops(torch=sum(torch_flops(p) for p in params),
                    exact=sum(step_flops(p, options["weight_decay"]) for p in params)),
        state_bytes=sum(state_bytes_of(p) for p in params),
        events=events,
        note=f"Adafactor{' (foreach)' if foreach else ''} over {len(params)} tensors "
             f"({amount(sum(p.numel for p in params))} elements), {factored} with factored second moments",
    )


@hookimpl
def costmodel_optimizer_names() -> list[str]:
    return [NAME]
