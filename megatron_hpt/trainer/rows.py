"""From scored rollouts to the rows of a training step (the HPT switch in action).

Which rows an algorithm trains on follows from its loss preset:

- ``sft``: every prompt's demonstration (SFT only);
- ``switch``: HPT, per prompt: SFT on the demonstration when at most ``gate`` of its
  rollouts are correct, RL on the rollouts otherwise (soft mode: both, weighted);
- ``off_policy``: LUFFY/SRFT, every prompt's rollouts plus its demonstration as an
  off-policy row of the same group, first in the group as the official code's
  prefix sample. As the HPT authors ran them (``LossConfig.demonstration_slot`` and
  ``demonstration_reward``), the group has n rows including the demonstration and the
  demonstration is scored by the verifier like a rollout; ``extra`` / ``success``
  give n rollouts plus a demonstration fixed at ``success_reward``;
- ``rl``: rollouts only (GRPO, PPO, REINFORCE, ...).

Rollout groups may hold the prompt's demonstration as a Sample with
``source="demonstration"`` (scored with the rollouts, see ``group_plan``); the switch
counts only rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from megatron_hpt.data.types import Sample, TrainBatch, TrainRow
from megatron_hpt.losses import LossConfig, SwitchConfig, compute_advantages, hpt_switch

RowPolicy = Literal["auto", "rl", "sft", "switch", "off_policy"]


def row_policy_for(loss: LossConfig, requested: RowPolicy = "auto") -> RowPolicy:
    """The row policy of a preset: explicit, or derived from its flags."""
    if requested != "auto":
        return requested
    if loss.off_policy_rows:
        return "off_policy"
    if loss.sft_rows:
        return "sft" if loss.advantage == "unit" else "switch"
    return "rl"


@dataclass(frozen=True)
class GroupPlan:
    """What the rollout stage gathers per prompt for a row policy."""

    num_rollouts: int
    """Rollouts to sample per prompt."""
    score_demonstration: bool
    """Append the prompt's demonstration to its group as a Sample scored by the verifier."""
    rows_per_prompt: int
    """Rows of an RL group: the mini-batch size in rows is mini_batch_size x this."""


def group_plan(loss: LossConfig, policy: RowPolicy, n: int) -> GroupPlan:
    """Rollouts per prompt and whether the demonstration is scored, for ``rollout.n = n``."""
    policy = row_policy_for(loss, policy)
    if policy != "off_policy":
        return GroupPlan(num_rollouts=n, score_demonstration=False, rows_per_prompt=n)
    if loss.demonstration_slot == "replaces_rollout":
        if n < 2:
            raise ValueError(
                f"rollout.n = {n}: {loss.name}'s groups hold n rows including the demonstration "
                "(demonstration_slot: replaces_rollout), so n must be >= 2"
            )
        return GroupPlan(num_rollouts=n - 1, score_demonstration=loss.demonstration_reward == "verifier",
                         rows_per_prompt=n)
    return GroupPlan(num_rollouts=n, score_demonstration=loss.demonstration_reward == "verifier",
                     rows_per_prompt=n + 1)


@dataclass
class StepRows:
    batch: TrainBatch
    metrics: dict[str, float]
    sft_groups: list[int]
    """Prompts (group indices) that trained on their demonstration (``remove_sfted_data``)."""


