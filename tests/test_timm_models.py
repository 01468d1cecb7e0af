"""timm's edge models (``--model timm:NAME``): predicted equal to the runtime reference on every
field, and one-line errors for a name timm does not know or a timm that is not installed."""

from __future__ import annotations

import sys

import pytest

from costmodel.cli import main
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.models import build_model, check_model_names, head_name, meta_model
from costmodel.prediction import predict_config
from costmodel.result import FLOP_CONVENTIONS, MEMORY_FIELDS, PHASES
from costmodel.validation.measure import measure

BATCH, RESOLUTION = 2, 64
# Small and quick enough for the default suite (about 60 s on 2 cores, most of it measuring).
# tf_mobilenetv3_small_100: TensorFlow "SAME" convolutions (timm's Conv2dSame, costmodel.plugins.timm_layers).
FAST_MODELS = ("mobilenetv3_small_100", "lcnet_050", "tf_mobilenetv3_small_100")
# The rest of the edge sample; each one predicted equal to the measurement under fft and LoRA r4.
SLOW_MODELS = ("mobilenetv3_large_100", "efficientnet_b0", "resnet18", "ghostnet_100", "mnasnet_100", "tinynet_a",
               "ghostnetv2_100",  # GhostNetV2's gate: F.interpolate(mode="nearest")
               "tf_efficientnet_b0", "tf_efficientnet_lite0", "tf_mixnet_s", "tf_mobilenetv3_large_100",
               "tf_efficientnetv2_b0")
METHODS = (("fft", {}), ("lora", {"rank": 4}))


def _assert_prediction_equals_measurement(name: str, method: str, changes: dict[str, int]) -> None:
    config = StepConfig(model=f"timm:{name}", method=method, batch=BATCH, resolution=RESOLUTION, **changes)
    predicted, measured = predict_config(config), measure(config, fake=True)
    for conv in FLOP_CONVENTIONS:
        for phase in (*PHASES, "total"):
            assert predicted.flops[conv][phase] == measured.flops[conv][phase], (conv, phase)
    for field in MEMORY_FIELDS:
        assert predicted.memory[field] == measured.memory[field], field
    assert predicted.trainable_params == measured.trainable_params
    assert predicted.total_params == measured.total_params


