"""Property: on any small CNN built from the op families the plugins cover, the prediction equals a
live measurement of the same step (``engine_live.assert_matches``).

Hypothesis draws a network as plain data (a ``NetSpec``: a stem, a few blocks, a head) together with
the batch, resolution, method and step, so a failing example prints as a readable spec and shrinks to
the smallest network that disagrees. The blocks: convolutions with random kernel, stride, padding and
groups (depthwise included), with or without bias; batch norm; ReLU/ReLU6/Hardswish/Hardsigmoid in
place or not; residual adds (``out = out + identity`` and in-place ``out += identity``, with a strided
1x1 projection where shapes change); a squeeze-excitation style ``x * gate``; max and adaptive average
pooling; dropout; group norm and channels-last layer norm with smooth activations (GELU exact and
tanh, SiLU, sigmoid, tanh); a self-attention block over the pixels as tokens (layer norm, a qkv
Linear, ``F.scaled_dot_product_attention``, a projection, a residual); channel shuffle; stochastic
depth on a residual branch; one convolution applied twice (a shared weight); and a head reached
through one of several flattening spellings, with or without auxiliary logits.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from math import gcd

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from costmodel.prediction import predict
from engine_live import assert_matches, measure_module

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid}
CHANNELS = (2, 4, 6, 8)


@dataclass(frozen=True)
class Act:
    kind: str
    inplace: bool

    def build(self) -> nn.Module:
        return ACTIVATIONS[self.kind](inplace=self.inplace)


@dataclass(frozen=True)
class ConvSpec:
    """Conv2d(c_in, c_out, kernel, stride, padding, groups, bias), then optional BN, then optional act."""

    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    groups: int
    bias: bool
    bn: bool
    act: Act | None

    def build(self) -> nn.Sequential:
        layers: list[nn.Module] = [nn.Conv2d(self.c_in, self.c_out, self.kernel, self.stride, self.padding,
                                             groups=self.groups, bias=self.bias)]
        if self.bn:
            layers.append(nn.BatchNorm2d(self.c_out))
        if self.act is not None:
            layers.append(self.act.build())
        return nn.Sequential(*layers)


@dataclass(frozen=True)
class ResidualSpec:
    """``out = branch(x)``; ``out = out + identity`` or ``out += identity`` with identity ``x`` or a
    strided 1x1 conv + BN projection of it; then an optional activation."""

    branch: ConvSpec
    project: bool
    inplace_add: bool
    post_act: Act | None


@dataclass(frozen=True)
class GateSpec:
    """Squeeze-excitation: ``x * hardsigmoid(conv(relu(conv(avgpool(x)))))``."""

    channels: int
    squeeze: int
    gate: str


@dataclass(frozen=True)
class PoolSpec:
    kind: str  # "max" (kernel, stride, padding) or "adaptive" (output size in kernel)
    kernel: int
    stride: int
    padding: int


@dataclass(frozen=True)
class DropoutSpec:
    p: float
    inplace: bool


SMOOTH: dict[str, nn.Module | None] = {
    "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(), "sigmoid": nn.Sigmoid(),
    "tanh": nn.Tanh(), "none": None}


@dataclass(frozen=True)
class NormSpec:
    """``GroupNorm(groups, C)``, or ConvNeXt's channels-last ``LayerNorm(C)`` between two permutes;
    then a smooth activation (or none)."""

    kind: str  # "group" or "layer"
    channels: int
    groups: int
    act: str


@dataclass(frozen=True)
class AttentionSpec:
    """The pixels as tokens: ``x + proj(sdpa(qkv(layer_norm(x))))``, back to an image."""

    channels: int
    heads: int


@dataclass(frozen=True)
class ShuffleSpec:
    channels: int
    groups: int


@dataclass(frozen=True)
class DropPathSpec:
    """``x + StochasticDepth(p, mode)(branch(x))``, the branch keeping the shape."""

    branch: ConvSpec
    p: float
    mode: str


@dataclass(frozen=True)
class SharedSpec:
    """One 3x3 convolution applied twice, an activation between: a weight used by two nodes."""

    channels: int
    act: Act | None


@dataclass(frozen=True)
class HeadSpec:
    name: str  # "fc" (a Linear) or "classifier" (a Sequential)
    pool: int  # AdaptiveAvgPool2d output size before flattening
    flatten: str  # "torch.flatten", "method", "module", "view"
    dropout: DropoutSpec | None
    hidden: int | None  # classifier only: Linear, Hardswish, then the last Linear
    features: int
    classes: int
    aux: bool = False  # auxiliary logits too (a Linear of their own): the output has .logits, .aux_logits


@dataclass(frozen=True)
class NetSpec:
    blocks: tuple[ConvSpec | ResidualSpec | GateSpec | PoolSpec | DropoutSpec | NormSpec | AttentionSpec
                  | ShuffleSpec | DropPathSpec | SharedSpec, ...]
    head: HeadSpec


class Residual(nn.Module):
    def __init__(self, spec: ResidualSpec) -> None:
        super().__init__()
        self.inplace_add = spec.inplace_add
        self.branch = spec.branch.build()
        b = spec.branch
        # Without a projection an nn.Identity() stands in, called on the block input before the
        # branch runs (property_findings.md, F2: it makes no autograd node).
        self.project = (nn.Sequential(nn.Conv2d(b.c_in, b.c_out, 1, b.stride, bias=False), nn.BatchNorm2d(b.c_out))
                        if spec.project else nn.Identity())
        self.post = spec.post_act.build() if spec.post_act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.project(x)
        out = self.branch(x)
        if self.inplace_add:
            out += identity
        else:
            out = out + identity
        return self.post(out)


class Gate(nn.Module):
    def __init__(self, spec: GateSpec) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.squeeze = nn.Conv2d(spec.channels, spec.squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.excite = nn.Conv2d(spec.squeeze, spec.channels, 1)
        self.gate = ACTIVATIONS[spec.gate]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate(self.excite(self.relu(self.squeeze(self.pool(x)))))
        return x * gate


class Norm(nn.Module):
    def __init__(self, spec: NormSpec) -> None:
        super().__init__()
        self.channels_last = spec.kind == "layer"
        self.norm = nn.LayerNorm(spec.channels) if self.channels_last else nn.GroupNorm(spec.groups, spec.channels)
        act = SMOOTH[spec.act]
        self.act = nn.Identity() if act is None else type(act)(**({"approximate": act.approximate}
                                                                  if isinstance(act, nn.GELU) else {}))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        else:
            x = self.norm(x)
        return self.act(x)


class Attention(nn.Module):
    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__()
        self.heads = spec.heads
        self.norm = nn.LayerNorm(spec.channels)
        self.qkv = nn.Linear(spec.channels, 3 * spec.channels)
        self.proj = nn.Linear(spec.channels, spec.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2).contiguous()
        qkv = self.qkv(self.norm(tokens)).reshape(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        tokens = tokens + self.proj(attended)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class Shuffle(nn.Module):
    def __init__(self, spec: ShuffleSpec) -> None:
        super().__init__()
        self.groups = spec.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size()
        x = x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous()
        return x.view(b, c, h, w)


class DropPath(nn.Module):
    def __init__(self, spec: DropPathSpec) -> None:
        super().__init__()
        self.branch = spec.branch.build()
        self.drop = StochasticDepth(spec.p, spec.mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.branch(x))


class Shared(nn.Module):
    def __init__(self, spec: SharedSpec) -> None:
        super().__init__()
        self.conv = nn.Conv2d(spec.channels, spec.channels, 3, padding=1)
        self.act = spec.act.build() if spec.act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.conv(x)))


Output = namedtuple("Output", ["logits", "aux_logits"])


class RandomNet(nn.Module):
    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.head_spec = spec.head
        self.features = nn.Sequential(*(build_block(b) for b in spec.blocks))
        head = spec.head
        self.pool = nn.AdaptiveAvgPool2d(head.pool)
        self.flatten = nn.Flatten() if head.flatten == "module" else nn.Identity()
        if head.aux:  # registered before the head, which stays the last child holding parameters
            self.aux = nn.Linear(head.features, head.classes)
        drop = nn.Dropout(head.dropout.p, head.dropout.inplace) if head.dropout is not None else nn.Identity()
        if head.name == "fc":
            self.drop = drop
            self.fc = nn.Linear(head.features, head.classes)
        else:
            layers: list[nn.Module] = []
            width = head.features
            if head.hidden is not None:
                layers += [nn.Linear(width, head.hidden), nn.Hardswish(inplace=True)]
                width = head.hidden
            self.classifier = nn.Sequential(*layers, drop, nn.Linear(width, head.classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        style = self.head_spec.flatten
        if style == "torch.flatten":
            x = torch.flatten(x, 1)
        elif style == "method":
            x = x.flatten(1)
        elif style == "view":
            x = x.view(x.size(0), -1)
        else:
            x = self.flatten(x)
        logits = self.fc(self.drop(x)) if self.head_spec.name == "fc" else self.classifier(x)
        return Output(logits, self.aux(x)) if self.head_spec.aux else logits


def build_block(spec) -> nn.Module:
    if isinstance(spec, ConvSpec):
        return spec.build()
    if isinstance(spec, ResidualSpec):
        return Residual(spec)
    if isinstance(spec, GateSpec):
        return Gate(spec)
    for kind, module in ((NormSpec, Norm), (AttentionSpec, Attention), (ShuffleSpec, Shuffle),
                         (DropPathSpec, DropPath), (SharedSpec, Shared)):
        if isinstance(spec, kind):
            return module(spec)
    if isinstance(spec, PoolSpec):
        return nn.MaxPool2d(spec.kernel, spec.stride, spec.padding) if spec.kind == "max" else nn.AdaptiveAvgPool2d(spec.kernel)
    return nn.Dropout(spec.p, spec.inplace)


# ----------------------------------------------------------------------------------- strategies


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


acts = st.builds(Act, st.sampled_from(sorted(ACTIVATIONS)), st.booleans())
optional_acts = st.none() | acts


@st.composite
def conv_specs(draw, c_in: int, size: int, *, same_shape: bool = False) -> tuple[ConvSpec, int]:
    """A convolution over ``c_in`` channels of ``size`` x ``size`` and the size it produces. With
    ``same_shape`` (a residual branch without projection) it keeps channels and size."""
    c_out = c_in if same_shape else draw(st.sampled_from(CHANNELS))
    kernel = draw(st.sampled_from((1, 3) if same_shape else (1, 2, 3, 5)))
    stride = 1 if same_shape else draw(st.sampled_from((1, 2)))
    padding = kernel // 2 if same_shape else draw(st.integers(0, kernel // 2))
    if size + 2 * padding < kernel:
        kernel, padding = 1, 0
    divisors = [g for g in range(1, gcd(c_in, c_out) + 1) if c_in % g == 0 and c_out % g == 0]
    groups = draw(st.sampled_from(divisors))  # gcd == c_in == c_out: depthwise
    spec = ConvSpec(c_in, c_out, kernel, stride, padding, groups, draw(st.booleans()), draw(st.booleans()),
                    draw(optional_acts))
    return spec, conv_out(size, kernel, stride, padding)


@st.composite
def residual_specs(draw, channels: int, size: int) -> tuple[ResidualSpec, int, int]:
    project = draw(st.booleans())
    if project:
        branch, out_size = draw(conv_specs(channels, size))
        if branch.kernel // 2 != branch.padding or (branch.kernel % 2 == 0):  # projection must match shapes
            k = draw(st.sampled_from((1, 3)))
            branch = ConvSpec(branch.c_in, branch.c_out, k, branch.stride, k // 2, branch.groups, branch.bias,
                              branch.bn, branch.act)
            out_size = conv_out(size, k, branch.stride, k // 2)
    else:
        branch, out_size = draw(conv_specs(channels, size, same_shape=True))
    # ReLU's backward reads its output, so autograd refuses an in-place add onto it (PyTorch, not us).
    inplace_ok = branch.act is None or branch.act.kind != "relu"
    inplace_add = inplace_ok and draw(st.booleans())
    return ResidualSpec(branch, project, inplace_add, draw(optional_acts)), branch.c_out, out_size


@st.composite
def pool_specs(draw, size: int) -> tuple[PoolSpec, int]:
    if draw(st.booleans()):
        kernel = draw(st.sampled_from((2, 3)))
        stride = draw(st.sampled_from((1, 2)))
        padding = draw(st.integers(0, kernel // 2))
        if size + 2 * padding < kernel:
            return PoolSpec("adaptive", 1, 1, 0), 1
        return PoolSpec("max", kernel, stride, padding), conv_out(size, kernel, stride, padding)
    # 1 x 1 runs as a mean; larger outputs run aten._adaptive_avg_pool2d with overlapping windows.
    out = draw(st.integers(1, min(3, size)))
    return PoolSpec("adaptive", out, 1, 0), out


def ends_in_relu(blocks: list) -> bool:
    """Whether the last block's output is a ReLU's, which ReLU's backward reads (no in-place op on it).
    Dropout with p = 0 hands its input through, so look past it."""
    block = blocks[-1]
    if isinstance(block, DropoutSpec):
        return block.p == 0 and ends_in_relu(blocks[:-1])
    act = block.act if isinstance(block, ConvSpec) else block.post_act if isinstance(block, ResidualSpec) else None
    return act is not None and act.kind == "relu"


dropouts = st.builds(DropoutSpec, st.sampled_from((0.0, 0.2, 0.5)), st.booleans())


@st.composite
def networks(draw) -> tuple[NetSpec, int, int]:
    resolution = draw(st.integers(8, 32))
    stem, size = draw(conv_specs(3, resolution))
    channels, blocks = stem.c_out, [stem]
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(("conv", "residual", "gate", "pool", "dropout", "norm", "attention", "shuffle",
                                     "droppath", "shared")))
        if kind == "conv":
            block, size = draw(conv_specs(channels, size))
            channels = block.c_out
        elif kind == "residual":
            block, channels, size = draw(residual_specs(channels, size))
        elif kind == "gate":
            block = GateSpec(channels, draw(st.sampled_from((1, 2, 4))), draw(st.sampled_from(("hardsigmoid", "relu6"))))
        elif kind == "pool":
            block, size = draw(pool_specs(size))
        elif kind == "dropout":
            block = draw(dropouts)
            if ends_in_relu(blocks):  # the same autograd rule as residual_specs' in-place add
                block = DropoutSpec(block.p, inplace=False)
        elif kind == "norm":
            groups = [g for g in (1, 2, channels) if channels % g == 0]
            block = NormSpec(draw(st.sampled_from(("group", "layer"))), channels, draw(st.sampled_from(groups)),
                             draw(st.sampled_from(sorted(SMOOTH))))
        elif kind == "attention":
            block = AttentionSpec(channels, draw(st.sampled_from([h for h in (1, 2) if channels % h == 0])))
        elif kind == "shuffle":
            block = ShuffleSpec(channels, 2)  # every width in CHANNELS is even
        elif kind == "droppath":
            branch, _ = draw(conv_specs(channels, size, same_shape=True))
            block = DropPathSpec(branch, draw(st.sampled_from((0.0, 0.3))), draw(st.sampled_from(("row", "batch"))))
        else:
            block = SharedSpec(channels, draw(optional_acts))
        blocks.append(block)
    name = draw(st.sampled_from(("fc", "classifier")))
    pool = draw(st.sampled_from((1, 2))) if size >= 2 else 1
    # An attention block or a channels-last layer norm hands on a channels-last layout (a permuted
    # view), which convolutions and pooling keep: ``x.view(n, -1)`` refuses it (in PyTorch too).
    channels_last = any(isinstance(b, AttentionSpec) or (isinstance(b, NormSpec) and b.kind == "layer")
                        for b in blocks)
    flattens = ("torch.flatten", "method", "module") + (() if channels_last else ("view",))
    head = HeadSpec(name, pool, draw(st.sampled_from(flattens)),
                    draw(st.none() | dropouts), draw(st.none() | st.sampled_from((4, 8))) if name == "classifier" else None,
                    channels * pool * pool, draw(st.integers(2, 10)), draw(st.booleans()))
    return NetSpec(tuple(blocks), head), resolution, draw(st.integers(2, 4))


steps = st.builds(lambda method, step: (method, step), st.sampled_from(("fft", "bn_head")), st.sampled_from((1, 2)))


def record_events(spec: NetSpec, method: str, step: int) -> None:  # noqa: D401
    """Label the constructs an example exercises (``--hypothesis-show-statistics`` tallies them)."""
    event(f"{method}, step {step}")
    for block in spec.blocks:
        conv = block.branch if isinstance(block, ResidualSpec) else block
        if isinstance(conv, ConvSpec) and conv.groups > 1:
            event("depthwise conv" if conv.groups == conv.c_in == conv.c_out else "grouped conv")
        if isinstance(block, ResidualSpec):
            event("residual += (in place)" if block.inplace_add else "residual + ")
        event(type(block).__name__)


def check(spec: NetSpec, resolution: int, batch: int, method: str, step: int) -> None:
    record_events(spec, method, step)
    head = spec.head.name
    predicted = predict(RandomNet(spec), method, batch=batch, resolution=resolution, classes=spec.head.classes,
                        step=step)
    trainable = (lambda name: True) if method == "fft" else (lambda name: name.startswith(head + "."))
    measured = measure_module(lambda: RandomNet(spec), trainable, batch=batch, resolution=resolution,
                              classes=spec.head.classes, step=step)
    assert_matches(predicted, measured)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), steps)
def test_random_network_matches_the_live_measurement(net, method_step):
    check(*net, *method_step)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), steps)
def test_random_network_matches_the_live_measurement_many(net, method_step):
    check(*net, *method_step)
