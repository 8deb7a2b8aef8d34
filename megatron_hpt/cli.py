"""The `megatron-hpt` command line: one entry point, one verb per job.

    megatron-hpt demo                      the main job on the embedded default, end to end
    megatron-hpt train --recipe R [k=v..]  a training run (under torchrun, or spawning its ranks)
    megatron-hpt eval --recipe R ...       evaluate a checkpoint on the recipe's held-out sets
    megatron-hpt convert ...               HF <-> Megatron checkpoints (megatron_hpt.models.conversion)
    megatron-hpt algorithms [--recipe R]   the estimator presets in the paper's form; with a recipe,
                                           its loss terms' weights next to the official code's
    megatron-hpt compare ...               several algorithms, same budget, one table

Options of a run live in its recipe (YAML) and ``dotted.key=value`` overrides;
the command line itself only names the job (and, for ``train``, how to treat an
output_dir that already holds a run: ``--resume`` or ``--overwrite``).

Exit codes: 0 done, 2 bad usage or input (a config key or value, a missing path, an
output_dir holding another run: one message naming it, no traceback), 1 any other
reported failure (a full disk while writing a checkpoint); a bug shows its traceback.
"""

from __future__ import annotations

import argparse
import sys

from megatron_hpt.config import ReportedError

# Verbs that parse their own arguments (argparse.REMAINDER would not take a leading --option).
SELF_PARSING = ("convert", "compare")


def _algorithms(args: argparse.Namespace) -> int:
    if args.recipe:
        from megatron_hpt.trainer.config import load_run_config
        from megatron_hpt.trainer.effective_weights import weights_report

        print(weights_report(load_run_config(args.recipe, args.overrides), args.recipe))
        return 0
    from megatron_hpt.losses import presets_table

    print(presets_table())
    return 0


def _train(args: argparse.Namespace) -> int:
    from megatron_hpt.trainer.launch import launch_training

    return launch_training(args.recipe, args.overrides, resume=args.resume, overwrite=args.overwrite)


def _demo(args: argparse.Namespace) -> int:
    from megatron_hpt.trainer.demo import run_demo

    run_demo(args.overrides, output_dir=args.output_dir)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from megatron_hpt.trainer.launch import launch_eval

    return launch_eval(args.recipe, args.model, args.overrides)


def _convert(args: argparse.Namespace) -> int:
    from megatron_hpt.models.conversion_cli import main as convert_main

    return convert_main(args.rest)


def _compare(args: argparse.Namespace) -> int:
    from megatron_hpt.trainer.compare import main as compare_main

    return compare_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-hpt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="build the tiny model, convert, train HPT, evaluate, export, report")
    demo.add_argument("--output-dir", default="runs/demo", help="where the demo writes everything")
    demo.add_argument("overrides", nargs="*", help="dotted.key=value changes to the demo recipe")
    demo.set_defaults(func=_demo)

    train = verbs.add_parser("train", help="run training from a recipe")
    train.add_argument("--recipe", required=True, help="recipe name (megatron_hpt/recipes) or YAML path")
    start = train.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue the run in output_dir from its newest checkpoint (start it if it has none)")
    start.add_argument("--overwrite", action="store_true",
                       help="move an earlier run in output_dir aside (to OUTPUT_DIR.replaced-<time>) and start "
                            "over; without --resume or --overwrite, a non-empty output_dir is refused")
    train.add_argument("overrides", nargs="*", help="dotted.key=value changes to the recipe")
    train.set_defaults(func=_train)

    ev = verbs.add_parser("eval", help="evaluate an HF checkpoint on the recipe's held-out sets")
    ev.add_argument("--recipe", required=True)
    ev.add_argument("--model", required=True, help="HF checkpoint directory to evaluate")
    ev.add_argument("overrides", nargs="*")
    ev.set_defaults(func=_eval)

    conv = verbs.add_parser("convert", help="HF <-> Megatron conversion (see `megatron-hpt convert --help`)", add_help=False)
    conv.add_argument("rest", nargs=argparse.REMAINDER)
    conv.set_defaults(func=_convert)

    alg = verbs.add_parser("algorithms", help="print the estimator presets in the paper's form")
    alg.add_argument("--recipe", help="print this recipe's loss-term weights on sample steps next to the official "
                     "HPT code's instead")
    alg.add_argument("overrides", nargs="*", help="dotted.key=value changes to the recipe")
    alg.set_defaults(func=_algorithms)

    cmp_ = verbs.add_parser("compare", help="train several algorithms on the same budget and compare", add_help=False)
    cmp_.add_argument("rest", nargs=argparse.REMAINDER)
    cmp_.set_defaults(func=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] and argv[0] in SELF_PARSING:
            args = argparse.Namespace(verb=argv[0], rest=argv[1:])
            return {"convert": _convert, "compare": _compare}[argv[0]](args)
        args = build_parser().parse_args(argv)
        return args.func(args)
    except ReportedError as err:
        print(f"megatron-hpt {argv[0] if argv else ''}: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
