"""From TrainRows to micro-batches: mini-batch and data-parallel splits, dynamic
batching under a token budget, and the padded tensors the forward step reads.

Shapes: B rows, T positions. Position t of a row predicts token t+1, so a row of
L tokens has T = L-1 positions; response token j of a row with a P-token prompt
is predicted at position P-1+j.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from megatron_hpt.data.types import TrainRow
from megatron_hpt.losses import LossNormalizers

CostModel = Literal["padded", "packed"]
"""How a micro-batch's size is counted: rows x longest row (padding) or the sum of row
lengths (THD sequence packing, which needs Transformer Engine)."""


def _cost(lengths: Sequence[int], cost_model: CostModel) -> int:
    if not lengths:
        return 0
    return max(lengths) * len(lengths) if cost_model == "padded" else sum(lengths)


def dynamic_batches(
    lengths: Sequence[int], max_tokens: int, cost_model: CostModel = "padded"
) -> list[list[int]]:
    """Group row indices into micro-batches whose cost stays within ``max_tokens``.

    Rows are taken longest first, and each goes into the first micro-batch it fits
    (first-fit decreasing); with padding, rows of similar length end up together.
    Every index appears exactly once; a row longer than the budget is an error.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    bin_lengths: list[list[int]] = []
    for i in order:
        if lengths[i] > max_tokens:
            raise ValueError(
                f"row {i} has {lengths[i]} tokens, more than the micro-batch budget "
                f"max_tokens_per_microbatch={max_tokens}; raise the budget or lower the "
                "maximum prompt/response length"
            )
        for b, bl in zip(bins, bin_lengths):
            if _cost(bl + [lengths[i]], cost_model) <= max_tokens:
                b.append(i)
                bl.append(lengths[i])
                break
        else:
            bins.append([i])
            bin_lengths.append([lengths[i]])
    return bins


def balanced_split(lengths: Sequence[int], indices: Sequence[int], parts: int) -> list[list[int]]:
    """Split ``indices`` into ``parts`` groups of near-equal token totals (greedy, longest
    first) so data-parallel ranks finish together. Deterministic on every rank."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        k = min(range(parts), key=lambda p: (totals[p], len(groups[p]), p))
        groups[k].append(i)
        totals[k] += lengths[i]
    return [sorted(g) for g in groups]


def minibatch_split(groups: Sequence[int], num_minibatches: int) -> list[list[int]]:
    """Row indices of each mini-batch: whole prompt groups, in order, in equal counts
    (the paper: 128 prompts per rollout step, 64 per optimizer step)."""
    unique = list(dict.fromkeys(groups))
    if num_minibatches < 1 or len(unique) % num_minibatches:
        raise ValueError(
            f"{len(unique)} prompts cannot be split into {num_minibatches} equal mini-batches; "
            "rollout_batch_size must be a multiple of mini_batch_size"
        )
    per = len(unique) // num_minibatches
    out = []
    for m in range(num_minibatches):
        chosen = set(unique[m * per : (m + 1) * per])
        out.append([i for i, g in enumerate(groups) if g in chosen])
    return out


@dataclass
class MicroBatch:
    """Padded tensors of one micro-batch; per-token fields are aligned with positions."""

    row_index: torch.Tensor
    """[B] index of each row in the step's TrainBatch."""
    tokens: torch.Tensor
    """[B, T] input ids (padded with 0 at the end)."""
    position_ids: torch.Tensor
    """[B, T]."""
    targets: torch.Tensor
    """[B, T] the next token of each position (0 where padded)."""
    loss_mask: torch.Tensor
    """[B, T] 1.0 on positions that predict a response (or demonstration) token."""
    advantages: torch.Tensor
    """[B] per-row advantage."""
    is_sft: torch.Tensor
    """[B] bool, HPT row kind."""
    off_policy: torch.Tensor
    """[B] bool, demonstration inside an RL group."""
    row_weight: torch.Tensor
    """[B] per-row loss weight (HPT soft mixing)."""
    old_logp: torch.Tensor | None = None
    """[B, T] log-probs of the policy before this step's updates."""
    ref_logp: torch.Tensor | None = None
    """[B, T] log-probs of the reference model."""
    rollout_logp: torch.Tensor | None = None
    """[B, T] log-probs reported by the rollout engine."""
    term_normalizers: LossNormalizers | None = None
    """Normalization ``verl``: the counts of the verl micro-batch these rows belong to, scaled by
    1 / verl's ranks (``LossConfig.normalization``); None: the mini-batch's own."""

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def response_values(self, values_BT: torch.Tensor) -> list[torch.Tensor]:
        """Per row, the values at its response positions (the inverse of ``scatter_rows``)."""
        return [values_BT[b][self.loss_mask[b].bool()] for b in range(values_BT.shape[0])]


