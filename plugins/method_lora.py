"""LoRA and DoRA as the pinned peft 0.21.2 applies them, mirrored op for op on the meta device.

The plugin swaps each target layer for an adapter module whose ``forward`` issues the same aten
ops, in the same order, with the same tensors kept alive, as peft's ``lora.Conv2d`` /
``lora.Linear`` in training mode with ``lora_dropout=0`` (the reference configuration). The
adapters are *not* tracer leaves: torch.fx traces through them, so every op is costed by the
ordinary op plugins (conv, linear, element-wise, shape) exactly as in the base model; the few ops
only DoRA issues (detach, the 2-norm, division by the norm, ``eye``) are costed in ``dora_ops``.

What peft 0.21.2 runs (``tuners/lora/layer.py``, ``variants.py``, ``dora.py``), checked on this
machine with a logging ``TorchDispatchMode``, ``saved_tensors_hooks`` and ``FlopCounterMode`` on
single ``Conv2d(16, 32, 3, stride=2, padding=1)`` and ``Linear(24, 40)`` layers at r = 1 and 4:

LoRA, ``Conv2d(C_in, C_out, k, stride, padding, groups=g)`` at rank ``r``, scaling ``alpha / r``:

- parameters: the frozen base weight (and bias), ``lora_A.default.weight`` of shape
  ``(r, C_in, *k)`` (a *dense* convolution with the base layer's kernel, stride and padding, no
  bias, no dilation, no groups) and ``lora_B.default.weight`` of shape ``(C_out, r / g, 1, 1)``
  (a 1x1 convolution with the base layer's ``groups``), in that ``named_parameters`` order;
- forward: ``result = base_layer(x)``; ``lora_B(lora_A(x))``; ``* scaling`` (an ``aten.mul``
  even when the scaling is 1.0, allocating a new tensor); ``result + ...`` (a new tensor). With
  ``lora_dropout=0`` the dropout is ``nn.Identity`` (no op); the dtype casts are no-ops in fp32;
- autograd saves: the base conv's input and (frozen) weight - the input only if it requires grad
  (the model's first layer records nothing for its base conv); ``lora_A``'s input and weight;
  ``lora_B``'s input (the r-channel activation) and weight; the two scalar/elementwise ops save
  nothing;
- backward: ``mul`` by the scaling (a new tensor), ``lora_B`` and ``lora_A`` weight and input
  gradients, the base conv's *input* gradient only (``output_mask = [True, False, False]``), and an
  ``add`` accumulating the two gradients of ``x`` (base path and adapter path).

For ``nn.Linear`` the same with ``lora_A = Linear(in, r, bias=False)`` and
``lora_B = Linear(r, out, bias=False)``.

DoRA (``use_dora=True``) adds ``lora_magnitude_vector.default.weight`` (shape ``(1, C_out, 1, 1)``
for a conv, ``(out,)`` for a Linear) and, after the base layer (whose result it reuses because the
dropout is the identity), runs in ``DoraConv2dLayer.forward``:

1. ``lora_weight = mm(lora_B.weight.view(-1, r), lora_A.weight.view(r, -1))`` reshaped to the base
   weight's shape: an ``mm`` of ``(C_out/g) x r`` by ``r x (C_in*kh*kw)``, ``2 (C_out/g) r C_in kh kw``
   FLOPs in both conventions (for ``g > 1`` peft's view pairs rows and columns oddly, but the
   shapes are what they are). Its result only ever feeds ``detach()``, so its backward never runs;
   but the Python local ``lora_weight`` keeps this weight-sized tensor alive until the DoRA forward
   returns;
2. ``weight_norm = (W + scaling * lora_weight.detach()).norm(p=2, dim=(1, 2, 3), keepdim=True)
   .transpose(1, 0)`` then ``.detach()``: a ``mul`` and an ``add`` of weight size (the sum lives
   until the norm is taken), ``linalg_vector_norm`` to ``(C_out, 1, 1, 1)``;
3. ``mag_norm_scale = magnitude / weight_norm`` (autograd saves ``weight_norm``);
4. if the base layer has a bias: ``base_result = result - bias.view(1, -1, 1, 1)`` (a new tensor);
5. ``result_dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_B(lora_A(x)) *
   scaling``: the broadcasting ``mul`` ops save their full-size operands (``base_result`` and the
   ``lora_B`` output) for the magnitude's gradient;
6. the function returns (``lora_weight`` is freed), then ``result + result_dora``.

For a Linear, ``lora_weight = lora_B(lora_A(eye(in))).T``: ``eye`` (in x in), two ``mm`` and a
transposed view; autograd saves ``eye`` and the ``(in, r)`` product, kept alive with
``lora_weight`` until the DoRA forward returns; the norm is ``linalg.norm(W', dim=1)`` and the
scale is viewed as ``(1, out)``.

The mirror computes step 1 (and the Linear's ``eye`` products) from detached weights: the same
ops, FLOPs and bytes, and - as in peft, where the result is detached before use - no backward.
Its ``dora`` method has the scope of peft's DoRA layer ``forward``: the engine follows the
Python locals of traced model code, so ``lora_weight`` (and the Linear's ``eye`` products, which
peft's autograd graph of ``lora_weight`` holds) die exactly where peft's do, when ``dora``
returns and before ``result + result_dora``.

One DoRA case is refused (``refuse_body_linear_dora``): a Linear outside the head, whose eye
products the reference's tracker keeps alive until Python's garbage collector runs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from costmodel.config import TRAINING, StepConfig
from costmodel.costs import MethodOptions, OptionSpec, PreparedMethod
from costmodel.errors import CostModelError
from costmodel.hookspecs import hookimpl
from costmodel.plugins.method_fft import optimizer_group, trainable_metas
from costmodel.plugins.quantized import Linear4bit, quantize_frozen_linears
from costmodel.plugins.method_targets import TARGET_OPTIONS, Target, head_module_names, replace_module, select_targets

METHODS: tuple[str, ...] = ("lora", "dora")
# Both take the adapter rank, peft's lora_alpha (the CLI's --alpha; absent: alpha = rank, the
# reference configuration, so the scaling alpha / rank is 1 at every rank) and every
# layer-selection option (method_targets).
ARGUMENTS = MethodOptions(takes_rank=True, options={
    "alpha": OptionSpec("float", "peft's lora_alpha: the adapters' scaling is alpha / rank (default: the rank)"),
    **TARGET_OPTIONS,
})
ADAPTER = "default"  # peft's adapter name: parameters are named lora_A.default.weight etc.


class DoraMagnitude(nn.Module):
    """peft's ``DoraConv2dLayer`` / ``DoraLinearLayer``: holds the trainable magnitude ``weight``."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))


