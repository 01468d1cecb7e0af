"""Full fine-tuning: every parameter trainable, one AdamW group (``torch.optim.AdamW(lr)``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from costmodel.config import StepConfig
from costmodel.costs import MethodOptions, ParamGroup, ParamMeta, PreparedMethod
from costmodel.hookspecs import hookimpl

NAME = "fft"
# What a method that only chooses which parameters train takes: no rank, no options.
NO_ARGUMENTS = MethodOptions(takes_rank=False)


def trainable_metas(model: nn.Module) -> list[ParamMeta]:
    """The trainable parameters in ``model.parameters()`` order: what the optimizer is given."""
    return [ParamMeta(name, tuple(p.shape), p.dtype, True)
            for name, p in model.named_parameters() if p.requires_grad]


@hookimpl
def costmodel_method_names() -> list[str]:
    return [NAME]


@hookimpl
def costmodel_method_options(name: str) -> MethodOptions | None:
    return NO_ARGUMENTS if name == NAME else None


def prepare_adamw_method(name: str, model: nn.Module, config: StepConfig, trains: Callable[[str], bool],
                         what: str) -> PreparedMethod:
    """A method that only chooses which parameters train (``trains(qualified_name)``) and gives them
    all to one ``AdamW(lr)`` group; it takes no rank and no options (``NO_ARGUMENTS``: the engine
    refuses any before it gets here)."""
    for qualified, parameter in model.named_parameters():
        parameter.requires_grad_(trains(qualified))
    params = trainable_metas(model)
    return PreparedMethod(
        param_groups=[ParamGroup("adamw", params, {"lr": config.lr})],
        note=f"{name}: {what} ({sum(p.numel for p in params):,} parameters trainable); AdamW",
        affine_in_rank=True,  # the rank changes nothing
    )


@hookimpl
def costmodel_prepare_method(name: str, model: nn.Module, config: StepConfig) -> PreparedMethod | None:
    if name != NAME:
        return None
    return prepare_adamw_method(NAME, model, config, lambda qualified: True, "every parameter")
