"""From TrainRows to micro-batches: mini-batch and data-parallel splits, dynamic
batching under a token budget, and the tensors the forward step reads, padded or
packed.

Shapes: B rows, T positions, S packed positions. Position t of a row predicts token
t+1, so a row of L tokens has T = L-1 positions; response token j of a row with a
P-token prompt is predicted at position P-1+j.

Two layouts of a micro-batch's model inputs (``CostModel.layout``):
- "padded": [B, T], each row padded at its end to the longest row;
- "packed": [1, S], the rows one after another (THD sequence packing), with the
  cumulative row lengths ``cu_seqlens`` telling attention and RoPE where each row
  starts; a trailing padding segment rounds S up to ``pad_multiple``.
Per-row values the loss reads (loss mask, old/ref/rollout log-probs) are always in the
row layout [B, T]; ``MicroBatch.unpack`` takes model outputs there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal, Sequence

import torch

from megatron_hpt.data.types import TrainRow
from megatron_hpt.losses import LossNormalizers

Layout = Literal["padded", "packed"]


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(kw_only=True, frozen=True)
class CostModel:
    """How rows are counted when they are split over data-parallel ranks and micro-batches.

    Two measures: the TOKENS a micro-batch occupies (what the memory budget
    ``max_tokens_per_microbatch`` bounds: padding included), and its WORK, the linear
    layers' per-token cost plus attention's quadratic part, which the splits balance.
    """

    layout: Layout = "padded"
    """Micro-batch layout: rows padded to the longest one, or packed into one sequence."""
    pad_multiple: int = 1
    """Padded row length / packed length is rounded up to a multiple of this (FP8 GEMMs
    need 16, MXFP8 32; tensor parallelism its size)."""
    attention_tokens: float = math.inf
    """Row length at which a row's causal-attention FLOPs equal its other FLOPs (per layer
    P_layer / (heads * head_dim)): a row of L positions costs L * (1 + L / attention_tokens)
    token-equivalents of work. inf counts tokens only."""

    def __post_init__(self) -> None:
        if self.layout not in ("padded", "packed"):
            raise ValueError(f"layout must be 'padded' or 'packed', got {self.layout!r}")
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {self.pad_multiple}")
        if not self.attention_tokens > 0:
            raise ValueError(f"attention_tokens must be > 0, got {self.attention_tokens}")

    def microbatch_tokens(self, lengths: Sequence[int]) -> int:
        """Positions the model runs on for a micro-batch of rows of these lengths."""
        return self._tokens(len(lengths), max(lengths, default=0), sum(lengths))

    def _tokens(self, count: int, longest: int, total: int) -> int:
        if self.layout == "padded":
            return count * round_up(longest, self.pad_multiple)
        return round_up(total, self.pad_multiple)

    def row_work(self, length: int) -> float:
        """Work of one row of ``length`` positions, in token-equivalents."""
        return length * (1.0 + length / self.attention_tokens)


def _first_fit_decreasing(lengths: Sequence[int], max_tokens: int, cost_model: CostModel) -> list[list[int]]:
    bins: list[list[int]] = []
    stats: list[list[int]] = []  # per bin: rows, longest, total
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        for b, (count, longest, total) in enumerate(stats):
            if cost_model._tokens(count + 1, max(longest, n), total + n) <= max_tokens:
                bins[b].append(i)
                stats[b] = [count + 1, max(longest, n), total + n]
                break
        else:
            bins.append([i])
            stats.append([1, n, n])
    return bins


def _balanced_packed_bins(
    lengths: Sequence[int], num_bins: int, max_tokens: int, cost_model: CostModel
) -> list[list[int]] | None:
    """Rows into ``num_bins`` packed micro-batches of near-equal work under the token budget
    (most work first, each to the least loaded micro-batch it fits in); None when a row
    fits nowhere."""
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    tokens = [0] * num_bins
    work = [0.0] * num_bins
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        fits = [b for b in range(num_bins) if round_up(tokens[b] + n, cost_model.pad_multiple) <= max_tokens]
        if not fits:
            return None
        b = min(fits, key=lambda b: (work[b], b))
        bins[b].append(i)
        tokens[b] += n
        work[b] += cost_model.row_work(n)
    return bins


def dynamic_batches(
    lengths: Sequence[int], max_tokens: int, cost_model: CostModel = CostModel()
) -> list[list[int]]:
    """Group row indices into micro-batches whose tokens (padding included) stay within
    ``max_tokens``.

    The number of micro-batches is that of first-fit decreasing (rows longest first, each
    into the first micro-batch it fits; with padding, rows of similar length end up
    together). Packed, when the rows also fit that many micro-batches of balanced work
    (attention's quadratic part counted), those are used, so pipeline stages do not wait
    on one heavy micro-batch. Within a micro-batch rows are longest first. Every index
    appears exactly once; a row longer than the budget is an error.
    """
    for i, n in enumerate(lengths):
        if cost_model.microbatch_tokens([n]) > max_tokens:
            raise ValueError(
                f"row {i} has {n} tokens ({cost_model.microbatch_tokens([n])} with padding to a multiple of "
                f"{cost_model.pad_multiple}), more than the micro-batch budget max_tokens_per_microbatch={max_tokens}; "
                "raise the budget or lower the maximum prompt/response length"
            )
    bins = _first_fit_decreasing(lengths, max_tokens, cost_model)
    if cost_model.layout == "packed":
        return _balanced_packed_bins(lengths, len(bins), max_tokens, cost_model) or bins
    return bins


def balanced_split(
    lengths: Sequence[int],
    indices: Sequence[int],
    parts: int,
    *,
    kinds: Sequence[str] | None = None,
    cost_model: CostModel = CostModel(),
) -> list[list[int]]:
    """Split ``indices`` into ``parts`` groups of near-equal work (greedy, most work first,
    each row to the least loaded group) so data-parallel ranks finish together.

    With ``kinds`` (a row kind per index of ``lengths``, e.g. "sft"/"rl"), each kind is
    balanced on its own, its rows going to the group with the least work of that kind
    (ties: least work overall): every rank gets its share of SFT tokens and of RL tokens,
    whatever the mix. Deterministic on every rank."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0.0] * parts
    by_kind: dict[str, list[int]] = {}
    for i in indices:
        by_kind.setdefault(kinds[i] if kinds is not None else "", []).append(i)
    for kind in sorted(by_kind):
        kind_totals = [0.0] * parts
        for i in sorted(by_kind[kind], key=lambda i: (-lengths[i], i)):
            k = min(range(parts), key=lambda p: (kind_totals[p], totals[p], len(groups[p]), p))
            groups[k].append(i)
            w = cost_model.row_work(lengths[i])
            kind_totals[k] += w
            totals[k] += w
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
class PackedRows:
    """Where each row sits in a packed micro-batch."""

    cu_seqlens: torch.Tensor
    """[B + 1] (or [B + 2] with a padding segment) int32: start of each row in the packed
    sequence, then its end; the padding that rounds S up is a segment of its own."""
    max_seqlen: int
    """Longest segment (row or padding)."""
    index: torch.Tensor
    """[B, T] long: the packed position of each row position (0 past a row's end)."""

    def to(self, device: torch.device) -> "PackedRows":
        return PackedRows(
            cu_seqlens=self.cu_seqlens.to(device, non_blocking=True),
            max_seqlen=self.max_seqlen,
            index=self.index.to(device, non_blocking=True),
        )


@dataclass
class MicroBatch:
    """One micro-batch: model inputs in its layout, per-token fields in the row layout [B, T]."""

    row_index: torch.Tensor
    """[B] index of each row in the step's TrainBatch."""
    tokens: torch.Tensor
    """Input ids: [B, T] padded with 0 at the end, or [1, S] packed."""
    position_ids: torch.Tensor
    """Like ``tokens``; restarting at 0 for each packed row."""
    targets: torch.Tensor
    """Like ``tokens``: the next token of each position (0 where padded)."""
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
    packed: PackedRows | None = None
    """Set for the packed layout."""

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def unpack(self, values: torch.Tensor) -> torch.Tensor:
        """Per-position model outputs (the shape of ``tokens``) in the row layout [B, T];
        differentiable (a gather)."""
        if self.packed is None:
            return values
        return values.reshape(-1)[self.packed.index]

    def response_values(self, values_BT: torch.Tensor) -> list[torch.Tensor]:
        """Per row, the values at its response positions (the inverse of ``scatter_rows``)."""
        return [values_BT[b][self.loss_mask[b].bool()] for b in range(values_BT.shape[0])]

    def to(self, device: torch.device) -> "MicroBatch":
        if device.type == "cpu":
            return self
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=True) if isinstance(v, (torch.Tensor, PackedRows)) else v
        return MicroBatch(**moved)


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


