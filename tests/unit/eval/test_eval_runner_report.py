"""evaluate / evaluate_prompts through a fake RolloutEngine with fixed completions, and the
report against hand-computed tables."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_hpt.eval import (
    BenchmarkConfig,
    BenchmarkResult,
    EvalConfig,
    EvalRun,
    build_report,
    evaluate,
)
from megatron_hpt.models.tiny import build_tokenizer
from megatron_hpt.rewards import RewardConfig
from megatron_hpt.rollout import Completion, RolloutEngine, SamplingParams


class FixedEngine(RolloutEngine):
    """Returns scripted responses: ``script[question][j]`` for sample j of a prompt."""

    def __init__(self, tokenizer, script):
        self.tok, self.script, self.calls = tokenizer, script, []

    def generate(self, prompts, n, params, seed):
        self.calls.append((len(prompts), n, params, seed))
        out = []
        for ids in prompts:
            text = self.tok.decode(ids)
            question = next(q for q in self.script if q in text)
            responses = self.script[question]
            assert len(responses) == n
            out.append(
                [
                    Completion(self.tok(r, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id],
                               [0.0] * 3, "stop")
                    for r in responses
                ]
            )
        return out

    def update_weights_from_disk(self, path, version):
        raise NotImplementedError

    def healthy(self):
        return True


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _bench_file(path, name, problems, style="rule"):
    rows = [
        {
            "data_source": name,
            "prompt": [{"role": "user", "content": question}],
            "reward_model": {"style": style, "ground_truth": answer},
            "extra_info": {"index": i},
        }
        for i, (question, answer) in enumerate(problems)
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_avg_at_k_from_fixed_completions_and_report(tok, tmp_path):
    box = "So the answer is \\boxed{{{}}}."
    # aime24: k=4 (override of the paper's 32); correct per problem: 4, 1, 0 -> avg@4 = 41.67
    aime = _bench_file(tmp_path / "aime.parquet", "aime24", [("Q1 a?", "7"), ("Q2 a?", "1/2"), ("Q3 a?", "9")])
    # math500: k=1 (paper default); correct: yes, no -> 50.0
    math500 = _bench_file(tmp_path / "m.parquet", "math500", [("Q4 b?", "(0,1]"), ("Q5 b?", "3")])
    # gpqa: multiple choice, k=2; correct: 1 of 2 -> 50.0
    gpqa = _bench_file(tmp_path / "g.parquet", "gpqa", [("Q6 c?", "C")], style="multiple_choice")
    # the demo's held-out split: any name works; k=2, 2 of 2 -> 100.0
    arith = _bench_file(tmp_path / "a.parquet", "arith_eval", [("Q7 d?", "5")])
    script = {
        "Q1 a?": [box.format(7), box.format("7.0"), box.format("\\frac{14}{2}"), box.format(7)],
        "Q2 a?": [box.format("0.5"), box.format(2), "no answer", box.format("9^{9^{9^{9}}}")],
        "Q3 a?": [box.format(8)] * 4,
        "Q4 b?": [box.format("(0, 1]")],
        "Q5 b?": [box.format(4)],
        "Q6 c?": ["ANSWER: C", "ANSWER: A"],
        "Q7 d?": [box.format(5), box.format("5")],
    }
    engine = FixedEngine(tok, script)
    cfg = EvalConfig(
        benchmarks=(
            BenchmarkConfig(name="arith_eval", path=arith, num_samples=2),
            BenchmarkConfig(name="gpqa", path=gpqa, num_samples=2),
            BenchmarkConfig(name="math500", path=math500),
            BenchmarkConfig(name="aime24", path=aime, num_samples=4, max_new_tokens=64),
        ),
        pass_k=(1, 2, 4),
        prompts_per_call=2,
        reward=RewardConfig(num_workers=0, timeout_s=1.0),
        cache_dir=str(tmp_path / "cache"),
    )
    run = evaluate(engine, tok, cfg, model="hpt-demo")
    aime24 = run.results["aime24"]
    assert aime24.correct_per_problem == [4, 1, 0]
    assert aime24.avg_at_k == pytest.approx(5 / 12)
    assert aime24.pass_at_k == pytest.approx({1: 5 / 12, 2: (1 + 0.5 + 0) / 3, 4: 2 / 3})
    assert aime24.zero_reasons == {"no_box": 1, "timeout": 1, "wrong": 5}
    assert aime24.settings == {"temperature": 0.6, "top_p": 0.95, "max_new_tokens": 64}
    assert run.results["math500"].num_samples == 1 and run.results["math500"].avg_at_k == 0.5
    assert run.results["gpqa"].avg_at_k == 0.5 and run.results["arith_eval"].avg_at_k == 1.0
    # The engine got the paper's sampling settings, k per benchmark, and chunks of 2 prompts.
    assert [(c[0], c[1]) for c in engine.calls] == [(1, 2), (1, 2), (2, 1), (2, 4), (1, 4)]
    assert engine.calls[2][2] == SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=8192)

    baseline = EvalRun(
        "base",
        {
            "aime24": BenchmarkResult("aime24", 3, 4, 0.10, {1: 0.10}, {}, {}, 10.0, [1, 0, 0]),
            "math500": BenchmarkResult("math500", 2, 1, 0.5, {1: 0.5}, {}, {}, 10.0, [1, 0]),
        },
    )
    report = build_report([baseline, run])
    # Hand-computed: Avg over the paper columns present (AIME24, MATH-500);
    # hpt-demo: (41.67 + 50.0) / 2 = 45.83; base: (10 + 50) / 2 = 30.0.
    assert report.to_markdown() == (
        "| Model | AIME24 | MATH-500 | Avg | GPQA | arith_eval |\n"
        "|---|---|---|---|---|---|\n"
        "| base | 10.0 | 50.0 | 30.0 | - | - |\n"
        "| hpt-demo | 41.7 | 50.0 | 45.8 | 50.0 | 100.0 |\n"
    )
    md, js = report.write(tmp_path / "out")
    data = json.loads(js.read_text())
    assert data["columns"] == ["aime24", "math500", "avg", "gpqa", "arith_eval"]
    assert data["titles"] == ["AIME24", "MATH-500", "Avg", "GPQA", "arith_eval"]
    assert data["rows"][1]["scores"]["avg"] == pytest.approx(100 * (5 / 12 + 0.5) / 2)
    assert data["rows"][0]["scores"]["gpqa"] is None
    assert md.read_text() == report.to_markdown()
    # Runs round-trip through JSON so reports can combine runs evaluated in different processes.
    run.save(tmp_path / "run.json")
    assert EvalRun.load(tmp_path / "run.json") == run


def test_full_paper_layout_and_defaults():
    results = {
        name: BenchmarkResult(name, 1, 1, value / 100, {1: value / 100}, {}, {}, 1.0, [0])
        for name, value in [("olympiad", 56.9), ("aime25", 21.9), ("minerva", 46.0), ("arc_c", 81.6),
                            ("aime24", 33.0), ("math500", 89.2), ("gpqa", 42.9), ("amc", 69.4)]
    }
    report = build_report([EvalRun("Qwen2.5-Math-7B HPT", results)])
    header, _, row = report.to_markdown().splitlines()
    assert header == "| Model | AIME24 | AIME25 | AMC | MATH-500 | Minerva | Olympiad | Avg | ARC-c | GPQA |"
    assert row == "| Qwen2.5-Math-7B HPT | 33.0 | 21.9 | 69.4 | 89.2 | 46.0 | 56.9 | 52.7 | 81.6 | 42.9 |"

    cfg = EvalConfig(benchmarks=(BenchmarkConfig(name="amc", path="x"), BenchmarkConfig(name="minerva", path="y")))
    assert [cfg.num_samples(b) for b in cfg.benchmarks] == [32, 1]
    assert cfg.sampling_params(cfg.benchmarks[0]) == SamplingParams(temperature=0.6, top_p=0.95, max_new_tokens=8192)
    with pytest.raises(ValueError, match="listed more than once"):
        EvalConfig(benchmarks=(BenchmarkConfig(name="amc", path="x"), BenchmarkConfig(name="amc", path="y")))
    with pytest.raises(ValueError, match="distinct model names"):
        build_report([EvalRun("a"), EvalRun("a")])
