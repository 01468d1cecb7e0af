"""bitsandbytes 0.50.2's ``bnb.optim.AdamW8bit`` as it runs on CPU.

What runs (``bitsandbytes/optim/optimizer.py``, ``Optimizer2State``; ``backends/cpu/ops.py``):

- construction: two quantisation maps of 256 float32 values (``create_dynamic_map``, signed and
  unsigned), held by the optimizer from then on (``OptimizerCost.resident_bytes``: 2,048 bytes);
- the step loops over the parameters, creating each one's state just before its update (not all
  first, as torch's optimizers do). A parameter of at least ``min_8bit_size`` (4,096) elements
  keeps both moments in ``uint8`` (``n`` bytes each) with a float32 ``absmax`` per block of 256
  (``b = ceil(n / 256)``); a smaller one keeps two float32 moments. ``step`` is a Python int.
- an 8-bit parameter runs ``_optimizer_update_8bit_blockwise_cpu``: it dequantises both moments to
  float32 (two ``4n`` tensors, 1 FLOP per element each: ``code[q] * absmax``); ``grad = g.float() *
  gnorm_scale`` (a ``4n`` tensor, n FLOPs; a non-float32 gradient is first copied to float32, a
  ``4n`` temporary); ``p_fp32 = p.data.float()`` (the parameter itself when it is float32, else a
  ``4n`` copy); Adam on the float32 moments: ``mul_(b1).add_(grad, alpha=1-b1)`` (n + 2n),
  ``mul_(b2).addcmul_(grad, grad, value=1-b2)`` (n + 3n), ``denom = (sqrt / correction2).add_(eps)``
  (3n; the root is a ``4n`` temporary freed after the division, the quotient ``denom`` lives on),
  the decay ``p_fp32.mul_(1 - lr*wd)`` (n, when ``wd > 0``), ``p_fp32.addcdiv_(m, denom,
  value=-lr/correction1)`` (3n), ``p.data.copy_(p_fp32)`` (0); then each moment is quantised back
  (``quantize_blockwise``: ``11n`` FLOPs, docs/flop-convention.md; its ``uint8`` result and block
  maxima, ``n + 4b`` bytes, are copied into the state and freed). Every float32 copy dies as the
  function returns.
- a smaller parameter runs ``_optimizer_update_32bit_cpu``: ``g_float = g.float() * gnorm_scale``
  (as above), ``p.data.float()`` (as above), the moments' updates (3n + 4n), the decay (n),
  ``update = m / (v.sqrt() + eps * correction2)`` (3n; the root and the sum are ``4n`` temporaries
  freed as the next one exists, ``update`` lives on), ``p_float.add_(update, alpha=step_size)`` (2n),
  ``p.data.copy_(p_float)`` (0).

Every byte here is OPT. The coefficient rule (docs/flop-convention.md) applies to ``alpha`` and
``value``. The stock counter counts none of it. The CUDA kernel is fused and allocates none of the
float32 copies: this rule is the CPU's, where bitsandbytes runs here.
"""

from __future__ import annotations

from typing import Any

import torch

from costmodel.costs import Flops, MemEvent, OptimizerCost, ParamGroup, ParamMeta, amount
from costmodel.errors import CostModelError
from costmodel.authoring import optimizer_group
from costmodel.hookspecs import hookimpl

from .adamw import checked_optimizer_options

NAME = "adamw8bit"
DEFAULTS: dict[str, Any] = {
    "lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False, "optim_bits": 32,
    "min_8bit_size": 4096, "is_paged": False,
}
# bitsandbytes refuses amsgrad and any optim_bits but 32 (the state is 8-bit regardless); a paged
# optimizer falls back to plain buffers on CPU with a warning: refused rather than half-modelled.
MODELLED = {"amsgrad": False, "optim_bits": 32, "is_paged": False}
BLOCK = 256  # bitsandbytes' blocksize for the 8-bit moments
CODE_BYTES = 2 * 256 * 4  # the signed and unsigned dynamic maps, float32
FLOAT32 = 4
QUANTIZE_FLOPS = 11  # per element, docs/flop-convention.md ("bitsandbytes")


def options_of(group: ParamGroup) -> dict[str, Any]:
    options = checked_optimizer_options("AdamW8bit", group.options, DEFAULTS, MODELLED)
    if isinstance(options["min_8bit_size"], float) and not options["min_8bit_size"].is_integer():
        raise CostModelError(f"--optimizer-option min_8bit_size: AdamW8bit expects a whole number of elements, "
                             f"got {options['min_8bit_size']!r}")
    return options


