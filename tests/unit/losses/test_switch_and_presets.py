"""The HPT switch (hard gate, soft weights), the preset registry, its table and the CLI verb."""

from __future__ import annotations

import pytest
import torch

from megatron_hpt.cli import main
from megatron_hpt.losses import PRESETS, SwitchConfig, get_preset, hpt_switch, presets_table


def test_hard_switch_gates_on_the_number_of_correct_rollouts():
    rewards = torch.tensor(
        [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [0.9, 0, 0, 0]], dtype=torch.float32
    )
    d = hpt_switch(rewards)  # paper default for Qwen: gate 0
    assert d.num_correct.tolist() == [0, 1, 2, 4, 0]
    assert d.is_sft.tolist() == [True, False, False, False, True]
    assert d.keep_rl.tolist() == [False, True, True, True, False]
    assert d.rl_weight.tolist() == [0, 1, 1, 1, 0] and d.sft_weight.tolist() == [1, 0, 0, 0, 1]
    d = hpt_switch(rewards, SwitchConfig(gate=2))  # paper: LLaMA-3.1-8B
    assert d.is_sft.tolist() == [True, True, True, False, True]
    assert d.metrics()["hpt/sft_prompt_frac"] == pytest.approx(0.8)


def test_switch_takes_ragged_groups_and_missing_demonstrations():
    d = hpt_switch([[0.0], [1.0, 0.0, 1.0], [0.0, 0.0]], has_demonstration=torch.tensor([True, True, False]))
    assert d.num_correct.tolist() == [0, 2, 0]
    # the third prompt is below the gate but has no demonstration: it keeps its rollouts
    assert d.is_sft.tolist() == [True, False, False]
    assert d.keep_rl.tolist() == [False, True, True]


def test_soft_mixing_weights():
    rewards = torch.zeros(6, 8)
    for k in range(6):
        rewards[k, :k] = 1.0
    d = hpt_switch(rewards, SwitchConfig(mode="soft"))
    assert d.rl_weight.tolist() == [0.0, 0.125, 0.25, 0.5, 1.0, 1.0]
    assert d.sft_weight.tolist() == [1.0, 0.5, 0.25, 0.125, 0.0, 0.0]
    assert d.is_sft.tolist() == [True, True, True, True, False, False]
    assert d.keep_rl.tolist() == [False, True, True, True, True, True]
    d = hpt_switch(rewards, SwitchConfig(mode="soft", soft_weights=((0.3, 0.7),)))
    assert d.rl_weight.tolist() == pytest.approx([0.3, 1, 1, 1, 1, 1])


def test_switch_bad_input():
    with pytest.raises(ValueError, match=r"NaN or inf values, for prompts \[1\]"):
        hpt_switch(torch.tensor([[1.0, 0.0], [float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="prompt 1 has no rollouts"):
        hpt_switch([[1.0], []])
    with pytest.raises(ValueError, match="n = 0 rollouts"):
        hpt_switch(torch.zeros(3, 0))
    with pytest.raises(ValueError, match=r"must be \[P, n\]"):
        hpt_switch(torch.zeros(3))
    with pytest.raises(ValueError, match="gate must be >= 0"):
        SwitchConfig(gate=-1)


def test_registry_holds_the_presets_and_names_known_ones():
    assert set(PRESETS.names()) == {
        "sft", "ppo", "grpo", "dr_grpo", "dapo", "rloo", "reinforce", "reinforce_pp",
        "cispo", "gspo", "srft", "luffy", "hpt",
    }
    with pytest.raises(KeyError, match="unknown loss preset 'grpoo'; known: cispo, dapo"):
        get_preset("grpoo")
    with pytest.raises(ValueError, match="already registered"):
        PRESETS.add("hpt", get_preset("hpt"))
    hpt = get_preset("hpt")  # the paper's HPT as its code runs it
    assert (hpt.reference, hpt.clip, hpt.advantage, hpt.advantage_std) == ("old", "none", "grpo", False)
    assert (hpt.aggregation, hpt.sft_aggregation, hpt.sft_weight, hpt.entropy_coef, hpt.kl_coef) == (
        "token_sum_constant", "token_mean", 1.0, 0.001, 0.0
    )


def test_table_in_the_papers_form(capsys):
    table = presets_table()
    lines = table.splitlines()
    assert "reference denominator pi_ref" in lines[0] and "stabilization mask" in lines[0]
    assert len(lines) == 2 + len(PRESETS.names())
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert all(len(r) == 5 for r in rows.values())  # no stray '|' inside a cell
    assert rows["sft"][:3] == ["pi_theta", "1", "none"]
    assert rows["grpo"][1] == "(r - mean_group) / std_group"
    assert rows["hpt"][0] == "SFT rows: pi_theta; RL rows: pi_old (token ratio)"
    assert rows["hpt"][1] == "SFT rows: 1; RL rows: r - mean_group"
    assert rows["gspo"][2].startswith("sequence-level clip")
    assert "stop-gradient" in rows["cispo"][2]
    assert main(["algorithms"]) == 0
    assert capsys.readouterr().out.strip() == table
