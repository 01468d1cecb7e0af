"""Applying each fine-tuning method for real: what is trainable, which adapters exist, which optimizer.

``apply_method(model, "lora", rank=4)`` mutates the model in place (adapters injected, parameters
frozen) and returns an :class:`AppliedMethod` with the model, its optimizer and the parameter counts.
It works on real tensors and inside ``FakeTensorMode`` alike (the measurement's ``--fake``).

The methods, as the runtime-reference issue defines them:

- ``fft``: every parameter trainable; ``torch.optim.AdamW(lr)``.
- ``bn_head``: only the head (``costmodel.models.head_name``) trainable; batch-norm layers stay in
  train mode (batch statistics used, running statistics updated) but their affine parameters are
  frozen; AdamW on the head.
- ``lora``/``dora``: peft ``LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0,
  use_dora=...)`` on every ``nn.Conv2d`` with ``groups == 1`` and every ``nn.Linear`` outside the
  head, passed to peft as exact module names; every base weight frozen (batch-norm affine too); the
  head made trainable with plain ``requires_grad`` rather than peft's ``modules_to_save``:
  ``modules_to_save`` wraps the head in a ``ModulesToSaveWrapper`` holding the original head *and a
  trainable copy*, which changes the module structure (the head's qualified names) and adds a second
  copy of the head's weights to parameter memory, neither of which the reference configuration has.
- ``galore``: every parameter trainable; ``galore_torch.GaLoreAdamW`` with the weight of every
  ``nn.Conv2d`` (grouped ones too) and every ``nn.Linear`` outside the head in the low-rank group
  (rank, update_proj_gap, scale, proj_type="std"), all other parameters in a plain group. A 4-D conv
  gradient is projected as the matrix (C_out, C_in/groups * kh * kw) and reshaped back after
  ``project_back`` (galore-torch 1.0 only handles matrices); see :class:`MatrixGaLoreProjector`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.models import head_name


@dataclass
class AppliedMethod:
    """A model prepared for one method, with the optimizer that trains it."""

    method: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    trainable_params: int
    total_params: int
    # Qualified names of the parameters that do not require grad.
    frozen: tuple[str, ...]
    # Method-specific facts: adapter targets (lora/dora), low-rank parameters (galore).
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedModel:
    """What a method does to a model before training: the mutated model and how to build its optimizer.

    ``make_optimizer`` looks parameters up by name when it is called, so the model's tensors may be
    replaced in between (``--fake`` prepares on the meta device, then materialises fake tensors).
    """

    model: nn.Module
    make_optimizer: Callable[[], torch.optim.Optimizer]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodOptions:
    rank: int = 4
    alpha: float | None = None
    lr: float = 1e-3
    update_proj_gap: int = 200
    scale: float = 0.25


def _in_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def adapter_targets(model: nn.Module) -> list[str]:
    """Qualified names of the LoRA/DoRA targets: Conv2d with groups == 1, Linear outside the head."""
    head = head_name(model)
    return [
        name for name, module in model.named_modules()
        if not _in_head(name, head)
        and ((isinstance(module, nn.Conv2d) and module.groups == 1) or isinstance(module, nn.Linear))
    ]


def low_rank_weights(model: nn.Module) -> list[str]:
    """GaLore's low-rank group: the weight of every Conv2d (grouped too) and Linear outside the head."""
    head = head_name(model)
    return [
        f"{name}.weight" for name, module in model.named_modules()
        if not _in_head(name, head) and isinstance(module, (nn.Conv2d, nn.Linear))
    ]


def _adamw_on_trainable(model: nn.Module, lr: float) -> Callable[[], torch.optim.Optimizer]:
    return lambda: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def prepare_fft(model: nn.Module, options: MethodOptions) -> PreparedModel:
    """Full fine-tuning: every parameter trainable, AdamW."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return PreparedModel(model, _adamw_on_trainable(model, options.lr))


def prepare_bn_head(model: nn.Module, options: MethodOptions) -> PreparedModel:
    """Head only; batch norm keeps training-mode statistics (the model stays in train mode)."""
    head = head_name(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_in_head(name, head))
    return PreparedModel(model.train(), _adamw_on_trainable(model, options.lr))


def inject_lora(model: nn.Module, targets: list[str], *, rank: int, alpha: float, use_dora: bool) -> nn.Module:
    """peft LoRA/DoRA adapters on exactly ``targets``; peft's refusals become CostModelError."""
    import warnings

    from peft import LoraConfig, inject_adapter_in_model

    kind = "DoRA" if use_dora else "LoRA"
    if not targets:
        raise CostModelError(f"{kind}: the model has no Conv2d with groups == 1 or Linear outside its head to adapt")
    try:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, use_dora=use_dora, target_modules=targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on merging grouped convs
            return inject_adapter_in_model(config, model)
    except (ValueError, TypeError, NotImplementedError) as error:
        message = " ".join(str(error).split())
        raise CostModelError(f"peft refuses {kind} with rank {rank}: {message}") from error


