"""Applying each method for real: trainable counts from module shapes, frozen sets, optimizer groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from costmodel.errors import CostModelError
from costmodel.models import build_model, head_name
from costmodel.validation.methods import adapter_targets, apply_method, inject_lora, low_rank_weights

MODELS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18")


def in_head(name: str, head: str) -> bool:
    return name == head or name.startswith(head + ".")


def head_params(model: nn.Module) -> int:
    return sum(p.numel() for p in getattr(model, head_name(model)).parameters())


def adapter_params(model: nn.Module, rank: int, dora: bool) -> int:
    """LoRA A (rank x in x kernel) + B (out x rank), plus DoRA's magnitude (out), from base shapes."""
    total = 0
    head = head_name(model)
    for name, module in model.named_modules():
        if in_head(name, head):
            continue
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            fan_in, fan_out = module.in_channels * math.prod(module.kernel_size), module.out_channels
        elif isinstance(module, nn.Linear):
            fan_in, fan_out = module.in_features, module.out_features
        else:
            continue
        total += rank * fan_in + fan_out * rank + (fan_out if dora else 0)
    return total


@pytest.mark.parametrize("model_name", MODELS)
def test_fft_trains_everything(model_name: str) -> None:
    applied = apply_method(build_model(model_name), "fft")
    assert applied.trainable_params == applied.total_params == sum(p.numel() for p in build_model(model_name).parameters())
    assert applied.frozen == ()
    assert isinstance(applied.optimizer, torch.optim.AdamW)


@pytest.mark.parametrize("model_name", MODELS)
def test_bn_head_trains_only_the_head_with_batch_norm_in_train_mode(model_name: str) -> None:
    applied = apply_method(build_model(model_name), "bn_head")
    model, head = applied.model, head_name(applied.model)
    assert applied.trainable_params == head_params(model)
    assert set(applied.frozen) == {name for name, _ in model.named_parameters() if not in_head(name, head)}
    batch_norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and all(m.training and not m.weight.requires_grad for m in batch_norms)
    optimized = {id(p) for group in applied.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in getattr(model, head).parameters()}


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("model_name", MODELS)
def test_lora_family_counts_and_frozen_set(model_name: str, method: str) -> None:
    base = build_model(model_name)
    expected = adapter_params(base, rank=4, dora=method == "dora") + head_params(base)
    base_names = {name for name, _ in base.named_parameters()}
    targets = adapter_targets(base)
    applied = apply_method(build_model(model_name), method, rank=4)
    model, head = applied.model, head_name(applied.model)

    assert applied.trainable_params == expected
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in name or in_head(name, head) for name in trainable)
    # every base parameter outside the head is frozen, batch-norm affine included
    assert {name for name in applied.frozen} == {
        name for name, _ in model.named_parameters() if ".lora_" not in name and not in_head(name, head)}
    assert len(applied.frozen) == len([n for n in base_names if not in_head(n, head)])
    # the head keeps its module structure (no ModulesToSaveWrapper) and is trained in full
    assert type(getattr(model, head)) is type(getattr(base, head))
    # only groups == 1 convs and Linear layers outside the head carry adapters
    adapted = {name.rsplit(".lora_", 1)[0].removesuffix(".base_layer") for name, _ in model.named_parameters()
               if ".lora_" in name}
    assert adapted == set(targets)
    modules = dict(base.named_modules())
    assert all(getattr(modules[t], "groups", 1) == 1 and not in_head(t, head) for t in targets)


@pytest.mark.parametrize("model_name", MODELS)
def test_galore_groups(model_name: str) -> None:
    base = build_model(model_name)
    head = head_name(base)
    expected_low_rank = {f"{name}.weight" for name, m in base.named_modules()
                         if isinstance(m, (nn.Conv2d, nn.Linear)) and not in_head(name, head)}
    applied = apply_method(build_model(model_name), "galore", rank=4, update_proj_gap=7, scale=0.5)
    assert applied.trainable_params == applied.total_params and applied.frozen == ()
    assert set(low_rank_weights(applied.model)) == expected_low_rank
    names = {id(p): name for name, p in applied.model.named_parameters()}
    plain, low_rank = applied.optimizer.param_groups
    assert {names[id(p)] for p in low_rank["params"]} == expected_low_rank
    assert (low_rank["rank"], low_rank["update_proj_gap"], low_rank["scale"], low_rank["proj_type"]) == (4, 7, 0.5, "std")
    assert len(plain["params"]) + len(low_rank["params"]) == len(names)


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8)
        self.fc = nn.Linear(8 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.depthwise(self.conv(x)).flatten(1))


def test_galore_projects_4d_conv_gradients() -> None:
    """galore-torch 1.0 alone fails on 4-D weights; the reshape adaptation steps and keeps shapes."""
    model = TinyConvNet()
    applied = apply_method(model, "galore", rank=2)
    x = torch.randn(2, 3, 8, 8)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        applied.optimizer.zero_grad(set_to_none=True)
        model(x).sum().backward()
        applied.optimizer.step()
    for parameter, old in zip(model.parameters(), before):
        assert parameter.shape == old.shape and not torch.equal(parameter, old)
    # conv: gradient as the 8 x 27 matrix; m < n, so a left projector and r x n moments
    assert applied.optimizer.state[model.conv.weight]["exp_avg"].shape == (2, 27)
    assert applied.optimizer.state[model.depthwise.weight]["exp_avg"].shape == (2, 9)
    assert applied.optimizer.state[model.fc.weight]["exp_avg"].shape == model.fc.weight.shape  # head: plain


