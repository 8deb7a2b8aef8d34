"""The paper's evaluation benchmarks and the conversion of their public releases
into the project schema (used by ``data/prepare_benchmarks.py`` and by eval's
report for names and column order).

Each benchmark knows its default hub dataset and the column layouts its public
copies use; a source's layout is recognized from its columns, so the same
converter reads the hub dataset, a local parquet/jsonl copy of it, or the
``{prompt, answer}`` JSON files shipped with the paper's code.

    in-distribution (the paper's "Avg"): AIME24, AIME25, AMC, MATH-500, Minerva, OlympiadBench
    out-of-distribution: ARC-c, GPQA-Diamond (multiple choice)
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = "Please write your final answer as the letter of the correct option, in the form \\boxed{{{letters}}}."


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    """Key used in configs, data_source and reports."""
    display: str
    """Column title in the paper's tables."""
    hub_name: str
    """Default Hugging Face dataset."""
    hub_split: str
    hub_config: str | None = None
    style: str = "math"
    """"math" (math-verify) or "multiple_choice"."""
    in_paper_average: bool = True
    """One of the six benchmarks the paper averages."""
    paper_num_samples: int = 1
    """Samples per problem in the paper's avg@k (32 for AIME24/25 and AMC, else 1)."""


BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(name="aime24", display="AIME24", hub_name="HuggingFaceH4/aime_2024", hub_split="train",
                      paper_num_samples=32),
        BenchmarkSpec(name="aime25", display="AIME25", hub_name="math-ai/aime25", hub_split="test",
                      paper_num_samples=32),
        BenchmarkSpec(name="amc", display="AMC", hub_name="AI-MO/aimo-validation-amc", hub_split="train",
                      paper_num_samples=32),
        BenchmarkSpec(name="math500", display="MATH-500", hub_name="HuggingFaceH4/MATH-500", hub_split="test"),
        BenchmarkSpec(name="minerva", display="Minerva", hub_name="math-ai/minervamath", hub_split="test"),
        BenchmarkSpec(name="olympiad", display="Olympiad", hub_name="Hothan/OlympiadBench", hub_split="train",
                      hub_config="OE_TO_maths_en_COMP"),
        BenchmarkSpec(name="arc_c", display="ARC-c", hub_name="allenai/ai2_arc", hub_split="test",
                      hub_config="ARC-Challenge", style="multiple_choice", in_paper_average=False),
        BenchmarkSpec(name="gpqa", display="GPQA", hub_name="Idavidrein/gpqa", hub_split="train",
                      hub_config="gpqa_diamond", style="multiple_choice", in_paper_average=False),
    )
}
PAPER_AVERAGE = tuple(name for name, spec in BENCHMARKS.items() if spec.in_paper_average)


def get_benchmark(name: str) -> BenchmarkSpec:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


class SourceLayoutError(ValueError):
    """A source row has none of the column layouts a benchmark's public copies use."""


_QUESTION_KEYS = ("problem", "Problem", "question", "Question", "prompt")
_ANSWER_KEYS = ("answer", "Answer", "final_answer")


def _strip_answer(answer) -> str:
    """A gold answer as a plain string: lists (OlympiadBench's final_answer) joined, outer $ and a
    whole-answer \\boxed{} removed (the paper's AIME24 file stores "\\boxed{204}")."""
    if isinstance(answer, (list, tuple)):
        if not answer:
            raise SourceLayoutError("empty answer list")
        answer = ", ".join(_strip_answer(a) for a in answer)
    if isinstance(answer, float) and answer.is_integer():  # AI-MO's AMC stores 27.0
        answer = int(answer)
    text = str(answer).strip()
    if len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    match = re.fullmatch(r"\\boxed\{(.*)\}", text, flags=re.DOTALL)
    return match.group(1).strip() if match else text