@pytest.mark.parametrize("method, changes", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("name", FAST_MODELS)
def test_timm_edge_model_predicts_exactly(name: str, method: str, changes: dict[str, int]) -> None:
    _assert_prediction_equals_measurement(name, method, changes)


@pytest.mark.slow
@pytest.mark.parametrize("method, changes", METHODS, ids=[m for m, _ in METHODS])
@pytest.mark.parametrize("name", SLOW_MODELS)
def test_more_timm_edge_models_predict_exactly(name: str, method: str, changes: dict[str, int]) -> None:
    _assert_prediction_equals_measurement(name, method, changes)


def test_timm_model_is_built_as_timm_builds_it() -> None:
    import timm

    model = meta_model("timm:lcnet_050", 7)
    assert model.training and all(p.is_meta for p in model.parameters())
    reference = timm.create_model("lcnet_050", pretrained=False, num_classes=7)
    assert [(n, p.shape) for n, p in model.named_parameters()] == \
        [(n, p.shape) for n, p in reference.named_parameters()]
    assert build_model("timm:lcnet_050", 7).classifier.weight.device.type == "cpu"
    # The head the methods keep trainable is what timm calls the classifier.
    assert getattr(model, head_name(model)) is model.get_classifier()
    # The Python API takes the same name.
    import costmodel

    by_name = costmodel.predict("timm:lcnet_050", "fft", batch=BATCH, resolution=RESOLUTION)
    config = StepConfig(model="timm:lcnet_050", method="fft", batch=BATCH, resolution=RESOLUTION)
    assert by_name.flops == predict_config(config).flops and by_name.memory == predict_config(config).memory


def test_unknown_timm_model_is_one_line() -> None:
    with pytest.raises(CostModelError, match=r"--model: unknown timm model 'no_such_net'") as error:
        check_model_names(["timm:no_such_net"], "--model")
    assert "\n" not in str(error.value)
    with pytest.raises(CostModelError, match=r"unknown timm model 'no_such_net'"):
        build_model("timm:no_such_net", device="meta")


def test_unknown_timm_model_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model", "timm:no_such_net", "--method", "fft"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown timm model 'no_such_net'" in err and "\n" not in err


def test_missing_timm_is_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # ``import timm`` now raises ImportError
    with pytest.raises(CostModelError, match=r"need the 'timm' extra .*pip install 'costmodel\[timm\]'") as error:
        build_model("timm:lcnet_050", device="meta")
    assert "\n" not in str(error.value)
    assert main(["predict", "--model", "timm:lcnet_050", "--method", "fft"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'timm' extra" in err and "\n" not in err
    # torchvision's models need no timm.
    assert check_model_names(["resnet18"], "--model") == ("resnet18",)


def test_same_padding_is_timms_at_every_size() -> None:
    """The stand-in's graph arithmetic (``costmodel.plugins.timm_layers.same_padding``) gives
    timm's own ``get_same_padding`` for every size, kernel, stride and dilation tried."""
    from timm.layers.padding import get_same_padding

    from costmodel.plugins.timm_layers import same_padding

    for size in range(1, 70):
        for kernel in (1, 2, 3, 5, 7):
            for stride in (1, 2, 3, 4):
                for dilation in (1, 2):
                    assert same_padding(size, kernel, stride, dilation) == \
                        get_same_padding(size, kernel, stride, dilation), (size, kernel, stride, dilation)


def test_a_module_with_same_convolutions_equals_live_measurements_at_odd_sizes() -> None:
    """A custom module of timm's Conv2dSame (stride 2, asymmetric padding at even sizes, none
    needed at some odd ones), predicted through the Python API at three resolutions (the padding
    is graph arithmetic on the input's size), each equal to a real-tensor measurement."""
    import torch
    from timm.layers import Conv2dSame
    from torch import nn

    import costmodel
    from engine_live import assert_matches, measure_module

    class Same(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = Conv2dSame(3, 4, 3, stride=2)
            self.b = Conv2dSame(4, 6, 5, stride=2, groups=2)
            self.fc = nn.Linear(6, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3)))

    for resolution in (9, 16, 33):
        measured = measure_module(Same, batch=2, resolution=resolution, fake=False)
        assert_matches(costmodel.predict(Same(), "fft", batch=2, resolution=resolution), measured)


@pytest.mark.parametrize("method", ["fft", "lora"])
def test_a_small_vision_transformer_predicts_exactly_at_its_size(method: str) -> None:
    """timm's ViT-Tiny at its fixed 224 x 224: LayerNorm, GELU, the fused attention
    (``F.scaled_dot_product_attention``, CPU flash kernel; costmodel.plugins.attention), the class
    token, every field equal to the measurement."""
    config = StepConfig(model="timm:vit_tiny_patch16_224", method=method, batch=2, resolution=224)
    predicted, measured = predict_config(config), measure(config, fake=True)
    assert predicted.flops == measured.flops
    for field in MEMORY_FIELDS:
        assert predicted.memory[field] == measured.memory[field], field
    assert predicted.trainable_params == measured.trainable_params


def test_a_timm_model_that_cannot_be_built_on_meta_is_one_line() -> None:
    """csatv2's constructor mixes a CPU tensor into a meta-device op: a one-line refusal naming
    the model, not an internal error."""
    with pytest.raises(CostModelError, match="cannot build timm:csatv2 on the meta device") as refused:
        predict_config(StepConfig(model="timm:csatv2", method="fft", batch=2, resolution=64))
    assert "\n" not in str(refused.value)
