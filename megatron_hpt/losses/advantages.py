"""Advantages from rewards: the A_hat factor of the unified estimator.

All estimators here are critic-free and work on one scalar reward per rollout,
grouped by prompt (``group_ids``); GAE is the exception that needs critic values,
and this project trains no critic. Computed once per rollout batch, before the
batch is split into micro-batches, on detached tensors.

Shape suffixes: B rows (rollouts), T response positions.
"""

from __future__ import annotations

import torch

from megatron_hpt.losses.config import AdvantageEstimator, LossConfig


def _check_rewards(rewards_B: torch.Tensor, group_ids_B: torch.Tensor, off_policy_B: torch.Tensor | None) -> None:
    if rewards_B.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B] (one reward per rollout), got shape {tuple(rewards_B.shape)}")
    if rewards_B.numel() == 0:
        raise ValueError("rewards is empty: no rollouts to compute advantages for")
    if group_ids_B.shape != rewards_B.shape:
        raise ValueError(
            f"group_ids shape {tuple(group_ids_B.shape)} does not match rewards shape {tuple(rewards_B.shape)}"
        )
    if group_ids_B.dtype.is_floating_point or group_ids_B.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor (one prompt index per rollout), got {group_ids_B.dtype}")
    if off_policy_B is not None and off_policy_B.shape != rewards_B.shape:
        raise ValueError(
            f"off_policy shape {tuple(off_policy_B.shape)} does not match rewards shape {tuple(rewards_B.shape)}"
        )
    bad = ~torch.isfinite(rewards_B)
    if bad.any():
        rows = bad.nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"rewards has {int(bad.sum())} non-finite values (NaN or inf), at rows {rows}; "
            "fix the reward function (a failed verification should score 0, not NaN)"
        )


