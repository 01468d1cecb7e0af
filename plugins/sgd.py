"""``torch.optim.SGD`` (with momentum) as it runs on CPU: the single-tensor path (the default) and
``foreach=True``.

Which path runs: ``torch.optim.sgd.sgd`` (torch 2.14) with ``foreach=None`` and ``fused=None``
asks ``_default_to_fused_or_foreach`` (``use_fused=False``), whose foreach devices (cuda, xpu,
mtia, privateuse1) exclude CPU: ``_single_tensor_sgd`` (``foreach=True``: below). ``fused=True``,
``maximize`` and ``differentiable`` are refused (other code), as is any key SGD does not take.

Per parameter with ``n`` elements (``torch/optim/sgd.py``, ``_single_tensor_sgd``):

- ``weight_decay != 0``: ``grad = grad.add(p, alpha=wd)`` (a new tensor; 2n FLOPs, n when ``wd == 1``:
  a scalar coefficient of 1 costs nothing, docs/flop-convention.md);
- ``momentum != 0``: on the first step ``buf = grad.detach().clone()`` (the state, 0 FLOPs), later
  ``buf.mul_(momentum).add_(grad, alpha=1 - dampening)`` (n + n, +n when ``1 - dampening != 1``);
  with ``nesterov`` ``grad = grad.add(buf, alpha=momentum)`` (a new tensor; 2n), else ``grad = buf``;
- ``p.add_(grad, alpha=-lr)`` (2n).

State: the momentum buffer (``n`` elements), none without momentum. The temporaries are OPT while
they live: the weight-decayed gradient until ``grad`` is rebound, the Nesterov sum until the next
parameter rebinds ``grad`` at the top of its loop iteration.

``foreach=True`` (torch's default on a GPU) runs ``_multi_tensor_sgd``, per (device, dtype) group
(``adamw.dtype_groups``): the same arithmetic, so the same FLOPs, as ``torch._foreach_*`` calls over
the group, with other temporaries:

- ``weight_decay != 0``: ``grads = torch._foreach_add(grads, params, alpha=wd)``, a copy of every
  gradient of the group at once, bound to ``device_grads`` until it is rebound: to the momentum
  buffers (with momentum, no Nesterov), or at the top of the next group's iteration, or when the
  step returns;
- momentum: the buffers are created on the first step by ``device_grads[i].detach().clone()``
  (state); later ``_foreach_mul_`` and ``_foreach_add_`` in place; Nesterov's
  ``torch._foreach_add_(device_grads, bufs, alpha=momentum)`` is in place too (into the decayed
  copies, or into the ``.grad`` tensors themselves without weight decay), so it allocates nothing.
"""

from __future__ import annotations

from typing import Any

from costmodel.costs import Flops, MemEvent, OptimizerCost, ParamGroup, ParamMeta
from costmodel.errors import CostModelError
from costmodel.authoring import optimizer_group
from costmodel.hookspecs import hookimpl

from .adamw import checked_optimizer_options, dtype_groups

NAME = "sgd"
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
    "maximize": False, "foreach": None, "differentiable": False, "fused": None,
}
# What _single_tensor_sgd covers here (maximize negates every gradient into a new tensor).
MODELLED = {"maximize": False, "differentiable": False}


def options_of(group: ParamGroup) -> dict[str, Any]:
    """The group's SGD options completed with torch's defaults, or a one-line refusal (an unknown
    key, a value of the wrong type, foreach/fused true, maximize or differentiable true, and
    torch's own refusal of Nesterov momentum without a momentum or with a dampening)."""
    options = checked_optimizer_options("SGD", group.options, DEFAULTS, MODELLED)
    if options["nesterov"] and (options["momentum"] <= 0 or options["dampening"] != 0):
        raise CostModelError("--optimizer-option nesterov=true: SGD's Nesterov momentum requires a momentum > 0 "
                             "and zero dampening")
    return options


