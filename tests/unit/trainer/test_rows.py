"""Rows of a step from scored rollouts: the HPT switch, SFT, off-policy and RL policies."""

from __future__ import annotations

from dataclasses import replace

import pytest

from megatron_hpt.data.types import Prompt, Sample
from megatron_hpt.losses import SwitchConfig, compute_advantages, get_preset
from megatron_hpt.trainer.rows import GroupPlan, build_rows, group_plan, row_policy_for


def _prompt(i: int) -> Prompt:
    return Prompt(uid=f"p{i}", messages=[], prompt_ids=[1, 2, 3 + i], ground_truth=str(i),
                  demonstration_ids=[9, 9, 2], demonstration="d")


def _samples(rewards: list[list[float]]) -> list[list[Sample]]:
    out = []
    for i, group in enumerate(rewards):
        p = _prompt(i)
        out.append([Sample(prompt=p, response_ids=[5 + j, 2], reward=r, rollout_logprobs=[-1.0, -0.5], sample_index=j)
                    for j, r in enumerate(group)])
    return out


def test_policy_follows_the_preset():
    assert row_policy_for(get_preset("hpt")) == "switch"
    assert row_policy_for(get_preset("sft")) == "sft"
    assert row_policy_for(get_preset("grpo")) == "rl"
    assert row_policy_for(get_preset("luffy")) == "off_policy"
    assert row_policy_for(get_preset("srft")) == "off_policy"
    assert row_policy_for(get_preset("grpo"), "sft") == "sft"


def test_hpt_switch_gate0_and_gate2():
    rewards = [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    rows = build_rows(_samples(rewards), get_preset("hpt"), SwitchConfig(gate=0), "auto")
    kinds = [(r.group, r.kind) for r in rows.batch.rows]
    assert kinds == [(0, "sft")] + [(g, "rl") for g in (1, 2, 3) for _ in range(4)]
    assert rows.metrics["hpt/sft_prompt_frac"] == 0.25
    sft = rows.batch.rows[0]
    assert sft.response_ids == [9, 9, 2] and sft.prompt_ids == [1, 2, 3]
    # RL advantages are r - group mean (no std), as the paper's HPT
    adv = [r.advantage for r in rows.batch.rows if r.group == 1]
    assert adv == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert all(r.advantage == 0 for r in rows.batch.rows if r.group == 3)
    assert rows.batch.rows[1].rollout_logprobs == [-1.0, -0.5]

    llama = build_rows(_samples(rewards), get_preset("hpt"), SwitchConfig(gate=2), "auto")
    assert [r.group for r in llama.batch.rows if r.kind == "sft"] == [0, 1, 2]
    assert llama.metrics["rows/rl"] == 4.0


def test_soft_mixing_weights_both_kinds():
    rows = build_rows(_samples([[1, 0, 0, 0]]), get_preset("hpt"), SwitchConfig(mode="soft"), "auto")
    by_kind = {r.kind: r.weight for r in rows.batch.rows}
    assert by_kind == {"sft": 0.5, "rl": 0.125}


def _with_demonstrations(samples, rewards):
    for group, r in zip(samples, rewards):
        p = group[0].prompt
        group.append(Sample(prompt=p, response_ids=list(p.demonstration_ids), source="demonstration", reward=r))
    return samples


def test_sft_and_off_policy_rows():
    rewards = [[0, 1], [0, 0]]
    sft = build_rows(_samples(rewards), get_preset("sft"), SwitchConfig(), "auto")
    assert [(r.group, r.kind) for r in sft.batch.rows] == [(0, "sft"), (1, "sft")]
    # as the HPT authors ran LUFFY: the demonstration is one of the group's rows, first (the prefix
    # sample), scored by the verifier: here prompt 1's demonstration does not verify (reward 0)
    luffy_cfg = get_preset("luffy")
    luffy = build_rows(_with_demonstrations(_samples(rewards), [1.0, 0.0]), luffy_cfg, SwitchConfig(), "auto")
    rows = luffy.batch.rows
    assert [(r.group, r.kind, r.off_policy) for r in rows] == [
        (0, "rl", True), (0, "rl", False), (0, "rl", False), (1, "rl", True), (1, "rl", False), (1, "rl", False)]
    import torch

    expected = compute_advantages(luffy_cfg, torch.tensor([1.0, 0, 1, 0, 0, 0], dtype=torch.float64),
                                  torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([True, False, False] * 2),
                                  response_lengths=torch.tensor([3, 2, 2, 3, 2, 2]))
    assert [r.advantage for r in rows] == pytest.approx(expected.tolist())
    assert all(r.advantage == 0 for r in rows if r.group == 1)  # all 0: no signal, as in the official run
    assert luffy.metrics["rollout/demonstration_reward_mean"] == 0.5
    # the other composition: the demonstration counts as correct whatever the verifier says
    fixed = replace(luffy_cfg, demonstration_reward="success", demonstration_slot="extra")
    fixed_rows = build_rows(_samples(rewards), fixed, SwitchConfig(), "auto").batch.rows
    assert fixed_rows[3].off_policy and fixed_rows[3].advantage == pytest.approx(2 / 3)


def test_group_plan_follows_the_composition():
    luffy = get_preset("luffy")
    assert group_plan(luffy, "auto", 8) == GroupPlan(num_rollouts=7, score_demonstration=True, rows_per_prompt=8)
    extra = replace(luffy, demonstration_slot="extra", demonstration_reward="success")
    assert group_plan(extra, "auto", 8) == GroupPlan(num_rollouts=8, score_demonstration=False, rows_per_prompt=9)
    assert group_plan(get_preset("hpt"), "auto", 8) == GroupPlan(8, False, 8)
    with pytest.raises(ValueError, match="rollout.n = 1: luffy's groups hold n rows including the demonstration"):
        group_plan(luffy, "auto", 1)
    with pytest.raises(ValueError, match="prompt p0: luffy scores its demonstration with the verifier"):
        build_rows(_samples([[0, 1]]), luffy, SwitchConfig(), "auto")


def test_switch_reports_the_prompts_it_sent_to_sft():
    rewards = [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    rows = build_rows(_samples(rewards), get_preset("hpt"), SwitchConfig(gate=0), "auto")
    assert rows.sft_groups == [0]
    # the official switch_gate_off: 0 < correct <= 2 also trains on the demonstration
    off = build_rows(_samples(rewards), get_preset("hpt"), SwitchConfig(gate=0, gate_off=2), "auto")
    assert off.sft_groups == [0, 1, 2] and off.metrics["hpt/gate_off_prompt_frac"] == 0.5
    assert [r.group for r in off.batch.rows if r.kind == "rl"] == [3] * 4


def test_rows_need_demonstrations():
    samples = _samples([[0, 0]])
    samples[0][0].prompt.demonstration_ids = None
    with pytest.raises(ValueError, match="needs a demonstration.*p0"):
        build_rows(samples, get_preset("sft"), SwitchConfig(), "auto")
    # HPT keeps the rollouts of a prompt without a demonstration
    rows = build_rows(samples, get_preset("hpt"), SwitchConfig(), "auto")
    assert [r.kind for r in rows.batch.rows] == ["rl", "rl"]
