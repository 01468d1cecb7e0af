"""The LoRA/DoRA method plugin against peft 0.21.2 applied for real.

- The adapted meta-device model has exactly peft's parameters (names, shapes, trainability), for
  the reference targets and under the options (rank_pattern, alpha_pattern, include_grouped,
  target_modules, adapt_head); a rank a layer cannot take is an error naming the layer.
- One adapted layer, run eagerly: the mirror issues the same aten ops (views aside) as peft's
  layer, and MemTracker sees the same per-group maxima, in forward and backward.
- Whole models: the prediction equals the live measurement (FLOPs per phase exactly in both
  conventions, PARAM/BUFFER/GRAD/OPT/OTH to the byte, ACT and peak within 1%, TEMP within 5%).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.models import build_model
from costmodel.plugins.method_lora import LoraConv2d, LoraLinear, apply_adapters
from costmodel.validation.memory import GroupPeakMemTracker
from costmodel.validation.methods import adapter_targets, apply_method

# Ops that move no data and allocate nothing, which the mirror may issue in another arrangement
# (it detaches weights before viewing them, etc.).
VIEW_OPS = frozenset({"view", "_unsafe_view", "detach", "t", "transpose", "permute", "slice", "alias",
                      "expand", "unsqueeze", "squeeze"})


def peft_model(model: nn.Module, targets: list[str], use_dora: bool, **config: object) -> nn.Module:
    from peft import LoraConfig, inject_adapter_in_model

    config.setdefault("lora_alpha", config["r"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return inject_adapter_in_model(
            LoraConfig(lora_dropout=0.0, use_dora=use_dora, target_modules=targets, **config), model)


def parameters(model: nn.Module) -> list[tuple[str, tuple[int, ...], bool]]:
    return [(name, tuple(p.shape), p.requires_grad) for name, p in model.named_parameters()]


def mirrored(model_name: str, method: str, rank: int, **options: object) -> nn.Module:
    model = build_model(model_name, device="meta")
    apply_adapters(model, StepConfig(model=model_name, method=method, rank=rank, options=options),
                   use_dora=method == "dora")
    return model


# ---------------------------------------------------------------------------------------------
# Parameters: the reference targets and the options


@pytest.mark.parametrize("model_name", ["mobilenet_v3_small", "resnet18"])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("rank", [1, 4])
def test_parameters_equal_the_reference(model_name: str, method: str, rank: int) -> None:
    reference = apply_method(build_model(model_name, device="meta"), method, rank=rank)
    ours = mirrored(model_name, method, rank)
    assert parameters(ours) == parameters(reference.model)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == reference.trainable_params


def test_rank_and_alpha_patterns_follow_peft() -> None:
    pattern = {"features.1.block.2.0": 2, r"features\.(4|5)\..*": 8}
    ours = mirrored("mobilenet_v3_small", "dora", 4, rank_pattern=pattern, alpha_pattern={"features.4.*": 3})
    base = build_model("mobilenet_v3_small", device="meta")
    theirs = peft_model(base, adapter_targets(base), True, r=4, rank_pattern=pattern, alpha_pattern={"features.4.*": 3})
    for p in theirs.parameters():
        p.requires_grad_(False)
    for name, p in theirs.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith("classifier."))
    assert parameters(ours) == parameters(theirs)
    assert ours.get_submodule("features.1.block.2.0").rank == 2
    assert ours.get_submodule("features.4.block.0.0").rank == 8
    assert ours.get_submodule("features.4.block.0.0").scaling == 3 / 8
    assert ours.get_submodule("features.6.block.0.0").scaling == 1.0


def test_grouped_convolutions_where_the_rank_divides_groups() -> None:
    rank = 16  # mobilenet_v2's depthwise convolutions have 32 .. 960 groups: only groups <= 16 dividing 16
    ours = mirrored("mobilenet_v2", "lora", rank, include_grouped=True)
    base = build_model("mobilenet_v2", device="meta")
    grouped = [name for name, m in base.named_modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1 and rank % m.groups == 0]
    theirs = peft_model(base, adapter_targets(base) + grouped, False, r=rank)
    for name, p in theirs.named_parameters():
        p.requires_grad_(".lora_" in name or name.startswith("classifier."))
    assert parameters(ours) == parameters(theirs)

    small = mirrored_module(GroupedNet(), "lora", 8, include_grouped=True)
    assert isinstance(small.conv, LoraConv2d) and small.conv.lora_B["default"].weight.shape == (8, 2, 1, 1)
    assert small.conv.lora_A["default"].weight.shape == (8, 8, 3, 3)  # lora_A is a dense convolution


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, groups=4)
        self.fc = nn.Linear(8, 2)


def mirrored_module(model: nn.Module, method: str, rank: int, **options: object) -> nn.Module:
    apply_adapters(model, StepConfig(method=method, rank=rank, options=options), use_dora=method == "dora")
    return model


def test_a_rank_a_layer_cannot_take_names_the_layer() -> None:
    with pytest.raises(CostModelError, match=r"features\.1\.conv\.0\.0.*groups=32.*rank 4"):
        mirrored("mobilenet_v2", "lora", 4, target_modules=["features.1.conv.0.0", "features.1.conv.1"])
    with pytest.raises(CostModelError, match=r"features\.2\.conv\.1\.0.*groups=96.*rank 8"):
        mirrored("mobilenet_v2", "dora", 8, include_grouped=True, rank_pattern={"features.2.conv.1.0": 8})
    with pytest.raises(CostModelError, match="rank of layer 'conv1' must be an integer >= 1"):
        mirrored("resnet18", "lora", 4, rank_pattern={"conv1": 0})
    with pytest.raises(CostModelError, match="does not know the option"):
        mirrored("resnet18", "lora", 4, rank_patern={"conv1": 2})
    with pytest.raises(CostModelError, match="matches no"):
        mirrored("resnet18", "lora", 4, target_modules="nothing.*")


def test_target_selection_and_the_head() -> None:
    only_layer4 = mirrored("resnet18", "lora", 4, target_modules=r"layer4\..*conv\d")
    adapted = [n for n, m in only_layer4.named_modules() if isinstance(m, LoraConv2d)]
    assert adapted == [f"layer4.{b}.conv{c}" for b in (0, 1) for c in (1, 2)]
    excluded = mirrored("resnet18", "lora", 4, exclude_modules=["conv1", "downsample.0"])
    assert not any(isinstance(m, LoraConv2d) for n, m in excluded.named_modules()
                   if n == "conv1" or n.endswith("downsample.0"))
    head = mirrored("mobilenet_v3_small", "lora", 4, adapt_head=True)
    assert isinstance(head.classifier[0], LoraLinear) and isinstance(head.classifier[3], LoraLinear)
    assert not head.classifier[0].base_layer.weight.requires_grad  # adapted like any layer: frozen
    trained = mirrored("mobilenet_v3_small", "lora", 4)
    assert isinstance(trained.classifier[0], nn.Linear) and trained.classifier[0].weight.requires_grad


# ---------------------------------------------------------------------------------------------
# One layer, eagerly: the same ops and the same memory as peft's layer


class OpLog(TorchDispatchMode):
    """(op, output shapes) of every aten op that is not a view."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[tuple[int, ...], ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in VIEW_OPS and not name.startswith("_record_function"):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            self.ops.append((name, tuple(tuple(o.shape) for o in outs if isinstance(o, torch.Tensor))))
        return out


