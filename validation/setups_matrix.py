"""The training-setups acceptance matrix (issue 11): each setup predicted and measured.

    python -m costmodel.validation.setups_matrix [--models mobilenet_v2 resnet18 timm:vit_tiny_patch16_224]
        [--methods fft lora galore] [--setups ...] [--steps 1 2] [--batch 4] [--resolution 64] [--real]

The models: MobileNetV2, ResNet-18 and an attention model, timm's ViT-Tiny (at its fixed 224).
A setup is a set of ``StepConfig`` fields beside the method: the precision (``--dtype``),
activation checkpointing of every block (``--checkpoint``: ``layer*`` on ResNets,
``features.*`` on MobileNets, ``blocks.*`` on the ViT), gradient accumulation
(``--accumulate 4``), CPU autocast (``--autocast bf16|fp16``, alone and with checkpointing and
accumulation), a quantized base under LoRA (``--quantize nf4|fp4|int8``, nf4 with checkpointing
and accumulation, int8 with checkpointing), the optimizer (``--optimizer``: SGD, Adam, AdamW's and SGD's foreach paths, Adafactor, bitsandbytes' AdamW8bit;
GaLore keeping its own), and combinations. For every model x method x setup x step it predicts the
step and measures it (under FakeTensorMode unless ``--real``; the optimizers that cannot step fake
tensors, autocast and a quantized base always with real ones),
prints one line each, then a table of the setups: how many configurations are equal on every
field (FLOPs per phase in both conventions, every memory group and the peak to the byte,
trainable parameters), and the worst field where one is not. Exits with status 1 if any is not.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from costmodel.config import StepConfig
from costmodel.validation.methods_matrix import Errors, errors
from costmodel.validation.optimizers import REAL_TENSORS_ONLY

MODELS: tuple[str, ...] = ("mobilenet_v2", "resnet18", "timm:vit_tiny_patch16_224")
METHODS: tuple[str, ...] = ("fft", "lora", "galore")
# Every block, by model family: the pattern ``--checkpoint`` takes.
BLOCKS: dict[str, str] = {"resnet": "layer*", "mobilenet": "features.*", "timm:vit_": "blocks.*"}
# Models with a fixed input size (a ViT's patch grid) take it instead of --resolution.
FIXED_RESOLUTION: dict[str, int] = {"timm:vit_tiny_patch16_224": 224}


def blocks(model: str) -> str:
    for prefix, pattern in BLOCKS.items():
        if model.startswith(prefix):
            return pattern
    raise SystemExit(f"no block pattern for {model!r}; known families: {', '.join(BLOCKS)}")


# Setup name -> the StepConfig fields it sets ("BLOCKS": the model's every-block pattern).
SETUPS: dict[str, dict[str, Any]] = {
    "fp32": {},
    "bf16": {"dtype": "bf16"},
    "fp16": {"dtype": "fp16"},
    "checkpoint": {"checkpoint": "BLOCKS"},
    "accumulate4": {"accumulate": 4},
    "sgd-momentum": {"optimizer": "sgd", "optimizer_options": {"momentum": 0.9}},
    "adam": {"optimizer": "adam"},
    "adamw-foreach": {"optimizer_options": {"foreach": True}},
    "sgd-foreach-nesterov-wd": {"optimizer": "sgd", "optimizer_options": {"foreach": True, "momentum": 0.9,
                                                                         "nesterov": True, "weight_decay": 0.01}},
    "adafactor": {"optimizer": "adafactor"},
    "adafactor-foreach": {"optimizer": "adafactor", "optimizer_options": {"foreach": True}},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "bf16+checkpoint+accumulate2": {"dtype": "bf16", "checkpoint": "BLOCKS", "accumulate": 2},
    "bf16+adamw8bit": {"dtype": "bf16", "optimizer": "adamw8bit"},
    "autocast-bf16": {"autocast": "bf16"},
    "autocast-fp16": {"autocast": "fp16"},
    "autocast+checkpoint+accumulate2": {"autocast": "bf16", "checkpoint": "BLOCKS", "accumulate": 2},
    "nf4": {"quantize": "nf4"},
    "fp4": {"quantize": "fp4"},
    "int8": {"quantize": "int8"},
    "nf4+checkpoint+accumulate2": {"quantize": "nf4", "checkpoint": "BLOCKS", "accumulate": 2},
    "int8+checkpoint": {"quantize": "int8", "checkpoint": "BLOCKS"},
}
# A quantized base is frozen: LoRA trains on it, the other methods refuse it.
QUANTIZED_METHODS = ("lora",)
# Setups measured with real tensors always: an optimizer that cannot step fake tensors
# (costmodel.validation.optimizers.REAL_TENSORS_ONLY says why), and autocast (``measure --fake``
# refuses it: fake tensors give a mixed-precision batch norm's statistics the input's dtype).
REAL_ONLY = frozenset(name for name, fields in SETUPS.items()
                      if fields.get("optimizer") in REAL_TENSORS_ONLY or fields.get("autocast")
                      or fields.get("quantize"))
OPTIMIZER_FIELDS = ("optimizer", "optimizer_options")


def configurations(models: Sequence[str], methods: Sequence[str], setups: Sequence[str], steps: Sequence[int],
                   batch: int, resolution: int) -> Iterator[tuple[str, StepConfig]]:
    """Every (setup, configuration); GaLore keeps its own optimizer (no optimizer setups), and is
    taken at T = 1 (an SVD on every step); a quantized base is LoRA's only."""
    for model, method, setup, step in itertools.product(models, methods, setups, steps):
        fields = {key: blocks(model) if value == "BLOCKS" else value for key, value in SETUPS[setup].items()}
        if method == "galore" and any(key in fields for key in OPTIMIZER_FIELDS):
            continue
        if "quantize" in fields and method not in QUANTIZED_METHODS:
            continue
        options = {"update_proj_gap": 1} if method == "galore" else {}
        yield setup, StepConfig(model=model, method=method, batch=batch,
                                resolution=FIXED_RESOLUTION.get(model, resolution), step=step, options=options,
                                **fields)


