"""``costmodel finetune``: a real fine-tuning loop, every step held against its analytic prediction.

The seed paper predicts what ONE step costs; a fine-tuning run is thousands of them, and not all
alike: step 1 creates the optimizer's state, GaLore runs an SVD on every refresh step, the last
batch of an epoch is smaller, and evaluations run the forward in eval mode beside everything the
training keeps alive. :func:`run_finetune` runs such a run for real, on the digit tasks of
``costmodel.validation.tasks``, and checks every kind of step against ``predict_config``:

1. **Pretraining.** Every method starts from the same weights: a short full fine-tune (AdamW,
   :data:`PRETRAIN_LR`, batch :data:`PRETRAIN_BATCH`, whole batches only) of the model on the
   task's SOURCE task (``Task.source``), ``pretrain_epochs`` epochs, cached outside the
   repository in ``$COSTMODEL_CACHE`` (else ``~/.cache/costmodel``) under ``pretrained/`` with its
   metadata, and reused when present. A task whose labels mean other classes than the source's
   (``digits-unseen``: digits 5-9 after pretraining on 0-4) gets a NEW head: the head module
   (``costmodel.models.head_name``) is re-initialised with a generator seeded by ``seed``.
2. **The schedule, predicted first.** Every training step (its index and batch size) and every
   evaluation (after which step, over which eval batches) is enumerated and predicted before the
   first training step, so that a step the engine refuses (a batch norm fed one image) fails
   before any work. An evaluation pass is its eval batches, each an ``evaluate`` prediction after
   k training steps; the pass's FLOPs are summed over its batches and its memory is the maximum
   of each field over them (measured alike). Identical ``StepConfig`` are predicted once.
3. **The loop.** ``DataLoader(task.train, batch_size, shuffle=True, seeded generator,
   drop_last=False, num_workers=0)``: the batch is exactly what the DataLoader collates (fresh
   float32 images, int64 labels), as the tracker expects; ``model.train()``; the method applied
   with ``costmodel.validation.methods.apply_config`` on the pretrained model. Evaluation every
   ``eval_every`` steps (default: at the end of each epoch) and at the end, over the whole eval
   split in batches of ``batch``, accuracy computed from the logits outside any tracked region.
4. **Measuring.** A run of at most :data:`MEASURE_ALL_UP_TO` steps measures every step; a longer
   one every ``measure_every``-th step (default: about :data:`REGULAR_MEASUREMENTS` of them), plus
   every special step: the first, every GaLore refresh ((k-1) % T == 0), every partial last batch,
   and every evaluation (each eval batch tracked on its own, the pass aggregated).

Each step has one kind, the first that applies: ``first`` (step 1), ``refresh`` (a GaLore SVD),
``partial`` (the last, smaller batch of an epoch), ``steady``; an evaluation pass is ``evaluate``.

Learning rates (:data:`DEFAULT_LEARNING_RATES`, AdamW; ``lr`` overrides):

- ``fft`` 1e-3: AdamW's usual rate for training a small CNN in full; every weight moves, so a
  higher one undoes the pretraining within an epoch.
- ``bn_head`` 1e-2: a linear probe (a few thousand parameters on frozen features) tolerates and
  needs a rate about ten times full fine-tuning's to converge in one or two epochs.
- ``lora`` / ``dora`` 3e-3: with B initialised to zero and alpha = r (scale 1, the paper's
  Table 2), a rank-4 adapter starts with no effect and its updates are small; LoRA practice (Hu et
  al. 2021, e.g. 5e-4 on RoBERTa-base where full fine-tuning uses a few 1e-5; the DoRA paper keeps
  LoRA's settings) trains adapters at a rate above full fine-tuning's. Not 1e-2: the head trains in
  full alongside, and on mobilenet_v2 / digits-impulse_noise-3 (resolution 32, batch 32, two
  epochs, seed 0) LoRA reached 59 % eval accuracy at 1e-2, 72 % at 1e-3 and 79 % at 3e-3.
- ``galore`` 1e-2: the GaLore paper (Zhao et al. 2024) trains with lr 0.01 and scale 0.25
  (the scale shrinks the projected update by four), i.e. ten times Adam's usual rate, for the
  same effective step; its non-projected parameters (biases, batch norm, the head) share it.

The method defaults are the paper's Table 2 (rank 4, alpha = rank, GaLore scale 0.25, T = 200,
proj_type std), as ``apply_config`` has them.

``run_finetune(FinetuneConfig(...)) -> FinetuneResult`` is the Python entry point (a study script
calls it many times); :func:`add_arguments` and :func:`run_command` are the CLI's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from costmodel.config import EVALUATION, TRAINING, StepConfig, check_int, check_positive
from costmodel.errors import CostModelError
from costmodel.result import MEMORY_FIELDS, relative_error

if TYPE_CHECKING:  # the tasks (numpy, scikit-learn's digits) load only when a run is checked
    from costmodel.validation.tasks import Task

DEFAULT_LEARNING_RATES: dict[str, float] = {
    "fft": 1e-3, "bn_head": 1e-2, "lora": 3e-3, "dora": 3e-3, "galore": 1e-2,
}
PRETRAIN_LR = 1e-3  # full fine-tuning's rate (above): pretraining is a full fine-tune from scratch
PRETRAIN_BATCH = 32  # fixed, so that one checkpoint serves every fine-tuning batch size
DEFAULT_PRETRAIN_EPOCHS = 3
PRETRAIN_EVAL_FRACTION = 0.2  # the source task's split that pretraining trains on (load_task's default)
DEFAULT_GALORE_GAP = 200  # GaLore's T when no option gives one (the method's default)
MEASURE_ALL_UP_TO = 50  # a run of at most this many steps measures every step
REGULAR_MEASUREMENTS = 30  # about this many regular steps measured in a longer run
KINDS: tuple[str, ...] = ("first", "steady", "refresh", "partial", "evaluate")
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. ``epochs`` or ``steps``, exactly one (neither: one epoch); ``lr`` None:
    the method's :data:`DEFAULT_LEARNING_RATES`; ``eval_every`` None: at the end of each epoch;
    ``measure_every`` None: chosen from the length (module docstring); ``measure`` False: nothing
    tracked (faster, for accuracy only: every ``measured`` is None)."""

    model: str = "mobilenet_v2"
    method: str = "fft"
    task: str = "digits"
    rank: int = 4
    epochs: int | None = None
    steps: int | None = None
    batch: int = 32
    resolution: int = 32
    lr: float | None = None
    seed: int = 0
    train_size: int | None = None
    # Share of each class held out for evaluation: at most PRETRAIN_EVAL_FRACTION, so that no eval
    # image was seen by the pretraining (a task's eval images are a prefix of the same seeded split).
    eval_fraction: float = PRETRAIN_EVAL_FRACTION
    eval_every: int | None = None
    measure_every: int | None = None
    # The method's hyper-parameters and layer options, as StepConfig.options (alpha, update_proj_gap...).
    options: dict[str, Any] = field(default_factory=dict)
    pretrain_epochs: int = DEFAULT_PRETRAIN_EPOCHS
    # Training images of the source task used for pretraining (None: all of them): small for tests.
    pretrain_size: int | None = None
    measure: bool = True
    # The setup (``StepConfig.dtype``, ``checkpoint``, ``accumulate``, ``optimizer``,
    # ``optimizer_options``): the pretrained float32 model is cast to ``dtype`` before the method is
    # applied, each batch too; ``checkpoint``'s modules run under activation checkpointing in the
    # training steps; each optimizer step takes ``accumulate`` micro-batches of ``batch`` images
    # (an epoch's last incomplete group of ``accumulate * batch`` images is dropped: a smaller one
    # would change the micro-batch); fft, bn_head, lora and dora train with ``optimizer``.
    dtype: str = StepConfig.dtype
    # ``StepConfig.autocast`` (the forward and loss of every step and evaluation under CPU
    # autocast) and ``StepConfig.quantize`` (LoRA on a quantized base).
    autocast: str = StepConfig.autocast
    quantize: str = StepConfig.quantize
    checkpoint: str = StepConfig.checkpoint
    accumulate: int = StepConfig.accumulate
    optimizer: str = StepConfig.optimizer
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    # Progress bars on stderr: None shows them only where stderr is a terminal.
    progress: bool | None = None

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PlannedStep:
    """One entry of the schedule: a training step, or an evaluation pass after ``step`` steps."""

    step: int  # the training step's index (1-based); an evaluation: training steps before it
    phase: str  # TRAINING or EVALUATION
    epoch: int  # 1-based epoch of the step (an evaluation: of the step before it)
    batch: int  # a training step's batch; an evaluation's batch size (its last batch may be smaller)
    kind: str
    measured: bool
    eval_batches: tuple[int, ...] = ()


