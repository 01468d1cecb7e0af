"""Live measurements of small custom models, for the engine tests: one step of any ``nn.Module``
measured exactly as ``costmodel.validation.measure`` measures a torchvision model (the same
FLOP counters and memory tracker), so the engine can be held against it on shapes and wiring that
the four reference models do not have."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from costmodel.models import checkpointed_modules, make_batch
from costmodel.result import MEMORY_FIELDS, StepCost
from costmodel.models import TrainingStep
from costmodel.validation.measure import loss_of, measure_step, tracked_evaluation, train_step, wrap_checkpointed


def measure_module(build: Callable[[], nn.Module], trainable: Callable[[str], bool] = lambda name: True, *,
                   batch: int = 2, resolution: int = 8, classes: int = 10, step: int = 2, channels: int = 3,
                   loss: str = "cross_entropy", phase: str = "train", accumulate: int = 1,
                   dtype: torch.dtype = torch.float32, checkpoint: str = "",
                   optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                   fake: bool = True, autocast: torch.dtype | None = None) -> dict[str, Any]:
    """FLOPs per phase and memory per group of step ``step`` of ``build()`` trained with ``optimizer``
    (AdamW(lr=1e-3) by default) on the parameters whose name ``trainable`` accepts; with
    ``phase="evaluate"``, of the evaluation pass after ``step`` training steps; ``accumulate``
    micro-batches of ``batch`` images per training step (``StepConfig.accumulate``); the images (and
    a floating target) in ``dtype`` (``build()`` makes the model in it); the modules ``checkpoint``
    names run under activation checkpointing (``StepConfig.checkpoint``); the forward and the loss
    under ``torch.autocast("cpu", dtype=autocast)`` when given (``StepConfig.autocast``)."""
    mode: contextlib.AbstractContextManager = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
    with mode:
        torch.manual_seed(0)
        model = build().train()
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable(name))
        if phase != "evaluate":
            wrap_checkpointed(model, checkpointed_modules(model, checkpoint))
        params = [p for p in model.parameters() if p.requires_grad]
        opt = optimizer(params) if optimizer is not None else torch.optim.AdamW(params, lr=1e-3)
        criterion, target = loss_of(loss)
        if phase == "evaluate":
            images, labels = make_batch(batch, resolution, classes, channels=channels, target=target, dtype=dtype)
            training = TrainingStep(model, criterion(), accumulate, autocast)
            if accumulate > 1:  # the training steps see the whole accumulated batch
                batches = make_batch(batch * accumulate, resolution, classes, channels=channels, target=target,
                                     dtype=dtype)
            for _ in range(step):
                train_step(training, opt, *(batches if accumulate > 1 else (images, labels)))
            measured = tracked_evaluation(training, opt, images, labels).measured
        else:
            images, labels = make_batch(batch * accumulate, resolution, classes, channels=channels, target=target,
                                     dtype=dtype)
            measured = measure_step(model, opt, images, labels, step, criterion(), micro_batches=accumulate,
                                    autocast=autocast)
    return {"flops": measured.flops, "memory": measured.memory}


def assert_matches(predicted: StepCost, measured: StepCost | dict[str, Any]) -> None:
    """What the README claims: FLOPs equal per phase in both conventions, and every memory group,
    the peak and the sum of group peaks equal to the byte."""
    flops = measured.flops if isinstance(measured, StepCost) else measured["flops"]
    memory = measured.memory if isinstance(measured, StepCost) else measured["memory"]
    assert predicted.flops == flops
    for field in MEMORY_FIELDS:
        assert predicted.memory[field] == memory[field], (field, predicted.memory[field], memory[field])
