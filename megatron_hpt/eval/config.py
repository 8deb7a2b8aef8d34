"""Evaluation settings: the paper's defaults with per-benchmark overrides.

The paper reports avg@32 on AIME24, AIME25 and AMC and avg@1 on the others,
sampling at temperature 0.6, top_p 0.95, up to 8192 new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_hpt.config import checks
from megatron_hpt.data.benchmarks import BENCHMARKS
from megatron_hpt.data.dataset import DEFAULT_CACHE_DIR
from megatron_hpt.rewards.pool import RewardConfig
from megatron_hpt.rollout.engine import SamplingParams


@dataclass(kw_only=True, frozen=True)
class BenchmarkConfig:
    name: str
    """Report column key: a paper benchmark (aime24, aime25, amc, math500, minerva, olympiad, arc_c,
    gpqa) or any other name (e.g. arith_eval, the demo's held-out split)."""
    path: str
    """Data in the project schema: a local file/folder, or a hub dataset written hf:NAME or owner/name
    (see data/prepare_benchmarks.py; a missing local path is an error, never a hub lookup)."""
    split: str = "test"
    """Split to load when ``path`` is a hub dataset name."""
    num_samples: int | None = None
    """k of avg@k; None takes the paper's (32 for aime24, aime25, amc; 1 otherwise)."""
    temperature: float | None = None
    """Overrides EvalConfig.temperature for this benchmark."""
    top_p: float | None = None
    """Overrides EvalConfig.top_p for this benchmark."""
    max_new_tokens: int | None = None
    """Overrides EvalConfig.max_new_tokens for this benchmark."""
    reward_style: Literal["auto", "math", "multiple_choice"] = "auto"
    """Verifier; "auto" reads each row's reward_model.style."""

    def __post_init__(self) -> None:
        checks.not_empty(self, "name", "path", "split")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"benchmark {self.name}: num_samples must be >= 1, got {self.num_samples}")
        try:  # the overrides that are set must make valid sampling parameters on their own
            SamplingParams(**{k: getattr(self, k) for k in ("temperature", "top_p", "max_new_tokens")
                              if getattr(self, k) is not None})
        except ValueError as e:
            raise ValueError(f"benchmark {self.name}: {e}") from None


@dataclass(kw_only=True, frozen=True)
class EvalConfig:
    benchmarks: tuple[BenchmarkConfig, ...] = ()
    """What to evaluate, in report order after the paper's columns."""
    temperature: float = 0.6
    """Sampling temperature (paper: 0.6)."""
    top_p: float = 0.95
    """Nucleus mass (paper: 0.95)."""
    max_new_tokens: int = 8192
    """Longest response (paper: 8192)."""
    max_prompt_length: int = 4096
    """Longer prompts are dropped and counted in the load report."""
    pass_k: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    """pass@k values reported (each where k <= the benchmark's num_samples)."""
    seed: int = 0
    """Base sampling seed; a benchmark's results depend on it and on prompts_per_call."""
    prompts_per_call: int = 64
    """Prompts sent to the rollout engine per generate() call."""
    reward: RewardConfig = RewardConfig()
    """Reward pool for scoring the responses."""
    cache_dir: str | None = DEFAULT_CACHE_DIR
    """Token cache for the benchmark files (None: tokenize every time)."""

    def __post_init__(self) -> None:
        names = [b.name for b in self.benchmarks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"benchmarks: {', '.join(duplicates)} listed more than once")
        if self.prompts_per_call < 1:
            raise ValueError(f"prompts_per_call must be >= 1, got {self.prompts_per_call}")
        if any(k < 1 for k in self.pass_k):
            raise ValueError(f"pass_k values must be >= 1, got {self.pass_k}")
        SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)
        checks.at_least(self, 1, "max_prompt_length")
        checks.non_negative(self, "seed")
        checks.not_empty(self, "cache_dir")

    def num_samples(self, bench: BenchmarkConfig) -> int:
        if bench.num_samples is not None:
            return bench.num_samples
        spec = BENCHMARKS.get(bench.name)
        return spec.paper_num_samples if spec is not None else 1

    def sampling_params(self, bench: BenchmarkConfig) -> SamplingParams:
        def pick(override, default):
            return default if override is None else override

        return SamplingParams(
            temperature=pick(bench.temperature, self.temperature),
            top_p=pick(bench.top_p, self.top_p),
            max_new_tokens=pick(bench.max_new_tokens, self.max_new_tokens),
        )