def _group_stats(
    rewards_B: torch.Tensor, inverse_B: torch.Tensor, num_groups: int, in_stats_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Count, mean and unbiased variance per group over the rows selected by in_stats_B."""
    w_B = in_stats_B.to(rewards_B.dtype)
    count_G = torch.zeros(num_groups, dtype=rewards_B.dtype).index_add_(0, inverse_B, w_B)
    total_G = torch.zeros(num_groups, dtype=rewards_B.dtype).index_add_(0, inverse_B, w_B * rewards_B)
    mean_G = total_G / count_G.clamp(min=1)
    dev2_B = w_B * (rewards_B - mean_G[inverse_B]) ** 2
    sq_G = torch.zeros(num_groups, dtype=rewards_B.dtype).index_add_(0, inverse_B, dev2_B)
    var_G = sq_G / (count_G - 1).clamp(min=1)
    return count_G, mean_G, var_G


def _estimate(
    estimator: AdvantageEstimator,
    cfg: LossConfig,
    rewards_B: torch.Tensor,
    group_ids_B: torch.Tensor,
    in_stats_B: torch.Tensor,
    response_lengths_B: torch.Tensor | None,
) -> torch.Tensor:
    if estimator == "unit":
        return torch.ones_like(rewards_B)
    if estimator == "reinforce":
        return torch.where(rewards_B >= cfg.success_reward, 1.0, -1.0).to(rewards_B.dtype)
    if estimator == "reinforce_pp":
        # REINFORCE++ (Hu 2025): normalize over the whole batch, no grouping. Token-weighted when
        # the response lengths are known (verl whitens over every response token).
        w_B = in_stats_B.to(rewards_B.dtype)
        if response_lengths_B is not None:
            w_B = w_B * response_lengths_B.to(rewards_B.dtype)
        if int((w_B > 0).sum()) < 2:
            raise ValueError("reinforce_pp normalizes over the batch and needs at least 2 rollouts in it")
        mean = (w_B * rewards_B).sum() / w_B.sum()
        var = (w_B * (rewards_B - mean) ** 2).sum() / w_B.sum()
        return (rewards_B - mean) / (var.sqrt() + cfg.advantage_eps)

    # group-relative estimators
    uniq_G, inverse_B = torch.unique(group_ids_B, return_inverse=True)
    count_G, mean_G, var_G = _group_stats(rewards_B, inverse_B, uniq_G.numel(), in_stats_B)
    empty = count_G == 0
    if empty.any():
        groups = uniq_G[empty][:10].tolist()
        raise ValueError(
            f"groups {groups} have no rollouts to compute their statistics from (only off-policy rows, and "
            "advantage_off_policy_in_group is False): every prompt needs at least one on-policy rollout"
        )
    if estimator in ("grpo", "gae"):
        if cfg.advantage_std:
            single = count_G < 2
            if single.any():
                groups = uniq_G[single][:10].tolist()
                raise ValueError(
                    f"groups {groups} have a single rollout: their standard deviation is undefined, so "
                    f"{cfg.name!r} (advantage_std=True) cannot normalize them; sample n >= 2 per prompt "
                    "or set advantage_std=False"
                )
            return (rewards_B - mean_G[inverse_B]) / (var_G[inverse_B].sqrt() + cfg.advantage_eps)
        return rewards_B - mean_G[inverse_B]
    if estimator == "rloo":
        single = count_G < 2
        if single.any():
            groups = uniq_G[single][:10].tolist()
            raise ValueError(f"groups {groups} have a single rollout: RLOO's leave-one-out baseline needs n >= 2")
        n_B = count_G[inverse_B]
        loo_mean_B = (mean_G[inverse_B] * n_B - rewards_B) / (n_B - 1)
        # rows outside the statistics (excluded off-policy rows) are compared with the whole group
        baseline_B = torch.where(in_stats_B, loo_mean_B, mean_G[inverse_B])
        return rewards_B - baseline_B
    raise ValueError(f"unknown advantage estimator {estimator!r}")


def _gae(
    cfg: LossConfig, rewards_B: torch.Tensor, values_BT: torch.Tensor, response_mask_BT: torch.Tensor
) -> torch.Tensor:
    """GAE (Schulman et al. 2016) with the outcome reward on each response's last token,
    whitened over all response tokens of the batch (as PPO implementations do)."""
    if values_BT.shape != response_mask_BT.shape or values_BT.shape[0] != rewards_B.shape[0]:
        raise ValueError(
            f"values {tuple(values_BT.shape)} and response_mask {tuple(response_mask_BT.shape)} must both be "
            f"[B, T] with B = {rewards_B.shape[0]} rows"
        )
    mask_BT = response_mask_BT.to(values_BT.dtype)
    lengths_B = response_mask_BT.sum(-1)
    last_B = (lengths_B - 1).clamp(min=0)
    reward_BT = torch.zeros_like(values_BT)
    reward_BT[torch.arange(rewards_B.shape[0]), last_B] = rewards_B.to(values_BT.dtype) * (lengths_B > 0)
    adv_BT = torch.zeros_like(values_BT)
    running_B = torch.zeros_like(rewards_B, dtype=values_BT.dtype)
    T = values_BT.shape[1]
    for t in reversed(range(T)):
        next_value_B = values_BT[:, t + 1] * mask_BT[:, t + 1] if t + 1 < T else torch.zeros_like(running_B)
        delta_B = reward_BT[:, t] + cfg.gae_gamma * next_value_B - values_BT[:, t]
        running_B = (delta_B + cfg.gae_gamma * cfg.gae_lambda * running_B) * mask_BT[:, t]
        adv_BT[:, t] = running_B
    n = mask_BT.sum()
    if n < 2:
        raise ValueError("GAE whitening needs at least 2 response tokens in the batch")
    mean = (adv_BT * mask_BT).sum() / n
    var = (((adv_BT - mean) * mask_BT) ** 2).sum() / (n - 1)
    return (adv_BT - mean) * torch.rsqrt(var + 1e-8) * mask_BT


def compute_advantages(
    cfg: LossConfig,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    off_policy: torch.Tensor | None = None,
    *,
    response_lengths: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-rollout advantages A_hat from rewards, grouped by prompt.

    Args:
        cfg: the loss config; ``advantage`` (and ``off_policy_advantage`` for off-policy rows),
            ``advantage_std``, ``advantage_eps``, ``advantage_off_policy_in_group``, ``success_reward``.
        rewards: [B] one scalar reward per rollout (RL rows only; SFT rows take no advantage).
        group_ids: [B] integer prompt index of each rollout; group statistics are per prompt.
        off_policy: [B] bool, True for demonstrations mixed into RL groups (LUFFY/SRFT).
        response_lengths: [B] response token counts; REINFORCE++ then weights its batch statistics
            by tokens, as verl does.
        values, response_mask: [B, T] critic values and response mask; with ``advantage="gae"`` and
            values given, returns GAE advantages [B, T]. There is no critic in this project: PPO
            without values uses the group estimator (GRPO's, per ``advantage_std``).

    Returns:
        [B] advantages (float, detached), or [B, T] for GAE with values.

    Formulas (r the reward, G the prompt's group, n = |G|):
        grpo          A = (r - mean_G r) / (std_G r + eps)      (std only if ``advantage_std``)
        rloo          A = r - (sum_G r - r) / (n - 1)
        reinforce     A = +1 if r >= success_reward else -1
        reinforce_pp  A = (r - mean_batch r) / (std_batch r + eps)
        unit          A = 1

    Raises ValueError for mismatched shapes, non-finite rewards, groups without rollouts
    and single-rollout groups where the estimator needs n >= 2.
    """
    with torch.no_grad():
        if not rewards.dtype.is_floating_point:
            rewards = rewards.to(torch.float32)
        _check_rewards(rewards, group_ids, off_policy)
        rewards_B = rewards.detach()
        off_B = off_policy.to(torch.bool) if off_policy is not None else torch.zeros_like(rewards_B, dtype=torch.bool)
        if response_lengths is not None and response_lengths.shape != rewards_B.shape:
            raise ValueError(
                f"response_lengths shape {tuple(response_lengths.shape)} does not match rewards "
                f"shape {tuple(rewards_B.shape)}"
            )
        in_stats_B = torch.ones_like(off_B) if cfg.advantage_off_policy_in_group else ~off_B

        if cfg.advantage == "gae" and values is not None:
            if response_mask is None:
                raise ValueError("GAE with critic values needs response_mask [B, T]")
            if off_B.any():
                raise ValueError("GAE advantages are for on-policy rollouts only; got off-policy rows")
            return _gae(cfg, rewards_B, values.detach(), response_mask)

        on_est = cfg.advantage
        off_est = cfg.off_policy_advantage or cfg.advantage
        adv_B = _estimate(on_est, cfg, rewards_B, group_ids, in_stats_B, response_lengths)
        if off_est != on_est and off_B.any():
            off_adv_B = _estimate(off_est, cfg, rewards_B, group_ids, in_stats_B, response_lengths)
            adv_B = torch.where(off_B, off_adv_B, adv_B)
        return adv_B
