"""Packed (THD) sequences through megatron's local attention, for machines without
Transformer Engine.

megatron-core runs packed sequences only through Transformer Engine's attention:
its local ``DotProductAttention`` refuses ``packed_seq_params``. Everything else on
the packed path is plain torch and runs anywhere: the attention layer squeezes q/k/v
to [S, heads, dim], RoPE restarts at each row from ``cu_seqlens``, and the output is
reshaped back. ``PackedDotProductAttention`` fills the one gap: attention restricted
to each row (a block-diagonal causal mask), computed by the local attention itself.
The packed rows are cut into windows of whole consecutive rows, each as wide as the
longest row, and the windows go through the local attention as one batch with a
block-diagonal causal mask per window: one batched call per layer, as with padding,
and no work on the masked blocks between rows of different windows. The CPU path thus
runs the same bookkeeping as the GPU one.

Imported only when a model is built with the local layer spec (it imports megatron).

Shape suffixes: S packed positions, H heads, D head dim, N windows, W window width.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

MIN_WINDOW = 64
"""Windows are at least this wide, so short rows share them (fewer, larger windows)."""


def row_windows(cu_seqlens: list[int], min_window: int = MIN_WINDOW) -> tuple[list[tuple[int, int]], int]:
    """Consecutive whole rows grouped into windows [start, end) no wider than the longest row
    (or ``min_window``); returns the windows and that width."""
    width = max(min_window, max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])))
    windows = []
    start = cu_seqlens[0]
    for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if b - start > width:
            windows.append((start, a))
            start = a
    windows.append((start, cu_seqlens[-1]))
    return windows, width


def window_layout(cu_seqlens: list[int], device, min_window: int = MIN_WINDOW):
    """The windows of ``row_windows`` as a batch [W, N] (the local attention's [seq, batch]),
    each window's rows first, then empty slots. Returns (N, W; slot_S: the flattened [W, N]
    slot of each packed position; mask_N1WW: True where attention is masked, i.e. later
    positions and other rows; an empty slot attends only to empty slots, so every softmax
    row stays finite)."""
    windows, _ = row_windows(cu_seqlens, min_window)
    N, W = len(windows), max(b - a for a, b in windows)
    S = cu_seqlens[-1]
    starts = torch.tensor([a for a, _ in windows])
    window_S = torch.repeat_interleave(torch.arange(N), torch.tensor([b - a for a, b in windows]))
    slot_S = (torch.arange(S) - starts[window_S]) * N + window_S
    row_S = torch.zeros(S, dtype=torch.long)
    row_S[torch.tensor(cu_seqlens[1:-1], dtype=torch.long)] = 1
    row_WN = torch.full((W * N,), -1, dtype=torch.long)
    row_WN[slot_S] = row_S.cumsum(0)
    row_NW = row_WN.view(W, N).t()
    later_WW = torch.ones(W, W, dtype=torch.bool).triu_(1)
    mask_N1WW = (later_WW | (row_NW[:, :, None] != row_NW[:, None, :])).unsqueeze(1)
    return N, W, slot_S.to(device), mask_N1WW.to(device)


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
        N, W, slot_S, mask_N1WW = window_layout(packed_seq_params.cu_seqlens_q.tolist(), query.device)

        def batch(x_SHD):  # -> [W, N, H, D], the local attention's [seq, batch, heads, dim]
            # index_copy / index_select: their backward is a plain gather (no accumulating scatter)
            return x_SHD.new_zeros(W * N, *x_SHD.shape[1:]).index_copy(0, slot_S, x_SHD).view(W, N, *x_SHD.shape[1:])

        out_WNh = super().forward(batch(query), batch(key), batch(value), mask_N1WW, attn_mask_type=attn_mask_type)
        return out_WNh.reshape(W * N, -1).index_select(0, slot_S)