def _pack(seqs: Sequence[list[int]], pad_to_multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, PackedRows]:
    """tokens, targets, position ids [1, S] and the placement of the rows packed one after another."""
    lengths = [len(s) - 1 for s in seqs]
    total = sum(lengths)
    S = round_up(total, pad_to_multiple)
    segments = lengths + ([S - total] if S > total else [])
    cu = [0]
    for n in segments:
        cu.append(cu[-1] + n)
    tokens = torch.zeros(1, S, dtype=torch.long)
    targets = torch.zeros(1, S, dtype=torch.long)
    position_ids = torch.zeros(1, S, dtype=torch.long)
    for seq, start, n in zip(seqs, cu, lengths):
        t = torch.as_tensor(seq, dtype=torch.long)
        tokens[0, start : start + n] = t[:-1]
        targets[0, start : start + n] = t[1:]
    for start, n in zip(cu, segments):
        position_ids[0, start : start + n] = torch.arange(n)
    T = max(lengths)
    t = torch.arange(T).unsqueeze(0)
    index = torch.where(t < torch.tensor(lengths).unsqueeze(1), torch.tensor(cu[: len(seqs)]).unsqueeze(1) + t, 0)
    return tokens, targets, position_ids, PackedRows(
        cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(segments), index=index
    )


