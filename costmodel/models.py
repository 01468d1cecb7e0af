"""Building the models that are measured and predicted, and finding their classification head.

Shared by the runtime reference and the analytic engine, so both describe the same network.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from costmodel.config import DTYPES, StepConfig
from costmodel.errors import CostModelError


@lru_cache(maxsize=1)
def available_models() -> tuple[str, ...]:
    """Names of torchvision's image-classification models."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


# Factory functions whose result is made from Python values (``torch.tensor([...])``, ``arange``),
# as opposed to an allocation of a given shape (``empty``, ``zeros``: parameters and buffers).
VALUE_CONSTRUCTORS: frozenset[Callable[..., torch.Tensor]] = frozenset({
    torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor,
    torch.arange, torch.range, torch.linspace, torch.logspace,
})


class _ValuesOnCpu(TorchFunctionMode):
    """Inside ``with torch.device("meta")``: tensors made from Python values stay on the CPU.

    Some constructors compute the architecture itself with tensors and read the result back into
    Python: torchvision's ``BlockParams.from_init_params`` (every RegNet) rounds its block widths
    with ``torch.round(...).int().tolist()``, which a meta tensor cannot answer ("Cannot copy out
    of meta tensor"). Those tensors are a few numbers; keeping them on the CPU costs nothing, while
    every allocation of a given shape (the weights) still goes to the device. The mode is entered
    inside the device context, so it sees each call first and fills in ``device="cpu"`` only where
    none is given; it changes nothing outside the ``with`` block.
    """

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in VALUE_CONSTRUCTORS and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


# ``--model timm:NAME`` (and ``costmodel.predict("timm:NAME", ...)``): one of timm's models.
TIMM_PREFIX = "timm:"


def _timm() -> Any:
    """The ``timm`` module, imported only when a timm model is asked for; missing, one line."""
    try:
        import timm
    except ImportError:
        raise CostModelError("timm models need the 'timm' extra (timm not installed): "
                             "pip install 'costmodel[timm]'") from None
    return timm


def _check_timm_name(name: str, option: str | None = None) -> str:
    """The timm model name in ``timm:NAME``, checked: timm must be installed and know it."""
    model = name[len(TIMM_PREFIX):]
    where = f"{option}: " if option else ""
    if not model:
        raise CostModelError(f"{where}no timm model named in {name!r}; write timm:NAME, e.g. timm:mobilenetv3_small_100")
    timm = _timm()
    if not timm.is_model(model):
        raise CostModelError(f"{where}unknown timm model {model!r}; choose one of timm.list_models(), "
                             f"e.g. timm:mobilenetv3_small_100, timm:efficientnet_b0, timm:resnet18")
    return model


def _build_timm_model(name: str, num_classes: int, device: str | torch.device) -> nn.Module:
    """``timm.create_model(NAME, pretrained=False, num_classes=num_classes)`` in train mode, built
    on ``device`` as torchvision's models are (weights allocated there, Python-valued tensors such
    as drop-path schedules computed on the CPU)."""
    model_name = _check_timm_name(name)
    timm = _timm()
    try:
        with torch.device(device), _ValuesOnCpu():
            model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    except CostModelError:
        raise
    except Exception as error:  # third-party constructor code: whatever it raises is this model's refusal
        message = " ".join(str(error).split())[:200]
        raise CostModelError(f"cannot build {name} on the {torch.device(device).type} device "
                             f"({type(error).__name__}: {message}); costmodel builds a model there without "
                             f"weights, and this constructor does not support it") from None
    return model.to(device).train()


def check_model_names(names: Sequence[str], option: str) -> tuple[str, ...]:
    """``names``, each one of torchvision's classification models or ``timm:NAME`` for a model timm
    knows (what the CLI can build by name), checked before any work: an unknown name, or a timm name
    without timm installed, is one line naming ``option``."""
    if not names:
        raise CostModelError(f"{option}: no name given")
    known = available_models()
    unknown = [name for name in names if not name.startswith(TIMM_PREFIX) and name not in known]
    for name in names:
        if name.startswith(TIMM_PREFIX):
            _check_timm_name(name, option)
    if unknown:
        raise CostModelError(f"{option}: unknown model {', '.join(map(repr, unknown))}; choose torchvision's "
                             f"classification models, e.g. mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, "
                             f"resnet18")
    return tuple(names)