@dataclass
class StepRecord:
    """A step or evaluation as run: what was predicted, what was measured (None: untracked)."""

    planned: PlannedStep
    predicted: dict[str, Any]
    measured: dict[str, Any] | None = None
    seconds: float = 0.0
    loss: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"step": self.planned.step, "phase": self.planned.phase, "epoch": self.planned.epoch,
                                 "batch": self.planned.batch, "kind": self.planned.kind,
                                 "predicted": self.predicted, "measured": self.measured,
                                 "seconds": self.seconds, "tracked": self.measured is not None, "loss": self.loss}
        if self.planned.phase == EVALUATION:
            entry["eval_batches"] = list(self.planned.eval_batches)
        return entry


@dataclass
class AccuracyPoint:
    epoch: int
    step: int
    train_loss: float  # mean training loss of the steps since the previous evaluation
    eval_accuracy: float
    eval_loss: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FinetuneResult:
    """What :func:`run_finetune` ran: the resolved run, each step's record, the accuracy curve."""

    config: dict[str, Any]
    steps: list[StepRecord]
    accuracy: list[AccuracyPoint]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "steps": [record.to_dict() for record in self.steps],
                "accuracy": [point.to_dict() for point in self.accuracy], "seconds": self.seconds}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)

    @property
    def all_equal(self) -> bool:
        """Whether every measured step and evaluation equals its prediction on every field."""
        return all(record.measured == record.predicted for record in self.steps if record.measured is not None)

    def mismatches(self) -> list[str]:
        """One line per measured field that differs from its prediction (empty when all agree)."""
        lines = []
        for record in self.steps:
            if record.measured is None:
                continue
            for name, predicted, measured in compared_fields(record.predicted, record.measured):
                if predicted != measured:
                    lines.append(f"{record.planned.phase} step {record.planned.step} ({record.planned.kind}, batch "
                                 f"{record.planned.batch}): {name} predicted {predicted:,} measured {measured:,}")
        return lines

    def render(self) -> str:
        """The per-kind table of worst relative errors, and the accuracy curve."""
        columns = ["flops.torch", "flops.exact", *MEMORY_FIELDS]
        header = ["kind", "measured", *columns, "equal"]
        rows = [header]
        for kind in KINDS:
            records = [record for record in self.steps if record.planned.kind == kind]
            if not records:
                continue
            tracked = [record for record in records if record.measured is not None]
            worst = dict.fromkeys(columns, 0.0)
            for record in tracked:
                for name, predicted, measured in compared_fields(record.predicted, record.measured):
                    column = ".".join(name.split(".")[:2]) if name.startswith("flops.") else name.split(".")[1]
                    worst[column] = max(worst[column], relative_error(predicted, measured))
            equal = all(record.measured == record.predicted for record in tracked)
            rows.append([kind, f"{len(tracked)}/{len(records)}",
                         *(_format_error(worst[column]) if tracked else "-" for column in columns),
                         ("yes" if equal else "NO") if tracked else "-"])
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width)
                           in enumerate(zip(row, widths))) for row in rows]
        config = self.config
        lines.insert(0, f"{config['model']} {config['method']} on {config['task']}: {config['total_steps']} steps, "
                        f"batch {config['batch']}, resolution {config['resolution']}, lr {config['lr']:g}"
                        f"{''.join(f', {key}={config[key]}' for key in SETUP_FIELDS if config.get(key) != SETUP_DEFAULTS[key])} "
                        f"({self.seconds:.1f} s); worst relative error, measured vs predicted:")
        lines.append(f"every measured step equals its prediction: {'yes' if self.all_equal else 'NO'}")
        lines += [f"epoch {point.epoch} step {point.step}: train loss {point.train_loss:.4f}, eval loss "
                  f"{point.eval_loss:.4f}, eval accuracy {point.eval_accuracy:.2%}" for point in self.accuracy]
        return "\n".join(lines)


