"""Convert the paper's evaluation benchmarks to the project schema (one parquet each).

Benchmarks: aime24, aime25, amc, math500, minerva, olympiad (the six in the paper's
average), arc_c and gpqa (out of distribution, multiple choice). Sources: the
default hub dataset of each (needs the hub), a local parquet/jsonl/json copy with
the same columns, or the paper code's data/<NAME>/test.json files (prompt, answer).

    python data/prepare_benchmarks.py --benchmark aime24 --out data/benchmarks/aime24.parquet
    python data/prepare_benchmarks.py --benchmark gpqa --source gpqa_diamond.csv.parquet --out gpqa.parquet
    python data/prepare_benchmarks.py --all --source-dir ~/hpt/data --out-dir data/benchmarks
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_hpt.data.benchmarks import BENCHMARKS, prepare_benchmark  # noqa: E402

# Folder names in the paper code's data/ directory.
PAPER_FOLDERS = {
    "aime24": "AIME24", "aime25": "AIME25", "amc": "AMC23", "math500": "MATH-500",
    "minerva": "Minerva", "olympiad": "Olympiad-Bench", "gpqa": "GPQA",
}


def find_local_source(source_dir: Path, name: str) -> Path | None:
    """<dir>/<name>.{parquet,jsonl,json}, <dir>/<name>/, or the paper's <dir>/<FOLDER>/test.json."""
    for candidate in (source_dir / f"{name}.parquet", source_dir / f"{name}.jsonl", source_dir / f"{name}.json",
                      source_dir / name):
        if candidate.exists():
            return candidate
    folder = PAPER_FOLDERS.get(name)
    if folder and (source_dir / folder / "test.json").exists():
        return source_dir / folder / "test.json"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--benchmark", choices=sorted(BENCHMARKS))
    which.add_argument("--all", action="store_true", help="every benchmark")
    parser.add_argument("--source", help="local file/folder or hub name (default: the benchmark's hub dataset)")
    parser.add_argument("--source-dir", type=Path, help="with --all: where local copies are (see find_local_source)")
    parser.add_argument("--split", help="hub split (default: the benchmark's)")
    parser.add_argument("--config", help="hub configuration (default: the benchmark's)")
    parser.add_argument("--out", type=Path, help="output parquet (with --benchmark)")
    parser.add_argument("--out-dir", type=Path, default=Path("data/benchmarks"), help="with --all")
    parser.add_argument("--instruction", help="appended to each question (default: ask for a \\boxed{} answer; '' for none)")
    parser.add_argument("--system-prompt", help="a system message to put first")
    parser.add_argument("--seed", type=int, default=0, help="fixes GPQA's option order")
    args = parser.parse_args(argv)

    jobs = []
    if args.benchmark:
        jobs.append((args.benchmark, args.source, args.out or args.out_dir / f"{args.benchmark}.parquet"))
    else:
        for name in BENCHMARKS:
            source = None
            if args.source_dir is not None:
                found = find_local_source(args.source_dir, name)
                if found is None:
                    print(f"{name}: no local copy in {args.source_dir}, skipped", file=sys.stderr)
                    continue
                source = str(found)
            jobs.append((name, source, args.out_dir / f"{name}.parquet"))
    for name, source, out in jobs:
        count = prepare_benchmark(name, out, source=source, split=args.split, config_name=args.config,
                                  instruction=args.instruction, system_prompt=args.system_prompt, seed=args.seed)
        print(f"{name}: {count} rows -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
