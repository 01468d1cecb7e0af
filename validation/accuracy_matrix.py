"""The analytic engine against the runtime reference over the acceptance matrix of issue 3.

    python -m costmodel.validation.accuracy_matrix [--models ...] [--methods ...]
        [--shapes 1x224 8x32 4x96] [--steps 1 2] [--real] [--json PATH]

For every configuration it predicts (``costmodel.prediction.predict_config``) and measures
(``costmodel.validation.measure.measure``, under FakeTensorMode unless ``--real``: the same counts,
far faster) the same step, and prints one row of relative errors per configuration: FLOPs per
convention (the largest error over the three phases; ``=`` when every phase is equal to the
integer) and every memory group. A summary gives the worst error of each field over the matrix and
checks the acceptance: FLOPs equal and every memory group and the peak equal to the byte. The exit
status is 1 when a configuration is not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Sequence

from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.result import FLOP_CONVENTIONS, MEMORY_GROUPS, PHASES, relative_error

MODELS = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18")
METHODS = ("fft", "bn_head")
SHAPES = ((1, 224), (8, 32), (4, 96))
STEPS = (1, 2)
MEMORY_COLUMNS = MEMORY_GROUPS + ("peak",)
# Acceptance bounds (relative); absent fields must be exact.
TOLERANCE: dict[str, float] = {}  # none: the README claims every field equal


def _shape(text: str) -> tuple[int, int]:
    try:
        batch, resolution = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BATCHxRESOLUTION, e.g. 8x32, not {text!r}") from None
    return batch, resolution


def compare(config: StepConfig, real: bool) -> dict:
    """Predict and measure one configuration; relative errors per field."""
    from costmodel.prediction import predict_config
    from costmodel.validation.measure import measure

    predicted = predict_config(config)
    started = time.perf_counter()
    measured = measure(config, fake=not real)
    measure_seconds = time.perf_counter() - started
    errors: dict[str, float] = {}
    for conv in FLOP_CONVENTIONS:
        errors[f"flops_{conv}"] = max(relative_error(predicted.flops[conv][p], measured.flops[conv][p]) for p in PHASES)
    for field in MEMORY_COLUMNS:
        errors[field] = relative_error(predicted.memory[field], measured.memory[field])
    return {"config": {"model": config.model, "method": config.method, "batch": config.batch,
                       "resolution": config.resolution, "step": config.step},
            "errors": errors, "predicted": predicted.to_dict(), "measured": measured.to_dict(),
            "predict_seconds": predicted.seconds, "measure_seconds": measure_seconds}


def within_bounds(errors: dict[str, float]) -> bool:
    return all(error <= TOLERANCE.get(field, 0.0) for field, error in errors.items())


def _cell(error: float) -> str:
    return "=" if error == 0 else f"{error:.3%}"


def render(rows: list[dict]) -> str:
    fields = [f"flops_{conv}" for conv in FLOP_CONVENTIONS] + list(MEMORY_COLUMNS)
    header = f"{'model':<20}{'method':<9}{'B':>3}{'R':>5}{'step':>5}" + "".join(f"{f:>13}" for f in fields) + "  ok"
    lines = [header, "-" * len(header)]
    for row in rows:
        c = row["config"]
        lines.append(f"{c['model']:<20}{c['method']:<9}{c['batch']:>3}{c['resolution']:>5}{c['step']:>5}"
                     + "".join(f"{_cell(row['errors'][f]):>13}" for f in fields)
                     + ("  ok" if within_bounds(row["errors"]) else "  OUT"))
    lines += ["", "worst relative error over the matrix (bound):"]
    for field in fields:
        worst = max(rows, key=lambda row: row["errors"][field])
        c = worst["config"]
        bound = TOLERANCE.get(field, 0.0)
        where = (f"at {c['model']} {c['method']} B={c['batch']} R={c['resolution']} step={c['step']}"
                 if worst["errors"][field] else "in every configuration")
        lines.append(f"  {field:<12}{_cell(worst['errors'][field]):>10}   (bound {bound:.0%})   {where}")
    speed = sorted(row["measure_seconds"] / max(row["predict_seconds"], 1e-9) for row in rows)
    lines.append(f"\nmeasure/predict time ratio: median {speed[len(speed) // 2]:.0f}x, min {speed[0]:.0f}x")
    failing = [row for row in rows if not within_bounds(row["errors"])]
    lines.append(f"{len(rows) - len(failing)} of {len(rows)} configurations within the acceptance bounds")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m costmodel.validation.accuracy_matrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--shapes", nargs="+", type=_shape, default=list(SHAPES), help="BATCHxRESOLUTION ...")
    parser.add_argument("--steps", nargs="+", type=int, default=list(STEPS))
    parser.add_argument("--real", action="store_true", help="measure with real tensors instead of FakeTensorMode")
    parser.add_argument("--json", metavar="PATH", help="also write every row (predicted, measured, errors) here")
    args = parser.parse_args(argv)
    rows = []
    try:
        for model, method, (batch, resolution), step in itertools.product(args.models, args.methods, args.shapes,
                                                                          args.steps):
            config = StepConfig(model=model, method=method, batch=batch, resolution=resolution, step=step)
            rows.append(compare(config, args.real))
            print(f"  {model} {method} B={batch} R={resolution} step={step}: "
                  f"{'ok' if within_bounds(rows[-1]['errors']) else 'OUT OF BOUNDS'}", file=sys.stderr, flush=True)
    except CostModelError as error:
        print(f"accuracy_matrix: error: {error}", file=sys.stderr)
        return 2
    print(render(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    return 0 if all(within_bounds(row["errors"]) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