def build_microbatch(
    rows: Sequence[TrainRow],
    row_index: Sequence[int],
    *,
    old_logp: Sequence[torch.Tensor] | None = None,
    ref_logp: Sequence[torch.Tensor] | None = None,
    pad_to_multiple: int = 1,
    layout: Layout = "padded",
) -> MicroBatch:
    """One MicroBatch of the given rows, padded or packed. ``old_logp``/``ref_logp`` hold one
    tensor per row with a value per response token (as ``MicroBatch.response_values``
    returns). ``pad_to_multiple`` rounds the padded row length or the packed length up
    (FP8 GEMMs of Transformer Engine need multiples of 16 tokens)."""
    seqs = [list(r.prompt_ids) + list(r.response_ids) for r in rows]
    for b, row in enumerate(rows):
        if not row.response_ids:
            raise ValueError(f"row {row_index[b]} has an empty response")
        if not row.prompt_ids:
            raise ValueError(f"row {row_index[b]} has an empty prompt")
    B = len(rows)
    packed = None
    if layout == "packed":
        tokens, targets, position_ids, packed = _pack(seqs, pad_to_multiple)
        T = packed.index.shape[1]
    else:
        T = round_up(max(len(s) for s in seqs) - 1, pad_to_multiple)
        tokens = torch.zeros(B, T, dtype=torch.long)
        targets = torch.zeros(B, T, dtype=torch.long)
        for b, seq in enumerate(seqs):
            t = torch.as_tensor(seq, dtype=torch.long)
            tokens[b, : len(seq) - 1] = t[:-1]
            targets[b, : len(seq) - 1] = t[1:]
        position_ids = torch.arange(T).unsqueeze(0).expand(B, T).contiguous()
    loss_mask = torch.zeros(B, T, dtype=torch.float32)
    starts = []
    for b, row in enumerate(rows):
        start = len(row.prompt_ids) - 1
        loss_mask[b, start : start + len(row.response_ids)] = 1.0
        starts.append(start)
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
        packed=packed,
    )