def state_bytes(params: list[ParamMeta], options: dict[str, Any]) -> int:
    return sum(p.nbytes for p in params) if options["momentum"] != 0 else 0


def step_flops(n: int, step: int, options: dict[str, Any]) -> int:
    """Exact-convention FLOPs of one parameter's update on step ``step``."""
    flops = 0
    if options["weight_decay"] != 0:
        flops += (1 + (options["weight_decay"] != 1)) * n
    if options["momentum"] != 0:
        if step > 1:
            flops += n + (1 + ((1 - options["dampening"]) != 1)) * n
        if options["nesterov"]:
            flops += (1 + (options["momentum"] != 1)) * n
    flops += (1 + (-options["lr"] != 1)) * n
    return flops


@hookimpl
def costmodel_optimizer_cost(group: ParamGroup, step: int, config: object) -> OptimizerCost | None:
    mine = optimizer_group(group, NAME, options_of)
    if mine is None:
        return None
    options, params = mine
    momentum, nesterov = options["momentum"] != 0, options["nesterov"]
    decays = options["weight_decay"] != 0
    flops = sum(step_flops(p.numel, step, options) for p in params)
    note = f"SGD (momentum {options['momentum']}) over {len(params)} tensors"
    if options["foreach"]:
        return OptimizerCost(flops=Flops(torch=0, exact=flops), state_bytes=state_bytes(params, options),
                             events=multi_tensor_events(params, step, momentum, nesterov, decays),
                             note=note + " (foreach)")
    events: list[MemEvent] = []
    carried: ParamMeta | None = None  # the parameter whose temporary is still bound to ``grad``
    for p in params:
        if carried is not None:  # ``grad = grads[i]`` rebinds: the previous parameter's temporary is freed
            events.append(MemEvent(-carried.nbytes, "OPT", "previous gradient freed"))
            carried = None
        if decays:
            events.append(MemEvent(p.nbytes, "OPT", f"{p.name}: grad + wd * p"))
        if momentum:
            if step == 1:
                events.append(MemEvent(p.nbytes, "OPT", f"{p.name}: momentum_buffer"))
            if nesterov:
                events.append(MemEvent(p.nbytes, "OPT", f"{p.name}: grad + momentum * buf"))
            if decays:  # ``grad`` is rebound to the Nesterov sum or to ``buf``
                events.append(MemEvent(-p.nbytes, "OPT", "decayed gradient freed"))
            carried = p if nesterov else None
        else:
            carried = p if decays else None
    if carried is not None:
        events.append(MemEvent(-carried.nbytes, "OPT", "last gradient freed"))
    return OptimizerCost(flops=Flops(torch=0, exact=flops), state_bytes=state_bytes(params, options),
                         events=events, note=note)


def multi_tensor_events(params: list[ParamMeta], step: int, momentum: bool, nesterov: bool,
                        decays: bool) -> list[MemEvent]:
    """``_multi_tensor_sgd``'s memory timeline, group by group (module docstring). (Sizes may be
    arrays over many ranks: whether a decayed copy is bound is a flag, never a size's truth.)"""
    events: list[MemEvent] = []
    decayed: Any = None  # bytes of the decayed copies bound to ``device_grads``, if any
    for group in dtype_groups(params):
        if decayed is not None:
            events.append(MemEvent(-decayed, "OPT", "previous group's decayed gradients freed"))
            decayed = None
        if decays:
            decayed = sum(p.nbytes for p in group)
            events.append(MemEvent(decayed, "OPT", f"_foreach_add(grads, params, alpha=wd) over {len(group)} tensors"))
        if momentum and step == 1:
            events += [MemEvent(p.nbytes, "OPT", f"{p.name}: momentum_buffer") for p in group]
        if momentum and not nesterov and decayed is not None:
            events.append(MemEvent(-decayed, "OPT", "device_grads = bufs: decayed gradients freed"))
            decayed = None
    if decayed is not None:
        events.append(MemEvent(-decayed, "OPT", "decayed gradients freed as the step returns"))
    return events
