"""``F.scaled_dot_product_attention`` on CPU (``costmodel.plugins.attention``): the flash kernel's
FLOPs and memory, the layout its output keeps (shape propagation's ``costmodel_meta_function``),
held against live measurements of timm's attention pattern, and the configurations it declines."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import costmodel
from costmodel.errors import CostModelError
from costmodel.plugins.attention import flash_attention_for_cpu, sdpa_backward_flops, sdpa_forward_flops
from costmodel.validation.flops import count_flops
from engine_live import assert_matches, measure_module

HEADS, DIM = 3, 12


class Attention(nn.Module):
    """timm's ``Attention`` (fused path) behind a patch embedding: ``qkv`` projection, the
    ``permute(2, 0, 3, 1, 4).unbind(0)`` split, SDPA, ``transpose(1, 2).reshape``, projection."""

    def __init__(self, causal: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, DIM, 4, stride=4)
        self.token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, 10)
        self.causal, self.dropout = causal, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, C), a transposed layout
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)  # timm's class token: contiguous
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=self.causal)
        y = self.proj(y.transpose(1, 2).reshape(b, n, c))
        return self.head((x + y).mean(1))


@pytest.mark.parametrize("phase", ["train", "evaluate"])
@pytest.mark.parametrize("resolution", [8, 16])
def test_timm_style_attention_equals_live_measurements(phase: str, resolution: int) -> None:
    measured = measure_module(Attention, batch=2, resolution=resolution, phase=phase, fake=False)
    assert_matches(costmodel.predict(Attention(), "fft", batch=2, resolution=resolution, phase=phase), measured)


def test_the_prediction_keeps_the_kernels_layout() -> None:
    """The CPU flash kernel's output keeps a permuted query's (B, L, H, d) order, so the reshape
    after ``transpose(1, 2)`` is a view; on the meta device the composite's math path would give a
    contiguous output and a copy there. The replacement matches the real kernel's strides."""
    x = torch.randn(2, 5, 3 * DIM)
    real = F.scaled_dot_product_attention(*x.reshape(2, 5, 3, HEADS, 4).permute(2, 0, 3, 1, 4).unbind(0))
    meta = x.to("meta").reshape(2, 5, 3, HEADS, 4).permute(2, 0, 3, 1, 4).unbind(0)
    assert flash_attention_for_cpu(*meta).stride() == real.stride()
    assert F.scaled_dot_product_attention(*meta).stride() != real.stride()  # why the hook exists


def test_the_exact_formulas_are_the_references() -> None:
    q, k = torch.randn(2, HEADS, 7, 4, requires_grad=True), torch.randn(2, HEADS, 5, 4, requires_grad=True)
    v = torch.randn(2, HEADS, 5, 4, requires_grad=True)
    out = []
    assert count_flops(lambda: out.append(F.scaled_dot_product_attention(q, k, v)), "exact") == \
        sdpa_forward_flops(2 * HEADS, 7, 5, 4)
    assert count_flops(lambda: out[0].backward(torch.ones_like(out[0])), "exact") == \
        sdpa_backward_flops(2 * HEADS, 7, 5, 4)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v), "torch") == 0
    assert sdpa_forward_flops(1, 1, 1, 1) == 4 + 5 + 1 + 2 and math.isclose(sdpa_backward_flops(1, 1, 1, 1), 18)


@pytest.mark.parametrize("changes", [{"causal": True}, {"dropout": 0.1}], ids=["causal", "dropout"])
def test_what_the_rule_does_not_cover_is_refused_naming_the_node(changes: dict) -> None:
    with pytest.raises(CostModelError, match="scaled_dot_product_attention"):
        costmodel.predict(Attention(**changes), "fft", batch=2, resolution=8)


def test_a_projection_of_a_non_contiguous_input_is_refused_not_mispredicted() -> None:
    """``nn.Linear`` on ``x.transpose(1, 2)`` (3-d, non-contiguous) copies its input before the
    product, a timeline the linear rule does not model: refused naming the node, where it was
    silently one tensor short."""

    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.fc = nn.Conv2d(3, DIM, 4, stride=4), nn.Linear(DIM, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.embed(x).flatten(2).transpose(1, 2)).mean(1)

    with pytest.raises(CostModelError, match="fc"):
        costmodel.predict(Transposed(), "fft", batch=2, resolution=8)


class AttentionThenMlpBlock(nn.Module):
    """``x + proj(sdpa(qkv(x)))`` then ``x + fc2(gelu(fc1(x)))``: a ViT block without its norms."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(F.gelu(self.fc1(x)))


class AttentionThenMlp(nn.Module):
    """Two such blocks behind a patch embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, DIM, 4, stride=4)
        self.blocks = nn.Sequential(AttentionThenMlpBlock(), AttentionThenMlpBlock())
        self.head = nn.Linear(DIM, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2).contiguous()
        return self.head(self.blocks(x).mean(1))


@pytest.mark.parametrize("checkpoint, accumulate", [("blocks.*", 1), ("", 2)])
def test_attention_blocks_checkpointed_or_accumulated_equal_live_measurements(checkpoint: str, accumulate: int) -> None:
    measured = measure_module(AttentionThenMlp, batch=2, resolution=16, checkpoint=checkpoint, accumulate=accumulate,
                              fake=False)
    assert_matches(costmodel.predict(AttentionThenMlp(), "fft", batch=2, resolution=16, checkpoint=checkpoint,
                                     accumulate=accumulate), measured)


def test_attention_blocks_checkpointed_and_accumulated_equal_live_measurements() -> None:
    """Both together: the step's peak is the last block's fc2 backward while that block is
    recomputed in the second micro-batch. autograd reduces fc2's broadcast bias gradient after the
    node's apply, when the recomputed saved input the apply unpacked is already gone
    (``OpCost.late_param_grads``; an ordinary saved input is released only after the reduction)."""
    measured = measure_module(AttentionThenMlp, batch=2, resolution=16, checkpoint="blocks.*", accumulate=2, fake=False)
    assert_matches(costmodel.predict(AttentionThenMlp(), "fft", batch=2, resolution=16, checkpoint="blocks.*",
                                     accumulate=2), measured)
