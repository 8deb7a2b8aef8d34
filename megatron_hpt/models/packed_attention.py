"""Packed (THD) sequences through megatron's local attention, for machines without
Transformer Engine.

megatron-core runs packed sequences only through Transformer Engine's attention:
its local ``DotProductAttention`` refuses ``packed_seq_params``. Everything else on
the packed path is plain torch and runs anywhere: the attention layer squeezes q/k/v
to [S, heads, dim], RoPE restarts at each row from ``cu_seqlens``, and the output is
reshaped back. ``PackedDotProductAttention`` fills the one gap: attention restricted
to each row (a block-diagonal causal mask), computed by the local attention itself.

Cost: a dense masked attention over the whole pack would spend S^2 on blocks that are
all masked, and one call per row would pay the per-call overhead hundreds of times for
short rows. Instead, consecutive rows are cut into windows about as wide as their first
(longest) row, and consecutive windows of similar width (within 2x) go through the local
attention as one batch [W, N] with a block-diagonal causal mask per window: a few calls
per layer, each about as wide as the rows in it. The CPU path thus runs the same
bookkeeping as the GPU one at a cost close to padding's or below.

Imported only when a model is built with the local layer spec (it imports megatron).

Shape suffixes: S packed positions, H heads, D head dim, N windows, W window width.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

MIN_WINDOW = 64
"""Windows are at least this wide, so short rows share them."""
BUCKET_RATIO = 2
"""Windows batched together differ in width by at most this factor."""


def row_windows(cu_seqlens: list[int], min_window: int = MIN_WINDOW) -> list[tuple[int, int]]:
    """Consecutive whole rows grouped into windows [start, end): a window takes rows while it
    stays within its first row's length (or ``min_window``)."""
    windows = []
    start, width = cu_seqlens[0], 0
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if a > start and b - start > width:
            windows.append((start, a))
            start = a
        if a == start:
            width = max(b - a, min_window)
    windows.append((start, cu_seqlens[-1]))
    return windows


def window_buckets(windows: list[tuple[int, int]], ratio: int = BUCKET_RATIO) -> list[list[tuple[int, int]]]:
    """Consecutive windows grouped so the widest of a group is at most ``ratio`` times its
    narrowest."""
    buckets: list[list[tuple[int, int]]] = []
    lo = hi = 0
    for a, b in windows:
        w = b - a
        if buckets and max(hi, w) <= ratio * min(lo, w):
            buckets[-1].append((a, b))
            lo, hi = min(lo, w), max(hi, w)
        else:
            buckets.append([(a, b)])
            lo = hi = w
    return buckets


def window_batch(cu_seqlens: list[int], windows: list[tuple[int, int]], device):
    """Consecutive windows as one batch [W, N] (the local attention's [seq, batch]), each
    window's rows first, then empty slots. Returns (N, W; slot: the flattened [W, N] slot of
    each position from the first window's start on; mask_N1WW: True where attention is
    masked, i.e. later positions and other rows; an empty slot attends only to empty slots,
    so every softmax row stays finite)."""
    N, W = len(windows), max(b - a for a, b in windows)
    start, end = windows[0][0], windows[-1][1]
    starts = torch.tensor([a for a, _ in windows])
    window = torch.repeat_interleave(torch.arange(N), torch.tensor([b - a for a, b in windows]))
    pos = torch.arange(start, end)
    slot = (pos - starts[window]) * N + window
    row = torch.zeros(end - start, dtype=torch.long)
    row[torch.tensor([c - start for c in cu_seqlens if start < c < end], dtype=torch.long)] = 1
    row_WN = torch.full((W * N,), -1, dtype=torch.long)
    row_WN[slot] = row.cumsum(0)
    row_NW = row_WN.view(W, N).t()
    later_WW = torch.ones(W, W, dtype=torch.bool).triu_(1)
    mask_N1WW = (later_WW | (row_NW[:, :, None] != row_NW[:, None, :])).unsqueeze(1)
    return N, W, slot.to(device), mask_N1WW.to(device)


class PackedDotProductAttention(DotProductAttention):
    """megatron's local DotProductAttention, extended to THD packed sequences."""

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
            return super().forward(
                query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                attention_bias=attention_bias, packed_seq_params=packed_seq_params,
            )
        if attention_mask is not None:
            raise ValueError("packed sequences take their attention mask from cu_seqlens, not attention_mask")
        if packed_seq_params.cu_seqlens_q_padded is not None or not torch.equal(
            packed_seq_params.cu_seqlens_q, packed_seq_params.cu_seqlens_kv
        ):
            raise ValueError("PackedDotProductAttention supports self-attention without per-row padding only")
        cu = packed_seq_params.cu_seqlens_q.tolist()
        outs = []
        for windows in window_buckets(row_windows(cu)):
            a, b = windows[0][0], windows[-1][1]
            N, W, slot, mask_N1WW = window_batch(cu, windows, query.device)

            def batch(x_SHD):  # -> [W, N, H, D], the local attention's [seq, batch, heads, dim]
                # index_copy / index_select: their backward is a plain gather (no accumulating scatter)
                x = x_SHD[a:b]
                return x.new_zeros(W * N, *x.shape[1:]).index_copy(0, slot, x).view(W, N, *x.shape[1:])

            out_WNh = super().forward(batch(query), batch(key), batch(value), mask_N1WW, attn_mask_type=attn_mask_type)
            outs.append(out_WNh.reshape(W * N, -1).index_select(0, slot))
        return torch.cat(outs) if len(outs) > 1 else outs[0]
