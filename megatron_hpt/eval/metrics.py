"""avg@k and pass@k over per-problem sample scores.

avg@k: the mean score over all k samples of all problems (the paper's metric:
avg@32 for AIME24/25 and AMC, avg@1 elsewhere).
pass@k: the unbiased estimator of Chen et al. (2021), per problem with n samples
of which c are correct, ``1 - C(n - c, k) / C(n, k)``, averaged over problems.
"""

from __future__ import annotations

from typing import Sequence


def avg_at_k(scores: Sequence[Sequence[float]]) -> float:
    """Mean over problems of the mean over that problem's samples (equal k per problem)."""
    if not scores:
        raise ValueError("no problems to average")
    per_problem = []
    for i, samples in enumerate(scores):
        if not samples:
            raise ValueError(f"problem {i} has no samples")
        per_problem.append(sum(samples) / len(samples))
    return sum(per_problem) / len(per_problem)


def pass_at_k_one(num_samples: int, num_correct: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is correct)."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct {num_correct} outside 0..{num_samples}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in 1..{num_samples}, got {k}")
    if num_samples - num_correct < k:
        return 1.0
    # Product form of 1 - C(n-c, k) / C(n, k): exact and stable for n in the thousands.
    miss = 1.0
    for i in range(num_samples - num_correct + 1, num_samples + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_at_k(scores: Sequence[Sequence[float]], k: int) -> float:
    """Mean over problems of the unbiased pass@k (a sample counts as correct when its score is 1)."""
    if not scores:
        raise ValueError("no problems to average")
    values = [pass_at_k_one(len(s), sum(1 for x in s if x >= 1.0), k) for s in scores]
    return sum(values) / len(values)

