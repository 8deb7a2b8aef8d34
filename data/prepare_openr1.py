"""Convert the paper's training set, Openr1-Math-46k-8192 (Elliott/Openr1-Math-46k-8192),
to a local parquet in the project schema, checking every row.

The source may be the hub dataset (needs the hub), a local parquet/jsonl copy of it,
or the raw OpenR1-Math-220k layout (problem, answer, generations), whose first
non-empty generation becomes the demonstration. The system prompt is kept; the HPT
recipe drops it at load time (DatasetConfig.drop_system_prompt, as the paper's code does).

    python data/prepare_openr1.py --out data/openr1/train.parquet
    python data/prepare_openr1.py --source openr1.parquet --out data/openr1/train.parquet --skip-bad
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_hpt.data.benchmarks import prepare_training_set  # noqa: E402

HUB_NAME = "Elliott/Openr1-Math-46k-8192"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=HUB_NAME, help=f"local file/folder or hub name (default {HUB_NAME})")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--instruction", default="", help="appended to raw OpenR1 problems (default none)")
    parser.add_argument("--skip-bad", action="store_true", help="skip and count malformed rows instead of failing")
    args = parser.parse_args(argv)
    written, skipped = prepare_training_set(args.source, args.out, split=args.split, instruction=args.instruction,
                                            on_bad_row="skip" if args.skip_bad else "error")
    print(f"{written} rows -> {args.out}" + (f" ({skipped} malformed rows skipped)" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
