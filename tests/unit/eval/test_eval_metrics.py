"""avg@k and the unbiased pass@k against the binomial formula."""

import math

import pytest

from megatron_hpt.eval import avg_at_k, pass_at_k, pass_at_k_one


def test_avg_at_k_is_the_mean_of_per_problem_means():
    scores = [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert avg_at_k(scores) == pytest.approx((1.0 + 0.25 + 0.0) / 3)
    with pytest.raises(ValueError):
        avg_at_k([])


@pytest.mark.parametrize("n", [1, 4, 8, 32])
def test_pass_at_k_matches_binomial_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k_one(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_averaging():
    assert pass_at_k_one(32, 0, 32) == 0.0
    assert pass_at_k_one(32, 1, 32) == 1.0
    assert pass_at_k_one(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k([[1, 0, 0, 0], [0, 0, 0, 0]], 2) == pytest.approx((0.5 + 0.0) / 2)
    # pass@1 is avg@k when scores are 0/1
    scores = [[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]]
    assert pass_at_k(scores, 1) == pytest.approx(avg_at_k(scores))
    with pytest.raises(ValueError):
        pass_at_k_one(4, 1, 5)
