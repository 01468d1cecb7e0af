"""Measure one fine-tuning step for real: FLOPs per phase in both conventions, memory per group.

``measure(config)`` builds ``config.model``, applies ``config.method`` with ``config.options``
(``validation.methods``), runs steps 1..k-1 untracked, then tracks the whole step k:

    optimizer.zero_grad(set_to_none=True)         # tracked, no FLOPs
    loss = TrainingStep(model, criterion)(images, labels)  # phase "forward" (criterion: LOSSES[config.loss])
    loss.backward()                              # phase "backward"
    optimizer.step()                             # phase "optimizer"

FLOPs come from ``validation.flops`` (stock FlopCounterMode and the exact convention of
``docs/flop-convention.md``), memory from ``validation.memory.GroupPeakMemTracker`` with the model,
the optimizer, the images and the labels passed to ``track_external``, so that everything that
exists before step k (parameters, buffers, gradients of step k-1, optimizer state, the batch) counts.
The FLOP counters and the memory tracker observe the same step (nested dispatch modes; the counters
allocate nothing that the tracker sees).

With ``fake=True`` the model, the method's adapters and optimizer, and the batch are created inside
one ``FakeTensorMode`` and every step runs there: no arithmetic is done, shapes and storages are the
same, so every count is identical to the real run while large batches cost almost nothing - with one
known exception: ``nn.MSELoss``'s CPU kernel leaves its 0-d loss in a storage of ``numel(input)``
elements, where the fake (meta) kernel gives it one element, so a fake MSE step counts the
difference less wherever the loss is alive (``costmodel/plugins/loss.py``).

The loss (``config.loss``) is this module's own table :data:`LOSSES`, independent of the plugins
that the analytic engine asks (``costmodel_loss``): the same criterion and target, built here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from costmodel.config import TRAINING, StepConfig
from costmodel.errors import CostModelError
from costmodel.models import (TrainingStep, autocast_dtype, build_model, check_checkpointed, checkpointed_modules,
                              in_step_dtype, make_batch, step_dtype, training_loss)
from costmodel.result import EVALUATE, PHASES, StepCost, evaluation_flops, phase_flops
from costmodel.validation.flops import PhaseFlops
from costmodel.validation.memory import GroupPeakMemTracker
from costmodel.validation.methods import apply_config
from costmodel.validation.optimizers import REAL_TENSORS_ONLY, kernels_in_view

SEED = 0


def _class_indices(batch: int, classes: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, classes, (batch,), generator=generator)


def _like_logits(batch: int, classes: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, classes, generator=generator)


# Loss name (StepConfig.loss) -> (the criterion, the target maker for make_batch).
LOSSES: dict[str, tuple[Callable[[], nn.Module], Callable[[int, int, torch.Generator], torch.Tensor]]] = {
    "cross_entropy": (nn.CrossEntropyLoss, _class_indices),
    "mse": (nn.MSELoss, _like_logits),
}


def loss_of(name: str) -> tuple[Callable[[], nn.Module], Callable[[int, int, torch.Generator], torch.Tensor]]:
    """The reference's criterion and target maker for loss ``name``; an unknown one is refused."""
    if name not in LOSSES:
        raise CostModelError(f"unknown loss {name!r}; the runtime reference measures: {', '.join(LOSSES)}")
    return LOSSES[name]


def _forward_loss(step: TrainingStep, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The step's forward and loss, ``costmodel.models.TrainingStep`` (the module the engine
    traces), with batch norm's one-value-per-channel error said as a size to change."""
    try:
        return step(images, labels)
    except ValueError as error:
        if "Expected more than 1 value per channel" in str(error):
            raise CostModelError(
                f"batch norm in training mode needs more than one value per channel ({error}); "
                f"use a larger --batch or --resolution") from error
        raise


