"""Rollouts: the engine interface, the SGLang client and launcher, and the project's
own SGLang-protocol server. Talks HTTP only; never imports megatron.

The trainer's entry point::

    engine = create_rollout_engine(RolloutConfig(...), model_path)   # launches or attaches
    completions = engine.generate(prompt_ids, n, params, seed)       # [prompt][sample]
    engine.update_weights_from_disk(hf_dir, version)                 # or the distributed path
    engine.close()
"""

from megatron_hpt.rollout.config import RolloutConfig
from megatron_hpt.rollout.engine import Completion, RolloutEngine, SamplingParams
from megatron_hpt.rollout.sglang_engine import (
    DistributedWeightSender,
    RolloutError,
    SGLangEngine,
    WeightSyncTarget,
    create_rollout_engine,
    sample_seed,
)

__all__ = [
    "Completion",
    "DistributedWeightSender",
    "RolloutConfig",
    "RolloutEngine",
    "RolloutError",
    "SGLangEngine",
    "SamplingParams",
    "WeightSyncTarget",
    "create_rollout_engine",
    "sample_seed",
]
