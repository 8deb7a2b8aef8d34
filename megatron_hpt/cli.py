"""The `megatron-hpt` command line: one entry point, one verb per job."""

from __future__ import annotations

import argparse
import sys


def _smoke(args: argparse.Namespace) -> int:
    from megatron_hpt.models.smoke import run_smoke

    run_smoke()
    return 0


def _algorithms(args: argparse.Namespace) -> int:
    from megatron_hpt.losses.presets import presets_table

    print(presets_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-hpt", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)
    demo = verbs.add_parser("demo", help="run the main job end to end on the embedded default")
    demo.set_defaults(func=_smoke)
    algorithms = verbs.add_parser("algorithms", help="print the loss presets in the paper's unified form")
    algorithms.set_defaults(func=_algorithms)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
