"""Normalization ``verl`` gives the official HPT run's gradients: the split this package replays
(``plan_minibatches``) and the per-micro-batch normalizers of the estimator against the official
code's own aggregation (``tests/official_verl.py``, written from its repository), in float64."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from megatron_hpt.data.types import TrainRow
from megatron_hpt.losses import LossInputs, LossNormalizers, get_preset, unified_loss
from megatron_hpt.training.minibatch_plan import plan_minibatches
from megatron_hpt.training.verl_split import karmarkar_karp
from tests.official_verl import (
    get_seqlen_balanced_partitions,
    hpt_microbatch_loss,
    luffy_microbatch_loss,
    official_minibatch_objective,
    official_split,
)

R = 24  # padded response length: the official token-sum divisor
V = 7
N = 4  # rows per prompt group
MINI_BATCH_PROMPTS = 8
BUDGET = 64  # ppo_max_token_len_per_gpu: several micro-batches per rank


class Step:
    """One step's rows (HPT: SFT rows or groups of N rollouts; LUFFY: groups of a demonstration
    and N - 1 rollouts) with response-aligned fp64 tensors."""

    def __init__(self, algorithm: str, seed: int, num_prompts: int = 16) -> None:
        rng = random.Random(seed)
        torch.manual_seed(seed)
        self.rows: list[TrainRow] = []
        for g in range(num_prompts):
            prompt = [1] * rng.randint(3, 12)
            if algorithm == "hpt" and rng.random() < 0.4:
                self.rows.append(TrainRow(prompt_ids=prompt, response_ids=[1] * rng.randint(4, R), kind="sft", group=g))
                continue
            rewards = [float(rng.random() < 0.5) for _ in range(N)]
            mean = sum(rewards) / N
            for j, r in enumerate(rewards):
                off = algorithm == "luffy" and j == 0
                self.rows.append(TrainRow(prompt_ids=prompt, response_ids=[1] * rng.randint(1, R), kind="rl",
                                          group=g, advantage=r - mean, off_policy=off))
        B = len(self.rows)
        self.logits = torch.randn(B, R, V, dtype=torch.float64, requires_grad=True)
        self.targets = torch.randint(0, V, (B, R))
        self.mask = torch.zeros(B, R, dtype=torch.float64)
        for b, row in enumerate(self.rows):
            self.mask[b, : len(row.response_ids)] = 1.0
        self.old = (torch.randn(B, R, V, dtype=torch.float64).log_softmax(-1)
                    .gather(-1, self.targets[..., None]).squeeze(-1))
        self.adv = torch.tensor([r.advantage for r in self.rows], dtype=torch.float64)
        self.is_sft = torch.tensor([r.kind == "sft" for r in self.rows])
        self.off = torch.tensor([r.off_policy for r in self.rows])

    def logp_entropy(self):
        logsm = torch.log_softmax(self.logits, -1)
        return logsm.gather(-1, self.targets[..., None]).squeeze(-1), -(logsm.exp() * logsm).sum(-1)

    def inputs(self, idx: list[int]) -> LossInputs:
        logp, ent = self.logp_entropy()
        i = torch.tensor(idx)
        return LossInputs(logp=logp[i], mask=self.mask[i], advantages=self.adv[i], entropy=ent[i],
                          old_logp=self.old[i], is_sft=self.is_sft[i], off_policy=self.off[i])

    def grad(self, objective: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(objective, self.logits)
        return g


def _plans(step: Step, ranks: int, dp_size: int, dp_rank: int):
    return plan_minibatches(step.rows, mini_batch_size=MINI_BATCH_PROMPTS, rows_per_prompt=N, num_minibatches=2,
                            epochs=1, dp_size=dp_size, dp_rank=dp_rank, verl_num_ranks=ranks, max_tokens=BUDGET)


def _ours(step: Step, cfg, ranks: int, dp_size: int) -> list[torch.Tensor]:
    """Every rank's micro-batches of each mini-batch, each verl micro-batch cut in pieces of 2 rows
    (as this run's own budget may cut it), summed: the gradient megatron's schedule applies."""
    per_rank = [_plans(step, ranks, dp_size, r) for r in range(dp_size)]
    grads = []
    for m in range(len(per_rank[0])):
        every = per_rank[0][m].rows
        norms = LossNormalizers.count(step.inputs(every), R)
        total = 0.0
        for plans in per_rank:
            assert plans[m].rows == every
            for mine, whole in plans[m].verl.pieces:
                term = replace(LossNormalizers.count(step.inputs(list(whole)), R), scale=1.0 / ranks)
                for o in range(0, len(mine), 2):
                    loss, _ = unified_loss(cfg, step.inputs(list(mine[o : o + 2])), norms, term)
                    total = total + loss
        grads.append(step.grad(total))
    return grads


def _official(step: Step, ranks: int, microbatch_loss) -> list[torch.Tensor]:
    split = official_split([r.num_tokens for r in step.rows], [r.kind == "sft" for r in step.rows],
                           world_size=ranks, ppo_mini_batch_size=MINI_BATCH_PROMPTS * N // ranks,
                           ppo_max_token_len_per_gpu=BUDGET)
    adv_BR = step.adv[:, None] * step.mask  # compute_grpo_outcome_advantage tiles over the response
    grads = []
    for mb in split:
        logp, ent = step.logp_entropy()
        tensors = (logp, ent, step.old, adv_BR, step.mask, step.is_sft | step.off)
        grads.append(step.grad(official_minibatch_objective(mb, ranks, microbatch_loss, tensors)))
    return grads


HPT = replace(get_preset("hpt"), normalization="verl", sft_weight=0.3, entropy_coef=0.01)
LUFFY = replace(get_preset("luffy"), normalization="verl", entropy_coef=0.01)


def _hpt_loss(*t):
    return hpt_microbatch_loss(*t, sft_loss_coef=0.3, entropy_coeff=0.01)


def _luffy_loss(*t):
    return luffy_microbatch_loss(*t, entropy_coeff=0.01)


@pytest.mark.parametrize("dp_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_hpt_gradients_equal_the_official_aggregation(seed, dp_size):
    step = Step("hpt", seed)
    official = _official(step, 4, _hpt_loss)
    ours = _ours(step, HPT, 4, dp_size)
    assert len(ours) == len(official) == 2
    for g_ours, g_official in zip(ours, official):
        assert g_official.abs().max() > 1e-4
        torch.testing.assert_close(g_ours, g_official, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dp_size", [1, 2])
def test_luffy_gradients_equal_the_official_aggregation(dp_size):
    step = Step("luffy", 3)
    for g_ours, g_official in zip(_ours(step, LUFFY, 4, dp_size), _official(step, 4, _luffy_loss), strict=True):
        assert g_official.abs().max() > 1e-4
        torch.testing.assert_close(g_ours, g_official, rtol=1e-6, atol=1e-9)


def test_the_comparison_tells_global_normalization_apart():
    """The same rows under global normalization with the constant x ranks (the PG scale alone
    matched) do not give the official gradients: SFT and entropy weigh differently."""
    step = Step("hpt", 0)
    official = _official(step, 4, _hpt_loss)
    cfg = replace(HPT, normalization="global")
    plans = plan_minibatches(step.rows, mini_batch_size=MINI_BATCH_PROMPTS, rows_per_prompt=N, num_minibatches=2,
                             epochs=1, dp_size=1, dp_rank=0, composition="sft_last")
    for plan, g_official in zip(plans, official, strict=True):
        loss, _ = unified_loss(cfg, step.inputs(plan.rows), LossNormalizers.count(step.inputs(plan.rows), R * 4))
        assert not torch.allclose(step.grad(loss), g_official, rtol=1e-2, atol=1e-6)


def test_split_is_the_official_one_and_sft_rows_come_last():
    step = Step("hpt", 1)
    split = official_split([r.num_tokens for r in step.rows], [r.kind == "sft" for r in step.rows], world_size=4,
                           ppo_mini_batch_size=MINI_BATCH_PROMPTS * N // 4, ppo_max_token_len_per_gpu=BUDGET)
    plans = _plans(step, 4, 1, 0)
    for plan, mb in zip(plans, split, strict=True):
        theirs = sorted(tuple(sorted(rows)) for rank in mb for rows in rank)
        assert sorted(tuple(sorted(whole)) for mine, whole in plan.verl.pieces) == theirs
        assert all(mine == whole for mine, whole in plan.verl.pieces)
    sft = {i for i, r in enumerate(step.rows) if r.kind == "sft"}
    assert sft and sft <= set(plans[-1].rows) and not sft & set(plans[0].rows)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("equal_size", [True, False])
def test_karmarkar_karp_matches_verl(seed, equal_size):
    rng = random.Random(seed)
    k = rng.choice([2, 3, 4, 8])
    n = k * rng.randint(1, 12) if equal_size else rng.randint(k, 60)
    lengths = [rng.choice([rng.randint(1, 50), 7, 7]) for _ in range(n)]  # ties on purpose
    assert karmarkar_karp(lengths, k, equal_size) == get_seqlen_balanced_partitions(lengths, k, equal_size)


def test_sft_last_composition_under_global_normalization():
    """The official mini-batch composition without its normalization: rollouts first, SFT rows after
    them, mini_batch_size x n rows per mini-batch; every rank's share balanced by tokens."""
    step = Step("hpt", 4)
    kinds = [r.kind for r in step.rows]
    plans = [plan_minibatches(step.rows, mini_batch_size=MINI_BATCH_PROMPTS, rows_per_prompt=N, num_minibatches=2,
                              epochs=2, dp_size=2, dp_rank=r, composition="sft_last") for r in range(2)]
    size = MINI_BATCH_PROMPTS * N
    order = [i for i, k in enumerate(kinds) if k != "sft"] + [i for i, k in enumerate(kinds) if k == "sft"]
    expected = [sorted(order[o : o + size]) for o in range(0, len(order), size)]
    assert [sorted(p.rows) for p in plans[0]] == expected * 2  # two epochs
    assert all(p.verl is None for p in plans[0])
    for m in range(len(plans[0])):
        assert sorted(plans[0][m].local + plans[1][m].local) == sorted(plans[0][m].rows)
    groups = plan_minibatches(step.rows, mini_batch_size=MINI_BATCH_PROMPTS, rows_per_prompt=N, num_minibatches=2,
                              epochs=1, dp_size=1, dp_rank=0)
    assert [{step.rows[i].group for i in p.rows} for p in groups] == [set(range(8)), set(range(8, 16))]


def test_verl_split_errors_are_explained():
    step = Step("hpt", 5)
    with pytest.raises(ValueError, match="does not split over 3 verl ranks"):
        plan_minibatches(step.rows, mini_batch_size=MINI_BATCH_PROMPTS, rows_per_prompt=N, num_minibatches=2,
                         epochs=1, dp_size=1, dp_rank=0, verl_num_ranks=3, max_tokens=BUDGET)
    with pytest.raises(ValueError, match="rows, fewer than the 64 data-parallel ranks"):
        plan_minibatches(step.rows, mini_batch_size=MINI_BATCH_PROMPTS, rows_per_prompt=N, num_minibatches=2,
                         epochs=1, dp_size=64, dp_rank=0, verl_num_ranks=4, max_tokens=BUDGET)


def test_every_rank_gets_rows_when_verl_made_fewer_microbatches():
    """8 ranks here, fewer verl micro-batches in the last mini-batch: some are cut in pieces that keep their
    verl micro-batch's normalizers (the gradients above hold at dp_size=8 too)."""
    step = Step("hpt", 0)
    plans = [_plans(step, 4, 8, r) for r in range(8)]
    cut = False
    for m in range(len(plans[0])):
        shares = [p[m].verl.pieces for p in plans]
        assert all(shares)
        wholes = {whole for share in shares for _, whole in share}
        cut = cut or len(wholes) < 8
        for whole in wholes:
            parts = [mine for share in shares for mine, w in share if w == whole]
            assert sorted(i for p in parts for i in p) == sorted(whole)
    assert cut
