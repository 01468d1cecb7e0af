"""Head + batch norm (BN+H): only the classification head trains; every batch-norm layer stays in
training mode (batch statistics, running statistics updated) with its affine parameters frozen.
One group of the configured optimizer (AdamW by default) over the head's parameters."""

from __future__ import annotations

from torch import nn

from costmodel.config import StepConfig
from costmodel.costs import MethodOptions, PreparedMethod
from costmodel.hookspecs import hookimpl
from costmodel.models import head_name

from .method_fft import NO_ARGUMENTS, prepare_selection_method

NAME = "bn_head"


@hookimpl
def costmodel_method_names() -> list[str]:
    return [NAME]


@hookimpl
def costmodel_method_options(name: str) -> MethodOptions | None:
    return NO_ARGUMENTS if name == NAME else None


@hookimpl
def costmodel_prepare_method(name: str, model: nn.Module, config: StepConfig) -> PreparedMethod | None:
    if name != NAME:
        return None
    head = head_name(model)
    model.train()  # batch norm keeps using batch statistics and updating its running statistics
    return prepare_selection_method(NAME, model, config,
                                lambda qualified: qualified == head or qualified.startswith(head + "."),
                                f"head {head!r}")
