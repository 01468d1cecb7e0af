"""Head + batch norm (BN+H): only the classification head trains; every batch-norm layer stays in
training mode (batch statistics, running statistics updated) with its affine parameters frozen.
One AdamW group over the head's parameters."""

from __future__ import annotations

from torch import nn

from costmodel.config import StepConfig
from costmodel.costs import ParamGroup, PreparedMethod
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl
from costmodel.models import head_name

from .method_fft import trainable_metas

NAME = "bn_head"


@hookimpl
def costmodel_method_names() -> list[str]:
    return [NAME]


@hookimpl
def costmodel_prepare_method(name: str, model: nn.Module, config: StepConfig) -> PreparedMethod | None:
    if name != NAME:
        return None
    if config.options:
        raise CostModelError(f"method 'bn_head' takes no options, got {', '.join(sorted(config.options))}")
    head = head_name(model)
    for qualified, parameter in model.named_parameters():
        parameter.requires_grad_(qualified == head or qualified.startswith(head + "."))
    model.train()
    params = trainable_metas(model)
    return PreparedMethod(
        param_groups=[ParamGroup("adamw", params, {"lr": config.lr})],
        note=f"bn_head: head {head!r} trainable ({sum(p.numel for p in params):,} parameters); AdamW",
    )
