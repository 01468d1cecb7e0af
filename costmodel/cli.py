"""``costmodel``: predict (analytically) or measure (for real) one fine-tuning step."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from costmodel.config import StepConfig
from costmodel.errors import CostModelError
from costmodel.result import FLOP_CONVENTIONS, StepCost, render_comparison


def _add_step_options(parser: argparse.ArgumentParser) -> None:
    defaults = StepConfig()
    parser.add_argument("--model", default=defaults.model, help="torchvision model name (default: %(default)s)")
    parser.add_argument("--method", default=defaults.method, help="fft, bn_head, lora, dora, galore, or a plugin's method (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=defaults.rank, help="adapter / projection rank (default: %(default)s)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA/DoRA lora_alpha (default: the rank)")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="batch size (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=defaults.resolution, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=defaults.classes, help="number of classes (default: %(default)s)")
    parser.add_argument("--step", type=int, default=defaults.step, help="which training step is costed; step 1 creates optimizer state (default: %(default)s)")
    parser.add_argument("--galore-update-proj-gap", type=int, default=defaults.galore_update_proj_gap, help="GaLore's T: an SVD on step k when (k-1) %% T == 0 (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _config(args: argparse.Namespace) -> StepConfig:
    return StepConfig(
        model=args.model, method=args.method, rank=args.rank, alpha=args.alpha, batch=args.batch,
        resolution=args.resolution, classes=args.classes, step=args.step,
        galore_update_proj_gap=args.galore_update_proj_gap,
    )


def _print(cost: StepCost, args: argparse.Namespace, conventions: tuple[str, ...] = FLOP_CONVENTIONS) -> None:
    print(cost.to_json() if args.json else cost.render(conventions))


def _measure(args: argparse.Namespace) -> int:
    from costmodel.validation.measure import measure  # the runtime tools load only when asked for

    _print(measure(_config(args), fake=args.fake), args)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from costmodel.predict import predict_config

    prediction = predict_config(_config(args), allow_unknown=args.allow_unknown)
    conventions = FLOP_CONVENTIONS if args.flops is None else (args.flops,)
    _print(prediction, args, conventions)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from costmodel.predict import predict_config
    from costmodel.validation.measure import measure

    config = _config(args)
    predicted = predict_config(config)
    measured = measure(config, fake=args.fake)
    if args.json:
        import json

        print(json.dumps({"predicted": predicted.to_dict(), "measured": measured.to_dict()}, indent=2))
    else:
        print(render_comparison(predicted, measured))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="costmodel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="predict one step's FLOPs and memory analytically")
    _add_step_options(predict)
    predict.add_argument("--flops", choices=FLOP_CONVENTIONS, default=None, help="show only this FLOP convention in the table")
    predict.add_argument("--allow-unknown", action="store_true", help="cost ops no plugin covers as a reported gap instead of failing")
    predict.set_defaults(run=_predict)

    measure = commands.add_parser("measure", help="run one step for real and measure it (FlopCounterMode, MemTracker)")
    _add_step_options(measure)
    measure.add_argument("--fake", action="store_true", help="measure under FakeTensorMode (same numbers, far faster at large batch)")
    measure.set_defaults(run=_measure)

    compare = commands.add_parser("compare", help="predict, then measure the same step, and show both side by side")
    _add_step_options(compare)
    compare.add_argument("--fake", action="store_true", help="measure under FakeTensorMode")
    compare.set_defaults(run=_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except CostModelError as error:
        print(f"costmodel: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # a bug, not bad input: still one line unless asked for more
        if os.environ.get("COSTMODEL_DEBUG"):
            traceback.print_exc()
        print(f"costmodel: internal error: {type(error).__name__}: {error} "
              f"(set COSTMODEL_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
