"""compute_advantages against plain per-group loops, and its input errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_hpt.losses import compute_advantages, get_preset

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
GROUPS = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3, 9, 9, 9, 9])


def _loop(rewards, groups, fn):
    out = torch.empty_like(rewards)
    for g in groups.unique().tolist():
        idx = (groups == g).nonzero().flatten().tolist()
        vals = [rewards[i].item() for i in idx]
        for i in idx:
            out[i] = fn(rewards[i].item(), vals)
    return out


def _mean(v):
    return sum(v) / len(v)


def _std(v):
    m = _mean(v)
    return (sum((x - m) ** 2 for x in v) / (len(v) - 1)) ** 0.5


def test_grpo_with_and_without_std():
    grpo = get_preset("grpo")
    got = compute_advantages(grpo, REWARDS, GROUPS)
    want = _loop(REWARDS, GROUPS, lambda r, v: (r - _mean(v)) / (_std(v) + 1e-6))
    torch.testing.assert_close(got, want)
    assert got[4:8].abs().max() > 0  # the group with a 0.5 reward
    got = compute_advantages(get_preset("hpt"), REWARDS, GROUPS)  # HPT: r - mean, no std
    torch.testing.assert_close(got, _loop(REWARDS, GROUPS, lambda r, v: r - _mean(v)))


def test_rloo_reinforce_unit():
    got = compute_advantages(get_preset("rloo"), REWARDS, GROUPS)
    want = _loop(REWARDS, GROUPS, lambda r, v: r - (sum(v) - r) / (len(v) - 1))
    torch.testing.assert_close(got, want)
    got = compute_advantages(get_preset("reinforce"), REWARDS, GROUPS)
    torch.testing.assert_close(got, torch.where(REWARDS >= 1.0, 1.0, -1.0).to(torch.float64))
    torch.testing.assert_close(compute_advantages(get_preset("sft"), REWARDS, GROUPS), torch.ones_like(REWARDS))


def test_reinforce_pp_normalizes_over_the_batch():
    cfg = get_preset("reinforce_pp")
    got = compute_advantages(cfg, REWARDS, GROUPS)
    mean = REWARDS.mean()
    std = ((REWARDS - mean) ** 2).mean().sqrt()
    torch.testing.assert_close(got, (REWARDS - mean) / (std + 1e-6))
    lengths = torch.arange(1, 13)
    got = compute_advantages(cfg, REWARDS, GROUPS, response_lengths=lengths)
    tok = REWARDS.repeat_interleave(lengths)  # every token of a response carries its reward
    torch.testing.assert_close(got, (REWARDS - tok.mean()) / (tok.std(unbiased=False) + 1e-6))


def test_off_policy_rows_in_and_out_of_group_statistics():
    off = torch.zeros(12, dtype=torch.bool)
    off[[3, 7, 11]] = True
    luffy = get_preset("luffy")
    got = compute_advantages(luffy, REWARDS, GROUPS, off)  # LUFFY: stats over on + off-policy rows
    torch.testing.assert_close(got, _loop(REWARDS, GROUPS, lambda r, v: r - _mean(v)))
    split = replace(luffy, advantage_off_policy_in_group=False)
    got = compute_advantages(split, REWARDS, GROUPS, off)
    on_means = {g: REWARDS[(GROUPS == g) & ~off].mean() for g in (7, 3, 9)}
    want = torch.stack([REWARDS[i] - on_means[int(GROUPS[i])] for i in range(12)])
    torch.testing.assert_close(got, want)
    # SRFT: +1/-1 on rollouts, group mean on demonstrations
    got = compute_advantages(get_preset("srft"), REWARDS, GROUPS, off)
    want = torch.where(off, _loop(REWARDS, GROUPS, lambda r, v: r - _mean(v)), torch.where(REWARDS >= 1, 1.0, -1.0).double())
    torch.testing.assert_close(got, want)


def test_gae_with_critic_values_and_fallback_without():
    ppo = get_preset("ppo")
    B, T = 4, 5
    g = torch.Generator().manual_seed(0)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 1, 4])
    mask = torch.arange(T)[None] < lengths[:, None]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    got = compute_advantages(ppo, rewards, torch.arange(B), values=values, response_mask=mask)
    raw = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        running = 0.0
        for t in reversed(range(n)):
            nxt = values[b, t + 1].item() if t + 1 < n else 0.0
            r = rewards[b].item() if t == n - 1 else 0.0
            running = r + ppo.gae_gamma * nxt - values[b, t].item() + ppo.gae_gamma * ppo.gae_lambda * running
            raw[b, t] = running
    flat = raw[mask]
    want = torch.zeros(B, T, dtype=torch.float64)
    want[mask] = (flat - flat.mean()) / (flat.var() + 1e-8).sqrt()
    torch.testing.assert_close(got, want)
    # no critic in this project: without values PPO takes GRPO's group advantage
    torch.testing.assert_close(
        compute_advantages(ppo, REWARDS, GROUPS), compute_advantages(get_preset("grpo"), REWARDS, GROUPS)
    )


def test_bad_inputs_say_what_is_wrong():
    grpo = get_preset("grpo")
    nan = REWARDS.clone()
    nan[5] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values .* rows \[5\]"):
        compute_advantages(grpo, nan, GROUPS)
    with pytest.raises(ValueError, match="group_ids shape"):
        compute_advantages(grpo, REWARDS, GROUPS[:5])
    with pytest.raises(ValueError, match="must be 1-D"):
        compute_advantages(grpo, REWARDS[None], GROUPS[None])
    with pytest.raises(ValueError, match="rewards is empty"):
        compute_advantages(grpo, REWARDS[:0], GROUPS[:0])
    with pytest.raises(ValueError, match="integer tensor"):
        compute_advantages(grpo, REWARDS, GROUPS.double())
    singles = torch.arange(12)
    with pytest.raises(ValueError, match=r"single rollout: their standard deviation is undefined"):
        compute_advantages(grpo, REWARDS, singles)
    with pytest.raises(ValueError, match="leave-one-out baseline needs n >= 2"):
        compute_advantages(get_preset("rloo"), REWARDS, singles)
    torch.testing.assert_close(compute_advantages(get_preset("hpt"), REWARDS, singles), torch.zeros_like(REWARDS))
    off = (GROUPS == 3)  # a group of demonstrations only, excluded from the statistics: an empty group
    with pytest.raises(ValueError, match=r"groups \[3\] have no rollouts"):
        compute_advantages(replace(get_preset("luffy"), advantage_off_policy_in_group=False), REWARDS, GROUPS, off)
