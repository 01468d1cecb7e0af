"""The configuration of one fine-tuning step: what is measured and what is predicted."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from costmodel.errors import CostModelError

# The largest integer accepted for a size, a rank or a step (and for a per-layer rank in an option).
# torch stores every size as an int64: a dimension of 10**23 fails deep inside C++, and a product
# of a few sizes near 2**63 would wrap around silently in numpy's int64 rank arrays. 2**31 - 1 (the
# int32 limit) is far above any real rank or batch, and keeps one size times a few others well
# inside int64; a tensor whose total size still overflows is refused by shape propagation.
MAX_INT = 2**31 - 1

# What ``StepConfig.phase`` names: a training step (forward, backward, optimizer step), or an
# evaluation pass (the forward and loss in eval mode under ``torch.no_grad()``).
TRAINING = "train"
EVALUATION = "evaluate"
STEP_KINDS: tuple[str, ...] = (TRAINING, EVALUATION)

# What ``StepConfig.dtype`` names: the step's floating-point precision, as ``torch`` calls it.
DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# What ``StepConfig.autocast`` names: the lower precision ``torch.autocast("cpu", dtype=...)`` runs
# its listed ops in ("" for no autocast).
AUTOCAST_DTYPES: tuple[str, ...] = ("bf16", "fp16")
# What ``StepConfig.quantize`` names: bitsandbytes' storage of a frozen base's Linear layers, its
# 4-bit data types (``Linear4bit``) and int8 (``Linear8bitLt``); "" for none.
QUANTIZE_TYPES: tuple[str, ...] = ("nf4", "fp4", "int8")

# How each field is named to the user: its CLI flag where it has one, else its keyword.
_FIELD_NAMES: dict[str, str] = {
    "rank": "--rank", "batch": "--batch", "resolution": "--resolution", "classes": "--classes",
    "step": "--step", "channels": "--channels", "loss": "--loss", "lr": "lr", "phase": "--phase",
    "optimizer": "--optimizer", "optimizer_options": "--optimizer-option", "accumulate": "--accumulate",
    "dtype": "--dtype", "checkpoint": "--checkpoint", "autocast": "--autocast", "quantize": "--quantize",
}


def is_valid_int(value: Any) -> bool:
    """Whether ``value`` is an integer in ``[1, MAX_INT]`` (a size, a rank, a step; never a bool)."""
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= MAX_INT


def is_valid_positive(value: Any) -> bool:
    """Whether ``value`` is a finite number > 0 (never a bool).

    A learning rate (or a method's ``"float"`` option: LoRA's alpha, GaLore's scale) of nan, inf, 0
    or below is accepted by torch, peft and galore-torch without complaint but trains nothing
    sensible; it is refused instead."""
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and value > 0)


def check_int(value: Any, what: str) -> int:
    """``value`` if :func:`is_valid_int`, else a CostModelError naming ``what``."""
    if not is_valid_int(value):
        raise CostModelError(f"{what} must be an integer >= 1 and <= {MAX_INT} (2**31 - 1), got {value!r}")
    return value


def check_positive(value: Any, what: str) -> float:
    """``value`` as a float if :func:`is_valid_positive`, else a CostModelError naming ``what``."""
    if not is_valid_positive(value):
        raise CostModelError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class StepConfig:
    """One fine-tuning step, as DEVELOPERS.md and the runtime-reference issue define it.

    The model is ``torchvision.models.<model>(weights=None, num_classes=classes)`` in train mode,
    fed ``batch`` images of ``channels`` x ``resolution`` x ``resolution`` and a target through the
    loss ``loss`` (``cross_entropy``: integer labels through ``nn.CrossEntropyLoss``; the losses are
    the plugins' ``costmodel_loss``); the measured step is number ``step`` (step 1 creates optimizer state).

    ``phase`` says what is measured: ``"train"``, training step number ``step``; ``"evaluate"``, the
    evaluation pass that runs after ``step`` training steps (0: before any): ``model.eval()``, and
    under ``torch.no_grad()`` the same forward and loss on ``batch`` images, with the parameters,
    buffers, the last step's gradients and the optimizer's state alive beside it.
    """

    model: str = "mobilenet_v2"
    method: str = "fft"
    rank: int = 4
    batch: int = 1
    resolution: int = 224
    classes: int = 10
    step: int = 2
    phase: str = TRAINING
    # Image channels: 3 for RGB, 1 for a grey-scale or thermal sensor, 4 for RGB + depth... (a
    # torchvision model's first layer takes 3; a model of one's own, whatever it was built for).
    channels: int = 3
    # The training loss, by name: what a loss plugin describes (``costmodel_loss``: the criterion
    # module and the target's shape and dtype): "cross_entropy" (class indices), "mse" (a target
    # shaped like the logits).
    loss: str = "cross_entropy"
    # The optimizer's learning rate (every method has one).
    lr: float = 1e-3
    # The options of ``method``, as its plugin declares them (``costmodel_method_options``): its
    # hyper-parameters (LoRA/DoRA ``alpha``, GaLore ``update_proj_gap`` and ``scale``), rank
    # patterns, target rules... Checked, coerced and completed with the declared defaults before
    # the method plugin runs (``costmodel.options.checked_config``); left here as given.
    options: dict[str, Any] = field(default_factory=dict)
    # Options for whichever method declares them, for a base configuration whose method varies
    # (sweep, plan, report: ``--galore-update-proj-gap`` applies to GaLore only): a method that
    # declares a key gets its value unless ``options`` gives one; a method that does not ignores it.
    shared_options: dict[str, Any] = field(default_factory=dict)
    # The optimizer the method's parameter groups are trained with, by name: what an optimizer
    # plugin costs (``costmodel_optimizer_cost``): "adamw" (the default), "adam", "sgd". A method
    # with an optimizer of its own (GaLore's GaLoreAdamW) refuses any other.
    optimizer: str = "adamw"
    # Its keyword arguments besides the learning rate (``lr`` above), as ``torch.optim`` takes
    # them: ``{"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}``. Checked here for type
    # only; the optimizer plugin refuses a key it does not know or a value it does not model.
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    # Gradient accumulation: the optimizer step follows ``accumulate`` micro-batches of ``batch``
    # images each. The step is given ``batch * accumulate`` images and labels, split with
    # ``chunk(accumulate)`` (views, no copy); each micro-batch runs the forward, ``loss /
    # accumulate`` and its backward pass, its gradients accumulating in ``.grad``; then one optimizer
    # step. 1: no accumulation (no division either). An evaluation pass is the same after it.
    accumulate: int = 1
    # The precision of the whole step (a key of ``DTYPES``): the model is built in float32, then
    # ``model.to(dtype)`` casts its floating parameters and buffers (integer buffers stay), before
    # the method is applied; the images (and a floating target) are in it too; the optimizer keeps
    # its state as it does for such parameters. A model of one's own must already be in it.
    dtype: str = "fp32"
    # Activation checkpointing: an fnmatch pattern over the model's qualified module names (before
    # the method is applied); each call of the outermost matching modules (``layer*``: ResNet's
    # ``layer1``..``layer4``) runs as ``torch.utils.checkpoint.checkpoint(module, *args,
    # use_reentrant=False)``: its forward saves nothing for backward but its inputs, and the
    # backward recomputes it. "": none.
    checkpoint: str = ""
    # Mixed precision: the forward and the loss run under ``torch.autocast("cpu", dtype=...)`` in
    # this lower precision (a key of ``DTYPES`` in ``AUTOCAST_DTYPES``), as a training loop writes
    # ``with torch.autocast(...): loss = criterion(model(images), labels)``; the parameters stay
    # in ``dtype``, the backward and the optimizer step run outside it. "": no autocast.
    autocast: str = ""
    # A quantized frozen base (the QLoRA setup): every frozen ``nn.Linear`` outside the head stored
    # as bitsandbytes' ``Linear4bit`` of this 4-bit type, with its defaults (blocks of 64, nested
    # statistics, float32 compute), or for "int8" as ``Linear8bitLt(has_fp16_weights=False)`` (a
    # name in ``QUANTIZE_TYPES``); adapters on top stay float32.
    # A method that does not train on a quantized base refuses it. "": no quantization.
    quantize: str = ""

    def __post_init__(self) -> None:
        if self.phase not in STEP_KINDS:
            raise CostModelError(f"{_FIELD_NAMES['phase']} must be one of {', '.join(STEP_KINDS)}, got {self.phase!r}")
        for name in ("rank", "batch", "resolution", "classes", "step", "channels", "accumulate"):
            if name == "step" and self.phase == EVALUATION:  # 0: an evaluation before any training
                if not ((type(self.step) is int and self.step == 0) or is_valid_int(self.step)):
                    raise CostModelError(f"--step of an evaluation (the training steps before it) must be an "
                                         f"integer >= 0 and <= {MAX_INT} (2**31 - 1), got {self.step!r}")
                continue
            check_int(getattr(self, name), _FIELD_NAMES[name])
        if not isinstance(self.checkpoint, str):
            raise CostModelError(f"{_FIELD_NAMES['checkpoint']} must be a module name pattern, got {self.checkpoint!r}")
        if self.dtype not in DTYPES:
            raise CostModelError(f"{_FIELD_NAMES['dtype']} must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.autocast != "" and self.autocast not in AUTOCAST_DTYPES:
            raise CostModelError(f"{_FIELD_NAMES['autocast']} must be one of {', '.join(AUTOCAST_DTYPES)} (or absent), "
                                 f"got {self.autocast!r}")
        if self.quantize != "" and self.quantize not in QUANTIZE_TYPES:
            raise CostModelError(f"{_FIELD_NAMES['quantize']} must be one of {', '.join(QUANTIZE_TYPES)} (or absent), "
                                 f"got {self.quantize!r}")
        if self.batch * self.accumulate > MAX_INT:  # the step is given all its micro-batches' images
            raise CostModelError(f"--batch x --accumulate (the images of one optimizer step) must be <= {MAX_INT} "
                                 f"(2**31 - 1), got {self.batch} x {self.accumulate}")
        check_positive(self.lr, _FIELD_NAMES["lr"])
        if not isinstance(self.loss, str) or not self.loss:
            raise CostModelError(f"{_FIELD_NAMES['loss']} must be a non-empty loss name, got {self.loss!r}")
        for name in ("options", "shared_options"):
            if not isinstance(getattr(self, name), dict):
                raise CostModelError(f"method {name.replace('_', ' ')} must be a dict of option names to values, "
                                     f"got {getattr(self, name)!r}")
        if not isinstance(self.optimizer, str) or not self.optimizer:
            raise CostModelError(f"{_FIELD_NAMES['optimizer']} must be a non-empty optimizer name, got {self.optimizer!r}")
        if not isinstance(self.optimizer_options, dict) or not all(
                isinstance(key, str) and key for key in self.optimizer_options):
            raise CostModelError(f"{_FIELD_NAMES['optimizer_options']}: the optimizer options must be a dict of "
                                 f"option names to values, got {self.optimizer_options!r}")
        if "lr" in self.optimizer_options:  # one learning rate, not two that may disagree
            raise CostModelError(f"{_FIELD_NAMES['optimizer_options']} lr: give the learning rate as lr, "
                                 f"not as an optimizer option")

    @property
    def micro_batches(self) -> int:
        """The micro-batches the measured pass runs: ``accumulate`` for a training step, 1 for an
        evaluation pass (one forward of ``batch`` images, its loss not divided)."""
        return self.accumulate if self.phase == TRAINING else 1

    def replace(self, **changes: Any) -> "StepConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