def _first(row: dict, keys: tuple[str, ...], what: str, where: str):
    for key in keys:
        if row.get(key) not in (None, ""):
            return key, row[key]
    raise SourceLayoutError(
        f"{where}: no {what} column (looked for {', '.join(keys)}; the row has {', '.join(sorted(row))})"
    )


def _choices_prompt(question: str, options: list[str], letters: str) -> str:
    lines = [question.strip(), ""] + [f"{letter}. {option}" for letter, option in zip(letters, options)]
    return "\n".join(lines)


def _convert_choice(row: dict, spec: BenchmarkSpec, index: int, seed: int, where: str) -> tuple[str, str]:
    """(question with lettered options, gold letter) from ARC's or GPQA's columns."""
    if "choices" in row and "answerKey" in row:  # allenai/ai2_arc
        choices = row["choices"]
        texts, labels = list(choices["text"]), [str(label) for label in choices["label"]]
        letters = "ABCDEFGHIJ"[: len(texts)]
        key = str(row["answerKey"])
        if key not in labels:
            raise SourceLayoutError(f"{where}: answerKey {key!r} is not among the labels {labels}")
        return _choices_prompt(row["question"], texts, letters), letters[labels.index(key)]
    if "Correct Answer" in row:  # Idavidrein/gpqa: the correct option is always listed first; shuffle it
        options = [row["Correct Answer"]] + [row[f"Incorrect Answer {i}"] for i in (1, 2, 3)]
        options = [str(o).strip() for o in options]
        order = list(range(4))
        random.Random(seed * 1_000_003 + index).shuffle(order)
        shuffled = [options[i] for i in order]
        return _choices_prompt(row["Question"], shuffled, "ABCD"), "ABCD"[order.index(0)]
    if "prompt" in row and "answer" in row:  # the paper's GPQA test.json: options already in the prompt
        return str(row["prompt"]), _strip_answer(row["answer"])
    raise SourceLayoutError(
        f"{where}: not a multiple-choice layout (ARC: question/choices/answerKey; GPQA: Question/Correct "
        f"Answer/Incorrect Answer 1-3; or prompt/answer); the row has {', '.join(sorted(row))}"
    )


def convert_row(
    row: dict,
    spec: BenchmarkSpec,
    index: int,
    *,
    where: str = "",
    instruction: str | None = None,
    system_prompt: str | None = None,
    seed: int = 0,
) -> dict:
    """One source row -> one project-schema row (data_source, prompt, ability, reward_model, extra_info).

    ``instruction`` (default: the benchmark's boxed-answer instruction; "" for none) is appended to
    the question; ``seed`` fixes GPQA's option order.
    """
    where = where or f"{spec.name} row {index}"
    if isinstance(row.get("prompt"), list) and isinstance(row.get("reward_model"), dict):
        out = dict(row)  # already in the project schema
        out.setdefault("data_source", spec.name)
        return out
    extra = {"index": index, "split": "test"}
    for key in ("id", "ID", "unique_id", "url", "subject", "level"):
        if row.get(key) is not None:
            extra[key] = row[key] if isinstance(row[key], (int, str)) else str(row[key])
    if spec.style == "multiple_choice":
        question, answer = _convert_choice(row, spec, index, seed, where)
        letters = "".join(sorted(set(re.findall(r"^([A-J])[.)]", question, flags=re.MULTILINE)))) or "ABCD"
        default_instruction = CHOICE_INSTRUCTION.format(letters="/".join(letters))
        style = "multiple_choice"
    else:
        _, question = _first(row, _QUESTION_KEYS, "question", where)
        _, answer = _first(row, _ANSWER_KEYS, "answer", where)
        if row.get("context"):  # OlympiadBench: some problems share a preamble
            question = f"{row['context'].strip()}\n{question}"
        answer = _strip_answer(answer)
        default_instruction = MATH_INSTRUCTION
        style = "rule"
    instruction = default_instruction if instruction is None else instruction
    content = f"{str(question).strip()}\n\n{instruction}" if instruction else str(question).strip()
    messages = [{"content": content, "role": "user"}]
    if system_prompt:
        messages.insert(0, {"content": system_prompt, "role": "system"})
    return {
        "data_source": spec.name,
        "prompt": messages,
        "ability": "math",
        "reward_model": {"ground_truth": answer, "style": style},
        "extra_info": extra,
    }


