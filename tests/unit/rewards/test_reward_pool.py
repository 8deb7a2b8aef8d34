"""RewardPool: order, equality with in-process scoring, timeouts (soft and hard kill),
worker crashes (retry, then worker_crash), and the pool staying usable."""

import time

import psutil
import pytest
from reward_fault_scorers import faulty_scorer

from megatron_hpt.rewards import RewardItem, RewardPool, score

MIX = [
    ("\\boxed{\\frac{1}{2}}", "0.5", "math"),
    ("no box here", "3", "math"),
    ("\\boxed{7}", "8", "math"),
    ("\\boxed{(0,1]}", "(0, 1]", "math"),
    ("ANSWER: C", "C", "multiple_choice"),
    ("\\boxed{}", "1", "math"),
] * 3


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=1.0, scorer=faulty_scorer) as p:
        yield p


def test_pool_matches_in_process_scoring_in_order(pool):
    expected = [score(*item, timeout_s=5) for item in MIX]
    assert pool.score_batch(MIX) == expected
    assert RewardPool(num_workers=0, timeout_s=5).score_batch(MIX) == expected
    assert pool.score_batch([RewardItem(*MIX[0])]) == expected[:1]


def test_sympy_hang_scores_timeout_within_limit(pool):
    batch = [("\\boxed{9^{9^{9^{9}}}}", "5", "math")] + MIX[:4]
    start = time.monotonic()
    results = pool.score_batch(batch)
    elapsed = time.monotonic() - start
    assert (results[0].score, results[0].reason) == (0.0, "timeout")
    assert results[1:] == [score(*item) for item in MIX[:4]]
    assert elapsed < 1.0 + 0.5 + 1.0, elapsed  # limit + kill grace + scheduling slack


def _child_pids() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}  # workers run under the forkserver


def test_uninterruptible_hang_is_killed_and_worker_replaced(pool):
    pids_before = _child_pids()
    killed_before = pool.stats["killed"]
    start = time.monotonic()
    results = pool.score_batch([("HANG_IN_C", "1", "math")] + MIX[:3])
    elapsed = time.monotonic() - start
    assert (results[0].score, results[0].reason) == (0.0, "timeout")
    assert results[1:] == [score(*item) for item in MIX[:3]]
    assert elapsed < 1.0 + 0.5 + 1.0, elapsed
    assert pool.stats["killed"] == killed_before + 1
    pids_after = _child_pids()
    assert pids_before - pids_after and pids_after - pids_before  # the stuck worker was replaced
    assert pool.score_batch(MIX[:2]) == [score(*item) for item in MIX[:2]]


def test_worker_crash_is_retried_then_scored_with_reason(pool, tmp_path):
    crashes_before = pool.stats["crashes"]
    batch = [("CRASH_ONCE:" + str(tmp_path / "marker"), "1", "math"), ("CRASH_ALWAYS", "1", "math")] + MIX[:3]
    results = pool.score_batch(batch)
    assert results[0] == type(results[0])(1.0, "", "recovered")  # the retry on a fresh worker succeeded
    assert (results[1].score, results[1].reason) == (0.0, "worker_crash")
    assert results[2:] == [score(*item) for item in MIX[:3]]
    # CRASH_ONCE died once; CRASH_ALWAYS died on its first try and its one retry.
    assert pool.stats["crashes"] == crashes_before + 3
    assert pool.score_batch(MIX) == [score(*item) for item in MIX]


def test_scorer_exception_is_a_reason_not_a_crash(pool):
    (result,) = pool.score_batch([("RAISE", "1", "math")])
    assert (result.score, result.reason) == (0.0, "scorer_error")


def test_bad_items_are_rejected_up_front(pool):
    with pytest.raises(ValueError, match="unknown reward style"):
        pool.score_batch([("\\boxed{1}", "1", "code")])
    with pytest.raises(TypeError, match="RewardItem"):
        pool.score_batch(["just a string"])
