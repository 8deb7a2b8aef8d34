"""Rewards: the final answer of each response checked against the ground truth
(math-verify for math, a letter for multiple choice), in a process pool with a
per-item timeout. No torch here: workers start fast and stay small.

    with RewardPool(num_workers=2, timeout_s=10.0) as pool:
        results = pool.score_batch([(response, ground_truth, "math"), ...])
    results[i].score, results[i].reason   # 1.0 / 0.0 and why
"""

from megatron_hpt.rewards.extract import extract_choice, last_boxed_content
from megatron_hpt.rewards.pool import RewardConfig, RewardPool
from megatron_hpt.rewards.scoring import REASONS, RewardItem, RewardResult, check_style, score, score_item

__all__ = [
    "REASONS",
    "RewardConfig",
    "RewardItem",
    "RewardPool",
    "RewardResult",
    "check_style",
    "extract_choice",
    "last_boxed_content",
    "score",
    "score_item",
]
