"""Every torchvision classifier (or every timm model) x the five methods: does it predict, and does
the prediction equal the measurement on every field?

    python -m costmodel.validation.model_matrix [--models M,M|all|timm] [--methods fft,lora,...]
        [--rank 8] [--batch 2] [--resolution 64] [--no-measure] [--json PATH]

Each model is predicted (``costmodel.prediction.predict_config``) and measured under
FakeTensorMode (``costmodel.validation.measure.measure``: the same counts as a real run, without
the arithmetic) at rank ``--rank``, batch ``--batch`` and resolution ``--resolution``, or at the
smallest size a model accepts (Inception-v3's auxiliary head needs 299 in train mode; the vision
transformers their native 224). A row per model and method says ``exact`` (every FLOP of every
phase in both conventions, every memory group, the peak, the sum of group peaks and the trainable
parameters equal), the fields that differ with their relative errors, or why it could not be
predicted or measured (the first line of the refusal). The summary counts the models that predict,
the configurations that are exact, the worst relative error of each field, and groups the
refusals by cause. Exit status 1 when a measured configuration is not exact.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from typing import Any

from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.result import FLOP_CONVENTIONS, MEMORY_FIELDS, PHASES, StepCost, relative_error

METHODS = ("fft", "bn_head", "lora", "dora", "galore")
# The smallest resolution at which these models train (batch norm needs more than one value per
# channel; Inception-v3's auxiliary head needs a 17x17 Mixed_6e; the transformers a fixed grid).
NATIVE_RESOLUTION = {"inception_v3": 299}
NATIVE_PREFIXES = {("vit_", "swin", "maxvit"): 224}


def timm_models() -> list[str]:
    """``timm:NAME`` for every name ``timm.list_models()`` gives."""
    import timm

    return [f"timm:{name}" for name in timm.list_models()]


def resolution_for(model: str, default: int) -> int:
    if model.startswith("timm:"):  # a timm model with a fixed input size (a ViT's patch grid) takes it
        import timm

        config = timm.get_pretrained_cfg(model[len("timm:"):], allow_unregistered=True)
        if config is not None and config.fixed_input_size:
            return config.input_size[-1]
        return default
    if model in NATIVE_RESOLUTION:
        return NATIVE_RESOLUTION[model]
    for prefixes, resolution in NATIVE_PREFIXES.items():
        if model.startswith(prefixes):
            return resolution
    return default


def fields(cost: StepCost) -> dict[str, int]:
    values = {f"flops.{conv}.{phase}": cost.flops[conv][phase] for conv in FLOP_CONVENTIONS for phase in PHASES}
    values.update({f"memory.{name}": cost.memory[name] for name in MEMORY_FIELDS})
    values["trainable_params"] = cost.trainable_params
    return values


def cause(error: Exception) -> str:
    """A refusal's reason with node names and sizes taken out, so that alike causes group."""
    text = str(error).splitlines()[0]
    text = re.sub(r"node '[^']*'", "node", text)
    text = re.sub(r"\([^()]*\)", "", text)
    return text[:160]


def check(config: StepConfig, measure_too: bool) -> dict[str, Any]:
    from costmodel.prediction import predict_config
    from costmodel.validation.measure import measure

    row: dict[str, Any] = {"model": config.model, "method": config.method, "resolution": config.resolution}
    try:
        predicted = predict_config(config)
    except CostModelError as error:
        return {**row, "status": "not predicted", "cause": cause(error)}
    except Exception as error:  # a bug: recorded (and the exit status says so), the sweep goes on
        return {**row, "status": "not predicted", "cause": f"INTERNAL ERROR {type(error).__name__}: {cause(error)}"}
    if not measure_too:
        return {**row, "status": "predicted"}
    try:
        measured = measure(config, fake=True)
    except CostModelError as error:
        return {**row, "status": "not measured", "cause": cause(error)}
    p, m = fields(predicted), fields(measured)
    errors = {name: relative_error(p[name], m[name]) for name in p if p[name] != m[name]}
    return {**row, "status": "exact" if not errors else "differs", "errors": errors}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m costmodel.validation.model_matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="all", help="comma-separated models (timm:NAME for timm's), all "
                        "(every torchvision classifier, the default) or timm (every timm.list_models() name)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--no-measure", action="store_true", help="predict only (coverage)")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    from costmodel.models import available_models, check_model_names

    try:
        if args.models in ("all", "timm"):
            models = available_models() if args.models == "all" else timm_models()
        else:
            models = check_model_names([m for m in args.models.split(",") if m], "--models")
        base = StepConfig(rank=args.rank, batch=args.batch)
    except CostModelError as error:
        print(f"model_matrix: error: {error}", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    rows = []
    started = time.perf_counter()
    for model in models:
        for method in methods:
            config = base.replace(model=model, method=method, resolution=resolution_for(model, args.resolution))
            row = check(config, not args.no_measure)
            rows.append(row)
            detail = row.get("cause") or ", ".join(f"{k} {v:.3%}" for k, v in row.get("errors", {}).items())
            print(f"{model:<22} {method:<8} R={config.resolution:<4} {row['status']:<14} {detail}", flush=True)

    predicted_models = {r["model"] for r in rows if r["status"] != "not predicted"}
    all_predicted = {m for m in models if all(r["status"] != "not predicted" for r in rows if r["model"] == m)}
    measured = [r for r in rows if r["status"] in ("exact", "differs")]
    exact = [r for r in measured if r["status"] == "exact"]
    worst: dict[str, float] = defaultdict(float)
    for row in measured:
        for name, error in row.get("errors", {}).items():
            worst[name] = max(worst[name], error)
    causes: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if "cause" in row:
            causes[f"{row['status']}: {row['cause']}"].append(f"{row['model']}/{row['method']}")
    print()
    print(f"{len(all_predicted)} of {len(models)} models predict with every method asked "
          f"({len(predicted_models)} with at least one); {len(exact)} of {len(measured)} measured configurations "
          f"exact on every field; {time.perf_counter() - started:.0f} s")
    print("worst relative error per field: " + (", ".join(f"{k} {v:.4%}" for k, v in sorted(worst.items()))
                                               if worst else "none (every measured field equal)"))
    for reason, where in sorted(causes.items(), key=lambda item: -len(item[1])):
        print(f"  {len(where):3d} x {reason}\n        {' '.join(where[:12])}{' ...' if len(where) > 12 else ''}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"rows": rows, "worst": worst}, handle, indent=2)
    internal = [r for r in rows if "INTERNAL ERROR" in r.get("cause", "")]
    return 1 if len(exact) != len(measured) or internal else 0


if __name__ == "__main__":
    sys.exit(main())