def build_model(name: str, num_classes: int = 10, device: str | torch.device = "cpu") -> nn.Module:
    """``torchvision.models.<name>(weights=None, num_classes=num_classes)`` in train mode; for a
    name ``timm:NAME``, ``timm.create_model(NAME, pretrained=False, num_classes=num_classes)``.

    On ``device="meta"`` no weight memory is allocated and no initialisation arithmetic runs: every
    weight is allocated on the meta device. Tensors that the constructor builds from Python values
    (and may read back: RegNet's block widths) are computed on the CPU, and whatever of them ends
    up in the model (batch norm's ``num_batches_tracked``, a position index) is moved to
    ``device`` afterwards.
    """
    import torchvision

    if name.startswith(TIMM_PREFIX):
        return _build_timm_model(name, num_classes, device)
    if name not in available_models():
        raise CostModelError(
            f"unknown model {name!r}; choose one of torchvision's classification models, "
            f"e.g. mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, resnet18"
        )
    with torch.device(device), _ValuesOnCpu():
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return model.to(device).train()


@lru_cache(maxsize=16)
def _pristine_meta_model(name: str, num_classes: int) -> nn.Module:
    return build_model(name, num_classes, device="meta")


def meta_model(name: str, num_classes: int = 10) -> nn.Module:
    """``build_model(name, num_classes, device="meta")``, as a copy of one built before: copying a
    meta-device model is a few times faster than running torchvision's constructor again."""
    return copy.deepcopy(_pristine_meta_model(name, num_classes))


def step_model(config: StepConfig) -> nn.Module:
    """The meta-device model of ``config`` before its method is applied: ``config.model`` with
    ``config.classes`` classes in the step's precision (:func:`in_step_dtype`). The one place the
    engine gets a model by name."""
    return in_step_dtype(meta_model(config.model, config.classes), config)


def checkpointed_modules(model: nn.Module, pattern: str, label: str = "the model") -> list[tuple[str, nn.Module]]:
    """The modules ``StepConfig.checkpoint`` names: those whose qualified name matches the fnmatch
    ``pattern``, outermost only (``layer*`` gives ResNet's ``layer1``..``layer4``, not the blocks
    inside them, which ``layer*`` matches too), in module order. A pattern that matches nothing is
    refused, naming the model's top-level modules; "" names none."""
    if not pattern:
        return []
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name and fnmatch.fnmatchcase(name, pattern) and not any(name.startswith(outer + ".") for outer, _ in found):
            found.append((name, module))
    if not found:
        children = ", ".join(name for name, _ in model.named_children())
        raise CostModelError(f"--checkpoint {pattern!r} matches no module of {label} (its top-level modules: {children})")
    return found


def check_checkpointed(model: nn.Module, checkpointed: Sequence[tuple[str, nn.Module]]) -> None:
    """Refuse a module of :func:`checkpointed_modules` (found before the method was applied) that
    the method replaced and ``model`` no longer holds: checkpointing is of a module of the
    prepared model. (peft keeps an adapted layer inside its LoRA layer: that one is still there.)"""
    present = {id(module) for module in model.modules()}
    gone = [name for name, module in checkpointed if id(module) not in present]
    if gone:
        raise CostModelError(f"--checkpoint: the method replaced {', '.join(gone)}; checkpoint a module that "
                             f"contains it")


def head_name(model: nn.Module) -> str:
    """The qualified name of the model's classification head: its last direct child that holds
    parameters, taken as a whole (MobileNetV3's ``classifier`` holds two Linear layers and a
    dropout). Found by structure, not by name, so that a model of one's own (an ``nn.Sequential``
    whose last layer is ``"7"``) has a head too; on every torchvision classifier it is the child
    the model's authors named ``fc``, ``classifier``, ``heads`` or ``head`` (checked by
    ``tests/test_models.py`` over all of them)."""
    with_params = [name for name, child in model.named_children() if next(child.parameters(), None) is not None]
    if not with_params:
        raise CostModelError(f"cannot find the classification head of {type(model).__name__}: "
                             f"no child module holds parameters")
    return with_params[-1]