# The setup fields a run's header names when they are not the defaults.
SETUP_FIELDS: tuple[str, ...] = ("optimizer", "optimizer_options", "accumulate", "dtype", "checkpoint")
SETUP_DEFAULTS: dict[str, Any] = {key: getattr(FinetuneConfig(), key) for key in SETUP_FIELDS}


def _format_error(error: float) -> str:
    return "0" if error == 0 else ("inf" if math.isinf(error) else f"{error:.2%}")


def compared_fields(predicted: Mapping[str, Any], measured: Mapping[str, Any]) -> Iterable[tuple[str, int, int]]:
    """(``flops.<convention>.<phase>`` or ``memory.<field>``, predicted, measured) for every field
    either side has (a field missing on one side counts as 0 there, so it cannot pass unseen)."""
    for conv in sorted(set(predicted["flops"]) | set(measured["flops"])):
        phases = predicted["flops"].get(conv, {}), measured["flops"].get(conv, {})
        for phase in sorted(set(phases[0]) | set(phases[1])):
            yield f"flops.{conv}.{phase}", phases[0].get(phase, 0), phases[1].get(phase, 0)
    for name in sorted(set(predicted["memory"]) | set(measured["memory"])):
        yield f"memory.{name}", predicted["memory"].get(name, 0), measured["memory"].get(name, 0)


