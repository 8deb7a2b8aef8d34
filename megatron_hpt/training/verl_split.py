"""The official HPT run's batch split, replayed: which rows share a micro-batch, and so
the weights of ``LossConfig.normalization = "verl"``.

The official code (TsinghuaC3I/Unify-Post-Training, on verl: ``mix_trainer.py``,
``mix_actor.py``, ``verl/utils/seqlen_balancing.py``) trains one step like this:

1. Row order: the rollouts of the prompts that keep them, in prompt order (LUFFY's
   demonstration first in its group, as the prefix sample), then the demonstrations of
   the prompts switched to SFT (the trainer appends them after the rollouts, in the
   order of their random prompt uids; here in prompt order).
2. The rows are padded to a multiple of 8 with copies of the last row; the copies take
   part in step 3 and are dropped before training.
3. ``_balance_batch``: a Karmarkar-Karp (largest differencing) partition into one set
   of equal row count per data-parallel rank, balancing token counts (prompt +
   response); a rank keeps its rows in batch order, so its demonstrations come last.
4. A rank cuts its rows into mini-batches of ``ppo_mini_batch_size`` rows (prompts per
   mini-batch x n / ranks; ``batch.split``), one optimizer step each: the SFT rows land
   in the last mini-batch.
5. A mini-batch becomes ceil(tokens / ``ppo_max_token_len_per_gpu``) micro-batches, the
   largest count over the ranks (all-reduced), by a Karmarkar-Karp partition of free
   sizes. Each micro-batch's loss is its own aggregate, a rank sums its micro-batches,
   FSDP averages the ranks.

``verl_split`` gives every verl micro-batch of every mini-batch; ``assign_to_ranks``
deals them to this run's data-parallel ranks, whatever their number: the objective is
a sum over verl micro-batches, each normalized by its own counts and 1 / verl's ranks,
and linear in its rows given those, so where each row is computed does not change it.
Pure Python on row lengths.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

from megatron_hpt.training.batching import balanced_split

VERL_ROW_MULTIPLE = 8
"""The official trainer pads each step's rows to a multiple of 8 before balancing them."""


class _Part:
    """One set of a partial partition: its token total and (index, length) items in insertion order."""

    __slots__ = ("total", "items")

    def __init__(self) -> None:
        self.total = 0
        self.items: list[tuple[int, int]] = []

    def key(self) -> tuple:
        return (self.total, len(self.items), self.items)


class _Partial:
    """A partial k-way partition. The heap takes the one whose sets differ most first, ties broken
    by the larger biggest set, as verl does: the same input gives verl's partitions exactly."""

    def __init__(self, items: Sequence[tuple[int, int]], k: int) -> None:
        self.parts = [_Part() for _ in range(k)]
        for part, (index, length) in zip(self.parts, items):
            part.total += length
            part.items.append((index, length))
        self._order()

    def _order(self) -> None:
        self.parts.sort(key=_Part.key, reverse=True)

    @property
    def spread(self) -> int:
        return self.parts[0].total - self.parts[-1].total

    def __lt__(self, other: "_Partial") -> bool:
        if self.spread != other.spread:
            return self.spread > other.spread
        return other.parts[0].key() < self.parts[0].key()

    def absorb(self, other: "_Partial") -> None:
        """Merge another partial partition, its smallest set into our largest and so on."""
        for mine, theirs in zip(self.parts, reversed(other.parts)):
            mine.total += theirs.total
            mine.items.extend(theirs.items)
        self._order()


def karmarkar_karp(lengths: Sequence[int], k: int, equal_size: bool) -> list[list[int]]:
    """verl's ``get_seqlen_balanced_partitions``: k sets of indices with near-equal length totals
    (equal counts when ``equal_size``, which needs len(lengths) % k == 0), each sorted."""
    if k < 1 or len(lengths) < k:
        raise ValueError(f"cannot partition {len(lengths)} rows into {k} sets")
    ranked = sorted((length, i) for i, length in enumerate(lengths))
    if equal_size:
        if len(ranked) % k:
            raise ValueError(f"{len(ranked)} rows do not split into {k} sets of equal size")
        chunks = [ranked[o : o + k] for o in range(0, len(ranked), k)]
    else:
        chunks = [[item] for item in ranked]
    heap: list[_Partial] = []
    for chunk in chunks:
        heapq.heappush(heap, _Partial([(i, length) for length, i in chunk], k))
    while len(heap) > 1:
        first = heapq.heappop(heap)
        first.absorb(heapq.heappop(heap))
        heapq.heappush(heap, first)
    return [sorted(i for i, _ in part.items) for part in heap[0].parts]


