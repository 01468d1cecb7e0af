"""Building the models that are measured and predicted, and finding their classification head.

Shared by the runtime reference and the analytic engine, so both describe the same network.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch
from torch import nn

from costmodel.errors import CostModelError

# The head is the model's first submodule with one of these names, taken as a whole
# (MobileNetV3's classifier holds two Linear layers).
HEAD_NAMES: tuple[str, ...] = ("fc", "classifier", "heads", "head")


@lru_cache(maxsize=1)
def available_models() -> tuple[str, ...]:
    """Names of torchvision's image-classification models."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def build_model(name: str, num_classes: int = 10, device: str | torch.device = "cpu") -> nn.Module:
    """``torchvision.models.<name>(weights=None, num_classes=num_classes)`` in train mode.

    On ``device="meta"`` no weight memory is allocated and no initialisation arithmetic runs.
    """
    import torchvision

    if name not in available_models():
        raise CostModelError(
            f"unknown model {name!r}; choose one of torchvision's classification models, "
            f"e.g. mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, resnet18"
        )
    with torch.device(device):
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return model.train()


@lru_cache(maxsize=16)
def _pristine_meta_model(name: str, num_classes: int) -> nn.Module:
    return build_model(name, num_classes, device="meta")


def meta_model(name: str, num_classes: int = 10) -> nn.Module:
    """``build_model(name, num_classes, device="meta")``, as a copy of one built before: copying a
    meta-device model is a few times faster than running torchvision's constructor again."""
    return copy.deepcopy(_pristine_meta_model(name, num_classes))


def head_name(model: nn.Module) -> str:
    """The qualified name of the model's classification head."""
    children = dict(model.named_children())
    for name in HEAD_NAMES:
        if name in children:
            return name
    raise CostModelError(
        f"cannot find the classification head of {type(model).__name__}: "
        f"no child module named one of {', '.join(HEAD_NAMES)}"
    )


def make_batch(
    batch: int, resolution: int, classes: int, device: str | torch.device = "cpu", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A generated batch: images 3 x resolution x resolution and integer labels."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, resolution, resolution, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return images.to(device), labels.to(device)