def convert_openr1_row(row: dict, index: int, *, where: str = "", instruction: str = "") -> dict:
    """A training row: already in the schema (Openr1-Math-46k-8192) or the raw OpenR1-Math-220k
    layout (problem, answer, generations), whose first non-empty generation is the demonstration."""
    where = where or f"row {index}"
    if isinstance(row.get("prompt"), list) and isinstance(row.get("reward_model"), dict):
        return dict(row)
    if "problem" in row and "generations" in row:
        generations = [g for g in (row["generations"] or []) if isinstance(g, str) and g.strip()]
        if not generations:
            raise SourceLayoutError(f"{where}: no non-empty generation to use as the demonstration")
        question = row["problem"].strip()
        content = f"{question} {instruction}".strip() if instruction else question
        return {
            "data_source": str(row.get("source") or "openr1"),
            "prompt": [{"content": content, "role": "user"}],
            "target": [{"content": generations[0], "role": "assistant"}],
            "ability": "math",
            "reward_model": {"ground_truth": _strip_answer(row["answer"]), "style": "rule"},
            "extra_info": {"index": index, "split": "train"},
        }
    raise SourceLayoutError(
        f"{where}: neither the project schema (prompt, target, reward_model) nor OpenR1-Math-220k's "
        f"(problem, answer, generations); the row has {', '.join(sorted(row))}"
    )


def prepare_benchmark(
    name: str,
    out_path: str | Path,
    *,
    source: str | None = None,
    split: str | None = None,
    config_name: str | None = None,
    instruction: str | None = None,
    system_prompt: str | None = None,
    seed: int = 0,
) -> int:
    """Convert benchmark ``name`` from ``source`` (a local file/folder or hub name; default: its hub
    dataset) to a project-schema parquet at ``out_path``. Returns the number of rows written."""
    from megatron_hpt.data.schema import validate_row
    from megatron_hpt.data.sources import read_rows, write_parquet

    spec = get_benchmark(name)
    if source is None:
        source, split, config_name = spec.hub_name, split or spec.hub_split, config_name or spec.hub_config
    raw = read_rows(source, split or spec.hub_split, config_name)
    rows = []
    for i, (row, (file, row_no)) in enumerate(zip(raw.rows, raw.locations)):
        where = f"{file}: row {row_no}"
        converted = convert_row(
            row, spec, i, where=where, instruction=instruction, system_prompt=system_prompt, seed=seed
        )
        validate_row(converted, where)  # what we write must load
        rows.append(converted)
    write_parquet(rows, out_path)
    return len(rows)


def prepare_training_set(
    source: str,
    out_path: str | Path,
    *,
    split: str = "train",
    instruction: str = "",
    on_bad_row: str = "error",
) -> tuple[int, int]:
    """Openr1-Math-46k-8192 (or raw OpenR1-Math-220k) -> project-schema parquet with a
    demonstration on every row. Returns (rows written, rows skipped)."""
    from megatron_hpt.data.schema import DataFormatError, validate_row
    from megatron_hpt.data.sources import read_rows, write_parquet

    raw = read_rows(source, split)
    rows, skipped = [], 0
    for i, (row, (file, row_no)) in enumerate(zip(raw.rows, raw.locations)):
        where = f"{file}: row {row_no}"
        try:
            converted = convert_openr1_row(row, i, where=where, instruction=instruction)
            validate_row(converted, where, require_demonstration=True)
        except (SourceLayoutError, DataFormatError):
            if on_bad_row == "error":
                raise
            skipped += 1
            continue
        rows.append(converted)
    write_parquet(rows, out_path)
    return len(rows), skipped