def aggregate_pass(costs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """An evaluation pass from its batches: FLOPs summed per convention and phase, memory the
    maximum of each field over the batches (the pass never holds two batches at once)."""
    flops: dict[str, dict[str, int]] = {}
    memory: dict[str, int] = {}
    for cost in costs:
        for conv, phases in cost["flops"].items():
            for phase, value in phases.items():
                flops.setdefault(conv, {}).setdefault(phase, 0)
                flops[conv][phase] += value
        for name, value in cost["memory"].items():
            memory[name] = max(memory.get(name, value), value)
    return {"flops": flops, "memory": memory}


# -- checking a run before any work

def _check_optional_int(value: Any, what: str) -> int | None:
    return None if value is None else check_int(value, what)


def method_options(config: FinetuneConfig) -> dict[str, Any]:
    """``config.options`` checked and coerced as the method's plugin declares them."""
    from costmodel.options import check_method_arguments
    from costmodel.registry import default_plugin_manager

    return check_method_arguments(default_plugin_manager(), config.method, False, config.options)


def check_config(config: FinetuneConfig) -> tuple[FinetuneConfig, "Task"]:
    """``config`` with its defaults resolved (lr, one epoch, options coerced), and its task;
    a one-line CostModelError for anything that cannot run, before any work."""
    from costmodel.models import check_model_names
    from costmodel.validation.methods import METHODS
    from costmodel.validation.tasks import load_task

    check_model_names([config.model], "--model")
    if config.method not in METHODS:
        raise CostModelError(f"--method: the fine-tuning loop applies {', '.join(METHODS)} for real, "
                             f"not {config.method!r}")
    check_int(config.rank, "--rank")
    check_int(config.batch, "--batch")
    if config.epochs is not None and config.steps is not None:
        raise CostModelError("give --epochs or --steps, not both")
    epochs = _check_optional_int(config.epochs, "--epochs")
    steps = _check_optional_int(config.steps, "--steps")
    _check_optional_int(config.eval_every, "--eval-every")
    _check_optional_int(config.measure_every, "--measure-every")
    check_int(config.pretrain_epochs, "--pretrain-epochs")
    from costmodel.cli import check_optimizer

    # their own checks, in one line (the optimizer's options by its plugin)
    check_optimizer(StepConfig(dtype=config.dtype, autocast=config.autocast, quantize=config.quantize,
                               checkpoint=config.checkpoint, accumulate=config.accumulate,
                               optimizer=config.optimizer, optimizer_options=dict(config.optimizer_options)))
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
        raise CostModelError(f"--seed must be an integer >= 0, got {config.seed!r}")
    lr = DEFAULT_LEARNING_RATES[config.method] if config.lr is None else check_positive(config.lr, "--lr")
    if isinstance(config.eval_fraction, (int, float)) and not isinstance(config.eval_fraction, bool) and \
            config.eval_fraction > PRETRAIN_EVAL_FRACTION:
        raise CostModelError(f"--eval-fraction {config.eval_fraction} exceeds {PRETRAIN_EVAL_FRACTION}: the eval split "
                             f"would hold images the pretraining trained on")
    options = method_options(config)
    task = load_task(config.task, config.resolution, seed=config.seed, eval_fraction=config.eval_fraction,
                     train_size=config.train_size)
    if config.pretrain_size is not None:  # the source task refuses a size it cannot give
        load_task(task.source, config.resolution, seed=config.seed, train_size=config.pretrain_size)
    if epochs is None and steps is None:
        epochs = 1
    return config.replace(lr=lr, options=options, epochs=epochs, steps=steps), task


def galore_gap(config: FinetuneConfig) -> int | None:
    """GaLore's T for this run (None: the method refreshes nothing)."""
    if config.method != "galore":
        return None
    return int(config.options.get("update_proj_gap", DEFAULT_GALORE_GAP))


def steps_per_epoch(config: FinetuneConfig, train_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, images in the last one when it is partial, else 0). With
    accumulation only whole groups of ``accumulate * batch`` images make a step (FinetuneConfig)."""
    if config.accumulate == 1:
        return math.ceil(train_size / config.batch), train_size % config.batch
    group = config.accumulate * config.batch
    if train_size < group:
        raise CostModelError(f"--accumulate {config.accumulate} x --batch {config.batch} needs {group} training "
                             f"images per step; the task has {train_size}")
    return train_size // group, 0


def plan_schedule(config: FinetuneConfig, train_size: int, eval_size: int) -> list[PlannedStep]:
    """Every training step and evaluation of the run, in order, with its kind and whether it is
    measured (``config`` resolved by :func:`check_config`)."""
    batch = config.batch
    per_epoch, remainder = steps_per_epoch(config, train_size)
    total = config.steps if config.steps is not None else config.epochs * per_epoch
    gap = galore_gap(config)
    every = config.measure_every
    if every is None:
        every = 1 if total <= MEASURE_ALL_UP_TO else max(1, round(total / REGULAR_MEASUREMENTS))
    eval_after = set(range(config.eval_every, total + 1, config.eval_every)) if config.eval_every else \
        set(range(per_epoch, total + 1, per_epoch))
    eval_after.add(total)
    eval_batches = tuple([batch] * (eval_size // batch) + ([eval_size % batch] if eval_size % batch else []))

    schedule: list[PlannedStep] = []
    for step in range(1, total + 1):
        epoch, position = divmod(step - 1, per_epoch)
        partial = remainder != 0 and position == per_epoch - 1
        if step == 1:
            kind = "first"
        elif gap is not None and (step - 1) % gap == 0:
            kind = "refresh"
        elif partial:
            kind = "partial"
        else:
            kind = "steady"
        measured = config.measure and (kind != "steady" or step % every == 0)
        schedule.append(PlannedStep(step, TRAINING, epoch + 1, remainder if partial else batch, kind, measured))
        if step in eval_after:
            schedule.append(PlannedStep(step, EVALUATION, epoch + 1, batch, "evaluate", config.measure,
                                        eval_batches))
    return schedule


# -- predicting the schedule

class Predictor:
    """``predict_config`` memoised on the StepConfig itself (its fields, options included)."""

    def __init__(self) -> None:
        self.cache: dict[str, dict[str, Any]] = {}
        self.seconds = 0.0

    def __call__(self, config: StepConfig) -> dict[str, Any]:
        from costmodel.prediction import predict_config

        key = json.dumps(config.to_dict(), sort_keys=True, default=repr)
        if key not in self.cache:
            started = time.perf_counter()
            prediction = predict_config(config)
            self.seconds += time.perf_counter() - started
            self.cache[key] = {"flops": prediction.flops, "memory": prediction.memory}
        return self.cache[key]


def step_config(config: FinetuneConfig, classes: int, phase: str, step: int, batch: int) -> StepConfig:
    return StepConfig(model=config.model, method=config.method, rank=config.rank, batch=batch,
                      resolution=config.resolution, classes=classes, step=step, phase=phase,
                      lr=config.lr, options=dict(config.options), dtype=config.dtype, autocast=config.autocast,
                      quantize=config.quantize, checkpoint=config.checkpoint, accumulate=config.accumulate,
                      optimizer=config.optimizer, optimizer_options=dict(config.optimizer_options))


def predict_schedule(config: FinetuneConfig, classes: int, schedule: Sequence[PlannedStep],
                     predictor: Predictor) -> list[dict[str, Any]]:
    """The prediction of every planned step (an evaluation: its batches aggregated)."""
    predictions = []
    for planned in schedule:
        batches = planned.eval_batches if planned.phase == EVALUATION else (planned.batch,)
        costs = []
        for batch in batches:
            try:
                costs.append(predictor(step_config(config, classes, planned.phase, planned.step, batch)))
            except CostModelError as error:
                what = "training step" if planned.phase == TRAINING else "evaluation after step"
                hint = ("; the last batch of an epoch holds one image: choose another --batch or --train-size"
                        if batch == 1 and planned.phase == TRAINING else "")
                raise CostModelError(f"{what} {planned.step} (batch {batch}) cannot be predicted: {error}{hint}") \
                    from None
        predictions.append(costs[0] if planned.phase == TRAINING else aggregate_pass(costs))
    return predictions


def check_fits_in_memory(config: FinetuneConfig, task: "Task", predictions: Sequence[Mapping[str, Any]],
                         predictor: Predictor) -> None:
    """A real run allocates what its steps allocate: refuse, before any work, one whose largest
    predicted peak (a fine-tuning step, an evaluation, or a pretraining step: FFT on the source task
    at the pretraining batch) is more than this machine has available (it would be killed, or take
    the machine down)."""
    from costmodel.validation.measure import check_machine_has

    pretrain_images = len(task.train) if config.pretrain_size is None else config.pretrain_size
    pretraining = StepConfig(model=config.model, method="fft", batch=max(1, min(PRETRAIN_BATCH, pretrain_images)),
                             resolution=config.resolution, classes=task.classes, step=2)
    try:
        peaks = [predictor(pretraining)["memory"]["peak"]]
    except CostModelError:  # the pretraining step is measured by running it; the run's own steps predict
        peaks = []
    peaks += [prediction["memory"]["peak"] for prediction in predictions]
    check_machine_has(max(peaks), "this run", "its largest predicted peak", "choose a smaller --batch or --resolution")


# -- pretraining and its checkpoint

def cache_directory() -> Path:
    """Where pretrained checkpoints live: ``$COSTMODEL_CACHE``, else ``~/.cache/costmodel``."""
    configured = os.environ.get("COSTMODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "costmodel"


def checkpoint_metadata(config: FinetuneConfig, source: str, classes: int) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "model": config.model, "source": source, "classes": classes,
            "resolution": config.resolution, "seed": config.seed, "epochs": config.pretrain_epochs,
            "train_size": config.pretrain_size, "batch": PRETRAIN_BATCH, "lr": PRETRAIN_LR}


def checkpoint_path(config: FinetuneConfig, source: str) -> Path:
    size = "" if config.pretrain_size is None else f"-n{config.pretrain_size}"
    name = f"{config.model}-{source}-r{config.resolution}-s{config.seed}-e{config.pretrain_epochs}{size}.pt"
    return cache_directory() / "pretrained" / name.replace(":", "_").replace("/", "_")


def load_checkpoint(path: Path, model: nn.Module, expected: Mapping[str, Any]) -> None:
    """Load ``path`` into ``model``; a file that is corrupt, pretrained otherwise (metadata), or
    does not fit the model (missing, unexpected or differently shaped tensors) is one line."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise CostModelError(f"checkpoint {path} cannot be read ({type(error).__name__}); delete it to pretrain "
                             f"again") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("metadata"), dict) or \
            not isinstance(saved.get("state_dict"), dict):
        raise CostModelError(f"checkpoint {path} is not a costmodel pretrained checkpoint; delete it to pretrain again")
    metadata = saved["metadata"]
    differing = [f"{key} {metadata.get(key)!r} (expected {value!r})" for key, value in expected.items()
                 if metadata.get(key) != value]
    if differing:
        raise CostModelError(f"checkpoint {path} does not match this run: {', '.join(differing)}")
    state = saved["state_dict"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{key} {tuple(state[key].shape)} (model {tuple(own[key].shape)})" for key in own
              if key in state and (not isinstance(state[key], torch.Tensor) or state[key].shape != own[key].shape)]
    problems = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + \
        ([f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}"] if unexpected else []) + \
        ([f"shape of {', '.join(shapes[:3])}"] if shapes else [])
    if problems:
        raise CostModelError(f"checkpoint {path} does not fit model {expected['model']!r}: {'; '.join(problems)}")
    model.load_state_dict(state)


def save_checkpoint(path: Path, model: nn.Module, metadata: Mapping[str, Any]) -> None:
    """Write atomically (a temporary file, then os.replace): a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"metadata": {**metadata, "torch": str(torch.__version__)}, "state_dict": model.state_dict()}, temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise CostModelError(f"cannot write the pretrained checkpoint {path}: {error.strerror}") from None
    finally:
        if temporary.exists():
            temporary.unlink()


def _show_progress(config: FinetuneConfig) -> bool:
    return sys.stderr.isatty() if config.progress is None else config.progress


def pretrain(config: FinetuneConfig, source: str) -> tuple[nn.Module, Path, bool]:
    """The model pretrained on ``source`` (from the cache, else trained and cached); the
    checkpoint's path and whether it was reused. Pretraining is not measured."""
    from tqdm import tqdm

    from costmodel.models import TrainingStep, build_model
    from costmodel.validation.measure import train_step
    from costmodel.validation.tasks import load_task

    task = load_task(source, config.resolution, seed=config.seed, train_size=config.pretrain_size)
    path = checkpoint_path(config, source)
    metadata = checkpoint_metadata(config, source, task.classes)
    torch.manual_seed(config.seed)
    model = build_model(config.model, num_classes=task.classes)
    if path.exists():
        load_checkpoint(path, model, metadata)
        return model.train(), path, True
    batch = min(PRETRAIN_BATCH, len(task.train))
    loader = torch.utils.data.DataLoader(task.train, batch_size=batch, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(config.seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR)
    training_step = TrainingStep(model, nn.CrossEntropyLoss())
    model.train()
    with tqdm(total=config.pretrain_epochs * len(loader), desc=f"pretraining {config.model} on {source}",
              file=sys.stderr, disable=not _show_progress(config), leave=False) as bar:
        for _ in range(config.pretrain_epochs):
            for images, labels in loader:
                bar.set_postfix(loss=f"{train_step(training_step, optimizer, images, labels):.3f}", refresh=False)
                bar.update()
    save_checkpoint(path, model, metadata)
    # The run starts from the checkpoint as a reused one would: a fresh model, no gradients left by
    # pretraining on its parameters (they would count as GRAD in every measured step).
    del optimizer, training_step, model
    fresh = build_model(config.model, num_classes=task.classes)
    load_checkpoint(path, fresh, metadata)
    return fresh.train(), path, False


def keeps_source_labels(task_name: str, source: str) -> bool:
    """Whether the task's labels mean the source's classes (the source itself, or a corruption of
    it); otherwise (``digits-unseen``: other digits under the same labels) the head is new."""
    return task_name == source or task_name.startswith(source + "-")


def reinitialise_head(model: nn.Module, seed: int) -> str:
    """Re-initialise the classification head in place with a generator seeded by ``seed`` (the
    global random state is left as it was); the head's name."""
    from costmodel.models import head_name

    name = head_name(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.get_submodule(name).modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
    return name


# -- the run

def _to_plain(measured: Any) -> dict[str, Any]:
    return {"flops": measured.flops, "memory": measured.memory}


def run_finetune(config: FinetuneConfig) -> FinetuneResult:
    """Pretrain (or reuse), predict the whole schedule, then fine-tune for real, measuring as
    planned; see the module docstring."""
    from tqdm import tqdm

    from costmodel.models import TrainingStep, autocast_dtype, checkpointed_modules, in_step_dtype, step_dtype
    from costmodel.validation.measure import (evaluation_logits, tracked_evaluation, tracked_train_step, train_step,
                                              wrap_checkpointed)
    from costmodel.validation.methods import apply_config

    started = time.perf_counter()
    config, task = check_config(config)
    schedule = plan_schedule(config, len(task.train), len(task.eval))
    predictor = Predictor()
    predictions = predict_schedule(config, task.classes, schedule, predictor)
    check_fits_in_memory(config, task, predictions, predictor)

    model, checkpoint, reused = pretrain(config, task.source)
    new_head = None if keeps_source_labels(task.name, task.source) else reinitialise_head(model, config.seed)
    torch.manual_seed(config.seed)  # the adapters' initialisation, dropout
    first = step_config(config, task.classes, TRAINING, 1, config.batch)
    model = in_step_dtype(model, first)
    checkpointed = checkpointed_modules(model, config.checkpoint, config.model)
    applied = apply_config(model, first)
    wrap_checkpointed(applied.model, checkpointed)  # no_grad evaluations run the modules as they are
    dtype = step_dtype(first)
    training_step = TrainingStep(applied.model, nn.CrossEntropyLoss(), first.micro_batches, autocast_dtype(first))
    applied.model.train()
    # One optimizer step's images: its micro-batches together (split by the step itself).
    loader = torch.utils.data.DataLoader(task.train, batch_size=config.batch * first.micro_batches, shuffle=True,
                                         drop_last=first.micro_batches > 1, num_workers=0,
                                         generator=torch.Generator().manual_seed(config.seed))
    eval_loader = torch.utils.data.DataLoader(task.eval, batch_size=config.batch, shuffle=False, drop_last=False,
                                              num_workers=0)

    def batches() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from loader

    records: list[StepRecord] = []
    accuracy: list[AccuracyPoint] = []
    losses_since_eval: list[float] = []
    stream = iter(batches())
    total = sum(planned.phase == TRAINING for planned in schedule)
    with tqdm(total=total, desc=f"{config.method} on {task.name}", file=sys.stderr,
              disable=not _show_progress(config), leave=False) as bar:
        for planned, predicted in zip(schedule, predictions):
            record = StepRecord(planned, predicted)
            if planned.phase == TRAINING:
                images, labels = next(stream)
                images = images.to(dtype)  # before the step: the batch is the step's input, OTH
                if images.shape[0] != planned.batch * first.micro_batches:  # the schedule and the loader must agree
                    raise CostModelError(f"internal: step {planned.step} planned {first.micro_batches} x batch "
                                         f"{planned.batch}, the loader gave {images.shape[0]}")
                began = time.perf_counter()
                if planned.measured:
                    tracked = tracked_train_step(training_step, applied.optimizer, images, labels)
                    record.loss, record.measured = tracked.loss, _to_plain(tracked.measured)
                else:
                    record.loss = train_step(training_step, applied.optimizer, images, labels)
                record.seconds = time.perf_counter() - began
                del images, labels
                losses_since_eval.append(record.loss)
                bar.set_postfix(loss=f"{record.loss:.3f}", refresh=False)
                bar.update()
            else:
                correct, loss_sum, seen, measured = 0, 0.0, 0, []
                began = time.perf_counter()
                for images, labels in eval_loader:
                    images = images.to(dtype)
                    if planned.measured:
                        tracked = tracked_evaluation(training_step, applied.optimizer, images, labels)
                        logits, loss = tracked.logits, tracked.loss
                        measured.append(_to_plain(tracked.measured))
                    else:
                        logits, loss_tensor = evaluation_logits(training_step, images, labels)
                        loss = float(loss_tensor)
                        del loss_tensor
                    correct += int((logits.argmax(dim=1) == labels).sum())
                    loss_sum += loss * len(labels)
                    seen += len(labels)
                    del logits, images, labels
                record.seconds = time.perf_counter() - began
                record.loss = loss_sum / seen
                record.measured = aggregate_pass(measured) if planned.measured else None
                point = AccuracyPoint(planned.epoch, planned.step,
                                      sum(losses_since_eval) / len(losses_since_eval) if losses_since_eval else math.nan,
                                      correct / seen, loss_sum / seen)
                accuracy.append(point)
                losses_since_eval = []
                bar.set_postfix(loss=f"{point.train_loss:.3f}", acc=f"{point.eval_accuracy:.1%}", refresh=False)
            records.append(record)

    described = {**config.to_dict(), "task_description": task.description, "source": task.source,
                 "classes": task.classes, "train_images": len(task.train), "eval_images": len(task.eval),
                 "total_steps": total, "steps_per_epoch": steps_per_epoch(config, len(task.train))[0],
                 "galore_update_proj_gap": galore_gap(config), "new_head": new_head,
                 "head": "re-initialised (seeded) after pretraining: the task's classes are new" if new_head
                 else "pretrained", "pretrained_checkpoint": str(checkpoint), "checkpoint_reused": reused,
                 "pretrain": {"epochs": config.pretrain_epochs, "lr": PRETRAIN_LR, "batch": PRETRAIN_BATCH,
                              "train_size": config.pretrain_size},
                 "trainable_params": applied.trainable_params, "total_params": applied.total_params,
                 "prediction_seconds": predictor.seconds, "distinct_predictions": len(predictor.cache)}
    return FinetuneResult(described, records, accuracy, time.perf_counter() - started)


# -- the CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``costmodel finetune``'s options (cli.py registers the subcommand)."""
    from costmodel.cli import add_setup_options

    defaults = FinetuneConfig()
    parser.add_argument("--model", default=defaults.model, help="torchvision model name (default: %(default)s)")
    parser.add_argument("--method", default=defaults.method, help="fft, bn_head, lora, dora or galore (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=None, help=f"adapter / projection rank (default: {defaults.rank})")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA/DoRA lora_alpha (default: the rank)")
    parser.add_argument("--task", required=True, help="digits, digits-<corruption>-<severity>, digits-unseen, "
                        "digits-unseen-<corruption>-<severity> (costmodel.validation.tasks)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs to fine-tune (default: 1 unless --steps)")
    parser.add_argument("--steps", type=int, default=None, help="training steps, instead of --epochs (may span epochs)")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="batch size (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=defaults.resolution, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction, metavar="F", help="share of each class held out for evaluation, at most %(default)s (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=None, metavar="N", help="evaluate every N steps, and at the end (default: at the end of each epoch)")
    parser.add_argument("--measure-every", type=int, default=None, metavar="N", help=f"measure every N-th step besides the special ones (default: every step up to {MEASURE_ALL_UP_TO} steps, else about {REGULAR_MEASUREMENTS} of them)")
    parser.add_argument("--no-measure", action="store_true", help="track nothing (accuracy only; predictions are still made)")
    parser.add_argument("--lr", type=float, default=None, help="the optimizer's learning rate (default: the method's, "
                        + ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LEARNING_RATES.items()) + ")")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the split, the shuffling, the initialisation (default: %(default)s)")
    parser.add_argument("--train-size", type=int, default=None, metavar="N", help="fine-tune on only N training images (default: all)")
    parser.add_argument("--galore-update-proj-gap", type=int, default=None, metavar="T", help=f"GaLore's T: an SVD on step k when (k-1) %% T == 0 (default: {DEFAULT_GALORE_GAP})")
    parser.add_argument("--pretrain-epochs", type=int, default=defaults.pretrain_epochs, help="epochs of pretraining on the source task (default: %(default)s)")
    parser.add_argument("--pretrain-size", type=int, default=None, metavar="N", help="pretrain on only N source images (default: all)")
    add_setup_options(parser)  # --dtype, --checkpoint, --accumulate, --optimizer, --optimizer-option, as predict's
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every step and the accuracy curve as JSON to FILE")


def config_from_arguments(args: argparse.Namespace) -> FinetuneConfig:
    """The run the parsed arguments ask for, checked (shorthand flags through the method's plugin)."""
    from costmodel.cli import setup_fields
    from costmodel.options import check_method_arguments
    from costmodel.registry import default_plugin_manager

    shorthands = {key: (flag, value) for key, flag, value in (("alpha", "--alpha", args.alpha),
                  ("update_proj_gap", "--galore-update-proj-gap", args.galore_update_proj_gap)) if value is not None}
    options = check_method_arguments(default_plugin_manager(), args.method, args.rank is not None, {}, shorthands)
    config = FinetuneConfig(
        model=args.model, method=args.method, task=args.task, rank=FinetuneConfig().rank if args.rank is None else args.rank,
        epochs=args.epochs, steps=args.steps, batch=args.batch, resolution=args.resolution, lr=args.lr, seed=args.seed,
        train_size=args.train_size, eval_fraction=args.eval_fraction, eval_every=args.eval_every, measure_every=args.measure_every, options=options,
        pretrain_epochs=args.pretrain_epochs, pretrain_size=args.pretrain_size, measure=not args.no_measure,
        **setup_fields(args))
    return check_config(config)[0]


def run_command(args: argparse.Namespace) -> int:
    """``costmodel finetune``: check everything, run, print the table, write --json."""
    from costmodel.cli import check_writable

    config = config_from_arguments(args)
    check_writable(args.json, "--json")
    result = run_finetune(config)
    if args.json:
        try:
            Path(args.json).write_text(result.to_json() + "\n", encoding="utf-8")
        except OSError as error:
            raise CostModelError(f"--json: cannot write {args.json}: {error.strerror}") from None
    print(result.render())
    return 0
