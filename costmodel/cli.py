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
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a method option, VALUE as JSON or a string; repeatable. LoRA/DoRA/GaLore: "
                             "rank_pattern='{\"layer4.*\": 8}', alpha_pattern, target_modules, exclude_modules, "
                             "include_grouped=true, adapt_head=true")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _method_options(pairs: Sequence[str] | None) -> dict[str, object]:
    """``--option KEY=VALUE`` pairs; a VALUE that parses as JSON is taken as such, else as a string."""
    import json

    options: dict[str, object] = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise CostModelError(f"--option expects KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def _config(args: argparse.Namespace) -> StepConfig:
    return StepConfig(
        model=args.model, method=args.method, rank=args.rank, alpha=args.alpha, batch=args.batch,
        resolution=args.resolution, classes=args.classes, step=args.step,
        galore_update_proj_gap=args.galore_update_proj_gap,
        options=_method_options(args.option),
    )


def _print(cost: StepCost, args: argparse.Namespace, conventions: tuple[str, ...] = FLOP_CONVENTIONS) -> None:
    print(cost.to_json() if args.json else cost.render(conventions))


def _measure(args: argparse.Namespace) -> int:
    from costmodel.validation.measure import measure  # the runtime tools load only when asked for

    _print(measure(_config(args), fake=args.fake), args)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from costmodel.prediction import predict_config

    prediction = predict_config(_config(args), allow_unknown=args.allow_unknown)
    conventions = FLOP_CONVENTIONS if args.flops is None else (args.flops,)
    _print(prediction, args, conventions)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from costmodel.prediction import predict_config
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


def _add_scenario_options(parser: argparse.ArgumentParser) -> None:
    """The step options that sweep, plan and report share (the model, method and rank vary)."""
    defaults = StepConfig()
    parser.add_argument("--batch", type=int, default=defaults.batch, help="batch size (default: %(default)s)")
    parser.add_argument("--resolution", type=int, default=defaults.resolution, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=defaults.classes, help="number of classes (default: %(default)s)")
    parser.add_argument("--step", type=int, default=defaults.step, help="which training step is costed (default: %(default)s)")
    parser.add_argument("--galore-update-proj-gap", type=int, default=defaults.galore_update_proj_gap, help="GaLore's T (default: %(default)s)")


def _scenario(args: argparse.Namespace) -> StepConfig:
    return StepConfig(batch=args.batch, resolution=args.resolution, classes=args.classes, step=args.step,
                      galore_update_proj_gap=args.galore_update_proj_gap)


def _write_text(path: str, text: str, option: str) -> None:
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    except OSError as error:
        raise CostModelError(f"{option}: cannot write {path}: {error.strerror}") from None


def _sweep(args: argparse.Namespace) -> int:
    from costmodel import sweep

    base = _scenario(args)
    models = sweep.parse_names(args.model, "--model")
    from costmodel.models import available_models

    available_models()  # loads torchvision (start-up, not prediction: before the sweep's clock starts)
    methods = None if args.methods is None else sweep.parse_names(args.methods, "--methods")
    ranks = sweep.parse_ranks(args.ranks)
    metrics = sweep.select_metrics(args.metrics)
    if args.measure is not None:
        sweep.evenly_spread(ranks, args.measure)  # a bad count fails before the predictions
    result = sweep.sweep(models, methods, ranks, sweep.default_predictor(), base, metrics,
                         workers=args.jobs or sweep.default_workers())
    if args.measure is not None:
        sweep.check_laws(result, args.measure, sweep.default_measurer(fake=args.fake))
    if args.csv:
        _write_text(args.csv, result.laws_csv(), "--csv")
    if args.points_csv:
        _write_text(args.points_csv, result.points_csv(), "--points-csv")
    print(result.to_json() if args.json else result.render())
    if args.json:
        print(result.timing_line(), file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from costmodel import plan, sweep

    budget = plan.Budget(
        memory=None if args.memory is None else plan.parse_memory(args.memory),
        flops=None if args.flops is None else plan.parse_flops(args.flops),
        memory_metric=args.memory_metric, flop_convention=args.flops_convention,
    )
    methods = None if args.methods is None else sweep.parse_names(args.methods, "--methods")
    ranks = sweep.parse_ranks(args.ranks)
    result = plan.plan(_scenario(args).replace(model=args.model), budget, sweep.default_predictor(),
                       ranks, methods, sort=args.sort, workers=args.jobs or sweep.default_workers())
    print(result.to_json() if args.json else result.render())
    return 0


def _report(args: argparse.Namespace) -> int:
    from costmodel import report, sweep

    models = sweep.parse_names(args.models, "--models")
    ranks = sweep.parse_ranks(args.ranks)
    measure_ranks = () if args.no_measure else sweep.parse_ranks(args.measure_ranks)
    written = report.generate(args.out, models=models, ranks=ranks, measure_ranks=measure_ranks,
                              base=_scenario(args).replace(rank=args.rank), fake=args.fake)
    for path in written:
        print(path)
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

    sweep = commands.add_parser("sweep", help="predict over ranks and fit a linear law cost = a + b*rank per metric")
    sweep.add_argument("--model", default=StepConfig().model, help="model name, or several comma-separated (default: %(default)s)")
    sweep.add_argument("--methods", default=None, help="comma-separated methods (default: every method the predictor can cost)")
    sweep.add_argument("--ranks", default="1-64", help="ranks: 1-64, 1,2,4,8 or 1-64:4 (default: %(default)s)")
    sweep.add_argument("--metrics", default=None, help="only metrics starting with these comma-separated prefixes, e.g. flops.exact,memory.peak")
    _add_scenario_options(sweep)
    sweep.add_argument("--measure", type=int, default=None, metavar="K", help="also measure K of the ranks (spread evenly) and report the laws' error on them")
    sweep.add_argument("--fake", action="store_true", help="with --measure: measure under FakeTensorMode")
    sweep.add_argument("--csv", default=None, metavar="PATH", help="write the laws as CSV (one row per model, method and metric)")
    sweep.add_argument("--points-csv", default=None, metavar="PATH", help="write every predicted point as CSV")
    sweep.add_argument("--json", action="store_true", help="print the points, laws and checks as one JSON object")
    sweep.add_argument("--jobs", type=int, default=None, metavar="N", help="processes to predict in (default: one per CPU)")
    sweep.set_defaults(run=_sweep)

    plan = commands.add_parser("plan", help="every method and rank that fits a memory and/or FLOP budget, best first")
    plan.add_argument("--model", default=StepConfig().model, help="torchvision model name (default: %(default)s)")
    plan.add_argument("--memory", default=None, help="memory budget, e.g. 64MiB, 1.5GB, 512KiB")
    plan.add_argument("--flops", default=None, help="FLOP budget for one step, e.g. 2GFLOP, 500MFLOP, 2e9")
    plan.add_argument("--memory-metric", default="peak", choices=("peak", "sum_of_group_peaks"), help="which memory figure the budget limits (default: %(default)s, the true simultaneous peak)")
    plan.add_argument("--flops-convention", default="exact", choices=FLOP_CONVENTIONS, help="which FLOP convention the budget limits (default: %(default)s)")
    plan.add_argument("--methods", default=None, help="comma-separated methods (default: every method the predictor can cost)")
    plan.add_argument("--ranks", default="1-64", help="ranks to consider (default: %(default)s)")
    plan.add_argument("--sort", default="capacity", choices=("capacity", "memory", "flops"), help="best first by: most trainable parameters, least memory, or fewest FLOPs (default: %(default)s)")
    _add_scenario_options(plan)
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("--jobs", type=int, default=None, metavar="N", help="processes to predict in (default: one per CPU)")
    plan.set_defaults(run=_plan)

    report = commands.add_parser("report", help="regenerate the paper's figures and claims table, predicted beside measured")
    report.add_argument("--out", default="docs/report", help="output directory (default: %(default)s)")
    report.add_argument("--models", default="mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large,resnet18", help="comma-separated models (default: %(default)s)")
    report.add_argument("--rank", type=int, default=StepConfig().rank, help="rank of Figures 1 and 2 and the claims (default: %(default)s)")
    report.add_argument("--ranks", default="1-64", help="ranks of Figure 5's predictions and laws (default: %(default)s)")
    report.add_argument("--measure-ranks", default="1,16,64", help="ranks measured for Figure 5, besides --rank (default: %(default)s)")
    report.add_argument("--no-measure", action="store_true", help="predictions only (measured columns say so)")
    report.add_argument("--fake", action="store_true", help="measure under FakeTensorMode")
    _add_scenario_options(report)
    report.set_defaults(run=_report)
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
    except BrokenPipeError:  # the reader went away (`costmodel predict | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:  # a bug, not bad input: still one line unless asked for more
        if os.environ.get("COSTMODEL_DEBUG"):
            traceback.print_exc()
        print(f"costmodel: internal error: {type(error).__name__}: {error} "
              f"(set COSTMODEL_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
