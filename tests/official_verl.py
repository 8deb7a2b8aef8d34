"""The official HPT code's loss aggregation, for tests, written from its repository
(TsinghuaC3I/Unify-Post-Training, hpt/verl) and not from this package:

- ``mix_trainer.py`` ``fit``: rollouts first, the switched prompts' demonstrations
  appended after them; padded to a multiple of 8 with copies of the last row
  (``whether_pad``); ``ray_trainer._balance_batch``; ``update_actor`` (DP_COMPUTE_PROTO:
  equal chunks per rank);
- ``mix_actor.py`` ``update_policy``: pads dropped, ``batch.split(ppo_mini_batch_size)``,
  ``rearrange_micro_batches`` (``seqlen_balancing.py``), per micro-batch ``loss.backward()``
  with gradient_accumulation = 64 // 64 = 1; FSDP averages gradients over ranks;
- the per micro-batch loss of ``offline_loss_type=sft`` (HPT) and ``off_policy``
  (LUFFY), with ``loss_remove_token_mean`` and ``loss_remove_clip`` (``core_algos.
  compute_policy_loss``, ``mix_core_alg.compute_sft_pure_loss`` and
  ``compute_token_on_off_policy_loss``).

Tensors are response-aligned: [rows, R] with R the padded response length (the token-sum
divisor), mask 1 on a row's response tokens.
"""

from __future__ import annotations

import heapq
import math

import torch

# ---------------------------------------------------------------- seqlen_balancing.py


class _Set:
    def __init__(self):
        self.sum = 0
        self.items = []

    def add(self, idx, val):
        self.items.append((idx, val))
        self.sum += val

    def merge(self, other):
        for idx, val in other.items:
            self.items.append((idx, val))
            self.sum += val

    def __lt__(self, other):
        if self.sum != other.sum:
            return self.sum < other.sum
        if len(self.items) != len(other.items):
            return len(self.items) < len(other.items)
        return self.items < other.items


class _State:
    def __init__(self, items, k):
        self.k = k
        self.sets = [_Set() for _ in range(k)]
        assert len(items) in [1, k]
        for i, (idx, seqlen) in enumerate(items):
            self.sets[i].add(idx=idx, val=seqlen)
        self.sets = sorted(self.sets, reverse=True)

    @property
    def spread(self):
        return self.sets[0].sum - self.sets[-1].sum

    def merge(self, other):
        for i in range(self.k):
            self.sets[i].merge(other.sets[self.k - 1 - i])
        self.sets = sorted(self.sets, reverse=True)

    def __lt__(self, other):
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.sets[0] > other.sets[0]


def get_seqlen_balanced_partitions(seqlen_list, k_partitions, equal_size):
    sorted_seqlen_list = sorted([(seqlen, i) for i, seqlen in enumerate(seqlen_list)])
    states_pq = []
    if equal_size:
        assert len(seqlen_list) % k_partitions == 0
        for offset in range(0, len(sorted_seqlen_list), k_partitions):
            items = []
            for i in range(k_partitions):
                seqlen, idx = sorted_seqlen_list[offset + i]
                items.append((idx, seqlen))
            heapq.heappush(states_pq, _State(items=items, k=k_partitions))
    else:
        for seqlen, idx in sorted_seqlen_list:
            heapq.heappush(states_pq, _State(items=[(idx, seqlen)], k=k_partitions))
    while len(states_pq) > 1:
        state0 = heapq.heappop(states_pq)
        state1 = heapq.heappop(states_pq)
        state0.merge(state1)
        heapq.heappush(states_pq, state0)
    partitions = [[idx for idx, _ in s.items] for s in states_pq[0].sets]
    assert all(len(p) > 0 for p in partitions)
    return [sorted(p) for p in partitions]


# ---------------------------------------------------------------- the step's split


