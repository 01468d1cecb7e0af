"""Applying each fine-tuning method for real: what is trainable, which adapters exist, which optimizer.

``apply_method(model, "lora", rank=4)`` mutates the model in place (adapters injected, parameters
frozen) and returns an :class:`AppliedMethod` with the model, its optimizer and the parameter counts.
It works on real tensors and inside ``FakeTensorMode`` alike (the measurement's ``--fake``).

The methods, as the runtime-reference issue defines them:

- ``fft``: every parameter trainable; ``torch.optim.AdamW(lr)`` (or the configured optimizer, below).
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

The optimizer of fft, bn_head, lora and dora is ``StepConfig.optimizer`` (``OPTIMIZERS``: adamw,
adam, sgd, adafactor, adamw8bit), built for real as ``torch.optim.AdamW / Adam / SGD /
Adafactor`` or ``bitsandbytes.optim.AdamW8bit`` ``(trainable parameters, lr=lr,
**StepConfig.optimizer_options)``, the library's defaults for every option not given (on CPU:
torch's single-tensor path). GaLore has its own optimizer, GaLoreAdamW: any other is refused.

Method options (``StepConfig.options``; ``apply_method(..., options=...)``), the ones the
predictor's method plugins accept, with the same meaning; any other is a CostModelError:

- lora/dora: ``rank_pattern``, ``alpha_pattern``, ``target_modules``, ``exclude_modules`` are
  handed to peft's ``LoraConfig`` as they are (peft matches names and picks per-layer ranks);
  without ``target_modules`` peft gets the default targets as exact names; ``include_grouped``
  adds the grouped convolutions whose rank (after ``rank_pattern``) is a multiple of ``groups``,
  or that ``rank_pattern`` names exactly (peft then refuses a rank they cannot take);
  ``adapt_head`` puts the head's layers among the default targets and stops training the head in
  full.
- galore: ``rank_pattern`` (a per-layer projection rank, keys matched as peft's
  ``get_pattern_key`` does), ``target_modules``, ``exclude_modules`` (matched by peft's own
  ``check_target_module_exists``, as for LoRA), ``adapt_head`` (the head's weights projected too).
- fft, bn_head: none.

The methods' hyper-parameters are options too (``StepConfig.options``, as the method plugins
declare them; ``apply_method``'s keywords): lora/dora ``alpha`` (peft's ``lora_alpha``; absent:
the rank), galore ``update_proj_gap`` (T, default 200) and ``scale`` (default 0.25).
``StepConfig.shared_options`` (a sweep's base step) give each method the hyper-parameters it takes.
"""

from __future__ import annotations

import re

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from costmodel.config import StepConfig, check_int, check_positive
from costmodel.errors import CostModelError
from costmodel.models import head_name
from costmodel.validation.optimizers import BUILDERS


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
    # StepConfig.optimizer and StepConfig.optimizer_options: which torch.optim class, with which keywords.
    optimizer: str = "adamw"
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    # StepConfig.options: which layers, at which rank (and alpha); checked by check_layer_options.
    layer_options: Mapping[str, Any] = field(default_factory=dict)
    # StepConfig.quantize: the frozen base's Linear layers as bitsandbytes' Linear4bit of this type.
    quantize: str = ""


LORA_OPTIONS: frozenset[str] = frozenset({
    "rank_pattern", "alpha_pattern", "target_modules", "exclude_modules", "include_grouped", "adapt_head"})
GALORE_OPTIONS: frozenset[str] = frozenset({"rank_pattern", "target_modules", "exclude_modules", "adapt_head"})
OPTIONS_BY_METHOD: dict[str, frozenset[str]] = {
    "fft": frozenset(), "bn_head": frozenset(), "lora": LORA_OPTIONS, "dora": LORA_OPTIONS, "galore": GALORE_OPTIONS,
}
# The hyper-parameters among a method's options: apply_method's keywords of the same names.
SETTINGS_BY_METHOD: dict[str, frozenset[str]] = {
    "lora": frozenset({"alpha"}), "dora": frozenset({"alpha"}), "galore": frozenset({"update_proj_gap", "scale"}),
}


def _is_name_spec(value: Any) -> bool:
    """A LoraConfig target/exclude spec: a regular expression, or a list of names."""
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value))


