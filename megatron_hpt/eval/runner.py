"""Running an evaluation: prompts -> rollout engine (k samples each) -> rewards ->
avg@k and pass@k per benchmark.

``evaluate_prompts`` is the core (the trainer's periodic held-out eval calls it on
already-loaded prompts); ``evaluate`` loads each configured benchmark and runs it.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from megatron_hpt.data.dataset import DatasetConfig, load_prompts
from megatron_hpt.data.types import Prompt
from megatron_hpt.eval.config import BenchmarkConfig, EvalConfig
from megatron_hpt.eval.metrics import avg_at_k, pass_at_k
from megatron_hpt.rewards.pool import RewardPool
from megatron_hpt.rewards.scoring import RewardItem
from megatron_hpt.rollout.engine import RolloutEngine, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class BenchmarkResult:
    """Scores of one benchmark for one model."""

    name: str
    num_problems: int
    num_samples: int
    avg_at_k: float
    """Mean score over all samples of all problems, in [0, 1]."""
    pass_at_k: dict[int, float]
    """Unbiased pass@k for each reported k <= num_samples, in [0, 1]."""
    zero_reasons: dict[str, int]
    """How many samples scored 0, by reason (no_box, wrong, timeout, ...)."""
    finish_reasons: dict[str, int]
    mean_response_tokens: float
    correct_per_problem: list[int]
    """Correct samples of each problem, in dataset order."""
    settings: dict = field(default_factory=dict)
    """The sampling settings used (temperature, top_p, max_new_tokens)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchmarkResult":
        data = dict(data)
        data["pass_at_k"] = {int(k): v for k, v in data["pass_at_k"].items()}
        return cls(**data)


@dataclass
class EvalRun:
    """All benchmark results of one model (one row of the report)."""

    model: str
    results: dict[str, BenchmarkResult] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model": self.model, "results": {k: v.to_dict() for k, v in self.results.items()}}

    @classmethod
    def from_dict(cls, data: dict) -> "EvalRun":
        return cls(data["model"], {k: BenchmarkResult.from_dict(v) for k, v in data["results"].items()})

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path) -> "EvalRun":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def evaluate_prompts(
    engine: RolloutEngine,
    prompts: Sequence[Prompt],
    *,
    name: str,
    num_samples: int,
    params: SamplingParams,
    decode: Callable[[list[int]], str],
    reward_pool: RewardPool,
    seed: int = 0,
    pass_k: Sequence[int] = (1,),
    prompts_per_call: int = 64,
) -> BenchmarkResult:
    """Sample ``num_samples`` responses per prompt, score them, and summarize."""
    if not prompts:
        raise ValueError(f"benchmark {name}: no prompts to evaluate")
    scores: list[list[float]] = []
    zero_reasons: Counter = Counter()
    finish_reasons: Counter = Counter()
    num_tokens = 0
    for start in range(0, len(prompts), prompts_per_call):
        chunk = prompts[start : start + prompts_per_call]
        completions = engine.generate([p.prompt_ids for p in chunk], num_samples, params, seed + start)
        if len(completions) != len(chunk) or any(len(c) != num_samples for c in completions):
            raise RuntimeError(
                f"benchmark {name}: the rollout engine returned {[len(c) for c in completions]} completions "
                f"for {len(chunk)} prompts x {num_samples} samples"
            )
        items = []
        for prompt, samples in zip(chunk, completions):
            for completion in samples:
                items.append(RewardItem(decode(completion.output_ids), prompt.ground_truth, prompt.reward_style))
                finish_reasons[completion.finish_reason] += 1
                num_tokens += len(completion.output_ids)
        results = reward_pool.score_batch(items)
        for i in range(len(chunk)):
            row = results[i * num_samples : (i + 1) * num_samples]
            scores.append([r.score for r in row])
            zero_reasons.update(r.reason for r in row if r.score == 0.0)
    return BenchmarkResult(
        name=name,
        num_problems=len(prompts),
        num_samples=num_samples,
        avg_at_k=avg_at_k(scores),
        pass_at_k={k: pass_at_k(scores, k) for k in sorted(set(pass_k)) if k <= num_samples},
        zero_reasons=dict(sorted(zero_reasons.items())),
        finish_reasons=dict(sorted(finish_reasons.items())),
        mean_response_tokens=num_tokens / (len(prompts) * num_samples),
        correct_per_problem=[sum(1 for s in row if s >= 1.0) for row in scores],
        settings={"temperature": params.temperature, "top_p": params.top_p, "max_new_tokens": params.max_new_tokens},
    )


def load_benchmark(bench: BenchmarkConfig, cfg: EvalConfig, tokenizer) -> list[Prompt]:
    dataset = load_prompts(
        DatasetConfig(
            path=bench.path,
            split=bench.split,
            max_prompt_length=cfg.max_prompt_length,
            max_demonstration_length=None,
            reward_style=bench.reward_style,
            cache_dir=cfg.cache_dir,
        ),
        tokenizer,
    )
    logger.info("%s", dataset.report.summary())
    return list(dataset)


def evaluate(
    engine: RolloutEngine,
    tokenizer,
    cfg: EvalConfig,
    *,
    model: str,
    reward_pool: RewardPool | None = None,
) -> EvalRun:
    """Evaluate every configured benchmark; one ``EvalRun`` (a report row) for ``model``."""
    own_pool = reward_pool is None
    pool = RewardPool.from_config(cfg.reward) if own_pool else reward_pool
    try:
        run = EvalRun(model)
        for bench in cfg.benchmarks:
            prompts = load_benchmark(bench, cfg, tokenizer)
            run.results[bench.name] = evaluate_prompts(
                engine,
                prompts,
                name=bench.name,
                num_samples=cfg.num_samples(bench),
                params=cfg.sampling_params(bench),
                decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                reward_pool=pool,
                seed=cfg.seed,
                pass_k=cfg.pass_k,
                prompts_per_call=cfg.prompts_per_call,
            )
        return run
    finally:
        if own_pool:
            pool.close()
