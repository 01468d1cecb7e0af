"""The schema that ``costmodel measure`` and ``costmodel predict`` both print."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from costmodel.config import EVALUATION, StepConfig

# The phases of a training step (``StepConfig.phase == "train"``), in order.
PHASES: tuple[str, ...] = ("forward", "backward", "optimizer")
# The one phase of an evaluation pass (``StepConfig.phase == "evaluate"``): the step's forward and
# loss with the model in eval mode under ``torch.no_grad()``.
EVALUATE = EVALUATION
FLOP_CONVENTIONS: tuple[str, ...] = ("torch", "exact")
# MemTracker's categories. OTH holds the tensors passed to track_external: inputs and labels.
MEMORY_GROUPS: tuple[str, ...] = ("PARAM", "BUFFER", "GRAD", "ACT", "TEMP", "OPT", "OTH")
MEMORY_FIELDS: tuple[str, ...] = MEMORY_GROUPS + ("peak", "sum_of_group_peaks")


def phase_flops(forward: int, backward: int, optimizer: int) -> dict[str, int]:
    """A training step's FLOPs in one convention: per phase and their total."""
    return {"forward": forward, "backward": backward, "optimizer": optimizer,
            "total": forward + backward + optimizer}


def evaluation_flops(evaluate: int) -> dict[str, int]:
    """An evaluation pass's FLOPs in one convention: its one phase and the total."""
    return {EVALUATE: evaluate, "total": evaluate}


def phases_of(kind: str) -> tuple[str, ...]:
    """The phases whose FLOPs a step of ``kind`` (``StepConfig.phase``) reports, in order."""
    return (EVALUATE,) if kind == EVALUATE else PHASES


@dataclass
class StepCost:
    """FLOPs per phase in both conventions and each memory group's maximum over the step.

    ``memory[group]`` is that group's own maximum over the step, whenever it occurs;
    ``memory["peak"]`` is the largest simultaneous total; ``memory["sum_of_group_peaks"]`` is
    the sum of the group maxima (what the paper reports as total peak memory).
    """

    config: StepConfig
    source: str  # "measure" or "predict"
    flops: dict[str, dict[str, int]]
    memory: dict[str, int]
    trainable_params: int
    total_params: int
    seconds: float
    # Anything else a producer wants to expose (per-node breakdowns, timelines, coverage).
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "config": self.config.to_dict(),
            "flops": self.flops,
            "memory": self.memory,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "seconds": self.seconds,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self, conventions: tuple[str, ...] = FLOP_CONVENTIONS) -> str:
        """A readable table: FLOPs per phase in each convention, then the memory groups."""
        c = self.config
        lines = [
            f"{self.source}: {c.model}, method={c.method}, rank={c.rank}, batch={c.batch}, "
            f"resolution={c.resolution}, classes={c.classes}, {step_label(c)}{setup_label(c)} "
            f"({self.seconds * 1e3:.1f} ms)",
            f"trainable parameters: {self.trainable_params:,} of {self.total_params:,}",
            "",
        ]
        lines += format_table(["FLOPs", *conventions],
                              [[phase, *(f"{self.flops[conv][phase]:,}" for conv in conventions)]
                               for phase in phases_of(c.phase) + ("total",)])
        lines.append("")
        lines += format_table(["memory", "bytes", "MiB"],
                              [[name, f"{self.memory[name]:,}", f"{self.memory[name] / 2**20:,.3f}"]
                               for name in MEMORY_FIELDS])
        return "\n".join(lines)


def step_label(config: StepConfig) -> str:
    """How a result's header names its step: ``step=2``, or ``evaluate after 3 steps``."""
    if config.phase == EVALUATE:
        return f"evaluate after {config.step} training step{'' if config.step == 1 else 's'}"
    return f"step={config.step}"


def setup_label(config: StepConfig) -> str:
    """The input, loss, optimizer and training setup, where they are not the default ones
    (", channels=1, loss=mse, optimizer=sgd(momentum=0.9), accumulate=4")."""
    defaults = StepConfig()
    label = "".join(f", {name}={getattr(config, name)}" for name in ("channels", "loss")
                    if getattr(config, name) != getattr(defaults, name))
    if config.optimizer != defaults.optimizer or config.optimizer_options:
        options = ", ".join(f"{key}={value!r}" for key, value in config.optimizer_options.items())
        label += f", optimizer={config.optimizer}" + (f"({options})" if options else "")
    setups = ("accumulate", "dtype", "autocast", "quantize", "checkpoint")
    return label + "".join(f", {name}={getattr(config, name)}" for name in setups
                           if getattr(config, name) != getattr(defaults, name))


def format_table(header: list[str], rows: list[list[str]], gap: int = 2, last_left: bool = False) -> list[str]:
    """Lines of a table: the first column left-aligned, the others right-aligned (the last one
    left-aligned too with ``last_left``, for free text), every column as wide as its widest cell
    plus ``gap``, so that no two cells ever run together at any size."""
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0])]
        for index, (cell, width) in enumerate(zip(row[1:], widths[1:]), start=1):
            free_text = last_left and index == len(header) - 1
            cells.append(" " * gap + cell.ljust(width) if free_text else cell.rjust(width + gap))
        lines.append("".join(cells).rstrip())
    return lines


def relative_error(predicted: int, measured: int) -> float:
    """|predicted - measured| / measured; 0 when both are 0, infinite when only measured is 0."""
    if measured == 0:
        return 0.0 if predicted == 0 else float("inf")
    return abs(predicted - measured) / measured


def render_comparison(predicted: StepCost, measured: StepCost) -> str:
    """Predicted beside measured, with the difference of every field (FLOPs, bytes, parameters)."""
    lines = [
        f"{predicted.config.model}, method={predicted.config.method}, rank={predicted.config.rank}, "
        f"batch={predicted.config.batch}, resolution={predicted.config.resolution}, "
        f"{step_label(predicted.config)}{setup_label(predicted.config)}",
        f"predict took {predicted.seconds * 1e3:.1f} ms, measure took {measured.seconds * 1e3:.1f} ms "
        f"({measured.seconds / max(predicted.seconds, 1e-9):.0f}x)",
        "",
    ]

    def row(label: str, p: int, m: int) -> list[str]:
        return [label, f"{p:,}", f"{m:,}", f"{p - m:,}", f"{relative_error(p, m):.4%}"]

    rows = []
    for conv in FLOP_CONVENTIONS:
        for phase in phases_of(predicted.config.phase) + ("total",):
            rows.append(row(f"FLOPs {conv} {phase}", predicted.flops[conv][phase], measured.flops[conv][phase]))
    for name in MEMORY_FIELDS:
        rows.append(row(f"memory {name} (B)", predicted.memory[name], measured.memory[name]))
    rows.append(row("trainable parameters", predicted.trainable_params, measured.trainable_params))
    lines += format_table(["", "predicted", "measured", "difference", "rel. error"], rows)
    return "\n".join(lines)