def check_layer_options(method: str, options: Mapping[str, Any]) -> None:
    """Refuse an option ``method`` does not take, or a value of the wrong kind, in one line."""
    known = OPTIONS_BY_METHOD.get(method, frozenset())
    unknown = sorted(set(options) - known)
    if unknown and not known:
        raise CostModelError(f"method {method!r} takes no options, got {', '.join(unknown)}")
    if unknown:
        raise CostModelError(f"method {method!r} does not know the option(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(sorted(known))}")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = options.get(key, {})
        if not isinstance(pattern, Mapping) or not all(isinstance(k, str) for k in pattern):
            raise CostModelError(f"option {key} must map layer-name patterns to values, got {pattern!r}")
    for key, rank in options.get("rank_pattern", {}).items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise CostModelError(f"option rank_pattern: the rank for {key!r} must be an integer >= 1, got {rank!r}")
    for key, alpha in options.get("alpha_pattern", {}).items():
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise CostModelError(f"option alpha_pattern: the alpha for {key!r} must be a number, got {alpha!r}")
    for key in ("target_modules", "exclude_modules"):
        if key in options and not _is_name_spec(options[key]):
            raise CostModelError(f"option {key} must be a regular expression or a list of names, got {options[key]!r}")
    for key in ("include_grouped", "adapt_head"):
        if key in options and not isinstance(options[key], bool):
            raise CostModelError(f"option {key} must be true or false, got {options[key]!r}")


def _in_head(name: str, head: str | None) -> bool:
    """Whether ``name`` is the head or inside it; nothing is when ``head`` is None (``adapt_head``)."""
    return head is not None and (name == head or name.startswith(head + "."))


def _pattern_value(pattern: Mapping[str, Any], name: str, default: Any) -> Any:
    """The value peft's ``get_pattern_key`` picks for layer ``name`` from a rank/alpha pattern."""
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(list(pattern), name), default)


def adapter_targets(model: nn.Module, rank: int = 4, options: Mapping[str, Any] | None = None) -> list[str]:
    """Qualified names of the default LoRA/DoRA targets: Conv2d with groups == 1, Linear outside the head.

    ``adapt_head`` drops the "outside the head"; ``include_grouped`` adds the grouped convolutions
    whose rank (``rank``, or ``rank_pattern``'s) is a multiple of ``groups``, and those that
    ``rank_pattern`` names exactly (peft then refuses the rank if they cannot take it).
    """
    options = options or {}
    head = None if options.get("adapt_head") else head_name(model)
    rank_pattern: Mapping[str, int] = options.get("rank_pattern", {})
    targets = []
    for name, module in model.named_modules():
        if _in_head(name, head):
            continue
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1):
            targets.append(name)
        elif isinstance(module, nn.Conv2d) and options.get("include_grouped"):
            if _pattern_value(rank_pattern, name, rank) % module.groups == 0 or name in rank_pattern:
                targets.append(name)
    return targets


