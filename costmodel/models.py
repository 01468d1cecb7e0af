"""Building the models that are measured and predicted, and finding their classification head.

Shared by the runtime reference and the analytic engine, so both describe the same network.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from costmodel.errors import CostModelError

# The head is the model's first submodule with one of these names, taken as a whole
# (MobileNetV3's classifier holds two Linear layers).
HEAD_NAMES: tuple[str, ...] = ("fc", "classifier", "heads", "head")


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


def check_model_names(names: Sequence[str], option: str) -> tuple[str, ...]:
    """``names``, each one of torchvision's classification models (what the CLI can build by name),
    checked before any work: an unknown name is one line naming ``option``."""
    if not names:
        raise CostModelError(f"{option}: no name given")
    known = available_models()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise CostModelError(f"{option}: unknown model {', '.join(map(repr, unknown))}; choose torchvision's "
                             f"classification models, e.g. mobilenet_v2, mobilenet_v3_small, mobilenet_v3_large, "
                             f"resnet18")
    return tuple(names)


def build_model(name: str, num_classes: int = 10, device: str | torch.device = "cpu") -> nn.Module:
    """``torchvision.models.<name>(weights=None, num_classes=num_classes)`` in train mode.

    On ``device="meta"`` no weight memory is allocated and no initialisation arithmetic runs: every
    weight is allocated on the meta device. Tensors that the constructor builds from Python values
    (and may read back: RegNet's block widths) are computed on the CPU, and whatever of them ends
    up in the model (batch norm's ``num_batches_tracked``, a position index) is moved to
    ``device`` afterwards.
    """
    import torchvision

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
