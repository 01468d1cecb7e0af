"""``torch.optim.Adam`` as it runs on CPU with default options: the single-tensor path.

``torch.optim.Adam`` runs ``_single_tensor_adam`` (``torch/optim/adam.py``, torch 2.14) on CPU for
the reason the ``adamw`` plugin gives (``foreach=None`` never defaults to foreach on CPU), with
``decoupled_weight_decay=False`` (its default; ``True`` is AdamW's rule and is costed as such).
Everything is AdamW's rule (``costmodel.plugins.adamw``) except the weight decay, whose default
here is 0:

- ``wd == 0`` (the default): no decay at all, ``13n + 1`` FLOPs per parameter of ``n`` elements
  (``step_t += 1``: 1; ``lerp_``: 3n; ``mul_(beta2)``: n; ``addcmul_(value=1-beta2)``: 3n;
  ``sqrt``, ``/``, ``add_(eps)``: 3n; ``addcdiv_(value=-step_size)``: 3n);
- ``wd != 0``: L2, ``grad = grad.add(param, alpha=wd)`` before the moments, a new tensor of the
  parameter's size and dtype (OPT; n FLOPs for the add, +n for ``alpha`` when ``wd != 1``), which
  the moments and the update then read. It stays bound to the loop's local ``grad`` until the
  next parameter's ``grad = grads[i]`` rebinds it, at the top of that iteration, before that
  parameter's own temporaries: so it is alive beside its own ``sqrt`` and division and beside the
  previous parameter's ``denom``.

State (created by ``_init_group`` on the first step for every parameter before any update): the
same as AdamW's, ``step`` (4 bytes), ``exp_avg`` and ``exp_avg_sq``. ``amsgrad`` (a fourth state
tensor and ``torch.maximum``), ``maximize``, ``capturable``, ``differentiable``, ``foreach=True``
and ``fused=True`` run other code and are refused.
"""

from __future__ import annotations

from typing import Any

from costmodel.costs import OptimizerCost, ParamGroup
from costmodel.authoring import optimizer_group
from costmodel.hookspecs import hookimpl

from .adamw import DEFAULTS as ADAMW_DEFAULTS
from .adamw import MODELLED, adam_family_cost, checked_optimizer_options

NAME = "adam"
# torch.optim.Adam's keywords and defaults: AdamW's, but no weight decay by default, and the
# choice of the decay's kind.
DEFAULTS: dict[str, Any] = {**ADAMW_DEFAULTS, "weight_decay": 0.0, "decoupled_weight_decay": False}


def options_of(group: ParamGroup) -> dict[str, Any]:
    """The group's Adam options completed with torch's defaults, or a one-line refusal."""
    return checked_optimizer_options("Adam", group.options, DEFAULTS, MODELLED)


@hookimpl
def costmodel_optimizer_cost(group: ParamGroup, step: int, config: object) -> OptimizerCost | None:
    mine = optimizer_group(group, NAME, options_of)
    if mine is None:
        return None
    options, params = mine
    decoupled = options["decoupled_weight_decay"]
    return adam_family_cost("Adam (decoupled weight decay)" if decoupled else "Adam", params, step, options,
                            decoupled_weight_decay=decoupled)


@hookimpl
def costmodel_optimizer_names() -> list[str]:
    return [NAME]
