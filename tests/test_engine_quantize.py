"""A quantized frozen base under LoRA (``StepConfig.quantize``, ``--quantize nf4|fp4|int8``):
bitsandbytes 0.50.2's ``Linear4bit`` and ``Linear8bitLt`` on the CPU, against live layers and live
measurements (real tensors: bitsandbytes quantizes the weights' values)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import costmodel
from costmodel.cli import main
from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.models import make_batch
from costmodel.plugins.quantized import MIRRORS
from costmodel.prediction import predict_config
from costmodel.validation.measure import measure, measure_step
from costmodel.validation.memory import quantization_state
from costmodel.validation.methods import apply_method, quantize_base
from engine_live import assert_matches


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("in_features, out_features", [(64, 32), (192, 576), (33, 7)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_the_mirror_holds_what_bitsandbytes_holds(in_features: int, out_features: int, quant_type: str) -> None:
    """The packed weight's bytes and its element count (PARAM, total_params), and the statistics,
    codes or scales bitsandbytes keeps beside it (BUFFER), against a live quantized layer."""
    holder = nn.Sequential(nn.Linear(in_features, out_features))
    quantize_base(holder, quant_type, head=None)
    live = holder[0]
    mirror = MIRRORS[quant_type](nn.Linear(in_features, out_features, device="meta"))
    assert mirror.weight.numel() == live.weight.numel()
    assert mirror.weight.numel() * mirror.weight.element_size() == _storage_bytes([live.weight])
    assert sum(b.numel() * b.element_size() for b in mirror.buffers()) == _storage_bytes(quantization_state(holder))


class Tokens(nn.Module):
    """A patch embedding, an MLP block of Linear layers with a residual, and a head: the frozen
    Linear layers are quantized, LoRA adapts them, the first runs without autograd (its input needs
    no gradient), the second inside bitsandbytes' autograd function."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.mlp = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2).contiguous()
        return self.head((self.mlp(tokens) + tokens).mean(1))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("step", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_lora_on_a_4bit_base_equals_the_measurement(quant_type: str, step: int) -> None:
    torch.manual_seed(0)
    model = Tokens()
    predicted = costmodel.predict(copy.deepcopy(model), "lora", rank=2, batch=2, resolution=8, step=step,
                                  quantize=quant_type)
    applied = apply_method(model, "lora", rank=2, quantize=quant_type)
    images, labels = make_batch(2, 8, 10)
    measured = measure_step(applied.model, applied.optimizer, images, labels, step)
    assert_matches(predicted, {"flops": measured.flops, "memory": measured.memory})
    assert predicted.total_params == applied.total_params
    quantized = [m for m in applied.model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    packed = 16 * 48 if quant_type == "int8" else 16 * 48 // 2  # int8: a byte a weight; 4-bit: two
    assert len(quantized) == 2 and math.prod(quantized[0].weight.shape) == packed


@pytest.mark.slow
def test_vit_tiny_on_a_4bit_base_equals_the_measurement() -> None:
    config = StepConfig(model="timm:vit_tiny_patch16_224", method="lora", batch=2, resolution=224, quantize="nf4")
    assert_matches(predict_config(config), measure(config, fake=False))


@pytest.mark.parametrize("argv, says", [
    (["--method", "fft", "--quantize", "nf4"], "does not train on a quantized base"),
    (["--method", "dora", "--quantize", "nf4"], "dora with --quantize"),
    (["--method", "lora", "--quantize", "nf4", "--dtype", "bf16"], "--quantize with --dtype bf16"),
    (["--method", "lora", "--quantize", "nf4", "--autocast", "bf16"], "node 'linear_4bit'"),
    (["--method", "lora", "--quantize", "int8", "--phase", "evaluate"], "--quantize int8 in an evaluation"),
    (["--method", "lora", "--quantize", "int8", "--accumulate", "2"], "--quantize int8 with --accumulate"),
    (["--method", "lora", "--quantize", "int3"], "--quantize"),
])
def test_what_a_4bit_base_does_not_model_is_refused_in_one_line(argv: list[str], says: str,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model", "timm:vit_tiny_patch16_224", "--batch", "1", "--resolution", "224",
                 *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]


def test_measure_fake_refuses_a_quantized_base() -> None:
    with pytest.raises(CostModelError, match="--quantize nf4 is measured with real tensors only"):
        measure(StepConfig(model="resnet18", method="lora", quantize="nf4"), fake=True)
    with pytest.raises(CostModelError, match="--quantize must be one of nf4, fp4, int8"):
        StepConfig(quantize="int4")


@pytest.mark.parametrize("quant_type", ["int8", "nf4"])
def test_a_checkpointed_quantized_layer_equals_the_measurement(quant_type: str) -> None:
    """int8's autograd function keeps its input as a ctx attribute, which a checkpoint does not
    drop and the backward does not release (``OpCost.kept_by_node``: it dies with the graph)."""
    from costmodel.models import checkpointed_modules
    from costmodel.validation.measure import wrap_checkpointed

    torch.manual_seed(0)
    model = Tokens()
    predicted = costmodel.predict(copy.deepcopy(model), "lora", rank=2, batch=2, resolution=8, quantize=quant_type,
                                  checkpoint="mlp")
    checkpointed = checkpointed_modules(model, "mlp")
    applied = apply_method(model, "lora", rank=2, quantize=quant_type)
    wrap_checkpointed(applied.model, checkpointed)
    images, labels = make_batch(2, 8, 10)
    measured = measure_step(applied.model, applied.optimizer, images, labels, 2)
    assert_matches(predicted, {"flops": measured.flops, "memory": measured.memory})
