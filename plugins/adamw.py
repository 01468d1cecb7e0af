"""``torch.optim.AdamW`` as it runs on CPU: the single-tensor path (the default) and ``foreach=True``.

Which path runs: ``torch.optim.adam.adam`` (torch 2.14) with ``foreach=None`` and ``fused=None``
asks ``torch.optim.optimizer._default_to_fused_or_foreach``, which picks foreach only when every
parameter's device is in ``_get_foreach_kernels_supported_devices()`` (cuda, xpu, mtia, the
privateuse1 backend): never CPU, so CPU tensors (and fake CPU tensors) take
``_single_tensor_adam``. ``foreach=False`` / ``fused=False`` say the same explicitly; ``fused=True``
(a fused CPU kernel exists) runs another kernel and is refused; ``foreach=True`` is below.

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

``foreach=True`` (torch's default on a GPU, where ``foreach=None`` picks it; on CPU it must be asked
for) runs ``_multi_tensor_adam``: the same arithmetic as one ``torch._foreach_*`` call over every
parameter at once, so the FLOPs are the single-tensor path's, but the temporaries are lists:

- ``torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)``: a 4-byte 0-d tensor for the call;
- Adam's L2 decay ``grads = torch._foreach_add(grads, params, alpha=wd)``: a copy of every gradient
  at once, deleted (``del device_grads``) after the second moment's ``addcmul_``;
- ``exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs)``: one temporary per parameter, all alive
  together (the division by ``bias_correction2_sqrt`` and the ``eps`` add are in place), until the
  function returns. So the step's OPT peak is the state plus a second copy of every parameter,
  where the single-tensor loop adds at most three tensors' worth.

Tensors are grouped by (device, dtype) (``Optimizer._group_tensors_by_device_and_dtype``, in the
order of first appearance); each group runs the sequence above, and a group's square roots stay
bound until the next group's ``_foreach_sqrt`` has allocated its own.

``torch.optim.Adam`` runs the same functions with ``decoupled_weight_decay=False``: the
``costmodel.plugins.adam`` plugin costs it with :func:`adam_family_cost` too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from costmodel.costs import Flops, MemEvent, OptimizerCost, ParamGroup, ParamMeta, amount
from costmodel.errors import CostModelError
from costmodel.authoring import optimizer_group
from costmodel.hookspecs import hookimpl

NAME = "adamw"
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False,
    "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
}
# What _single_tensor_adam covers here; anything else takes another code path.
MODELLED = {"amsgrad": False, "maximize": False, "capturable": False, "differentiable": False}
# The options that choose another kernel when true (None and False: the single-tensor path on CPU).
PATH_OPTIONS = ("foreach", "fused")
# Of those, the paths that are modelled (``foreach=True``: the multi-tensor path, module docstring).
MODELLED_PATHS = ("foreach",)
STEP_BYTES = 4  # torch.tensor(0.0, dtype=_get_scalar_dtype()): float32 unless the default dtype is float64


def is_number(value: Any) -> bool:
    """A real number as torch.optim takes it (an int or a float, never a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checked_optimizer_options(what: str, given: Mapping[str, Any], defaults: Mapping[str, Any],
                              modelled: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` completed with ``defaults``, or a one-line CostModelError naming the option.

    Refused: a key ``defaults`` does not list (a typo must not silently change nothing); a value of
    another type than its default's (a number for a number, a bool for a bool, a pair of numbers
    for ``betas``); an option of ``modelled`` with another value than the one modelled
    (``maximize=True`` negates every gradient into a new tensor: another rule); ``foreach`` or
    ``fused`` true (another kernel: the single-tensor rule does not describe it). ``lr`` comes
    from ``StepConfig.lr`` and is checked there."""
    unknown = [key for key in given if key not in defaults]
    if unknown:
        raise CostModelError(f"--optimizer-option {unknown[0]}: {what} has no such option; "
                             f"known: {', '.join(key for key in defaults if key != 'lr')}")
    options = {**defaults, **given}
    for key, value in given.items():
        default = defaults[key]
        if isinstance(default, bool) or key in modelled or key in PATH_OPTIONS:
            if not (isinstance(value, bool) or (value is None and default is None)):
                raise CostModelError(f"--optimizer-option {key}: {what} expects true or false, got {value!r}")
        elif isinstance(default, tuple):
            if not (isinstance(value, (list, tuple)) and len(value) == len(default) and all(map(is_number, value))):
                raise CostModelError(f"--optimizer-option {key}: {what} expects {len(default)} numbers "
                                     f"(like {list(default)}), got {value!r}")
            options[key] = tuple(value)
        elif is_number(default) and not is_number(value):
            raise CostModelError(f"--optimizer-option {key}: {what} expects a number, got {value!r}")
    for key in PATH_OPTIONS:
        if options.get(key) and key not in MODELLED_PATHS:
            raise CostModelError(f"--optimizer-option {key}={options[key]!r}: {what}'s {key} path is not modelled "
                                 f"(the single-tensor path, torch's default on CPU, and foreach=true are)")
    for key, value in modelled.items():
        if options[key] != value:
            raise CostModelError(f"--optimizer-option {key}={options[key]!r}: {what} is modelled only with "
                                 f"{key}={value!r}")
    return options


def options_of(group: ParamGroup) -> dict[str, Any]:
    """The group's AdamW options completed with torch's defaults, or a one-line refusal."""
    return checked_optimizer_options("AdamW", group.options, DEFAULTS, MODELLED)


def state_bytes(params: list[ParamMeta]) -> int:
    """``step``, ``exp_avg`` and ``exp_avg_sq`` of every parameter."""
    return sum(STEP_BYTES + 2 * p.nbytes for p in params)


def step_flops(n: int, step: int, options: dict[str, Any], decoupled_weight_decay: bool = True) -> int:
    """Exact-convention FLOPs of one parameter's update on step ``step``.

    With ``decoupled_weight_decay`` (AdamW) a weight decay is ``p.mul_(1 - lr*wd)`` (n); without it
    (Adam) it is L2, ``grad = grad.add(p, alpha=wd)`` (n for the add, +n when ``wd != 1``)."""
    beta1, beta2 = options["betas"]
    lr, weight_decay = options["lr"], options["weight_decay"]
    step_size = lr / (1 - beta1 ** step)
    flops = 1  # step_t += 1
    if weight_decay != 0:
        flops += n if decoupled_weight_decay else (1 + (weight_decay != 1)) * n
    flops += 3 * n  # exp_avg.lerp_(grad, 1 - beta1)
    flops += n + (2 + ((1 - beta2) != 1)) * n  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    flops += 3 * n  # sqrt, / bias_correction2_sqrt, add_(eps)
    flops += (2 + (-step_size != 1)) * n  # param.addcdiv_(exp_avg, denom, value=-step_size)
    return flops


def state_events(params: list[ParamMeta]) -> list[MemEvent]:
    """Step 1's ``_init_group``: every parameter's ``step``, ``exp_avg`` and ``exp_avg_sq``, in order."""
    events: list[MemEvent] = []
    for p in params:
        events += [MemEvent(STEP_BYTES, "OPT", f"{p.name}: state step"),
                   MemEvent(p.nbytes, "OPT", f"{p.name}: exp_avg"),
                   MemEvent(p.nbytes, "OPT", f"{p.name}: exp_avg_sq")]
    return events


def dtype_groups(params: list[ParamMeta]) -> list[list[ParamMeta]]:
    """``Optimizer._group_tensors_by_device_and_dtype`` on one device: the parameters of each dtype,
    groups in the order of their first parameter, parameters in their own order."""
    groups: dict[torch.dtype, list[ParamMeta]] = {}
    for p in params:
        groups.setdefault(p.dtype, []).append(p)
    return list(groups.values())


def multi_tensor_adam_events(params: list[ParamMeta], l2_gradient: bool) -> list[MemEvent]:
    """``_multi_tensor_adam``'s temporaries after the state (module docstring), group by group.
    (Sizes may be arrays over many ranks, so "is there a previous group" is never a size's truth.)"""
    events: list[MemEvent] = []
    previous_roots: Any = None  # the previous group's square roots, bound to ``exp_avg_sq_sqrt``
    for group in dtype_groups(params):
        size = sum(p.nbytes for p in group)
        events += [MemEvent(STEP_BYTES, "OPT", "torch.tensor(1.0) for _foreach_add_(steps)"),
                   MemEvent(-STEP_BYTES, "OPT", "its 0-d tensor freed")]
        if l2_gradient:
            events += [MemEvent(size, "OPT", f"_foreach_add(grads, params, alpha=wd) over {len(group)} tensors"),
                       MemEvent(-size, "OPT", "del device_grads")]
        events.append(MemEvent(size, "OPT", f"_foreach_sqrt(exp_avg_sqs) over {len(group)} tensors"))
        if previous_roots is not None:
            events.append(MemEvent(-previous_roots, "OPT", "previous group's square roots freed"))
        previous_roots = size
    if previous_roots is not None:
        events.append(MemEvent(-previous_roots, "OPT", "square roots freed as the step returns"))
    return events


def adam_family_cost(what: str, params: list[ParamMeta], step: int, options: dict[str, Any],
                     decoupled_weight_decay: bool) -> OptimizerCost:
    """``_single_tensor_adam`` (or with ``foreach=True`` ``_multi_tensor_adam``, whose FLOPs are the
    same) over ``params`` on step ``step``: the state on step 1, then each parameter's temporaries
    in the order the loop makes and drops them.

    Without ``decoupled_weight_decay`` and with ``wd != 0`` (Adam's L2), ``grad = grad.add(p,
    alpha=wd)`` is a new tensor of the parameter's size, bound to the local ``grad`` until the next
    parameter's ``grad = grads[i]`` rebinds it at the top of its iteration (before that one's
    temporaries), the last one until the function returns."""
    l2_gradient = options["weight_decay"] != 0 and not decoupled_weight_decay
    events = state_events(params) if step == 1 else []
    flops = sum(step_flops(p.numel, step, options, decoupled_weight_decay) for p in params)
    per_element = step_flops(1, step, options, decoupled_weight_decay) - 1
    elements = amount(sum(p.numel for p in params))
    if options["foreach"]:
        return OptimizerCost(
            flops=Flops(torch=0, exact=flops), state_bytes=state_bytes(params),
            events=events + multi_tensor_adam_events(params, l2_gradient),
            note=f"{what} (foreach) over {len(params)} tensors ({elements} elements): {per_element}n+1 FLOPs each, "
                 f"a square root of every second moment alive at once")
    previous: ParamMeta | None = None
    for p in params:
        if l2_gradient and previous is not None:
            events.append(MemEvent(-previous.nbytes, "OPT", "previous grad + wd * p freed"))
        if l2_gradient:
            events.append(MemEvent(p.nbytes, "OPT", f"{p.name}: grad + wd * p"))
        temporary = p.nbytes  # sqrt and the division keep the moment's dtype, the parameter's
        events += [MemEvent(temporary, "OPT", f"{p.name}: exp_avg_sq.sqrt()"),
                   MemEvent(temporary, "OPT", f"{p.name}: / bias_correction2_sqrt"),
                   MemEvent(-temporary, "OPT", f"{p.name}: sqrt freed")]
        if previous is not None:
            events.append(MemEvent(-previous.nbytes, "OPT", "previous denom freed"))
        previous = p
    if previous is not None:
        events.append(MemEvent(-previous.nbytes, "OPT", "last denom freed"))
        if l2_gradient:
            events.append(MemEvent(-previous.nbytes, "OPT", "last grad + wd * p freed"))
    return OptimizerCost(
        flops=Flops(torch=0, exact=flops),
        state_bytes=state_bytes(params),
        events=events,
        note=f"{what} over {len(params)} tensors ({elements} elements): {per_element}n+1 FLOPs each",
    )


@hookimpl
def costmodel_optimizer_cost(group: ParamGroup, step: int, config: object) -> OptimizerCost | None:
    mine = optimizer_group(group, NAME, options_of)
    if mine is None:
        return None
    options, params = mine
    return adam_family_cost("AdamW", params, step, options, decoupled_weight_decay=True)


@hookimpl
def costmodel_optimizer_names() -> list[str]:
    return [NAME]
