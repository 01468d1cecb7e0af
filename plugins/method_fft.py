"""Full fine-tuning: every parameter trainable, one AdamW group (``torch.optim.AdamW(lr)``)."""

from __future__ import annotations

from torch import nn

from costmodel.config import StepConfig
from costmodel.costs import ParamGroup, ParamMeta, PreparedMethod
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl

NAME = "fft"


def trainable_metas(model: nn.Module) -> list[ParamMeta]:
    """The trainable parameters in ``model.parameters()`` order: what the optimizer is given."""
    return [ParamMeta(name, tuple(p.shape), p.dtype, True)
            for name, p in model.named_parameters() if p.requires_grad]


@hookimpl
def costmodel_method_names() -> list[str]:
    return [NAME]


@hookimpl
def costmodel_prepare_method(name: str, model: nn.Module, config: StepConfig) -> PreparedMethod | None:
    if name != NAME:
        return None
    if config.options:
        raise CostModelError(f"method 'fft' takes no options, got {', '.join(sorted(config.options))}")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    params = trainable_metas(model)
    return PreparedMethod(
        param_groups=[ParamGroup("adamw", params, {"lr": config.lr})],
        note=f"fft: all {sum(p.numel for p in params):,} parameters trainable; AdamW",
    )
