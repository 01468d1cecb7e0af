"""``torch.optim.SGD`` (with momentum) as it runs on CPU: the single-tensor path.

Per parameter with ``n`` elements (``torch/optim/sgd.py``, ``_single_tensor_sgd``):

- ``weight_decay != 0``: ``grad = grad.add(p, alpha=wd)`` (a new tensor; 2n FLOPs);
- ``momentum != 0``: on the first step ``buf = grad.detach().clone()`` (the state, 0 FLOPs), later
  ``buf.mul_(momentum).add_(grad, alpha=1 - dampening)`` (n + n, +n when ``1 - dampening != 1``);
  with ``nesterov`` ``grad = grad.add(buf, alpha=momentum)`` (a new tensor; 2n), else ``grad = buf``;
- ``p.add_(grad, alpha=-lr)`` (2n).

State: the momentum buffer (``n`` elements), none without momentum. The temporaries are OPT while
they live: the weight-decayed gradient until ``grad`` is rebound, the Nesterov sum until the next
parameter rebinds ``grad`` at the top of its loop iteration.
"""

from __future__ import annotations

from typing import Any

from costmodel.costs import Flops, MemEvent, OptimizerCost, ParamGroup, ParamMeta
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl

NAME = "sgd"
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False,
    "maximize": False, "foreach": None, "differentiable": False, "fused": None,
}


def options_of(group: ParamGroup) -> dict[str, Any]:
    options = {**DEFAULTS, **group.options}
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise CostModelError(f"SGD has no option(s) {', '.join(unknown)}")
    if options["maximize"] or options["differentiable"] or options["foreach"] or options["fused"]:
        raise CostModelError("SGD is modelled on its plain single-tensor path only "
                             "(maximize, differentiable, foreach and fused off)")
    if options["nesterov"] and (options["momentum"] <= 0 or options["dampening"] != 0):
        raise CostModelError("SGD: Nesterov momentum requires a momentum and zero dampening")
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
    if group.optimizer != NAME:
        return None
    options = options_of(group)
    params = [p for p in group.params if p.trainable]
    momentum, nesterov = options["momentum"] != 0, options["nesterov"]
    events: list[MemEvent] = []
    carried = 0  # a temporary still bound to ``grad`` from the previous parameter
    flops = 0
    for p in params:
        if carried:  # ``grad = grads[i]`` rebinds: the previous parameter's temporary is freed
            events.append(MemEvent(-carried, "OPT", "previous gradient freed"))
            carried = 0
        decayed = 0
        if options["weight_decay"] != 0:
            decayed = p.nbytes
            events.append(MemEvent(decayed, "OPT", f"{p.name}: grad + wd * p"))
        if momentum:
            if step == 1:
                events.append(MemEvent(p.nbytes, "OPT", f"{p.name}: momentum_buffer"))
            if nesterov:
                events.append(MemEvent(p.nbytes, "OPT", f"{p.name}: grad + momentum * buf"))
            if decayed:  # ``grad`` is rebound to the Nesterov sum or to ``buf``
                events.append(MemEvent(-decayed, "OPT", "decayed gradient freed"))
            carried = p.nbytes if nesterov else 0
        else:
            carried = decayed
        flops += step_flops(p.numel, step, options)
    if carried:
        events.append(MemEvent(-carried, "OPT", "last gradient freed"))
    return OptimizerCost(
        flops=Flops(torch=0, exact=flops),
        state_bytes=state_bytes(params, options),
        events=events,
        note=f"SGD (momentum {options['momentum']}) over {len(params)} tensors",
    )