def forward_backward(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], list[object]]:
    tracker = GroupPeakMemTracker()
    tracker.track_external(model, x)
    log = OpLog()
    with tracker, log:
        y = model(x)
        y.sum().backward()
        del y
    return tracker.memory(), log.ops


LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "conv3x3-stride2": (lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), (2, 16, 8, 8)),
    "conv1x1-bias": (lambda: nn.Conv2d(16, 32, 1), (2, 16, 8, 8)),
    "grouped": (lambda: nn.Conv2d(16, 32, 3, padding=1, groups=4, bias=False), (2, 16, 8, 8)),
    "large-activations": (lambda: nn.Conv2d(4, 8, 3, padding=1), (4, 4, 32, 32)),
    "linear": (lambda: nn.Linear(24, 40), (3, 24)),
}


@pytest.mark.parametrize("layer,rank,method,input_grad", [
    (layer, rank, method, input_grad)
    for layer, rank, method, input_grad in itertools.product(LAYERS, (1, 4), ("lora", "dora"), (False, True))
    if layer != "grouped" or rank == 4])
def test_one_layer_runs_the_same_ops_and_memory_as_peft(layer: str, rank: int, method: str, input_grad: bool) -> None:
    make, shape = LAYERS[layer]
    runs = []
    for ours in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(make())
        if ours:
            for p in model.parameters():
                p.requires_grad_(False)
            wrapper = LoraConv2d if isinstance(model[0], nn.Conv2d) else LoraLinear
            model[0] = wrapper(model[0], rank, float(rank), method == "dora")
        else:
            model = peft_model(model, ["0"], method == "dora", r=rank)
        runs.append(forward_backward(model, torch.randn(shape, requires_grad=input_grad)))
    (peft_memory, peft_ops), (our_memory, our_ops) = runs
    assert our_ops == peft_ops
    assert our_memory == peft_memory