def test_peft_refusal_is_one_clear_error() -> None:
    model = build_model("mobilenet_v2")
    depthwise = next(name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    with pytest.raises(CostModelError, match="peft refuses LoRA with rank 3") as error:
        inject_lora(model, [depthwise], rank=3, alpha=3.0, use_dora=False)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("method, rank, message", [("nope", 4, "unknown method 'nope'"), ("lora", 0, "rank")])
def test_bad_method_or_rank(method: str, rank: int, message: str) -> None:
    with pytest.raises(CostModelError, match=message):
        apply_method(build_model("resnet18"), method, rank=rank)


# ---------------------------------------------------------------------------------------------
# Method options (StepConfig.options): the predictor's options, with peft's semantics


def test_the_reference_takes_exactly_the_predictors_options() -> None:
    from costmodel.plugins.method_galore import GALORE_OPTIONS as PREDICTED_GALORE
    from costmodel.plugins.method_targets import KNOWN_OPTIONS
    from costmodel.validation.methods import OPTIONS_BY_METHOD

    assert OPTIONS_BY_METHOD["lora"] == OPTIONS_BY_METHOD["dora"] == KNOWN_OPTIONS
    assert OPTIONS_BY_METHOD["galore"] == PREDICTED_GALORE
    assert OPTIONS_BY_METHOD["fft"] == OPTIONS_BY_METHOD["bn_head"] == frozenset()


@pytest.mark.parametrize("method, options, message", [
    ("lora", {"rank_patern": {"conv1": 2}}, "does not know the option.*'rank_patern'"),
    ("galore", {"include_grouped": True}, "does not know the option.*'include_grouped'"),
    ("fft", {"adapt_head": True}, "'fft' takes no options"),
    ("dora", {"rank_pattern": {"conv1": 0}}, "rank for 'conv1' must be an integer >= 1"),
    ("lora", {"adapt_head": "yes"}, "adapt_head must be true or false"),
    ("lora", {"target_modules": "nothing.*"}, "peft refuses LoRA.*not found"),
    ("galore", {"target_modules": ["bn1"]}, "'bn1' \\(BatchNorm2d\\).*neither"),
])
def test_bad_options_are_one_clear_error(method: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(CostModelError, match=message) as error:
        apply_method(build_model("resnet18", device="meta"), method, rank=4, options=options)
    assert "\n" not in str(error.value)


def test_lora_options_reach_peft() -> None:
    options = {"rank_pattern": {"layer4.*": 8, "conv1": 2}, "alpha_pattern": {"layer3.*": 2},
               "exclude_modules": ["downsample.0"]}
    applied = apply_method(build_model("resnet18", device="meta"), "lora", rank=4, options=options)
    targets, model = applied.details["targets"], applied.model
    # keys match as suffixes, the first matching key wins
    assert targets["conv1"] == targets["layer2.0.conv1"] == 2 and targets["layer2.0.conv2"] == 4
    assert targets["layer4.1.conv2"] == targets["layer4.0.conv1"] == 8
    assert not any(name.endswith("downsample.0") for name in targets)
    assert model.get_submodule("layer3.0.conv2").scaling["default"] == 2 / 4
    assert model.get_submodule("layer4.0.conv1").scaling["default"] == 4 / 8  # alpha stays the rank


def test_adapt_head_adapts_the_head_instead_of_training_it() -> None:
    applied = apply_method(build_model("mobilenet_v3_small", device="meta"), "dora", rank=4,
                           options={"adapt_head": True})
    assert {"classifier.0", "classifier.3"} <= set(applied.details["targets"])
    trainable = [name for name, p in applied.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)


def test_include_grouped_adds_the_grouped_convolutions_the_rank_divides() -> None:
    base = build_model("mobilenet_v2", device="meta")
    divisible = {name for name, m in base.named_modules()
                 if isinstance(m, nn.Conv2d) and m.groups > 1 and 32 % m.groups == 0}
    applied = apply_method(build_model("mobilenet_v2", device="meta"), "lora", rank=32,
                           options={"include_grouped": True})
    assert divisible and set(applied.details["targets"]) == set(adapter_targets(base)) | divisible


def test_galore_rank_pattern_gives_each_projector_its_rank() -> None:
    applied = apply_method(build_model("resnet18", device="meta"), "galore", rank=4,
                           options={"rank_pattern": {"layer4.*": 8}, "exclude_modules": ["conv1"], "adapt_head": True})
    low_rank = applied.details["low_rank"]
    assert not any(name.endswith("conv1.weight") for name in low_rank)  # a listed name matches as a suffix
    assert "layer1.0.conv2.weight" in low_rank and low_rank["fc.weight"] == 4
    assert low_rank["layer4.0.downsample.0.weight"] == 8 and low_rank["layer3.1.conv2.weight"] == 4
    parameters = dict(applied.model.named_parameters())
    assert {name: applied.optimizer.state[parameters[name]]["projector"].rank for name in low_rank} == low_rank
