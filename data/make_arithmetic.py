"""Generate the embedded default dataset: short arithmetic problems with
step-by-step demonstrations ending in \\boxed{...}, in the paper's
Openr1-Math-46k-8192 schema (data_source, prompt, target, ability,
reward_model, extra_info).

Made for a model trained from scratch (the tiny demo model): the mix climbs in
difficulty, so accuracy rises in steps as the model picks up each kind.
  level 1 (copy a number and change one digit): n + 1, n - 1, n * 10, 40 + 7;
  level 2 (one-digit facts): addition, subtraction up to 18 - 9, the
           multiplication table, one-step word problems, "solve for x";
  level 3 (two steps): two-digit addition written out column by column
           (with carry), and two-step expressions.
Train and eval are drawn from the same distribution and never share a prompt;
except for the one-digit facts (there are only 100 of each), they never share
the computation either (DISJOINT_WORK).

Deterministic: the same seed and sizes give byte-identical parquet files.

    python data/make_arithmetic.py            # writes data/arithmetic/{train,eval}.parquet
    python data/make_arithmetic.py --out DIR --seed 7 --num-train 1000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path
from typing import Callable

INSTRUCTION = "Put your final answer within \\boxed{}."
PROMPT_FORMAT = "{question} {instruction}"
DATA_SOURCE = "arithmetic"
DEFAULT_SEED = 1234
DEFAULT_NUM_TRAIN = 3000
DEFAULT_NUM_EVAL = 200

NAMES = ("Ann", "Tom", "Sam", "Mia", "Ben", "Max", "Eve", "Leo")
OBJECTS = ("apples", "books", "coins")

# (category, level, weight): the share of rows in both splits.
MIX = (
    ("plus_one", 1, 0.12),
    ("minus_one", 1, 0.10),
    ("times_ten", 1, 0.14),
    ("place_value", 1, 0.14),
    ("add1", 2, 0.10),
    ("sub1", 2, 0.07),
    ("mul1", 2, 0.07),
    ("word1", 2, 0.07),
    ("solve", 2, 0.04),
    ("add2", 3, 0.07),
    ("two_step", 3, 0.08),
)

Problem = tuple[str, str, int]
"""(question, worked steps, answer)."""

DISJOINT_WORK = frozenset({"plus_one", "minus_one", "times_ten", "place_value", "add2", "solve", "two_step"})
"""Categories whose eval problems also never share their worked steps with a train problem (the
computation itself is held out, not just the wording). The one-digit fact categories cannot: a
model cannot be asked for a fact it never saw, so there only the prompts are held out."""


def _answer(value: int) -> str:
    return f"So the answer is \\boxed{{{value}}}."


def _add1(rng: random.Random) -> Problem:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    question = rng.choice(
        ("What is {a} + {b}?", "Compute {a} + {b}.", "What is {a} plus {b}?",
         "Find the sum of {a} and {b}.", "What is the sum of {a} and {b}?")
    ).format(a=a, b=b)
    return question, f"{a} + {b} = {a + b}.", a + b


def _sub1(rng: random.Random) -> Problem:
    b, c = rng.randint(0, 9), rng.randint(0, 9)
    a = b + c
    question = rng.choice(
        ("What is {a} - {b}?", "Compute {a} - {b}.", "What is {a} minus {b}?",
         "Find the difference of {a} and {b}.")
    ).format(a=a, b=b)
    return question, f"{a} - {b} = {c}.", c


def _mul1(rng: random.Random) -> Problem:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    question = rng.choice(
        ("What is {a} * {b}?", "Compute {a} * {b}.", "What is {a} times {b}?",
         "Find the product of {a} and {b}.", "What is the product of {a} and {b}?")
    ).format(a=a, b=b)
    return question, f"{a} * {b} = {a * b}.", a * b


def _word1(rng: random.Random) -> Problem:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    if rng.random() < 0.5:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        question = rng.choice(
            ("{n} has {a} {o} and gets {b} more. How many {o} does {n} have?",
             "A number is {b} more than {a}. What is the number?")
        ).format(n=name, o=obj, a=a, b=b)
        return question, f"{a} + {b} = {a + b}.", a + b
    b, c = rng.randint(1, 9), rng.randint(0, 9)
    a = b + c
    question = rng.choice(
        ("{n} has {a} {o} and gives away {b}. How many {o} are left?",
         "Find the number that is {b} less than {a}.")
    ).format(n=name, o=obj, a=a, b=b)
    return question, f"{a} - {b} = {c}.", c


def _plus_one(rng: random.Random) -> Problem:
    n = rng.randint(0, 99)
    question = rng.choice(
        ("What is {n} + 1?", "What is {n} plus 1?", "What number comes after {n}?", "What is 1 more than {n}?",
         "Compute {n} + 1.", "Add 1 to {n}.")
    ).format(n=n)
    return question, f"{n} + 1 = {n + 1}.", n + 1


def _minus_one(rng: random.Random) -> Problem:
    n = rng.randint(1, 100)
    question = rng.choice(
        ("What is {n} - 1?", "What is {n} minus 1?", "What number comes before {n}?", "What is 1 less than {n}?",
         "Compute {n} - 1.", "Subtract 1 from {n}.")
    ).format(n=n)
    return question, f"{n} - 1 = {n - 1}.", n - 1


def _times_ten(rng: random.Random) -> Problem:
    n = rng.randint(1, 99)
    question = rng.choice(
        ("What is {n} * 10?", "What is {n} times 10?", "Compute {n} * 10.", "Multiply {n} by 10.",
         "What is the product of {n} and 10?", "Compute 10 * {n}.", "What is 10 times {n}?")
    ).format(n=n)
    return question, f"{n} * 10 = {n * 10}.", n * 10


def _place_value(rng: random.Random) -> Problem:
    tens, ones = rng.randint(1, 9), rng.randint(0, 9)
    a, b = f"{tens}0", str(ones)
    if rng.random() < 0.3:
        a, b = b, a
    question = rng.choice(("What is {a} + {b}?", "Compute {a} + {b}.", "What is {a} plus {b}?")).format(a=a, b=b)
    return question, f"{a} + {b} = {10 * tens + ones}.", 10 * tens + ones


def _column_add(a: int, b: int) -> str:
    """47 + 38 -> '7 + 8 = 15, carry 1. 4 + 3 + 1 = 8.' (the answer, 85, is read off the steps)."""
    a_tens, a_ones = divmod(a, 10)
    b_tens, b_ones = divmod(b, 10)
    ones = a_ones + b_ones
    carry = ones // 10
    steps = [f"{a_ones} + {b_ones} = {ones}" + (", carry 1." if carry else ".")]
    tens_terms = [str(a_tens)] + ([str(b_tens)] if b_tens else []) + (["1"] if carry else [])
    if len(tens_terms) > 1:
        steps.append(f"{' + '.join(tens_terms)} = {a_tens + b_tens + carry}.")
    return " ".join(steps)


def _add2(rng: random.Random) -> Problem:
    a = rng.randint(10, 99)
    b = rng.randint(1, 9) if rng.random() < 0.4 else rng.randint(10, 99)
    question = rng.choice(("What is {a} + {b}?", "Compute {a} + {b}.", "What is the sum of {a} and {b}?")).format(
        a=a, b=b
    )
    return question, _column_add(a, b), a + b


def _solve(rng: random.Random) -> Problem:
    lead = rng.choice(("Solve for x if", "Find x if", "What is x if"))
    end = "?" if lead.startswith("What") else "."
    kind = rng.randrange(3)
    if kind == 0:
        a, x = rng.randint(1, 9), rng.randint(0, 9)
        return f"{lead} x + {a} = {x + a}{end}", f"x = {x + a} - {a} = {x}.", x
    if kind == 1:
        a, d = rng.randint(1, 9), rng.randint(0, 9)
        return f"{lead} x - {a} = {d}{end}", f"x = {d} + {a} = {d + a}.", d + a
    a, x = rng.randint(2, 9), rng.randint(1, 9)
    return f"{lead} {a} * x = {a * x}{end}", f"x = {a * x} / {a} = {x}.", x


def _two_step(rng: random.Random) -> Problem:
    kind = rng.randrange(4)
    if kind == 0:  # (a + b) * c, the sum a one-digit factor
        s = rng.randint(2, 9)
        a = rng.randint(1, s - 1)
        b, c = s - a, rng.randint(2, 9)
        expr, steps, value = f"({a} + {b}) * {c}", f"{a} + {b} = {s}. {s} * {c} = {s * c}.", s * c
    elif kind == 1:  # a * b + c
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
        expr, steps, value = f"{a} * {b} + {c}", f"{a} * {b} = {a * b}. {a * b} + {c} = {a * b + c}.", a * b + c
    elif kind == 2:  # a * b - c
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(1, min(9, a * b))
        expr, steps, value = f"{a} * {b} - {c}", f"{a} * {b} = {a * b}. {a * b} - {c} = {a * b - c}.", a * b - c
    else:  # a + b + c
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        expr, steps, value = f"{a} + {b} + {c}", f"{a} + {b} = {a + b}. {a + b} + {c} = {a + b + c}.", a + b + c
    question = rng.choice(("What is {e}?", "Compute {e}.", "What is the value of {e}?")).format(e=expr)
    return question, steps, value


GENERATORS: dict[str, Callable[[random.Random], Problem]] = {
    "plus_one": _plus_one,
    "minus_one": _minus_one,
    "times_ten": _times_ten,
    "place_value": _place_value,
    "add1": _add1,
    "sub1": _sub1,
    "mul1": _mul1,
    "word1": _word1,
    "add2": _add2,
    "solve": _solve,
    "two_step": _two_step,
}


def _quotas(total: int) -> dict[str, int]:
    """Rows per category for a split of ``total`` rows (largest remainder, so they sum exactly)."""
    raw = {name: weight * total for name, _, weight in MIX}
    quotas = {name: int(value) for name, value in raw.items()}
    by_remainder = sorted(raw, key=lambda name: (quotas[name] - raw[name], name))
    for name in by_remainder[: total - sum(quotas.values())]:
        quotas[name] += 1
    return quotas


def _row(index: int, split: str, category: str, level: int, problem: Problem) -> dict:
    question, steps, answer = problem
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"content": PROMPT_FORMAT.format(question=question, instruction=INSTRUCTION), "role": "user"}],
        "target": [{"content": f"{steps} {_answer(answer)}", "role": "assistant"}],
        "ability": "math",
        "reward_model": {"ground_truth": str(answer), "style": "rule"},
        "extra_info": {"index": index, "split": split, "category": category, "level": level},
    }


def generate(seed: int = DEFAULT_SEED, num_train: int = DEFAULT_NUM_TRAIN, num_eval: int = DEFAULT_NUM_EVAL):
    """(train_rows, eval_rows). Eval is drawn first; a prompt drawn once is never drawn again, and in
    DISJOINT_WORK categories no train problem repeats an eval problem's worked steps."""
    rng = random.Random(seed)
    levels = {name: level for name, level, _ in MIX}
    seen: set[str] = set()
    eval_work: set[str] = set()
    splits = {}
    for split, total in (("eval", num_eval), ("train", num_train)):
        rows = []
        for category, count in _quotas(total).items():
            drawn = 0
            for _ in range(200 * count + 1000):
                if drawn == count:
                    break
                problem = GENERATORS[category](rng)
                if problem[0] in seen:
                    continue
                if split == "train" and category in DISJOINT_WORK and problem[1] in eval_work:
                    continue
                if split == "eval":
                    eval_work.add(problem[1])
                seen.add(problem[0])
                rows.append((category, problem))
                drawn += 1
            else:
                raise RuntimeError(f"category {category!r} ran out of distinct problems for {count} {split} rows")
        rng.shuffle(rows)
        splits[split] = [_row(i, split, cat, levels[cat], problem) for i, (cat, problem) in enumerate(rows)]
    return splits["train"], splits["eval"]