def materialize_fake(model: nn.Module, mode: contextlib.AbstractContextManager) -> None:
    """Replace every meta parameter and buffer by a CPU fake tensor of the same shape and dtype.

    Tensors shared between modules stay shared; ``requires_grad`` is kept.
    """
    replaced: dict[int, torch.Tensor] = {}

    def fake_like(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in replaced:
            new = torch.zeros(tensor.shape, dtype=tensor.dtype, device="cpu")
            if isinstance(tensor, nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            replaced[id(tensor)] = new
        return replaced[id(tensor)]

    with mode:
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for name, tensor in tensors.items():
                    if tensor is not None:
                        tensors[name] = fake_like(tensor)


class CheckpointedCall(nn.Module):
    """What ``StepConfig.checkpoint`` makes of a module in the reference:
    ``torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)``, the module called
    through ``__call__`` in the recomputation too (as transformers' gradient checkpointing and
    ``torch.distributed``'s ``checkpoint_wrapper`` call it), so MemTracker sees the recomputation
    as the module's forward run again in backward (its AC rule: ACT, not TEMP)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.module, *args, use_reentrant=False, **kwargs)


def wrap_checkpointed(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> None:
    """Wrap each of ``modules`` (``models.checkpointed_modules`` of the model before its method was
    applied) in a :class:`CheckpointedCall`, in place; one the method replaced is refused, as the
    engine refuses it (``models.check_checkpointed``)."""
    check_checkpointed(model, modules)
    wanted = {id(module) for _, module in modules}
    for parent in list(model.modules()):
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in wanted:
                parent._modules[key] = CheckpointedCall(child)


@dataclass
class MeasuredStep:
    """What one tracked step measured: FLOPs per convention and phase, memory per group, FLOPs per op."""

    flops: dict[str, dict[str, int]]
    memory: dict[str, int]
    flops_by_op: dict[str, Any]


def measure_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                 step: int, criterion: nn.Module | None = None, micro_batches: int = 1,
                 autocast: torch.dtype | None = None) -> MeasuredStep:
    """Run steps 1..``step``-1 untracked, then measure step ``step`` of ``model`` trained by ``optimizer``
    on ``images``/``labels`` with ``criterion`` (default ``nn.CrossEntropyLoss()``): any module, any
    optimizer (call it inside the FakeTensorMode that made them, if any); ``micro_batches``: gradient
    accumulation over that many ``chunk`` pieces of the batch (:func:`split_micro_batches`); ``autocast``: the
    forward and the loss under ``torch.autocast("cpu", dtype=autocast)``."""
    training_step = TrainingStep(model, nn.CrossEntropyLoss() if criterion is None else criterion, micro_batches,
                                 autocast)
    for _ in range(step - 1):
        train_step(training_step, optimizer, images, labels)
    return tracked_train_step(training_step, optimizer, images, labels).measured


def split_micro_batches(training_step: TrainingStep, images: torch.Tensor, labels: torch.Tensor
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's micro-batches (``StepConfig.accumulate``): the batch itself, or with gradient
    accumulation over ``training_step.micro_batches`` its ``chunk`` views, split before any
    tracking (views allocate nothing)."""
    count = training_step.micro_batches
    if count == 1:
        return [(images, labels)]
    if images.shape[0] % count or labels.shape[0] % count:
        raise CostModelError(f"gradient accumulation over {count} micro-batches needs a batch that divides into "
                             f"them, got {images.shape[0]} images")
    return list(zip(images.chunk(count), labels.chunk(count)))


def _forward_backward(training_step: TrainingStep, micro: list[tuple[torch.Tensor, torch.Tensor]],
                      flops: PhaseFlops | None, tracker: GroupPeakMemTracker | None = None,
                      in_view: contextlib.AbstractContextManager = contextlib.nullcontext()
                      ) -> tuple[torch.Tensor, float]:
    """Each micro-batch's forward and loss (phase ``forward``) and ``backward()`` (phase
    ``backward``), gradients accumulating in ``.grad``; the last loss (the loop's ``loss`` holds
    each until the next one replaces it) and the losses' sum (each already divided by their count).
    MemTracker refuses a top-level module called twice in one tracked region; its per-module
    statistics (which the groups and the peak do not use) are reset before each later micro-batch.
    ``in_view`` (``optimizers.kernels_in_view``) is entered inside each phase, above its counters."""
    phase = flops.phase if flops is not None else (lambda name: contextlib.nullcontext())
    total = 0.0
    for number, (images, labels) in enumerate(micro):
        if number and tracker is not None:
            tracker.reset_mod_stats()
        with phase("forward"), in_view:
            loss = _forward_loss(training_step, images, labels)
        with phase("backward"), in_view:
            loss.backward()
        if len(micro) > 1:
            total += _value(loss)
    return loss, total


def train_step(training_step: TrainingStep, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor) -> float:
    """One untracked training step, exactly as :func:`tracked_train_step` runs it; the loss's value."""
    micro = split_micro_batches(training_step, images, labels)
    optimizer.zero_grad(set_to_none=True)
    loss, total = _forward_backward(training_step, micro, None)
    optimizer.step()
    return _value(loss) if len(micro) == 1 else total


@dataclass
class TrackedStep:
    """A tracked training step or evaluation pass: what it measured, the loss's value, and for an
    evaluation the logits (for accuracy), computed inside the tracked region."""

    measured: MeasuredStep
    loss: float
    logits: torch.Tensor | None = None


def tracked_train_step(training_step: TrainingStep, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                       labels: torch.Tensor) -> TrackedStep:
    """Measure one training step in place (``StepConfig.phase == "train"``)::

        optimizer.zero_grad(set_to_none=True)         # tracked, no FLOPs
        loss = training_step(images, labels)          # phase "forward"
        loss.backward()                               # phase "backward"
        optimizer.step()                              # phase "optimizer"

    With gradient accumulation (``training_step.micro_batches`` N > 1) the forward and backward
    run once per micro-batch (:func:`split_micro_batches`: ``images.chunk(N)``), ``loss / N`` each, and
    the phases sum over them.

    Everything that exists before it (the model's parameters, buffers and gradients, the
    optimizer's state, the batch) counts; the optimizer's step number is whatever it is at: in a
    real run the step's own index."""
    model = training_step.model
    micro = split_micro_batches(training_step, images, labels)
    in_view = kernels_in_view(optimizer, model)  # before the counters (its formulas join the table)
    tracker = GroupPeakMemTracker()
    tracker.track_external(model, optimizer, images, labels)
    flops = PhaseFlops()
    with tracker:
        optimizer.zero_grad(set_to_none=True)
        loss, total = _forward_backward(training_step, micro, flops, tracker, in_view)
        with flops.phase("optimizer"), in_view:
            optimizer.step()
        value = _value(loss) if len(micro) == 1 else total
        del loss
    counts = _covered(flops)
    return TrackedStep(MeasuredStep(flops={conv: phase_flops(*(counts[conv].get(phase, 0) for phase in PHASES))
                                           for conv in flops.conventions},
                                    memory=tracker.memory(), flops_by_op=flops.by_op), value)


def evaluation_logits(training_step: TrainingStep, images: torch.Tensor, labels: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One evaluation forward: ``model.eval()``, then under ``torch.no_grad()`` the step's forward
    and loss (``training_loss``, as ``TrainingStep`` runs it), then ``model.train()`` again. The
    logits and the loss; the caller computes accuracy from the logits, outside any tracked region."""
    model = training_step.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), training_step.precision():
            logits = model(images)
            loss = training_loss(training_step.criterion, logits, labels)
    finally:
        model.train(was_training)
    return logits, loss


def tracked_evaluation(training_step: TrainingStep, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                       labels: torch.Tensor) -> TrackedStep:
    """Measure one evaluation forward in place (``StepConfig.phase == "evaluate"``, phase
    ``evaluate``): :func:`evaluation_logits`, with the parameters, buffers, gradients left by the
    last training step, the optimizer's state and the batch counted as existing before it."""
    in_view = kernels_in_view(optimizer, training_step.model)  # a 4-bit base's products
    tracker = GroupPeakMemTracker()
    tracker.track_external(training_step.model, optimizer, images, labels)
    flops = PhaseFlops()
    with tracker:
        with flops.phase(EVALUATE), in_view:
            logits, loss = evaluation_logits(training_step, images, labels)
        value = _value(loss)
        del loss
    counts = _covered(flops)
    return TrackedStep(MeasuredStep(flops={conv: evaluation_flops(counts[conv].get(EVALUATE, 0))
                                           for conv in flops.conventions},
                                    memory=tracker.memory(), flops_by_op=flops.by_op), value, logits)


def _value(loss: torch.Tensor) -> float:
    """The loss as a number (nan under FakeTensorMode, which computes nothing)."""
    from torch._subclasses.fake_tensor import is_fake

    return float("nan") if is_fake(loss) else float(loss.detach())


def _covered(flops: PhaseFlops) -> dict[str, dict[str, int]]:
    """The counts, once every op seen is in the exact convention (else an error naming them)."""
    if flops.uncovered:
        ops = ", ".join(f"{op} (x{count})" for op, count in sorted(flops.uncovered.items()))
        raise CostModelError(f"ops outside the exact FLOP convention (docs/flop-convention.md): {ops}")
    return flops.counts


def available_memory() -> int | None:
    """Bytes the machine can still give (MemAvailable), or None where it cannot say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits_in_memory(config: StepConfig, fake: bool, predicted: StepCost | None = None) -> StepCost | None:
    """A real measurement allocates what the step allocates: refuse one whose predicted peak is
    more than this machine has left (it would be killed, or take the machine down), before it
    starts. The prediction is returned for reuse; a step the engine cannot predict is measured as
    asked (the reference has no other guard)."""
    if fake:
        return predicted
    if predicted is None:
        from costmodel.prediction import predict_config

        try:
            predicted = predict_config(config)
        except CostModelError:
            return None
    check_machine_has(predicted.memory["peak"], "measuring this step for real", "its predicted peak",
                      "pass --fake to measure it under FakeTensorMode, which allocates nothing")
    return predicted


def check_machine_has(needed: int, what: str, why: str, advice: str) -> None:
    """Refuse ``what`` (a measurement, a fine-tuning run) when the ``needed`` bytes (``why``: which
    prediction says so) are more than this machine has available, in one line ending in ``advice``."""
    available = available_memory()
    if available is not None and needed > available:
        raise CostModelError(f"{what} needs about {needed / 2**30:,.1f} GiB ({why}), more than the "
                             f"{available / 2**30:,.1f} GiB this machine has available; {advice}")


def measure(config: StepConfig, *, fake: bool = False) -> StepCost:
    """Run step ``config.step`` of ``config.method`` on ``config.model`` and measure it; for an
    evaluation (``config.phase == "evaluate"``), run ``config.step`` training steps untracked and
    measure the evaluation pass after them.

    With ``fake=True``, an optimizer of ``REAL_TENSORS_ONLY`` and autocast are refused before any work, and any
    other step that reads a tensor's value (a ``.item()``) fails as it does so: fake tensors have
    no values. Either is a one-line CostModelError saying so."""
    if not fake:
        return _measure(config, fake=False)
    if config.optimizer in REAL_TENSORS_ONLY:
        raise CostModelError(f"measure --fake: --optimizer {config.optimizer} runs on real tensors only "
                             f"({REAL_TENSORS_ONLY[config.optimizer]}); measure it without --fake")
    if config.quantize:
        raise CostModelError(f"measure --fake: --quantize {config.quantize} is measured with real tensors only "
                             f"(bitsandbytes quantizes the weights' values); measure it without --fake")
    if config.autocast:
        raise CostModelError(f"measure --fake: --autocast {config.autocast} is measured with real tensors only "
                             f"(a batch norm then sees a lower-precision input with float32 parameters, and fake "
                             f"tensors give its statistics the input's dtype where the CPU kernel keeps float32); "
                             f"measure it without --fake")
    from torch._subclasses.fake_tensor import DataDependentOutputException

    try:
        return _measure(config, fake=True)
    except DataDependentOutputException as error:
        raise CostModelError(f"measure --fake: the step reads a tensor's value ({error.func}, e.g. an optimizer's "
                             f"norm(...).item()), which fake tensors do not have; measure it with real tensors "
                             f"(without --fake)") from error


def _measure(config: StepConfig, *, fake: bool) -> StepCost:
    started = time.perf_counter()
    criterion, target = loss_of(config.loss)
    mode: contextlib.AbstractContextManager = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
        # peft moves new adapters with Module.to(), which must swap fake parameters and cannot
        # (FakeTensorMode holds weak references to its tensors): prepare on meta, then materialise.
        model = in_step_dtype(build_model(config.model, num_classes=config.classes, device="meta"), config)
        checkpointed = checkpointed_modules(model, config.checkpoint, config.model)
        applied = apply_config(model, config, materialize=lambda model: materialize_fake(model, mode))
    with mode:
        torch.manual_seed(SEED)
        if not fake:
            model = in_step_dtype(build_model(config.model, num_classes=config.classes), config)
            checkpointed = checkpointed_modules(model, config.checkpoint, config.model)
            applied = apply_config(model, config)
        if config.phase == TRAINING:  # an evaluation under no_grad saves nothing: checkpointing changes nothing
            wrap_checkpointed(applied.model, checkpointed)
        images, labels = make_batch(config.batch * config.micro_batches, config.resolution, config.classes, seed=SEED,
                                    channels=config.channels, target=target, dtype=step_dtype(config))
        training_step = TrainingStep(applied.model, criterion(), config.micro_batches, autocast_dtype(config))
        for _ in range(config.step - 1 if config.phase == TRAINING else config.step):
            train_step(training_step, applied.optimizer, images, labels)
        if config.phase == TRAINING:
            measured = tracked_train_step(training_step, applied.optimizer, images, labels).measured
        else:
            measured = tracked_evaluation(training_step, applied.optimizer, images, labels).measured

    return StepCost(
        config=config,
        source="measure",
        flops=measured.flops,
        memory=measured.memory,
        trainable_params=applied.trainable_params,
        total_params=applied.total_params,
        seconds=time.perf_counter() - started,
        details={"fake": fake, "flops_by_op": measured.flops_by_op, "frozen": applied.frozen, **applied.details},
    )
