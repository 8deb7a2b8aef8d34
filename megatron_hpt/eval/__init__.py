"""Evaluation: avg@k and pass@k through the rollout engine with the paper's settings,
and the results table in the paper's layout (markdown and JSON).

    run = evaluate(engine, tokenizer, EvalConfig(benchmarks=(BenchmarkConfig(name="aime24",
                   path="data/benchmarks/aime24.parquet"),)), model="hpt-step-500")
    build_report([run]).write("runs/eval")
"""

from megatron_hpt.eval.config import BenchmarkConfig, EvalConfig
from megatron_hpt.eval.metrics import avg_at_k, pass_at_k, pass_at_k_one
from megatron_hpt.eval.report import EvalReport, build_report
from megatron_hpt.eval.runner import BenchmarkResult, EvalRun, evaluate, evaluate_prompts, load_benchmark

__all__ = [
    "BenchmarkConfig",
    "BenchmarkResult",
    "EvalConfig",
    "EvalReport",
    "EvalRun",
    "avg_at_k",
    "build_report",
    "evaluate",
    "evaluate_prompts",
    "load_benchmark",
    "pass_at_k",
    "pass_at_k_one",
]