@dataclass(frozen=True)
class VerlMicroBatch:
    """One micro-batch of the official split."""

    rank: int
    """The verl data-parallel rank that computes it."""
    rows: tuple[int, ...]
    """Row indices of the step."""


@dataclass(frozen=True)
class VerlShare:
    """What one data-parallel rank of this run computes of a mini-batch under verl normalization."""

    pieces: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    """(rows this rank computes, every row of the verl micro-batch they belong to): the rows are
    normalized by their whole verl micro-batch's counts, wherever they are computed."""
    num_ranks: int
    """verl's data-parallel ranks: every term is divided by them (FSDP's gradient average)."""


def verl_split(
    lengths: Sequence[int],
    order: Sequence[int],
    *,
    num_ranks: int,
    rows_per_minibatch: int,
    max_tokens: int,
) -> list[list[VerlMicroBatch]]:
    """Every verl micro-batch of each mini-batch of a step.

    Args:
        lengths: tokens of each row (prompt + response), indexed by row.
        order: the rows in the official order (``verl_row_order``).
        num_ranks: verl's data-parallel ranks (the paper's runs: 8 GPUs).
        rows_per_minibatch: rows of a mini-batch per rank (verl's normalized ``ppo_mini_batch_size``).
        max_tokens: ``ppo_max_token_len_per_gpu``.
    """
    if num_ranks < 1 or rows_per_minibatch < 1 or max_tokens < 1:
        raise ValueError(
            f"verl split needs num_ranks, rows_per_minibatch and max_tokens >= 1, got "
            f"{num_ranks}, {rows_per_minibatch}, {max_tokens}"
        )
    if not order:
        return []
    multiple = math.lcm(VERL_ROW_MULTIPLE, num_ranks)
    padded = list(order) + [order[-1]] * (-len(order) % multiple)
    ranks = karmarkar_karp([lengths[i] for i in padded], num_ranks, equal_size=True)
    rank_rows = [[padded[p] for p in part if p < len(order)] for part in ranks]
    num_minibatches = max(-(-len(r) // rows_per_minibatch) for r in rank_rows)
    out = []
    for m in range(num_minibatches):
        chunks = [r[m * rows_per_minibatch : (m + 1) * rows_per_minibatch] for r in rank_rows]
        count = max(-(-sum(lengths[i] for i in c) // max_tokens) for c in chunks if c)
        microbatches = []
        for rank, chunk in enumerate(chunks):
            if not chunk:
                continue  # verl would wait for this rank in the all-reduce; it has nothing to add
            parts = karmarkar_karp([lengths[i] for i in chunk], min(count, len(chunk)), equal_size=False)
            microbatches += [VerlMicroBatch(rank=rank, rows=tuple(chunk[j] for j in p)) for p in parts if p]
        out.append(microbatches)
    return out


def verl_row_order(is_sft: Sequence[bool]) -> list[int]:
    """The official row order: every row that is not SFT in batch order, then the SFT rows."""
    return [i for i, s in enumerate(is_sft) if not s] + [i for i, s in enumerate(is_sft) if s]


def assign_to_ranks(
    microbatches: Sequence[VerlMicroBatch], lengths: Sequence[int], dp_size: int
) -> list[list[tuple[tuple[int, ...], tuple[int, ...]]]]:
    """Each of this run's ``dp_size`` ranks' pieces (rows, their verl micro-batch's rows), balancing
    tokens. Every rank gets at least one piece: when verl made fewer micro-batches than there are ranks
    (a verl rank with no rows in this mini-batch), the largest are cut in two."""
    pieces = [(mb.rows, mb.rows) for mb in microbatches]
    while len(pieces) < dp_size:
        cut = max(range(len(pieces)), key=lambda p: (len(pieces[p][0]), -p))
        rows, whole = pieces[cut]
        if len(rows) < 2:
            raise ValueError(
                f"this mini-batch has {sum(len(p[0]) for p in pieces)} rows, fewer than the {dp_size} data-parallel "
                "ranks (each needs at least one); use fewer data-parallel ranks or more rows per mini-batch"
            )
        by_length = sorted(rows, key=lambda i: (-lengths[i], i))
        pieces[cut : cut + 1] = [(tuple(sorted(by_length[0::2])), whole), (tuple(sorted(by_length[1::2])), whole)]
    tokens = [sum(lengths[i] for i in rows) for rows, _ in pieces]
    return [[pieces[p] for p in share] for share in balanced_split(tokens, range(len(pieces)), dp_size)]
