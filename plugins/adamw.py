"""``torch.optim.AdamW`` as it runs on CPU with default options: the single-tensor path.

Per parameter ``p`` with ``n`` elements (``torch/optim/adam.py``, ``_single_tensor_adam``,
``decoupled_weight_decay=True``):

- state, created on the first step by ``_init_group`` for every parameter of the group before any
  update: ``step`` (a 0-d float32 tensor, 4 bytes), ``exp_avg`` and ``exp_avg_sq`` (``zeros_like(p)``);
- update: ``step_t += 1`` (1 FLOP), ``p.mul_(1 - lr*wd)`` (n, only when ``wd != 0``),
  ``exp_avg.lerp_(grad, 1 - beta1)`` (3n), ``exp_avg_sq.mul_(beta2)`` (n),
  ``.addcmul_(grad, grad, value=1 - beta2)`` (2n, +n when the value is not 1), ``.item()`` (0),
  ``denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)`` (3n),
  ``p.addcdiv_(exp_avg, denom, value=-step_size)`` (2n, +n when the value is not 1):
  ``14n + 1`` with the defaults (docs/flop-convention.md). The stock counter counts none of it.

Memory inside ``step()`` (all OPT): ``sqrt`` allocates ``n`` elements, the division another ``n``,
then the square root's result is freed; ``denom`` stays bound to its local variable until the next
parameter's ``denom`` replaces it (after that one's ``add_``), so at the next division three such
temporaries are alive. The last ``denom`` dies when the group's update returns.
"""

from __future__ import annotations

from typing import Any

from costmodel.costs import Flops, MemEvent, OptimizerCost, ParamGroup, ParamMeta, amount
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl

NAME = "adamw"
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False,
    "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
}
# What _single_tensor_adam covers here; anything else takes another code path.
MODELLED = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}
STEP_BYTES = 4  # torch.tensor(0.0, dtype=_get_scalar_dtype()): float32 unless the default dtype is float64


def options_of(group: ParamGroup) -> dict[str, Any]:
    options = {**DEFAULTS, **group.options}
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise CostModelError(f"AdamW has no option(s) {', '.join(unknown)}")
    for key, value in MODELLED.items():
        if bool(options[key]) != value:
            raise CostModelError(f"AdamW with {key}={options[key]!r} is not modelled (only {key}={value})")
    if options["foreach"] or options["fused"]:
        raise CostModelError("AdamW's foreach/fused paths are not modelled (CPU runs the single-tensor path)")
    return options


def state_bytes(params: list[ParamMeta]) -> int:
    """``step``, ``exp_avg`` and ``exp_avg_sq`` of every parameter."""
    return sum(STEP_BYTES + 2 * p.nbytes for p in params)


def step_flops(n: int, step: int, options: dict[str, Any]) -> int:
    """Exact-convention FLOPs of one parameter's update on step ``step``."""
    beta1, beta2 = options["betas"]
    lr, weight_decay = options["lr"], options["weight_decay"]
    step_size = lr / (1 - beta1 ** step)
    flops = 1  # step_t += 1
    flops += n if weight_decay != 0 else 0  # param.mul_(1 - lr * wd)
    flops += 3 * n  # exp_avg.lerp_(grad, 1 - beta1)
    flops += n + (2 + ((1 - beta2) != 1)) * n  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    flops += 3 * n  # sqrt, / bias_correction2_sqrt, add_(eps)
    flops += (2 + (-step_size != 1)) * n  # param.addcdiv_(exp_avg, denom, value=-step_size)
    return flops


@hookimpl
def costmodel_optimizer_cost(group: ParamGroup, step: int, config: object) -> OptimizerCost | None:
    if group.optimizer != NAME:
        return None
    options = options_of(group)
    params = [p for p in group.params if p.trainable]
    events: list[MemEvent] = []
    if step == 1:
        for p in params:
            events += [MemEvent(STEP_BYTES, "OPT", f"{p.name}: state step"),
                       MemEvent(p.nbytes, "OPT", f"{p.name}: exp_avg"),
                       MemEvent(p.nbytes, "OPT", f"{p.name}: exp_avg_sq")]
    previous_denom = None
    flops = 0
    for p in params:
        temporary = p.nbytes  # sqrt and the division keep the moment's dtype, the parameter's
        events += [MemEvent(temporary, "OPT", f"{p.name}: exp_avg_sq.sqrt()"),
                   MemEvent(temporary, "OPT", f"{p.name}: / bias_correction2_sqrt"),
                   MemEvent(-temporary, "OPT", f"{p.name}: sqrt freed")]
        if previous_denom is not None:
            events.append(MemEvent(-previous_denom, "OPT", "previous denom freed"))
        previous_denom = temporary
        flops += step_flops(p.numel, step, options)
    if previous_denom is not None:
        events.append(MemEvent(-previous_denom, "OPT", "last denom freed"))
    return OptimizerCost(
        flops=Flops(torch=0, exact=flops),
        state_bytes=state_bytes(params),
        events=events,
        note=f"AdamW over {len(params)} tensors ({amount(sum(p.numel for p in params))} elements): 14n+1 FLOPs each",
    )