def _prepare_lora_family(model: nn.Module, options: MethodOptions, *, use_dora: bool) -> PreparedModel:
    head = head_name(model)
    targets = adapter_targets(model)
    alpha = float(options.rank if options.alpha is None else options.alpha)
    model = inject_lora(model, targets, rank=options.rank, alpha=alpha, use_dora=use_dora)
    for name, parameter in model.named_parameters():
        # peft freezes everything but its adapters; the head is trained in full on top of them.
        parameter.requires_grad_(".lora_" in name or _in_head(name, head))
    return PreparedModel(model, _adamw_on_trainable(model, options.lr), {"targets": targets})


def prepare_lora(model: nn.Module, options: MethodOptions) -> PreparedModel:
    """LoRA (peft) on the adapter targets, head trainable, everything else frozen."""
    return _prepare_lora_family(model, options, use_dora=False)


def prepare_dora(model: nn.Module, options: MethodOptions) -> PreparedModel:
    """DoRA (peft, use_dora=True) on the adapter targets, head trainable, everything else frozen."""
    return _prepare_lora_family(model, options, use_dora=True)


def _galore_projector_class() -> type:
    from galore_torch.galore_projector import GaLoreProjector

    class MatrixGaLoreProjector(GaLoreProjector):
        """GaLoreProjector that handles N-d gradients as the matrix (shape[0], prod(shape[1:])).

        For a conv weight gradient this is (C_out, C_in/groups * kh * kw); the reshape of a
        contiguous gradient is a view, and the update is reshaped back after ``project_back``.
        """

        def project(self, full_rank_grad: torch.Tensor, iter: int) -> torch.Tensor:
            self.grad_shape = full_rank_grad.shape
            return super().project(full_rank_grad.reshape(full_rank_grad.shape[0], -1), iter)

        def project_back(self, low_rank_grad: torch.Tensor) -> torch.Tensor:
            return super().project_back(low_rank_grad).reshape(self.grad_shape)

    return MatrixGaLoreProjector


def prepare_galore(model: nn.Module, options: MethodOptions) -> PreparedModel:
    """GaLore: all trainable; conv/linear weights outside the head projected to ``rank``."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    low_rank_names = low_rank_weights(model)

    def make_optimizer() -> torch.optim.Optimizer:
        from galore_torch import GaLoreAdamW

        parameters = dict(model.named_parameters())
        low_rank = [parameters[name] for name in low_rank_names]
        low_rank_ids = {id(p) for p in low_rank}
        optimizer = GaLoreAdamW(
            [{"params": [p for p in parameters.values() if id(p) not in low_rank_ids]},
             {"params": low_rank, "rank": options.rank, "update_proj_gap": options.update_proj_gap,
              "scale": options.scale, "proj_type": "std"}],
            lr=options.lr, no_deprecation_warning=True,
        )
        # GaLoreAdamW creates state["projector"] only when missing, so a projector placed in the
        # state beforehand is used instead of the stock one: no patching of galore_torch.
        projector = _galore_projector_class()
        for parameter in low_rank:
            optimizer.state[parameter]["projector"] = projector(
                options.rank, update_proj_gap=options.update_proj_gap, scale=options.scale, proj_type="std")
        return optimizer

    return PreparedModel(model, make_optimizer, {"low_rank": low_rank_names})


MethodPreparer = Callable[[nn.Module, MethodOptions], PreparedModel]

METHODS: dict[str, MethodPreparer] = {
    "fft": prepare_fft,
    "bn_head": prepare_bn_head,
    "lora": prepare_lora,
    "dora": prepare_dora,
    "galore": prepare_galore,
}


def apply_method(model: nn.Module, method: str, *, rank: int = 4, alpha: float | None = None, lr: float = 1e-3,
                 update_proj_gap: int = 200, scale: float = 0.25,
                 materialize: Callable[[nn.Module], None] | None = None) -> AppliedMethod:
    """Prepare ``model`` (in place) for ``method`` and build its optimizer.

    ``materialize``, if given, runs between the preparation and the optimizer's creation; it may
    replace the model's tensors (``measure(fake=True)`` turns meta tensors into fake ones there).
    """
    if method not in METHODS:
        raise CostModelError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CostModelError(f"--rank must be an integer >= 1, got {rank!r}")
    options = MethodOptions(rank=rank, alpha=alpha, lr=lr, update_proj_gap=update_proj_gap, scale=scale)
    prepared = METHODS[method](model, options)
    if materialize is not None:
        materialize(prepared.model)
    named = list(prepared.model.named_parameters())
    return AppliedMethod(
        method=method,
        model=prepared.model,
        optimizer=prepared.make_optimizer(),
        trainable_params=sum(p.numel() for _, p in named if p.requires_grad),
        total_params=sum(p.numel() for _, p in named),
        frozen=tuple(name for name, p in named if not p.requires_grad),
        details=prepared.details,
    )


def apply_config(model: nn.Module, config: StepConfig,
                 materialize: Callable[[nn.Module], None] | None = None) -> AppliedMethod:
    """``apply_method`` with the method, rank and hyper-parameters of ``config``."""
    return apply_method(model, config.method, rank=config.rank, alpha=config.alpha, lr=config.lr,
                        update_proj_gap=config.galore_update_proj_gap, scale=config.galore_scale,
                        materialize=materialize)