def blocks(n: Any) -> Any:
    return -(-n // BLOCK)


def coefficient(value: float) -> int:
    """1 when a scalar coefficient costs a multiply per element (docs/flop-convention.md)."""
    return int(value != 1)


def float_copies(p: ParamMeta, events: list[MemEvent]) -> Any:
    """``g.float() * gnorm_scale`` and ``p.data.float()``: the bytes that live on (the scaled
    gradient, and a float32 copy of a parameter in another dtype); a gradient in another dtype is
    first copied to float32, a temporary freed once the product exists."""
    n4 = p.numel * FLOAT32
    converted = p.dtype != torch.float32
    if converted:
        events.append(MemEvent(n4, "OPT", f"{p.name}: g.float()"))
    events.append(MemEvent(n4, "OPT", f"{p.name}: g.float() * gnorm_scale"))
    if converted:
        events += [MemEvent(-n4, "OPT", "g.float() freed"), MemEvent(n4, "OPT", f"{p.name}: p.data.float()")]
    return n4 * (2 if converted else 1)


def update_8bit(p: ParamMeta, step: int, options: dict[str, Any], events: list[MemEvent]) -> Any:
    """``_optimizer_update_8bit_blockwise_cpu`` (module docstring): events, and its FLOPs."""
    n, n4, b4 = p.numel, p.numel * FLOAT32, blocks(p.numel) * FLOAT32
    beta1, beta2 = options["betas"]
    events += [MemEvent(n4, "OPT", f"{p.name}: dequantised exp_avg"), MemEvent(n4, "OPT", f"{p.name}: dequantised exp_avg_sq")]
    live = 2 * n4 + float_copies(p, events)
    events += [MemEvent(n4, "OPT", f"{p.name}: exp_avg_sq.sqrt()"), MemEvent(n4, "OPT", f"{p.name}: / correction2"),
               MemEvent(-n4, "OPT", "sqrt freed")]
    live += n4  # denom
    for moment in ("exp_avg", "exp_avg_sq"):
        events += [MemEvent(n + b4, "OPT", f"{p.name}: quantize_blockwise({moment})"),
                   MemEvent(-(n + b4), "OPT", "its result copied into the state and freed")]
    events.append(MemEvent(-live, "OPT", f"{p.name}: float32 copies freed as the kernel returns"))
    step_size = -options["lr"] / (1 - beta1 ** step)
    flops = 2 * n + n  # dequantise both moments, grad * gnorm_scale
    flops += n + (1 + coefficient(1 - beta1)) * n + n + (2 + coefficient(1 - beta2)) * n
    flops += 3 * n + (n if options["weight_decay"] > 0 else 0) + (2 + coefficient(step_size)) * n
    return flops + 2 * QUANTIZE_FLOPS * n


def update_32bit(p: ParamMeta, step: int, options: dict[str, Any], events: list[MemEvent]) -> Any:
    """``_optimizer_update_32bit_cpu`` (module docstring): events, and its FLOPs."""
    n, n4 = p.numel, p.numel * FLOAT32
    beta1, beta2 = options["betas"]
    live = float_copies(p, events)
    events += [MemEvent(n4, "OPT", f"{p.name}: exp_avg_sq.sqrt()"), MemEvent(n4, "OPT", f"{p.name}: sqrt + eps"),
               MemEvent(-n4, "OPT", "sqrt freed"), MemEvent(n4, "OPT", f"{p.name}: update"),
               MemEvent(-n4, "OPT", "sqrt + eps freed")]
    live += n4
    events.append(MemEvent(-live, "OPT", f"{p.name}: float32 copies freed as the kernel returns"))
    correction1, correction2 = 1 - beta1 ** step, (1 - beta2 ** step) ** 0.5
    step_size = -options["lr"] * correction2 / correction1
    flops = n + n + (1 + coefficient(1 - beta1)) * n + n + (2 + coefficient(1 - beta2)) * n
    flops += (n if options["weight_decay"] > 0 else 0) + 3 * n + (1 + coefficient(step_size)) * n
    return flops


def state_events(p: ParamMeta, eight_bit: bool) -> list[MemEvent]:
    if eight_bit:
        b4 = blocks(p.numel) * FLOAT32
        return [MemEvent(p.numel, "OPT", f"{p.name}: state1 (uint8)"), MemEvent(p.numel, "OPT", f"{p.name}: state2 (uint8)"),
                MemEvent(b4, "OPT", f"{p.name}: absmax1"), MemEvent(b4, "OPT", f"{p.name}: absmax2")]
    return [MemEvent(p.numel * FLOAT32, "OPT", f"{p.name}: state1 (float32)"),
            MemEvent(p.numel * FLOAT32, "OPT", f"{p.name}: state2 (float32)")]


def state_bytes_of(p: ParamMeta, eight_bit: bool) -> Any:
    return 2 * p.numel + 2 * blocks(p.numel) * FLOAT32 if eight_bit else 2 * p.numel * FLOAT32


@hookimpl
def costmodel_optimizer_cost(group: ParamGroup, step: int, config: object) -> OptimizerCost | None:
    mine = optimizer_group(group, NAME, options_of)
    if mine is None:
        return None
    options, params = mine
    # Which parameters are 8-bit is a size comparison: asked with sizes over many ranks, a plugin
    # failure sends the engine rank by rank (hookspec), where it is a plain bool.
    eight = [bool(p.numel >= options["min_8bit_size"]) for p in params]
    events: list[MemEvent] = []
    flops = 0
    for p, eight_bit in zip(params, eight):
        if step == 1:
            events += state_events(p, eight_bit)
        flops += (update_8bit if eight_bit else update_32bit)(p, step, options, events)
    return OptimizerCost(
        flops=Flops(torch=0, exact=flops),
        state_bytes=sum(state_bytes_of(p, e) for p, e in zip(params, eight)),
        events=events,
        resident_bytes=CODE_BYTES,
        note=f"bitsandbytes AdamW8bit (CPU kernels) over {len(params)} tensors "
             f"({amount(sum(p.numel for p in params))} elements), {sum(eight)} with 8-bit moments",
    )


@hookimpl
def costmodel_optimizer_names() -> list[str]:
    return [NAME]