def _schema():
    import pyarrow as pa

    message = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", message),
            ("target", message),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [("index", pa.int64()), ("split", pa.string()), ("category", pa.string()), ("level", pa.int64())]
                ),
            ),
        ]
    )


def content_hash(rows: list[dict]) -> str:
    """sha256 of the rows as canonical JSON: equal content, equal hash, whatever the file bytes."""
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def write(out_dir: str | Path, seed: int = DEFAULT_SEED, num_train: int = DEFAULT_NUM_TRAIN,
          num_eval: int = DEFAULT_NUM_EVAL) -> dict:
    """Write train.parquet, eval.parquet and MANIFEST.json to ``out_dir``; returns the manifest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, evaluation = generate(seed, num_train, num_eval)
    manifest = {"generator": "data/make_arithmetic.py", "seed": seed, "pyarrow": pa.__version__, "files": {}}
    for name, rows in (("train", train), ("eval", evaluation)):
        path = out / f"{name}.parquet"
        table = pa.Table.from_pylist(rows, schema=_schema())
        pq.write_table(table, path, compression="zstd", write_statistics=False)
        categories: dict[str, int] = {}
        for row in rows:
            categories[row["extra_info"]["category"]] = categories.get(row["extra_info"]["category"], 0) + 1
        manifest["files"][path.name] = {
            "rows": len(rows),
            "content_sha256": content_hash(rows),
            "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "categories": dict(sorted(categories.items())),
        }
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "arithmetic"))
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num-eval", type=int, default=DEFAULT_NUM_EVAL)
    args = parser.parse_args(argv)
    manifest = write(args.out, args.seed, args.num_train, args.num_eval)
    for name, info in manifest["files"].items():
        print(f"{args.out}/{name}: {info['rows']} rows, content sha256 {info['content_sha256'][:16]}")


if __name__ == "__main__":
    main()