def make_batch(
    batch: int, resolution: int, classes: int, device: str | torch.device = "cpu", seed: int = 0, channels: int = 3,
    target: Callable[[int, int, torch.Generator], torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A generated batch: images channels x resolution x resolution and integer labels, or the
    labels ``target(batch, classes, generator)`` makes (drawn from the same seeded generator, after
    the images); the images, and a floating target, in ``dtype`` (drawn in float32 and cast, so
    that every precision sees the same values)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, channels, resolution, resolution, generator=generator)
    if target is None:
        labels = torch.randint(0, classes, (batch,), generator=generator)
    else:
        labels = target(batch, classes, generator)
    if labels.is_floating_point():
        labels = labels.to(dtype)
    return images.to(device=device, dtype=dtype), labels.to(device)


def step_dtype(config: StepConfig) -> torch.dtype:
    """The torch dtype of ``config.dtype`` (``StepConfig.dtype``)."""
    return getattr(torch, DTYPES[config.dtype])


def autocast_dtype(config: StepConfig) -> torch.dtype | None:
    """The torch dtype of ``config.autocast`` (``StepConfig.autocast``), None without autocast."""
    return getattr(torch, DTYPES[config.autocast]) if config.autocast else None


def in_step_dtype(model: nn.Module, config: StepConfig, label: str = "") -> nn.Module:
    """A torchvision model (built in float32) cast to the step's precision, before the method is
    applied, as one loads a model in bf16 and then adds adapters: ``model.to(dtype)`` (floating
    parameters and buffers; integer buffers such as ``num_batches_tracked`` stay). A model of one's
    own (``label`` names it) is never cast: one whose floating tensors are not all in the step's
    precision is refused, naming the first that is not."""
    dtype = step_dtype(config)
    if not label:
        return model if dtype == torch.float32 else model.to(dtype)
    for kind, tensors in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in tensors:
            if tensor.is_floating_point() and tensor.dtype != dtype:
                raise CostModelError(
                    f"{label}'s {kind} {name!r} is {tensor.dtype} but the step's dtype is {config.dtype} "
                    f"({dtype}): pass dtype={_dtype_name(tensor.dtype)!r} (--dtype) if the whole model is in it, or "
                    f"convert the model; a model mixing precisions is not modelled")
    return model


def _dtype_name(dtype: torch.dtype) -> str:
    names = {getattr(torch, name): key for key, name in DTYPES.items()}
    return names.get(dtype, str(dtype))


# ---------------------------------------------------------------------------------------------
# The training loss, as a function of what the model returns


# Auxiliary classifiers and the weight of their losses, by the output's field names. GoogLeNet in
# train mode returns ``GoogLeNetOutputs(logits, aux_logits2, aux_logits1)`` and is trained with
# ``CE(logits) + 0.3 * (CE(aux_logits1) + CE(aux_logits2))`` (Szegedy et al. 2014, "Going deeper
# with convolutions", section 5: the auxiliary losses are weighted by 0.3); Inception-v3 returns
# ``InceptionOutputs(logits, aux_logits)`` and is trained with ``CE(logits) + 0.4 * CE(aux_logits)``
# (the weight of TF-slim's Inception-v3 training and of PyTorch's fine-tuning tutorial).
# torchvision's references/classification/train.py itself calls ``criterion(output, target)`` on
# whatever the model returns, which fails on these tuples. The first entry whose names are all
# fields of the output applies; the losses are summed in the order listed.
AUXILIARY_LOSSES: tuple[tuple[tuple[str, ...], float], ...] = (
    (("aux_logits1", "aux_logits2"), 0.3),
    (("aux_logits",), 0.4),
)


def _is_structure(output: Any) -> bool:
    """Whether ``output`` may have fields: not a tensor, nor an fx proxy standing for one while
    the step is traced (a proxy answers every attribute with a new graph node: never ask it)."""
    return not isinstance(output, (torch.Tensor, fx.Proxy))


def _has_field(output: Any, name: str) -> bool:
    if not _is_structure(output):
        return False
    return name in output if isinstance(output, dict) else hasattr(output, name)


def _output_field(output: Any, name: str) -> Any:
    """``output.name`` (``output[name]`` for a mapping), None when it has no such field."""
    if not _has_field(output, name):
        return None
    return output[name] if isinstance(output, dict) else getattr(output, name)


def training_loss(criterion: nn.Module, output: Any, labels: Any) -> Any:
    """The loss one training step back-propagates, for what the model returned.

    The single definition, called by :class:`TrainingStep` for the analytic engine (traced with
    torch.fx) and for the runtime reference alike, so that both run the same ops in the same order
    and keep the same Python locals alive:

    - a tensor: ``criterion(output, labels)``;
    - an output with ``logits`` and auxiliary logits (:data:`AUXILIARY_LOSSES`):
      ``criterion(logits) + weight * (criterion(aux_1) + criterion(aux_2) + ...)``, auxiliary
      fields that are None skipped: one ``add`` per extra auxiliary loss, one ``mul`` by the
      weight, one ``add`` onto the main loss, each on a 0-d tensor;
    - any other output with ``logits`` (a namedtuple, a mapping, an object): ``criterion(logits)``.

    Anything else (a plain tuple or list of tensors, an output without logits) is refused with a
    ``CostModelError``: which element is the prediction is not ours to guess.
    """
    logits = _output_field(output, "logits")
    if logits is None:
        if isinstance(output, (tuple, list, dict)):
            raise CostModelError(
                f"the model returns a {type(output).__name__} without a 'logits' field; the training "
                f"loss is defined for a tensor of logits or an output with .logits (and auxiliary logits)")
        return criterion(output, labels)
    loss = criterion(logits, labels)
    for names, weight in AUXILIARY_LOSSES:
        if not all(_has_field(output, name) for name in names):
            continue
        auxiliary = None
        for name in names:
            value = _output_field(output, name)
            if value is None:  # an auxiliary head that is off this step
                continue
            term = criterion(value, labels)
            auxiliary = term if auxiliary is None else auxiliary + term
        if auxiliary is not None:
            loss = loss + weight * auxiliary
        break
    return loss


class TrainingStep(nn.Module):
    """What one step runs forward: ``training_loss(criterion, model(images), labels)``.

    The one definition of the step's forward for the analytic engine (``costmodel.trace`` traces
    this module with torch.fx: the model is its child ``model``, the loss its child ``criterion``)
    and for the runtime reference (``costmodel.validation.measure`` calls it), so that both run the
    same ops in the same order and keep the same Python locals alive.

    The reference calls the step as a module, not the loss as a function, because of MemTracker:
    its module hooks refuse a top-level module called twice in one tracked iteration ("multiple
    iterative calls"), and a model with auxiliary logits calls ``criterion`` once per logits. Under
    this module the criterion is a child, which MemTracker allows to be called repeatedly. The
    wrapper allocates nothing and runs no op of its own, but the division of gradient accumulation.
    """

    def __init__(self, model: nn.Module, criterion: nn.Module, micro_batches: int = 1,
                 autocast: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        # Gradient accumulation over this many micro-batches (``StepConfig.accumulate``): each
        # one's loss is divided by it, as in ``loss = criterion(...) / accumulation_steps``, so
        # that the accumulated gradient is the whole batch's mean. 1: no division at all.
        self.micro_batches = micro_batches
        # Mixed precision (``StepConfig.autocast``): the forward and the loss run under
        # ``torch.autocast("cpu", dtype=autocast)``; None: no autocast.
        self.autocast = autocast

    def precision(self) -> contextlib.AbstractContextManager[Any]:
        """The region the forward and the loss run in: ``torch.autocast("cpu", dtype=autocast)``,
        or nothing without autocast."""
        return torch.autocast("cpu", dtype=self.autocast) if self.autocast is not None else contextlib.nullcontext()

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.precision():
            loss = training_loss(self.criterion, self.model(images), labels)
        return loss / self.micro_batches if self.micro_batches > 1 else loss