def low_rank_weights(model: nn.Module, rank: int = 4, options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """GaLore's low-rank group, each weight's qualified name with its projection rank.

    By default the weight of every Conv2d (grouped too) and Linear outside the head, at ``rank``;
    ``adapt_head`` includes the head; ``target_modules`` / ``exclude_modules`` select layers as
    peft's ``LoraConfig`` does (a matched layer that is not a Conv2d or Linear is an error, as in
    peft); ``rank_pattern`` gives a layer its own rank.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    options = options or {}
    head = None if options.get("adapt_head") else head_name(model)
    layers = (nn.Conv2d, nn.Linear)
    default = [name for name, module in model.named_modules()
               if isinstance(module, layers) and not _in_head(name, head)]
    selection = LoraConfig(target_modules=options.get("target_modules", default),
                           exclude_modules=options.get("exclude_modules"))
    chosen = {}
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(selection, name):
            continue
        if not isinstance(module, layers):
            raise CostModelError(f"GaLore: option target_modules matches layer {name!r} "
                                 f"({type(module).__name__}), which is neither an nn.Conv2d nor an nn.Linear")
        chosen[f"{name}.weight"] = _pattern_value(options.get("rank_pattern", {}), name, rank)
    if "target_modules" in options and not chosen:
        raise CostModelError(f"GaLore: option target_modules={options['target_modules']!r} matches no layer")
    return chosen


# StepConfig.optimizer -> the torch.optim class the reference builds for fft, bn_head, lora and dora.
TORCH_OPTIMIZERS: dict[str, str] = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD", "adafactor": "Adafactor"}
# Every optimizer the reference builds, by the name its class goes by (BUILDERS make those outside torch.optim).
OPTIMIZERS: dict[str, str] = {**{name: f"torch.optim.{cls}" for name, cls in TORCH_OPTIMIZERS.items()},
                              "adamw8bit": "bitsandbytes.optim.AdamW8bit"}


def build_optimizer(name: str, params: list[nn.Parameter], lr: float,
                    optimizer_options: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``<OPTIMIZERS[name]>(params, lr=lr, **optimizer_options)`` (torch.optim's class, or the
    builder of ``costmodel.validation.optimizers.BUILDERS``); an unknown name, or
    a keyword or value torch refuses, is a one-line CostModelError."""
    if name not in OPTIMIZERS:
        raise CostModelError(f"--optimizer {name!r}: the runtime reference builds {', '.join(OPTIMIZERS)}")
    build = BUILDERS[name] if name in BUILDERS else getattr(torch.optim, TORCH_OPTIMIZERS[name])
    try:
        return build(params, lr=lr, **optimizer_options)
    except (TypeError, ValueError) as error:
        raise CostModelError(f"--optimizer-option: {OPTIMIZERS[name]} refuses "
                             f"{dict(optimizer_options)!r}: {' '.join(str(error).split())}") from error


def _optimizer_on_trainable(model: nn.Module, options: MethodOptions) -> Callable[[], torch.optim.Optimizer]:
    return lambda: build_optimizer(options.optimizer, [p for p in model.parameters() if p.requires_grad],
                                   options.lr, options.optimizer_options)


def prepare_fft(model: nn.Module, options: MethodOptions) -> PreparedModel:
    """Full fine-tuning: every parameter trainable, the configured optimizer (AdamW by default)."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return PreparedModel(model, _optimizer_on_trainable(model, options))


def prepare_bn_head(model: nn.Module, options: MethodOptions) -> PreparedModel:
    """Head only; batch norm keeps training-mode statistics (the model stays in train mode)."""
    head = head_name(model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_in_head(name, head))
    return PreparedModel(model.train(), _optimizer_on_trainable(model, options))


def inject_lora(model: nn.Module, targets: str | list[str], *, rank: int, alpha: float, use_dora: bool,
                **lora: Any) -> nn.Module:
    """peft LoRA/DoRA adapters on ``targets`` (``LoraConfig.target_modules``: exact or suffix names,
    or a regular expression), with further ``LoraConfig`` fields in ``lora`` (``rank_pattern``,
    ``alpha_pattern``, ``exclude_modules``); peft's refusals become CostModelError."""
    import warnings

    from peft import LoraConfig, inject_adapter_in_model

    kind = "DoRA" if use_dora else "LoRA"
    if not targets:
        raise CostModelError(f"{kind}: the model has no Conv2d with groups == 1 or Linear outside its head to adapt")
    try:
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, use_dora=use_dora, target_modules=targets,
                            **lora)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on merging grouped convs
            return inject_adapter_in_model(config, model)
    except (ValueError, TypeError, NotImplementedError) as error:
        message = " ".join(str(error).split())
        # peft quotes a refused module's whole repr: name it by its class instead, on one short line.
        message = re.sub(r"Target module (\w+)\(.*\) is not supported", r"Target module \1 is not supported", message)
        raise CostModelError(f"peft refuses {kind} with rank {rank}: {message}") from error


def quantize_base(model: nn.Module, quant_type: str, head: str | None) -> None:
    """Every ``nn.Linear`` outside the head as bitsandbytes' ``Linear4bit`` of ``quant_type`` with its
    defaults (blocks of 64, nested statistics) and float32 compute, or for ``"int8"`` as
    ``Linear8bitLt(has_fp16_weights=False)``, its weights quantized from the layer's (bitsandbytes
    quantizes when the layer is moved to its device), before peft adds adapters: what a user does
    to fine-tune a vision model on a quantized base. Real tensors only."""
    import bitsandbytes as bnb

    names = [name for name, module in model.named_modules()
             if type(module) is nn.Linear and not _in_head(f"{name}.weight", head)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if quant_type == "int8":  # int8 weights with per-row scales, no float copy kept
            quantized = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                            has_fp16_weights=False, threshold=0.0)
        else:
            quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                          compute_dtype=torch.float32, quant_type=quant_type)
        quantized.load_state_dict(linear.state_dict())
        setattr(parent, child, quantized.to(linear.weight.device))


