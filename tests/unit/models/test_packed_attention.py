"""The local attention over packed rows: windows of whole rows, the window batch and its
block-diagonal causal mask, against naive per-position definitions."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_hpt.models.packed_attention import row_windows, window_layout


def _cu(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def _random_lengths(seed):
    rng = random.Random(seed)
    return [rng.choice([rng.randint(1, 20), rng.randint(20, 300)]) for _ in range(rng.randint(1, 30))]


@pytest.mark.parametrize("seed", range(20))
def test_windows_cover_whole_rows_once_within_the_width(seed):
    cu = _cu(_random_lengths(seed))
    windows, width = row_windows(cu, min_window=64)
    assert width == max(64, max(b - a for a, b in zip(cu, cu[1:])))
    # consecutive, covering [0, S), every boundary a row boundary, none wider than the width
    assert windows[0][0] == 0 and windows[-1][1] == cu[-1]
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert all(a in cu and b in cu and a < b <= a + width for a, b in windows)
    # greedy: the next row would not have fitted
    for (a, b), (_, nxt) in zip(windows, windows[1:]):
        assert cu[cu.index(b) + 1] - a > width


def test_windows_group_short_rows_and_isolate_long_ones():
    assert row_windows(_cu([200, 30, 30, 30, 10, 100, 5]), min_window=64) == (
        [(0, 200), (200, 400), (400, 405)], 200)
    assert row_windows(_cu([5, 7, 9]), min_window=64) == ([(0, 21)], 64)


@pytest.mark.parametrize("seed", range(6))
def test_window_batch_places_every_position_once_and_masks_other_rows(seed):
    lengths = _random_lengths(seed)
    cu = _cu(lengths)
    S = cu[-1]
    N, W, slot, mask = window_layout(cu, "cpu")
    windows, _ = row_windows(cu)
    assert N == len(windows) and W == max(b - a for a, b in windows)
    assert mask.shape == (N, 1, W, W)
    # every packed position has its own slot of the [W, N] batch: offset in its window, window
    assert len(set(slot.tolist())) == S
    for n, (a, b) in enumerate(windows):
        assert slot[a:b].tolist() == [t * N + n for t in range(b - a)]
    # naive: position p may attend to q iff both are real, in the same row, and q <= p
    pos = torch.full((W * N,), S)  # S marks an empty slot
    pos[slot] = torch.arange(S)
    gather = pos.view(W, N).t()  # [N, W]: the packed position in each slot
    row_of = torch.tensor([r for r, n in enumerate(lengths) for _ in range(n)] + [-1])
    p, q = gather[:, :, None], gather[:, None, :]
    real = (p < S) & (q < S)
    expected = ~(real & (row_of[p] == row_of[q]) & (q <= p))
    # an empty slot attends to empty slots only, itself at least, so its softmax stays finite
    slot_i, slot_j = torch.arange(W)[None, :, None], torch.arange(W)[None, None, :]
    empty = (p == S).expand(N, W, W)
    expected[empty] = ((q != S) | (slot_j > slot_i)).expand(N, W, W)[empty]
    assert torch.equal(mask[:, 0], expected)
    assert (~mask[:, 0]).any(-1).all()
