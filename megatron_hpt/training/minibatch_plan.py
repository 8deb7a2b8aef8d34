"""How a step's rows become mini-batches (one optimizer step each) and what each
data-parallel rank computes of them.

- normalization ``global``, composition ``groups``: whole prompt groups, in order, the
  same number of prompts per mini-batch; the rows of a mini-batch are dealt to ranks by
  token count;
- normalization ``global``, composition ``sft_last``: as the official HPT code orders
  them, every row that is not SFT first, then the SFT rows, cut into mini-batches of
  mini_batch_size x rows per prompt rows (so the SFT rows land in the last ones);
- normalization ``verl``: the official split itself (``verl_split``), whose verl
  micro-batches carry the normalization; each rank computes some of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from megatron_hpt.data.types import TrainRow
from megatron_hpt.training.batching import CostModel, balanced_split, minibatch_split
from megatron_hpt.training.verl_split import VerlShare, assign_to_ranks, verl_row_order, verl_split

Composition = Literal["groups", "sft_last"]
"""Which rows share a mini-batch under global normalization (see the module docstring)."""


@dataclass(frozen=True)
class MiniBatchPlan:
    """One optimizer step's rows, and this data-parallel rank's part of them."""

    rows: list[int]
    """Every row of the mini-batch (its global normalizers count them)."""
    local: list[int]
    """The rows this rank computes."""
    verl: VerlShare | None = None
    """Normalization ``verl``: this rank's verl micro-batches; None under global normalization."""


def plan_minibatches(
    rows: Sequence[TrainRow],
    *,
    mini_batch_size: int,
    rows_per_prompt: int,
    num_minibatches: int,
    epochs: int,
    dp_size: int,
    dp_rank: int,
    composition: Composition = "groups",
    verl_num_ranks: int | None = None,
    max_tokens: int = 32768,
    cost_model: CostModel = CostModel(),
) -> list[MiniBatchPlan]:
    """The mini-batches of a step, ``epochs`` times over.

    Args:
        mini_batch_size: prompts per mini-batch (the paper: 64).
        rows_per_prompt: rows of an RL group (rollout.n, or n + 1 with an extra demonstration).
        num_minibatches: mini-batches per epoch under composition ``groups``.
        verl_num_ranks: normalization ``verl`` with this many verl data-parallel ranks; None: global.
        max_tokens: verl's ``ppo_max_token_len_per_gpu`` (normalization ``verl`` only).
        cost_model: how the rows' work is counted when they are dealt to ranks (global only: the
            verl split deals whole verl micro-batches).
    """
    if verl_num_ranks is not None:
        plans = _verl_plans(rows, mini_batch_size * rows_per_prompt, verl_num_ranks, max_tokens, dp_size, dp_rank)
        return plans * epochs
    positions = [r.num_tokens - 1 for r in rows]
    if composition == "groups":
        minibatches = minibatch_split([r.group for r in rows], num_minibatches)
    elif composition == "sft_last":
        order = verl_row_order([r.kind == "sft" for r in rows])
        size = mini_batch_size * rows_per_prompt
        minibatches = [order[o : o + size] for o in range(0, len(order), size)]
    else:
        raise ValueError(f"unknown mini-batch composition {composition!r}; use 'groups' or 'sft_last'")
    kinds = [r.kind for r in rows]
    return [
        MiniBatchPlan(rows=mb, local=balanced_split(positions, mb, dp_size, kinds=kinds, cost_model=cost_model)[dp_rank])
        for mb in minibatches
    ] * epochs


def _verl_plans(
    rows: Sequence[TrainRow], rows_per_step_minibatch: int, num_ranks: int, max_tokens: int, dp_size: int, dp_rank: int
) -> list[MiniBatchPlan]:
    if rows_per_step_minibatch % num_ranks:
        raise ValueError(
            f"verl normalization: a mini-batch of {rows_per_step_minibatch} rows (mini_batch_size x rows per "
            f"prompt) does not split over {num_ranks} verl ranks (algorithm.verl_num_ranks); verl needs "
            "ppo_mini_batch_size x n divisible by its GPUs"
        )
    lengths = [r.num_tokens for r in rows]
    order = verl_row_order([r.kind == "sft" for r in rows])
    plans = []
    for microbatches in verl_split(
        lengths, order, num_ranks=num_ranks, rows_per_minibatch=rows_per_step_minibatch // num_ranks,
        max_tokens=max_tokens,
    ):
        mine = assign_to_ranks(microbatches, lengths, dp_size)[dp_rank]
        plans.append(
            MiniBatchPlan(
                rows=sorted(i for mb in microbatches for i in mb.rows),
                local=sorted(i for rows, _ in mine for i in rows),
                verl=VerlShare(pieces=tuple(mine), num_ranks=num_ranks),
            )
        )
    return plans