class _LoraLayer(nn.Module):
    """What peft 0.21.2's ``lora.Conv2d`` and ``lora.Linear`` share in training mode with dropout 0:
    the frozen base layer, ``lora_B(lora_A(x)) * alpha / rank`` added to its result, and, for DoRA,
    the magnitude vector. Modules register in peft's order, so parameters come in peft's order."""

    def __init__(self, base_layer: nn.Module, lora_A: nn.Module, lora_B: nn.Module,
                 magnitude_shape: tuple[int, ...], rank: int, alpha: float, use_dora: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict({ADAPTER: lora_A})
        self.lora_B = nn.ModuleDict({ADAPTER: lora_B})
        self.lora_magnitude_vector = nn.ModuleDict()
        if use_dora:
            weight = base_layer.weight
            self.lora_magnitude_vector[ADAPTER] = DoraMagnitude(magnitude_shape, weight.device, weight.dtype)
        self.scaling = alpha / rank
        self.use_dora = use_dora
        self.has_bias = base_layer.bias is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        result_dtype = result.dtype
        # peft's ``_cast_input_dtype``: the input in the adapter's dtype (a copy under autocast,
        # where the base layer's result is in the lower precision but the adapters stay float32;
        # the tensor itself otherwise), and the sum back in the base result's dtype.
        x = x.to(self.lora_A[ADAPTER].weight.dtype)
        if not self.use_dora:
            return (result + self.lora_B[ADAPTER](self.lora_A[ADAPTER](x)) * self.scaling).to(result_dtype)
        return (result + self.dora(x, result)).to(result_dtype)

    def dora(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class LoraConv2d(_LoraLayer):
    """peft 0.21.2 ``lora.Conv2d`` (and its DoRA variant) in training mode, dropout 0."""

    def __init__(self, base_layer: nn.Conv2d, rank: int, alpha: float, use_dora: bool) -> None:
        device, dtype = base_layer.weight.device, base_layer.weight.dtype
        # peft builds both adapters with the base layer's own class (``type(base_layer)``): a conv
        # subclass (timm's Conv2dSame, which pads by its input's size) adapts with its own forward.
        conv_layer = type(base_layer)
        with torch.device(device):
            lora_A = conv_layer(base_layer.in_channels, rank, base_layer.kernel_size, base_layer.stride,
                                base_layer.padding, bias=False).to(dtype=dtype)
            lora_B = conv_layer(rank, base_layer.out_channels, 1, 1, groups=base_layer.groups,
                                bias=False).to(dtype=dtype)
        super().__init__(base_layer, lora_A, lora_B, (1, base_layer.out_channels, 1, 1), rank, alpha, use_dora)
        self.weight_shape = tuple(base_layer.weight.shape)

    def dora(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``_DoraConvNdLayer.forward`` with ``base_result=result`` (the dropout is the identity)."""
        lora_A, lora_B = self.lora_A[ADAPTER], self.lora_B[ADAPTER]
        weight = self.base_layer.weight
        # The rank read off the weight, as a traced size, so that the graph is the same at every rank.
        rank = lora_A.weight.shape[0]
        lora_weight = torch.mm(lora_B.weight.detach().view(-1, rank),
                               lora_A.weight.detach().view(rank, -1)).reshape(self.weight_shape)
        weight_norm = (weight + self.scaling * lora_weight.detach()).norm(
            p=2, dim=(1, 2, 3), keepdim=True).transpose(1, 0)
        weight_norm = weight_norm.detach()
        mag_norm_scale = self.lora_magnitude_vector[ADAPTER].weight / weight_norm
        base_result = result
        if self.has_bias:
            base_result = base_result - self.base_layer.bias.view(1, -1, 1, 1)
        result_dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_B(lora_A(x)) * self.scaling
        return result_dora


class LoraLinear(_LoraLayer):
    """peft 0.21.2 ``lora.Linear`` (and its DoRA variant) in training mode, dropout 0."""

    def __init__(self, base_layer: nn.Linear | Linear4bit, rank: int, alpha: float, use_dora: bool) -> None:
        device, dtype = base_layer.weight.device, base_layer.weight.dtype
        if not dtype.is_floating_point:  # a quantized base: peft leaves the adapters in float32
            dtype = torch.float32
        lora_A = nn.Linear(base_layer.in_features, rank, bias=False, device=device, dtype=dtype)
        lora_B = nn.Linear(rank, base_layer.out_features, bias=False, device=device, dtype=dtype)
        super().__init__(base_layer, lora_A, lora_B, (base_layer.out_features,), rank, alpha, use_dora)

    def dora(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``DoraLinearLayer.forward`` with ``base_result=result`` (the dropout is the identity)."""
        lora_A, lora_B = self.lora_A[ADAPTER], self.lora_B[ADAPTER]
        # As peft writes it: the size, device and dtype read off the weight make fx record the call
        # (a call without traced arguments would be folded into a constant).
        x_eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=lora_A.weight.dtype)
        eye_a = F.linear(x_eye, lora_A.weight.detach())
        lora_weight = F.linear(eye_a, lora_B.weight.detach()).t()
        weight = self.base_layer.weight
        weight_norm = torch.linalg.norm(weight + self.scaling * lora_weight.detach(), dim=1)
        weight_norm = weight_norm.detach()
        mag_norm_scale = (self.lora_magnitude_vector[ADAPTER].weight / weight_norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        base_result = result
        if self.has_bias:
            base_result = base_result - self.base_layer.bias
        result_dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * self.scaling
        return result_dora


def refuse_body_linear_dora(targets: list[Target], head: set[str]) -> None:
    """Refuse DoRA on an ``nn.Linear`` outside the classification head: its reference memory is not
    a function of the configuration.

    peft's ``get_lora_weight`` calls the *modules* ``lora_B(lora_A(eye))``. Under the reference's
    MemTracker, ModTracker's forward pre-hook registers a ``register_multi_grad_hook`` on
    ``lora_A``'s output whose closure holds that output's ``grad_fn``, and the hook is stored on
    that same ``grad_fn``: a reference cycle that keeps the ``MmBackward`` nodes - and the
    ``eye(in)`` and ``(in, r)`` tensors they saved - alive after ``lora_weight`` dies, until
    Python's cyclic garbage collector happens to run (checked with weak references: freed at once
    without the tracker, freed only by ``gc.collect()`` under it). That graph never runs backward,
    so nothing else frees them. In the head only small activations follow, and the measured
    figures have stayed exact (resnet18 ``fc``, mobilenet_v3_small's classifier); in the body
    (ConvNeXt's block Linears, GoogLeNet's auxiliary heads) every later activation piles on top of
    an unknown number of uncollected identity matrices (convnext_tiny at B=2, R=64: ACT measured
    +182 MB). The conv DoRA mirror is unaffected: its ``mm`` runs on detached weights, no module.
    """
    for target in targets:
        if isinstance(target.module, nn.Linear) and target.name not in head:
            n = target.module.in_features
            raise CostModelError(
                f"dora: DoRA on the Linear layer {target.name!r} outside the head is not predicted: the "
                f"reference keeps its eye({n}) and {n}x{target.rank} products alive until Python's garbage "
                f"collector runs, so its measured ACT and peak depend on collection timing")


def apply_adapters(model: nn.Module, config: StepConfig, use_dora: bool) -> tuple[list[Target], int]:
    """Freeze ``model`` and wrap its target layers in adapters, as ``inject_adapter_in_model`` does.

    Every base parameter is frozen; the head stays fully trainable unless ``adapt_head``; with
    ``config.quantize`` the frozen Linear layers outside the head are stored in 4 bits first
    (``costmodel.plugins.quantized``). Returns the targets (name, module, rank, alpha) in model
    order, and how many layers were quantized. ``config.options`` are as the engine
    coerced them against ``ARGUMENTS`` (``adapt_head`` a real bool, not the string "False").
    """
    method = "dora" if use_dora else "lora"
    alpha = float(config.options.get("alpha", config.rank))  # absent: alpha = rank
    targets = select_targets(model, config.rank, alpha, config.options, grouped="divisible")
    if not targets:
        raise CostModelError(f"{method}: the model {config.model!r} has no layer to adapt")
    head = head_module_names(model)
    if use_dora:
        refuse_body_linear_dora(targets, head)
    trainable_head = set() if config.options.get("adapt_head") else head
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(name in trainable_head)
    quantized = 0
    if config.quantize:  # the frozen base's Linear layers, before the adapters wrap some of them
        quantized = quantize_frozen_linears(model, config.quantize, keep=trainable_head)
    for target in targets:
        base = model.get_submodule(target.name)
        wrapper = LoraConv2d if isinstance(base, nn.Conv2d) else LoraLinear
        replace_module(model, target.name, wrapper(base, target.rank, target.alpha, use_dora))
    return targets, quantized


@hookimpl
def costmodel_method_names() -> list[str]:
    return list(METHODS)


@hookimpl
def costmodel_method_options(name: str) -> MethodOptions | None:
    return ARGUMENTS if name in METHODS else None


@hookimpl
def costmodel_prepare_method(name: str, model: nn.Module, config: StepConfig) -> PreparedMethod | None:
    if name not in METHODS:
        return None
    if config.quantize and config.dtype != "fp32":
        raise CostModelError(f"--quantize with --dtype {config.dtype}: bitsandbytes' Linear4bit then casts its input to "
                             f"its float32 compute dtype and back, which is not modelled; quantize a float32 step")
    if config.quantize == "int8" and config.phase != TRAINING:
        raise CostModelError("--quantize int8 in an evaluation: bitsandbytes' Linear8bitLt then takes its int8 "
                             "inference path (MatMul8bitLt), which is not modelled; predict the training step")
    if config.quantize == "int8" and config.accumulate > 1:
        # Measured: the previous micro-batch's graph, whose int8 nodes keep their inputs as ctx
        # attributes, is still alive in the next micro-batch's backward (2.7 MB over the
        # prediction on ViT-Tiny at B=2); the engine frees it when the next forward returns.
        raise CostModelError("--quantize int8 with --accumulate: the previous micro-batch's graph, whose int8 layers "
                             "keep their inputs, outlives the next forward in a way the engine does not model; "
                             "use nf4 or fp4, or one micro-batch")
    if name == "dora" and config.quantize:
        raise CostModelError("dora with --quantize: DoRA's weight norm reads the base weight, which peft dequantizes "
                             "on a 4-bit base; not modelled: use lora")
    if name == "dora" and config.autocast:
        # peft's DoRA computes lora_B.weight @ lora_A.weight with gradients on: under autocast that
        # product saves bf16/fp16 casts of both weights, kept by an autograd graph that no backward
        # ever runs and that dies with the product when the DoRA forward returns. The engine frees
        # saved tensors at a node's backward only, so it would predict them gone: refused.
        raise CostModelError("dora with --autocast: peft's DoRA keeps autocast's casts of its adapter weights alive "
                             "through an autograd graph that never runs backward, which the engine does not model; "
                             "use lora, or dora without --autocast")
    targets, quantized = apply_adapters(model, config, use_dora=name == "dora")
    ranks = sorted({t.rank for t in targets})
    group = optimizer_group(trainable_metas(model), config)
    # Every adapter's size follows the rank, and its scaling alpha / rank does not (alpha = rank):
    # unless a pattern pins some layers' rank or alpha, or a grouped convolution accepts only some
    # ranks.
    options = config.options
    affine = ("alpha" not in options and not options.get("rank_pattern") and not options.get("alpha_pattern")
              and not options.get("include_grouped") and all(getattr(t.module, "groups", 1) == 1 for t in targets))
    return PreparedMethod(
        param_groups=[group],
        note=f"{name}: {len(targets)} adapted layers (rank {', '.join(map(str, ranks))}); "
             f"{config.optimizer} over {sum(p.numel for p in group.params):,} trainable parameters"
             + (f"; {quantized} frozen Linear layers in {config.quantize}" if config.quantize else ""),
        affine_in_rank=affine, quantized=bool(config.quantize))
