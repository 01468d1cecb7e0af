"""The configuration of one fine-tuning step: what is measured and what is predicted."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from costmodel.errors import CostModelError


@dataclass(frozen=True)
class StepConfig:
    """One fine-tuning step, as DEVELOPERS.md and the runtime-reference issue define it.

    The model is ``torchvision.models.<model>(weights=None, num_classes=classes)`` in train mode,
    fed ``batch`` images of 3 x ``resolution`` x ``resolution`` with integer labels through
    ``nn.CrossEntropyLoss``; the measured step is number ``step`` (step 1 creates optimizer state).
    """

    model: str = "mobilenet_v2"
    method: str = "fft"
    rank: int = 4
    batch: int = 1
    resolution: int = 224
    classes: int = 10
    step: int = 2
    lr: float = 1e-3
    # LoRA/DoRA: lora_alpha; None means alpha = rank (the reference configuration).
    alpha: float | None = None
    # GaLore: the projector is refreshed (an SVD) on step k when (k - 1) % T == 0.
    galore_update_proj_gap: int = 200
    galore_scale: float = 0.25
    # Method-specific options that later method plugins define (rank patterns, target rules...).
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("rank", "batch", "resolution", "classes", "step", "galore_update_proj_gap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CostModelError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.lr <= 0:
            raise CostModelError(f"--lr must be positive, got {self.lr!r}")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def replace(self, **changes: Any) -> "StepConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