def table(results: list[tuple[str, Errors]]) -> str:
    """Per setup: configurations equal on every field, and the worst broken field if any."""
    lines = [f"{'setup':<32}{'equal':>12}  worst difference"]
    for setup in dict.fromkeys(name for name, _ in results):
        rows = [e for name, e in results if name == setup]
        broken = [e for e in rows if e.broken()]
        worst = "-" if not broken else f"{broken[0].broken()[0]} ({broken[0].config.model} {broken[0].config.method})"
        lines.append(f"{setup:<32}{len(rows) - len(broken):>6} of {len(rows):<3}  {worst}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m costmodel.validation.setups_matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--real", action="store_true", help="measure with real tensors instead of FakeTensorMode")
    args = parser.parse_args(argv)

    from costmodel.prediction import predict_config
    from costmodel.validation.measure import measure

    results: list[tuple[str, Errors]] = []
    started = time.perf_counter()
    for setup, config in configurations(args.models, args.methods, args.setups, args.steps, args.batch,
                                        args.resolution):
        result = errors(predict_config(config), measure(config, fake=not (args.real or setup in REAL_ONLY)))
        results.append((setup, result))
        broken = result.broken()
        print(f"{setup:<32}{config.model:<28}{config.method:<8}k={config.step}  "
              f"{'equal on every field' if not broken else 'BROKEN: ' + '; '.join(broken)}", flush=True)
    print()
    print(table(results))
    failures = sum(1 for _, e in results if e.broken())
    print(f"\n{len(results)} configurations ({'real' if args.real else 'FakeTensorMode'} measurements, the "
          f"real-only setups ({', '.join(sorted(REAL_ONLY & set(args.setups))) or 'none'}) with real tensors, "
          f"B={args.batch} R={args.resolution}), {failures} not equal, {time.perf_counter() - started:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
