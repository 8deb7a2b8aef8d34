"""The prep scripts on small local fixtures shaped like each public source's columns."""

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_hpt.data import DatasetConfig, load_prompts
from megatron_hpt.data.benchmarks import SourceLayoutError, get_benchmark
from megatron_hpt.models.tiny import build_tokenizer
from megatron_hpt.rewards import score

ROOT = Path(__file__).resolve().parents[3]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# Columns as published (dataset cards / the paper code's data files); values shortened.
FIXTURES = {
    "aime24": [  # HuggingFaceH4/aime_2024
        {"id": 60, "problem": "Find $x$ if $x+1=205$.", "solution": "... $\\boxed{204}$", "answer": "204",
         "url": "https://aops/1", "year": "2024"},
    ],
    "aime25": [{"problem": "Find the sum of all bases $b>9$ ...", "answer": "70", "id": "0"}],  # math-ai/aime25
    "amc": [{"id": 0, "problem": "Cities $A$ and $B$ are $45$ miles apart ...", "answer": 27.0,  # AI-MO
             "url": "https://aops/2"}],
    "math500": [  # HuggingFaceH4/MATH-500
        {"problem": "Convert $(0,3)$ to polar coordinates.", "solution": "...",
         "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
         "unique_id": "test/precalculus/807.json"},
    ],
    "minerva": [{"question": "Find the image diameter (in cm).", "answer": "1.6"}],  # math-ai/minervamath
    "olympiad": [  # Hothan/OlympiadBench OE_TO_maths_en_COMP
        {"id": 1606, "question": "How many moves does Sergey need?", "solution": ["..."], "final_answer": ["$2$"],
         "context": None, "is_multiple_answer": False, "unit": None, "answer_type": "Numerical",
         "subfield": "Combinatorics", "subject": "Math", "language": "English"},
        {"id": 1607, "question": "Find all $n$.", "solution": ["..."], "final_answer": ["$1$", "$3$"],
         "context": "Let $n$ be a positive integer.", "is_multiple_answer": True, "unit": None,
         "answer_type": "Numerical", "subfield": "Algebra", "subject": "Math", "language": "English"},
    ],
    "arc_c": [  # allenai/ai2_arc ARC-Challenge
        {"id": "Mercury_1", "question": "Which is the most likely effect?",
         "choices": {"text": ["density decreases", "years longer", "days shorter", "gravity stronger"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
        {"id": "NYSED_2", "question": "Which numbered option?",
         "choices": {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]}, "answerKey": "2"},
    ],
    "gpqa": [  # Idavidrein/gpqa gpqa_diamond
        {"Question": f"Q{i}: which energy difference resolves the levels?", "Correct Answer": "10^-4 eV",
         "Incorrect Answer 1": "10^-11 eV", "Incorrect Answer 2": "10^-8 eV", "Incorrect Answer 3": "10^-9 eV",
         "Record ID": f"rec{i}", "High-level domain": "Physics"}
        for i in range(6)
    ],
}
GOLD = {"aime24": ["204"], "aime25": ["70"], "amc": ["27"], "math500": ["\\left( 3, \\frac{\\pi}{2} \\right)"],
        "minerva": ["1.6"], "olympiad": ["2", "1, 3"], "arc_c": ["C", "B"]}


def test_every_benchmark_converts_from_its_source_columns(tok, tmp_path):
    prep = _script("prepare_benchmarks")
    src = tmp_path / "src"
    src.mkdir()
    for name, rows in FIXTURES.items():
        if name == "minerva":  # exercise jsonl too
            (src / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            _parquet(src / f"{name}.parquet", rows)
    assert prep.main(["--all", "--source-dir", str(src), "--out-dir", str(tmp_path / "out")]) == 0

    for name, rows in FIXTURES.items():
        ds = load_prompts(DatasetConfig(path=str(tmp_path / "out" / f"{name}.parquet"), cache_dir=None), tok)
        assert len(ds) == len(rows), name
        spec = get_benchmark(name)
        for prompt, raw in zip(ds, rows):
            assert prompt.data_source == name
            assert prompt.reward_style == ("multiple_choice" if spec.style == "multiple_choice" else "math")
            assert "\\boxed{" in prompt.messages[-1]["content"]  # the prompt asks for a boxed answer
            question = raw.get("problem") or raw.get("question") or raw.get("Question")
            assert question in prompt.messages[-1]["content"]
            # The gold answer scores 1 when a model answers it in a box.
            assert score(f"\\boxed{{{prompt.ground_truth}}}", prompt.ground_truth, prompt.reward_style).score == 1.0
        if name in GOLD:
            assert [p.ground_truth for p in ds] == GOLD[name]
    olympiad = load_prompts(DatasetConfig(path=str(tmp_path / "out" / "olympiad.parquet"), cache_dir=None), tok)
    assert olympiad[1].messages[0]["content"].startswith("Let $n$ be a positive integer.\nFind all $n$.")
    arc = load_prompts(DatasetConfig(path=str(tmp_path / "out" / "arc_c.parquet"), cache_dir=None), tok)
    assert "C. days shorter" in arc[0].messages[0]["content"]

    gpqa = load_prompts(DatasetConfig(path=str(tmp_path / "out" / "gpqa.parquet"), cache_dir=None), tok)
    letters = []
    for prompt in gpqa:
        option = {line[0]: line[3:] for line in prompt.messages[0]["content"].splitlines() if line[1:3] == ". "}
        assert option[prompt.ground_truth] == "10^-4 eV"  # the gold letter points at the correct answer
        letters.append(prompt.ground_truth)
    assert len(set(letters)) > 1  # options are shuffled, not always A
    again = tmp_path / "again.parquet"
    prep.main(["--benchmark", "gpqa", "--source", str(src / "gpqa.parquet"), "--out", str(again)])
    assert pq.read_table(again).equals(pq.read_table(tmp_path / "out" / "gpqa.parquet"))  # deterministic


def test_paper_code_json_files_and_custom_instruction(tmp_path, tok):
    prep = _script("prepare_benchmarks")
    folder = tmp_path / "hpt_data" / "AIME24"
    folder.mkdir(parents=True)
    (folder / "test.json").write_text(json.dumps([{"prompt": "Every morning Aya walks.", "answer": "\\boxed{204}"}]))
    gpqa = tmp_path / "hpt_data" / "GPQA"
    gpqa.mkdir()
    (gpqa / "test.json").write_text(json.dumps([{"prompt": "Which planet?\n\nA. d\nB. a", "answer": "A",
                                                 "source": "gpqa_diamond", "id": "0"}]))
    prep.main(["--all", "--source-dir", str(tmp_path / "hpt_data"), "--out-dir", str(tmp_path / "out"),
               "--instruction", ""])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["aime24.parquet", "gpqa.parquet"]
    (p,) = load_prompts(DatasetConfig(path=str(tmp_path / "out" / "aime24.parquet"), cache_dir=None), tok)
    assert (p.messages[0]["content"], p.ground_truth) == ("Every morning Aya walks.", "204")
    (g,) = load_prompts(DatasetConfig(path=str(tmp_path / "out" / "gpqa.parquet"), cache_dir=None), tok)
    assert (g.ground_truth, g.reward_style) == ("A", "multiple_choice")


def test_unknown_layout_names_file_row_and_columns(tmp_path):
    prep = _script("prepare_benchmarks")
    src = _parquet(tmp_path / "weird.parquet", [{"q": "x", "a": "1"}])
    with pytest.raises(SourceLayoutError, match=r"weird\.parquet: row 0: no question column .* the row has a, q"):
        prep.main(["--benchmark", "aime24", "--source", str(src), "--out", str(tmp_path / "o.parquet")])


def test_training_set_from_schema_or_raw_openr1(tmp_path, tok):
    prep = _script("prepare_openr1")
    system = {"role": "system", "content": "Your task is to follow a systematic, thorough reasoning process."}
    schema_rows = [  # Elliott/Openr1-Math-46k-8192
        {"data_source": "", "prompt": [system, {"role": "user", "content": f"Problem {i}"}],
         "target": [{"role": "assistant", "content": f"<think>...</think> \\boxed{{{i}}}"}], "ability": "math",
         "reward_model": {"ground_truth": str(i), "style": "rule"}, "extra_info": {"index": i, "split": "default"}}
        for i in range(3)
    ]
    _parquet(tmp_path / "openr1.parquet", schema_rows)
    prep.main(["--source", str(tmp_path / "openr1.parquet"), "--out", str(tmp_path / "train.parquet")])
    ds = load_prompts(DatasetConfig(path=str(tmp_path / "train.parquet"), require_demonstration=True,
                                    drop_system_prompt=True, cache_dir=None), tok)
    assert [p.messages for p in ds] == [[{"role": "user", "content": f"Problem {i}"}] for i in range(3)]
    assert all(score(p.demonstration, p.ground_truth).score == 1.0 for p in ds)

    raw_rows = [  # open-r1/OpenR1-Math-220k
        {"problem": "What is 1+1?", "solution": "2", "answer": "2", "generations": ["", "1+1=2, \\boxed{2}"],
         "correctness_math_verify": [False, True], "is_reasoning_complete": [False, True], "source": "amc"},
        {"problem": "Nothing generated", "solution": "", "answer": "3", "generations": [],
         "correctness_math_verify": [], "is_reasoning_complete": [], "source": "amc"},
    ]
    _parquet(tmp_path / "raw.parquet", raw_rows)
    with pytest.raises(SourceLayoutError, match=r"raw\.parquet: row 1: no non-empty generation"):
        prep.main(["--source", str(tmp_path / "raw.parquet"), "--out", str(tmp_path / "t2.parquet")])
    prep.main(["--source", str(tmp_path / "raw.parquet"), "--out", str(tmp_path / "t2.parquet"), "--skip-bad"])
    (p,) = load_prompts(DatasetConfig(path=str(tmp_path / "t2.parquet"), require_demonstration=True,
                                      cache_dir=None), tok)
    assert (p.demonstration, p.ground_truth, p.data_source) == ("1+1=2, \\boxed{2}", "2", "amc")
