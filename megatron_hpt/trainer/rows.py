"""From scored rollouts to the rows of a training step (the HPT switch in action).

Which rows an algorithm trains on follows from its loss preset:

- ``sft``: every prompt's demonstration (SFT only);
- ``switch``: HPT, per prompt: SFT on the demonstration when at most ``gate`` of its
  rollouts are correct, RL on the rollouts otherwise (soft mode: both, weighted);
- ``off_policy``: LUFFY/SRFT, every prompt's rollouts plus its demonstration as an
  off-policy row of the same group;
- ``rl``: rollouts only (GRPO, PPO, REINFORCE, ...).
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


@dataclass
class StepRows:
    batch: TrainBatch
    metrics: dict[str, float]


def build_rows(
    samples: Sequence[Sequence[Sample]],
    loss: LossConfig,
    switch: SwitchConfig,
    policy: RowPolicy,
) -> StepRows:
    """Rows of one step from ``samples[prompt][sample]`` (rewards filled in)."""
    policy = row_policy_for(loss, policy)
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
        if policy == "off_policy":
            rl_index.append(len(rows))
            rows.append(
                TrainRow(prompt_ids=prompt.prompt_ids, response_ids=prompt.demonstration_ids, kind="rl",
                         group=g, off_policy=True)
            )
            rl_rewards.append(loss.success_reward)  # a demonstration is a correct answer
            rl_groups.append(g)
            rl_off.append(True)
            rl_lengths.append(len(prompt.demonstration_ids))

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
    return StepRows(batch=TrainBatch(rows=rows), metrics=metrics)
