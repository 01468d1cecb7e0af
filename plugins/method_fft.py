"""Full fine-tuning: every parameter trainable, one group of the configured optimizer
(``StepConfig.optimizer``, ``torch.optim.AdamW(lr)`` by default; :func:`optimizer_group`)."""

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


def optimizer_group(params: list[ParamMeta], config: StepConfig) -> ParamGroup:
    """One group of ``config.optimizer`` over ``params`` with ``config.lr`` and
    ``config.optimizer_options``: what the runtime reference builds, ``torch.optim.<Optimizer>(
    params, lr=config.lr, **config.optimizer_options)``. The optimizer plugin checks the options
    (``StepConfig`` keeps ``lr`` out of them)."""
    return ParamGroup(config.optimizer, params, {"lr": config.lr, **config.optimizer_options})


@hookimpl
def costmodel_method_names() -> list[str]:
    return [NAME]


@hookimpl
def costmodel_method_options(name: str) -> MethodOptions | None:
    return NO_ARGUMENTS if name == NAME else None


def prepare_selection_method(name: str, model: nn.Module, config: StepConfig, trains: Callable[[str], bool],
                             what: str) -> PreparedMethod:
    """A method that only chooses which parameters train (``trains(qualified_name)``) and gives them
    all to one group of the configured optimizer (:func:`optimizer_group`); it takes no rank and
    no options (``NO_ARGUMENTS``: the engine refuses any before it gets here)."""
    for qualified, parameter in model.named_parameters():
        parameter.requires_grad_(trains(qualified))
    params = trainable_metas(model)
    return PreparedMethod(
        param_groups=[optimizer_group(params, config)],
        note=f"{name}: {what} ({sum(p.numel for p in params):,} parameters trainable); {config.optimizer}",
        affine_in_rank=True,  # the rank changes nothing
    )


@hookimpl
def costmodel_prepare_method(name: str, model: nn.Module, config: StepConfig) -> PreparedMethod | None:
    if name != NAME:
        return None
    return prepare_selection_method(NAME, model, config, lambda qualified: True, "every parameter")