def official_split(seqlens, is_demo, *, world_size, ppo_mini_batch_size, ppo_max_token_len_per_gpu):
    """Per mini-batch index, per rank, the micro-batches of the official update, as lists of the
    caller's row indices. ``ppo_mini_batch_size`` is the per-rank row count after the worker's
    normalization (prompts x n / ranks)."""
    # fit(): the batch holds the rollouts, then the demonstrations (appended after them)
    batch = [i for i in range(len(seqlens)) if not is_demo[i]] + [i for i in range(len(seqlens)) if is_demo[i]]
    whether_pad = [False] * len(batch)
    remainder = len(batch) % 8
    if remainder != 0:
        batch += [batch[-1]] * (8 - remainder)
        whether_pad += [True] * (8 - remainder)
    # _balance_batch
    global_seqlen_lst = [seqlens[i] for i in batch]
    partitions = get_seqlen_balanced_partitions(global_seqlen_lst, k_partitions=world_size, equal_size=True)
    global_idx = [j for partition in partitions for j in partition]
    batch = [batch[j] for j in global_idx]
    whether_pad = [whether_pad[j] for j in global_idx]
    chunk = len(batch) // world_size
    per_rank = []
    for rank in range(world_size):
        rows = batch[rank * chunk : (rank + 1) * chunk]
        pads = whether_pad[rank * chunk : (rank + 1) * chunk]
        kept = [r for r, p in zip(rows, pads) if not p]  # update_policy: whether_keep
        per_rank.append([kept[o : o + ppo_mini_batch_size] for o in range(0, len(kept), ppo_mini_batch_size)])
    out = []
    for m in range(max(len(mbs) for mbs in per_rank)):
        # rearrange_micro_batches: the count is all-reduced (MAX) over the ranks
        counts = [math.ceil(sum(seqlens[i] for i in mbs[m]) / ppo_max_token_len_per_gpu)
                  for mbs in per_rank if m < len(mbs)]
        num_micro_batches = max(counts)
        ranks = []
        for mbs in per_rank:
            if m >= len(mbs):
                ranks.append([])
                continue
            mini = mbs[m]
            parts = get_seqlen_balanced_partitions([seqlens[i] for i in mini], min(num_micro_batches, len(mini)),
                                                   equal_size=False)
            ranks.append([[mini[j] for j in p] for p in parts])
        out.append(ranks)
    return out


# ---------------------------------------------------------------- mix_actor.py, one micro-batch


def _masked_mean(values, mask):
    return (values * mask).sum() / mask.sum()


def hpt_microbatch_loss(log_prob, entropy, old_log_prob, advantages, response_mask, is_demo, *, sft_loss_coef,
                        entropy_coeff):
    """offline_loss_type=sft: SFT (token mean) on the demonstration rows, the policy gradient (ratio,
    no clip, token sum / response length) on the rollouts, minus the entropy mean over all rows."""
    off_policy_mask = is_demo
    sft_loss = _masked_mean(-log_prob[off_policy_mask], response_mask[off_policy_mask])
    on = ~off_policy_mask
    ratio = torch.exp(log_prob[on] - old_log_prob[on])
    pg_losses = -advantages[on] * ratio
    eos_mask = response_mask[on]
    pg_loss = (pg_losses * eos_mask).sum() / eos_mask.shape[-1]
    if not torch.isnan(sft_loss):
        pg_loss = sft_loss * sft_loss_coef + pg_loss
    entropy_loss = _masked_mean(entropy, response_mask)
    policy_loss = pg_loss - entropy_loss * entropy_coeff
    return policy_loss / 1  # gradient_accumulation = ppo_mini_batch_size // ppo_micro_batch_size = 1


def luffy_microbatch_loss(log_prob, entropy, old_log_prob, advantages, response_mask, is_demo, *, entropy_coeff):
    """offline_loss_type=off_policy, off_policy_reshape p_div_p_0.1, on_policy_reshape no_reshape,
    loss_remove_clip, loss_remove_token_mean: token sum / response length over every row."""
    prefix_mask = is_demo[:, None].expand_as(response_mask)
    ratio = torch.exp(log_prob - old_log_prob)
    on_pg_losses = -advantages * ratio
    off_ratio = torch.exp(log_prob)
    off_ratio = off_ratio / (off_ratio + 0.1)
    off_pg_losses = -advantages * off_ratio
    prefix = prefix_mask.to(log_prob.dtype)
    pg_losses = off_pg_losses * prefix + on_pg_losses * (1 - prefix)
    pg_loss = (pg_losses * response_mask).sum() / response_mask.shape[-1]
    entropy_loss = _masked_mean(entropy, response_mask)
    return pg_loss - entropy_loss * entropy_coeff


def official_minibatch_objective(split_minibatch, world_size, microbatch_loss, tensors):
    """The objective whose gradient the official update applies for one mini-batch: every rank's
    micro-batch losses summed (backward per micro-batch), averaged over ranks by FSDP."""
    total = 0.0
    for rank_microbatches in split_minibatch:
        for rows in rank_microbatches:
            idx = torch.tensor(rows)
            total = total + microbatch_loss(*(t[idx] for t in tensors))
    return total / world_size