def build_rows(
    samples: Sequence[Sequence[Sample]],
    loss: LossConfig,
    switch: SwitchConfig,
    policy: RowPolicy,
) -> StepRows:
    """Rows of one step from ``samples[prompt][sample]`` (rewards filled in)."""
    policy = row_policy_for(loss, policy)
    demos = [[s for s in group if s.source == "demonstration"] for group in samples]
    samples = [[s for s in group if s.source == "rollout"] for group in samples]
    rewards = [[float(s.reward or 0.0) for s in group] for group in samples]
    prompts = [group[0].prompt for group in samples]
    has_demo = torch.tensor([p.demonstration_ids is not None for p in prompts])
    metrics: dict[str, float] = {}
    if policy in ("sft", "off_policy") and not bool(has_demo.all()):
        missing = [p.uid for p, h in zip(prompts, has_demo.tolist()) if not h][:5]
        raise ValueError(f"row policy {policy!r} needs a demonstration for every prompt; missing for {missing}")

    if policy == "switch":
        decision = hpt_switch(rewards, switch, has_demonstration=has_demo)
        metrics.update(decision.metrics())
        is_sft, keep_rl = decision.is_sft.tolist(), decision.keep_rl.tolist()
        rl_w, sft_w = decision.rl_weight.tolist(), decision.sft_weight.tolist()
    else:
        n = len(prompts)
        sft_only = policy == "sft"
        is_sft, keep_rl = [sft_only] * n, [not sft_only] * n
        rl_w, sft_w = [1.0] * n, [1.0] * n
        metrics["hpt/sft_prompt_frac"] = float(sft_only)
        metrics["hpt/rl_prompt_frac"] = float(not sft_only)

    rows: list[TrainRow] = []
    rl_rewards: list[float] = []
    rl_groups: list[int] = []
    rl_off: list[bool] = []
    rl_lengths: list[int] = []
    rl_index: list[int] = []
    for g, (prompt, group) in enumerate(zip(prompts, samples)):
        if is_sft[g]:
            rows.append(
                TrainRow(prompt_ids=prompt.prompt_ids, response_ids=prompt.demonstration_ids,
                         kind="sft", group=g, weight=sft_w[g])
            )
        if not keep_rl[g]:
            continue
        if policy == "off_policy":
            rl_index.append(len(rows))
            rows.append(
                TrainRow(prompt_ids=prompt.prompt_ids, response_ids=prompt.demonstration_ids, kind="rl",
                         group=g, off_policy=True)
            )
            rl_rewards.append(_demonstration_reward(loss, prompt, demos[g]))
            rl_groups.append(g)
            rl_off.append(True)
            rl_lengths.append(len(prompt.demonstration_ids))
        for s in group:
            rl_index.append(len(rows))
            rows.append(
                TrainRow(prompt_ids=prompt.prompt_ids, response_ids=s.response_ids, kind="rl", group=g,
                         weight=rl_w[g], rollout_logprobs=s.rollout_logprobs)
            )
            rl_rewards.append(float(s.reward or 0.0))
            rl_groups.append(g)
            rl_off.append(False)
            rl_lengths.append(len(s.response_ids))

    if rl_index:
        adv = compute_advantages(
            loss,
            torch.tensor(rl_rewards, dtype=torch.float64),
            torch.tensor(rl_groups),
            torch.tensor(rl_off),
            response_lengths=torch.tensor(rl_lengths),
        )
        for i, a in zip(rl_index, adv.tolist()):
            rows[i].advantage = float(a)
    num_sft = sum(r.kind == "sft" for r in rows)
    metrics["rows/sft"] = float(num_sft)
    metrics["rows/rl"] = float(len(rows) - num_sft)
    if policy == "off_policy":
        demo_rewards = [r for r, off in zip(rl_rewards, rl_off) if off]
        metrics["rollout/demonstration_reward_mean"] = sum(demo_rewards) / max(len(demo_rewards), 1)
    sft_groups = sorted({r.group for r in rows if r.kind == "sft"})
    return StepRows(batch=TrainBatch(rows=rows), metrics=metrics, sft_groups=sft_groups)


def _demonstration_reward(loss: LossConfig, prompt, scored: list[Sample]) -> float:
    if loss.demonstration_reward == "success":
        return loss.success_reward
    if len(scored) != 1 or scored[0].reward is None:
        raise ValueError(
            f"prompt {prompt.uid}: {loss.name} scores its demonstration with the verifier "
            "(demonstration_reward: verifier), but its group holds "
            f"{len(scored)} demonstration samples{' without a reward' if scored else ''}; "
            "the rollout stage must append one scored demonstration per prompt (group_plan)"
        )
    return float(scored[0].reward)
