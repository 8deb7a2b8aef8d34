"""The local attention over packed rows: windows of whole rows, their batches of similar
width, and each batch's block-diagonal causal mask, against naive per-position definitions."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_hpt.models.packed_attention import row_windows, window_batch, window_buckets


def _cu(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def _random_lengths(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 20), rng.randint(20, 300)]) for _ in range(rng.randint(1, 30))]
    return sorted(lengths, reverse=True) if seed % 2 else lengths  # micro-batches come longest first


@pytest.mark.parametrize("seed", range(20))
def test_windows_cover_whole_rows_once_within_their_first_row(seed):
    cu = _cu(_random_lengths(seed))
    windows = row_windows(cu, min_window=64)
    # consecutive, covering [0, S), every boundary a row boundary
    assert windows[0][0] == 0 and windows[-1][1] == cu[-1]
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert all(a in cu and b in cu and a < b for a, b in windows)
    for (a, b), nxt in zip(windows, windows[1:] + [None]):
        width = max(64, cu[cu.index(a) + 1] - a)
        assert b - a <= width or b == cu[cu.index(a) + 1]  # several rows fit the first one's width
        if nxt is not None:  # greedy: the next row would not have fitted
            assert cu[cu.index(b) + 1] - a > width


def test_windows_group_short_rows_and_isolate_long_ones():
    assert row_windows(_cu([200, 30, 30, 30, 10, 100, 5]), min_window=64) == [
        (0, 200), (200, 260), (260, 300), (300, 400), (400, 405)]
    assert row_windows(_cu([5, 7, 9]), min_window=64) == [(0, 21)]


def test_buckets_are_consecutive_windows_within_a_factor_of_two():
    windows = [(0, 200), (200, 320), (320, 400), (400, 440), (440, 460), (460, 470), (470, 500)]
    assert window_buckets(windows) == [[(0, 200), (200, 320)], [(320, 400), (400, 440)], [(440, 460), (460, 470)],
                                       [(470, 500)]]
    for seed in range(10):
        ws = row_windows(_cu(_random_lengths(seed)))
        buckets = window_buckets(ws)
        assert [w for b in buckets for w in b] == ws
        for b in buckets:
            spans = [e - s for s, e in b]
            assert max(spans) <= 2 * min(spans)


@pytest.mark.parametrize("seed", range(6))
def test_window_batch_places_every_position_once_and_masks_other_rows(seed):
    lengths = _random_lengths(seed)
    cu = _cu(lengths)
    row_of_pos = [r for r, n in enumerate(lengths) for _ in range(n)]
    for windows in window_buckets(row_windows(cu)):
        start, end = windows[0][0], windows[-1][1]
        N, W, slot, mask = window_batch(cu, windows, "cpu")
        assert N == len(windows) and W == max(b - a for a, b in windows)
        assert mask.shape == (N, 1, W, W)
        # every position of the bucket has its own slot of the [W, N] batch: offset in its window, window
        assert slot.shape == (end - start,) and len(set(slot.tolist())) == end - start
        for n, (a, b) in enumerate(windows):
            assert slot[a - start : b - start].tolist() == [t * N + n for t in range(b - a)]
        # naive: position p may attend to q iff both are real, in the same row, and q <= p
        E = end  # marks an empty slot
        pos = torch.full((W * N,), E)
        pos[slot] = torch.arange(start, end)
        gather = pos.view(W, N).t()  # [N, W]: the packed position in each slot
        row_of = torch.tensor(row_of_pos[:end] + [-1])
        row_of[E] = -1
        p, q = gather[:, :, None], gather[:, None, :]
        real = (p < E) & (q < E)
        expected = ~(real & (row_of[p.clamp(max=E)] == row_of[q.clamp(max=E)]) & (q <= p))
        # an empty slot attends to empty slots only, itself at least, so its softmax stays finite
        slot_i, slot_j = torch.arange(W)[None, :, None], torch.arange(W)[None, None, :]
        empty = (p == E).expand(N, W, W)
        expected[empty] = ((q != E) | (slot_j > slot_i)).expand(N, W, W)[empty]
        assert torch.equal(mask[:, 0], expected)
        assert (~mask[:, 0]).any(-1).all()
