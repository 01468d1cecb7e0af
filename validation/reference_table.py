"""The measured reference table: every method on every reference model, both FLOP conventions, all groups.

    python -m costmodel.validation.reference_table [--rank 4 --batch 1 --resolution 224] [--fake]

prints, per model, the FLOPs per phase in both conventions, every memory group in bytes, and the
full fine-tuning backward/forward FLOP ratio of each model in both conventions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.result import FLOP_CONVENTIONS, MEMORY_FIELDS, PHASES, StepCost
from costmodel.validation.measure import measure
from costmodel.validation.methods import METHODS

REFERENCE_MODELS: tuple[str, ...] = ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in header]] + [
        [f"{value:,}" if isinstance(value, int) else str(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(row, widths)))
             for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def render_model(model: str, costs: dict[str, StepCost]) -> str:
    flop_header = ["method", "trainable"] + [f"{conv} {phase}" for conv in FLOP_CONVENTIONS for phase in PHASES + ("total",)]
    flop_rows = [[method, cost.trainable_params] + [cost.flops[conv][phase] for conv in FLOP_CONVENTIONS
                                                     for phase in PHASES + ("total",)]
                 for method, cost in costs.items()]
    memory_rows = [[method] + [cost.memory[name] for name in MEMORY_FIELDS] for method, cost in costs.items()]
    return "\n\n".join([
        f"== {model}: FLOPs",
        _table(flop_header, flop_rows),
        f"== {model}: memory (bytes; each group's maximum over the step, peak = largest simultaneous total)",
        _table(["method", *MEMORY_FIELDS], memory_rows),
    ])


def render_ratios(fft_costs: dict[str, StepCost]) -> str:
    rows = [[model] + [f"{cost.flops[conv]['backward'] / cost.flops[conv]['forward']:.3f}" for conv in FLOP_CONVENTIONS]
            for model, cost in fft_costs.items()]
    return "== FFT backward/forward FLOP ratio\n\n" + _table(["model", *FLOP_CONVENTIONS], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m costmodel.validation.reference_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(REFERENCE_MODELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--step", type=int, default=2)
    parser.add_argument("--fake", action="store_true", help="measure under FakeTensorMode (same numbers)")
    args = parser.parse_args(argv)
    try:
        sections: list[str] = []
        fft_costs: dict[str, StepCost] = {}
        for model in args.models:
            costs = {method: measure(StepConfig(model=model, method=method, rank=args.rank, batch=args.batch,
                                                resolution=args.resolution, step=args.step), fake=args.fake)
                     for method in args.methods}
            if "fft" in costs:
                fft_costs[model] = costs["fft"]
            sections.append(render_model(model, costs))
        print(f"Measured step {args.step}, rank {args.rank}, batch {args.batch}, resolution {args.resolution}, "
              f"10 classes, {'FakeTensorMode' if args.fake else 'real tensors'} (CPU)\n")
        print("\n\n".join(sections))
        if fft_costs:
            print("\n" + render_ratios(fft_costs))
    except CostModelError as error:
        print(f"reference_table: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
