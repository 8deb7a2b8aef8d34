"""Dynamic batching, splits and padded micro-batches."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_hpt.data.types import TrainRow
from megatron_hpt.training.batching import (
    balanced_split,
    build_microbatch,
    dynamic_batches,
    minibatch_split,
)


def paper_like_lengths(n: int, seed: int = 0) -> list[int]:
    """Prompt (<= 1024) + response (long-tailed, <= 8192) token counts, like the paper's rollouts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.randint(60, 1024)
        response = min(8192, int(rng.lognormvariate(7.0, 0.9)))
        out.append(prompt + max(response, 16))
    return out


@pytest.mark.parametrize("cost_model", ["padded", "packed"])
def test_budget_respected_every_row_once_and_fill(cost_model):
    lengths = paper_like_lengths(1024)
    budget = 32768
    bins = dynamic_batches(lengths, budget, cost_model)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    costs = []
    for b in bins:
        ls = [lengths[i] for i in b]
        cost = max(ls) * len(ls) if cost_model == "padded" else sum(ls)
        assert cost <= budget
        costs.append(cost)
    # fill: real tokens over the budget of the micro-batches used
    fill = sum(lengths) / (budget * len(bins))
    assert fill >= 0.90, fill


def test_row_over_budget_is_named():
    with pytest.raises(ValueError, match="row 1 has 50 tokens.*max_tokens_per_microbatch=40"):
        dynamic_batches([10, 50, 20], 40)


def test_balanced_split_and_minibatches():
    lengths = paper_like_lengths(64, seed=1)
    parts = balanced_split(lengths, range(64), 4)
    assert sorted(i for p in parts for i in p) == list(range(64))
    totals = [sum(lengths[i] for i in p) for p in parts]
    assert max(totals) - min(totals) <= max(lengths)
    groups = [i // 8 for i in range(64)]  # 8 prompts x 8 samples
    mbs = minibatch_split(groups, 2)
    assert [sorted({groups[i] for i in m}) for m in mbs] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        minibatch_split(groups, 3)


def test_microbatch_alignment():
    rows = [
        TrainRow(prompt_ids=[5, 6, 7], response_ids=[8, 9], kind="rl", advantage=0.5, rollout_logprobs=[-1.0, -2.0]),
        TrainRow(prompt_ids=[1, 2], response_ids=[3, 4, 5, 6], kind="sft"),
    ]
    mb = build_microbatch(rows, [3, 7], old_logp=[torch.tensor([-0.1, -0.2]), torch.tensor([-1.0, -2, -3, -4])])
    assert mb.tokens.tolist() == [[5, 6, 7, 8, 0], [1, 2, 3, 4, 5]]
    assert mb.targets.tolist() == [[6, 7, 8, 9, 0], [2, 3, 4, 5, 6]]
    assert mb.loss_mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    # each response token's value sits at the position that predicts it
    assert mb.targets[0][mb.loss_mask[0].bool()].tolist() == [8, 9]
    assert mb.targets[1][mb.loss_mask[1].bool()].tolist() == [3, 4, 5, 6]
    assert [v.tolist() for v in mb.response_values(mb.old_logp)] == [
        pytest.approx([-0.1, -0.2]),
        [-1.0, -2.0, -3.0, -4.0],
    ]
    assert mb.rollout_logp[0].tolist() == [0, 0, -1.0, -2.0, 0] and mb.rollout_logp[1].abs().sum() == 0
    assert mb.is_sft.tolist() == [False, True] and mb.row_index.tolist() == [3, 7]
    assert mb.num_loss_tokens == 6


def test_microbatch_padded_to_a_multiple_keeps_every_value_in_place():
    rows = [TrainRow(prompt_ids=[5, 6, 7], response_ids=[8, 9], kind="rl", advantage=0.5, rollout_logprobs=[-1.0, -2.0]),
            TrainRow(prompt_ids=[1, 2], response_ids=[3, 4, 5, 6], kind="sft")]
    plain = build_microbatch(rows, [0, 1])
    padded = build_microbatch(rows, [0, 1], pad_to_multiple=16)
    assert padded.tokens.shape == (2, 16) and plain.tokens.shape == (2, 5)
    for name in ("tokens", "targets", "loss_mask", "position_ids", "rollout_logp"):
        a, b = getattr(plain, name), getattr(padded, name)
        assert torch.equal(b[:, :5], a), name
    assert padded.loss_mask[:, 5:].sum() == 0 and padded.tokens[:, 5:].sum() == 0
    assert padded.position_ids[0].tolist() == list(range(16))
    assert build_microbatch(rows, [0, 1], pad_to_multiple=5).tokens.shape == (2, 5)