def _prepare_lora_family(model: nn.Module, options: MethodOptions, *, use_dora: bool) -> PreparedModel:
    from peft.tuners.lora import LoraLayer

    layer_options = options.layer_options
    head = None if layer_options.get("adapt_head") else head_name(model)
    targets = layer_options.get("target_modules") or adapter_targets(model, options.rank, layer_options)
    alpha = float(options.rank if options.alpha is None else options.alpha)
    lora = {key: layer_options[key] for key in ("rank_pattern", "alpha_pattern", "exclude_modules")
            if key in layer_options}
    if options.quantize:
        quantize_base(model, options.quantize, head)
    model = inject_lora(model, targets, rank=options.rank, alpha=alpha, use_dora=use_dora, **lora)
    for name, parameter in model.named_parameters():
        # peft freezes everything but its adapters; the head is trained in full on top of them.
        parameter.requires_grad_(".lora_" in name or _in_head(name, head))
    adapted = {name: module.r["default"] for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    return PreparedModel(model, _optimizer_on_trainable(model, options), {"targets": adapted})


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
    """GaLore: all trainable; conv/linear weights outside the head projected to ``rank``.
    Its optimizer is GaLoreAdamW with its defaults: another optimizer, or optimizer options, are refused."""
    if options.optimizer != "adamw":
        raise CostModelError(f"--optimizer {options.optimizer}: method galore trains with its own optimizer "
                             f"(galore-torch's GaLoreAdamW, which projects the gradients); drop --optimizer")
    if options.optimizer_options:
        raise CostModelError(f"--optimizer-option {next(iter(options.optimizer_options))}: method galore's "
                             f"GaLoreAdamW is built with its defaults only")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    low_rank_names = low_rank_weights(model, options.rank, options.layer_options)

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
        # state beforehand is used instead of the stock one: no patching of galore_torch. It also
        # carries each weight's own rank (rank_pattern); the group's "rank" only marks it low-rank.
        projector = _galore_projector_class()
        for name, parameter in zip(low_rank_names, low_rank):
            optimizer.state[parameter]["projector"] = projector(
                low_rank_names[name], update_proj_gap=options.update_proj_gap, scale=options.scale, proj_type="std")
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
                 update_proj_gap: int = 200, scale: float = 0.25, options: Mapping[str, Any] | None = None,
                 optimizer: str = "adamw", optimizer_options: Mapping[str, Any] | None = None,
                 materialize: Callable[[nn.Module], None] | None = None, quantize: str = "") -> AppliedMethod:
    """Prepare ``model`` (in place) for ``method`` and build its optimizer.

    ``options`` are the method's layer options (``StepConfig.options``, see the module docstring);
    ``optimizer`` and ``optimizer_options`` the optimizer and its keywords besides ``lr``
    (``StepConfig.optimizer``, ``StepConfig.optimizer_options``).
    ``materialize``, if given, runs between the preparation and the optimizer's creation; it may
    replace the model's tensors (``measure(fake=True)`` turns meta tensors into fake ones there).
    ``quantize``: LoRA on a 4-bit base (``StepConfig.quantize``, :func:`quantize_base`).
    """
    if method not in METHODS:
        raise CostModelError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise CostModelError(f"--rank must be an integer >= 1, got {rank!r}")
    # peft and galore-torch take any alpha, T and scale unchecked: the same bounds as the predictor's.
    if alpha is not None:
        alpha = check_positive(alpha, "option alpha")
    update_proj_gap = check_int(update_proj_gap, "option update_proj_gap")
    scale = check_positive(scale, "option scale")
    check_layer_options(method, options or {})
    if optimizer not in OPTIMIZERS:  # before any work (the optimizer is built last)
        raise CostModelError(f"--optimizer {optimizer!r}: the runtime reference builds {', '.join(OPTIMIZERS)}")
    if quantize and method != "lora":
        raise CostModelError(f"--quantize {quantize}: the runtime reference quantizes the frozen base of lora only")
    settings = MethodOptions(rank=rank, alpha=alpha, lr=lr, update_proj_gap=update_proj_gap, scale=scale,
                             optimizer=optimizer, optimizer_options=dict(optimizer_options or {}),
                             layer_options=dict(options or {}), quantize=quantize)
    prepared = METHODS[method](model, settings)
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
    """``apply_method`` with the method, rank, learning rate, optimizer and options of ``config``: its
    hyper-parameters (``SETTINGS_BY_METHOD``: ``config.options``, else ``config.shared_options``)
    as keywords, every other option as a layer option."""
    taken = SETTINGS_BY_METHOD.get(config.method, frozenset())
    options = {key: value for key, value in config.shared_options.items() if key in taken}
    options.update(config.options)
    settings = {key: options.pop(key) for key in taken if key in options}
    return apply_method(model, config.method, rank=config.rank, lr=config.lr, **settings,
                        options=options, optimizer=config.optimizer, optimizer_options=config.optimizer_options,
                        materialize=materialize, quantize=config.quantize)
