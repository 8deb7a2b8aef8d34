"""Rollouts: the engine interface, the SGLang client and launcher, and the project's
own SGLang-protocol server. Talks HTTP only; never imports megatron.

The trainer's entry point::

    engine = create_rollout_engine(RolloutConfig(...), model_path)   # launches or attaches
    completions = engine.generate(prompt_ids, n, params, seed)       # [prompt][sample]
    engine.update_weights_from_disk(hf_dir, version)                 # or the distributed path
    engine.close()
"""

from megatron_hpt.rollout.config import RolloutConfig
from megatron_hpt.rollout.engine import (
    Completion,
    RolloutEngine,
    RolloutError,
    SamplingParams,
    StaleSamples,
    WeightSender,
    WeightsNeeded,
    WeightSyncError,
    WeightSyncTarget,
    count_stale,
)
from megatron_hpt.rollout.sglang_engine import (
    DistributedWeightSender,
    HttpWeightSyncTarget,
    SGLangEngine,
    create_rollout_engine,
    sample_seed,
)

__all__ = [
    "Completion",
    "DistributedWeightSender",
    "HttpWeightSyncTarget",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutError",
    "SGLangEngine",
    "SamplingParams",
    "StaleSamples",
    "WeightSender",
    "WeightSyncError",
    "WeightSyncTarget",
    "WeightsNeeded",
    "count_stale",
    "create_rollout_engine",
    "sample_seed",
]