def _scatter(per_row: Sequence[torch.Tensor | Sequence[float] | None], starts: list[int], shape) -> torch.Tensor | None:
    """Per-row response values placed at their positions; rows without values (e.g.
    demonstrations have no rollout log-probs) stay 0. None when no row has values."""
    if all(v is None for v in per_row):
        return None
    out = torch.zeros(shape, dtype=torch.float32)
    for b, (v, s) in enumerate(zip(per_row, starts)):
        if v is None:
            continue
        v = torch.as_tensor(v, dtype=torch.float32)
        out[b, s : s + v.numel()] = v
    return out


def build_microbatch(
    rows: Sequence[TrainRow],
    row_index: Sequence[int],
    *,
    old_logp: Sequence[torch.Tensor] | None = None,
    ref_logp: Sequence[torch.Tensor] | None = None,
    pad_to_multiple: int = 1,
) -> MicroBatch:
    """Pad the given rows into one MicroBatch. ``old_logp``/``ref_logp`` hold one tensor
    per row with a value per response token (as ``MicroBatch.response_values`` returns).
    ``pad_to_multiple`` rounds the length up (FP8 GEMMs of Transformer Engine need
    multiples of 16 tokens)."""
    seqs = [list(r.prompt_ids) + list(r.response_ids) for r in rows]
    T = -(-(max(len(s) for s in seqs) - 1) // pad_to_multiple) * pad_to_multiple
    B = len(rows)
    tokens = torch.zeros(B, T, dtype=torch.long)
    targets = torch.zeros(B, T, dtype=torch.long)
    loss_mask = torch.zeros(B, T, dtype=torch.float32)
    starts = []
    for b, (row, seq) in enumerate(zip(rows, seqs)):
        if not row.response_ids:
            raise ValueError(f"row {row_index[b]} has an empty response")
        if not row.prompt_ids:
            raise ValueError(f"row {row_index[b]} has an empty prompt")
        n = len(seq) - 1
        t = torch.as_tensor(seq, dtype=torch.long)
        tokens[b, :n] = t[:-1]
        targets[b, :n] = t[1:]
        start = len(row.prompt_ids) - 1
        loss_mask[b, start : start + len(row.response_ids)] = 1.0
        starts.append(start)
    position_ids = torch.arange(T).unsqueeze(0).expand(B, T).contiguous()
    return MicroBatch(
        row_index=torch.as_tensor(list(row_index), dtype=torch.long),
        tokens=tokens,
        position_ids=position_ids,
        targets=targets,
        loss_mask=loss_mask,
        advantages=torch.tensor([r.advantage for r in rows], dtype=torch.float32),
        is_sft=torch.tensor([r.kind == "sft" for r in rows]),
        off_policy=torch.tensor([r.off_policy for r in rows]),
        row_weight=torch.tensor([r.weight for r in rows], dtype=torch.float32),
        old_logp=_scatter(old_logp, starts, (B, T)) if old_logp is not None else None,
        ref_logp=_scatter(ref_logp, starts, (B, T)) if ref_logp is not None else None,
        rollout_logp=_scatter([r.rollout_logprobs for r in rows], starts, (B, T)),
    )
