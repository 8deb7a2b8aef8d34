"""Dynamic batching, splits, and padded and packed micro-batches."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_hpt.data.types import TrainRow
from megatron_hpt.training.batching import (
    CostModel,
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


def _tokens_naive(ls: list[int], layout: str, multiple: int) -> int:
    up = lambda n: -(-n // multiple) * multiple  # noqa: E731
    return len(ls) * up(max(ls)) if layout == "padded" else up(sum(ls))


@pytest.mark.parametrize("multiple", [1, 16, 32])
@pytest.mark.parametrize("layout,min_fill", [("padded", 0.80), ("packed", 0.95)])
def test_budget_respected_every_row_once_and_fill(layout, min_fill, multiple):
    lengths = paper_like_lengths(1024)
    budget = 32768
    cost_model = CostModel(layout=layout, pad_multiple=multiple, attention_tokens=6144.0)
    bins = dynamic_batches(lengths, budget, cost_model)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    for b in bins:
        assert _tokens_naive([lengths[i] for i in b], layout, multiple) <= budget
    # fill: real tokens over the budget of the micro-batches used
    fill = sum(lengths) / (budget * len(bins))
    assert fill >= min_fill, fill


def test_packed_fill_at_the_paper_budget_is_at_least_95_percent_for_every_seed():
    for seed in range(5):
        lengths = paper_like_lengths(256, seed=seed)  # one rank's share of a paper mini-batch
        bins = dynamic_batches(lengths, 32768, CostModel(layout="packed", pad_multiple=16))
        assert sum(lengths) / (32768 * len(bins)) >= 0.95, seed


def test_packed_microbatches_balance_attention_work():
    """With attention's quadratic part counted, packed micro-batches carry near-equal work
    (first-fit decreasing alone puts the long rows, and most of the work, in the first ones)."""
    from megatron_hpt.training.batching import _first_fit_decreasing

    for seed in range(4):
        lengths = paper_like_lengths(256, seed=seed)
        cm = CostModel(layout="packed", pad_multiple=16, attention_tokens=6144.0)
        bins = dynamic_batches(lengths, 32768, cm)
        work = [sum(cm.row_work(lengths[i]) for i in b) for b in bins]
        assert max(work) / min(work) <= 1.1, (seed, work)
        ffd = _first_fit_decreasing(lengths, 32768, cm)
        assert len(ffd) == len(bins)  # as few micro-batches as first-fit decreasing makes
        ffd_work = [sum(cm.row_work(lengths[i]) for i in b) for b in ffd]
        assert max(ffd_work) / min(ffd_work) > 1.5, ffd_work  # the balancing is what does it


def test_row_over_budget_is_named():
    with pytest.raises(ValueError, match="row 1 has 50 tokens.*max_tokens_per_microbatch=40"):
        dynamic_batches([10, 50, 20], 40)
    with pytest.raises(ValueError, match=r"row 0 has 33 tokens \(48 with padding to a multiple of 16\)"):
        dynamic_batches([33], 40, CostModel(layout="packed", pad_multiple=16))


def test_cost_model_counts_padding_and_attention():
    padded = CostModel(layout="padded", pad_multiple=16, attention_tokens=100.0)
    packed = CostModel(layout="packed", pad_multiple=16, attention_tokens=100.0)
    assert padded.microbatch_tokens([10, 30]) == 2 * 32
    assert packed.microbatch_tokens([10, 30]) == 48
    assert packed.row_work(50) == 50 * 1.5
    with pytest.raises(ValueError, match="pad_multiple"):
        CostModel(pad_multiple=0)


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


def test_balanced_split_balances_sft_and_rl_tokens_each():
    """Long demonstrations (SFT) and long-tailed rollouts (RL): each kind's tokens are spread
    evenly over the ranks, not only their sum."""
    rng = random.Random(3)
    lengths = paper_like_lengths(96, seed=3)
    kinds = ["sft" if rng.random() < 0.25 else "rl" for _ in lengths]
    cm = CostModel(layout="packed", attention_tokens=6144.0)
    for parts in (2, 4):
        split = balanced_split(lengths, range(96), parts, kinds=kinds, cost_model=cm)
        assert sorted(i for p in split for i in p) == list(range(96))
        assert split == balanced_split(lengths, list(reversed(range(96))), parts, kinds=kinds, cost_model=cm)
        for kind in ("sft", "rl"):
            work = [sum(cm.row_work(lengths[i]) for i in p if kinds[i] == kind) for p in split]
            biggest = max(cm.row_work(n) for n, k in zip(lengths, kinds) if k == kind)
            assert max(work) - min(work) <= biggest, (kind, parts, work)
    # kinds ignored, the SFT rows can pile up on one rank
    blind = balanced_split(lengths, range(96), 4, cost_model=cm)
    sft = [sum(cm.row_work(lengths[i]) for i in p if kinds[i] == "sft") for p in blind]
    split = balanced_split(lengths, range(96), 4, kinds=kinds, cost_model=cm)
    sft_k = [sum(cm.row_work(lengths[i]) for i in p if kinds[i] == "sft") for p in split]
    assert max(sft_k) - min(sft_k) < max(sft) - min(sft)


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


def _rows():
    return [
        TrainRow(prompt_ids=[5, 6, 7], response_ids=[8, 9], kind="rl", advantage=0.5, rollout_logprobs=[-1.0, -2.0]),
        TrainRow(prompt_ids=[1, 2], response_ids=[3, 4, 5, 6], kind="sft"),
        TrainRow(prompt_ids=[11], response_ids=[12, 13], kind="rl", advantage=-0.5, rollout_logprobs=[-3.0, -4.0]),
    ]


@pytest.mark.parametrize("multiple", [1, 4, 16])
def test_packed_microbatch_is_the_padded_one_in_a_row(multiple):
    rows = _rows()
    old = [torch.tensor([-0.1, -0.2]), torch.tensor([-1.0, -2, -3, -4]), torch.tensor([-5.0, -6.0])]
    padded = build_microbatch(rows, [3, 7, 9], old_logp=old)
    packed = build_microbatch(rows, [3, 7, 9], old_logp=old, layout="packed", pad_to_multiple=multiple)
    S = -(-(4 + 5 + 2) // multiple) * multiple
    assert packed.tokens.shape == packed.targets.shape == packed.position_ids.shape == (1, S)
    assert packed.tokens[0, :11].tolist() == [5, 6, 7, 8, 1, 2, 3, 4, 5, 11, 12]
    assert packed.targets[0, :11].tolist() == [6, 7, 8, 9, 2, 3, 4, 5, 6, 12, 13]
    assert packed.tokens[0, 11:].sum() == 0 and packed.targets[0, 11:].sum() == 0
    # positions restart at each row, and in the padding segment
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1] + list(range(S - 11))
    pad = [S] if S > 11 else []
    assert packed.packed.cu_seqlens.tolist() == [0, 4, 9, 11] + pad
    assert packed.packed.cu_seqlens.dtype == torch.int32
    assert packed.packed.max_seqlen == max(5, S - 11)
    # the row layout the loss reads is the padded micro-batch's, and unpack maps onto it
    for name in ("loss_mask", "old_logp", "rollout_logp", "advantages", "is_sft", "row_index"):
        assert torch.equal(getattr(packed, name), getattr(padded, name)), name
    m = padded.loss_mask.bool()
    assert torch.equal(packed.unpack(packed.targets)[m], padded.targets[m])
    assert torch.equal(packed.unpack(packed.tokens)[m], padded.tokens[m])
    values = torch.arange(S, dtype=torch.float32).reshape(1, S).requires_grad_()
    unpacked = packed.unpack(values)
    assert unpacked.shape == padded.loss_mask.shape
    (unpacked * packed.loss_mask).sum().backward()
    # every response position receives its gradient once, nothing else does
    assert values.grad[0].tolist() == [0, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1] + [0] * (S - 11)
