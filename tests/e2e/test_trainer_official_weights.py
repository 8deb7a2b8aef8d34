"""The official run's options through the whole loop: verl normalization at DP=2 replaying 4 verl
ranks with SFT prompts removed from later epochs (state in the checkpoint), and LUFFY's groups as
its authors ran them (n rows with the demonstration, scored by the verifier)."""

from __future__ import annotations

import math

from megatron_hpt.training.checkpoint import latest_checkpoint, read_trainer_extra
from tests.e2e.conftest import metrics, run_train


def test_verl_normalization_at_dp2_with_remove_sfted_data(tmp_path, demo_models):
    run_train(tmp_path, demo_models, "train.steps=2", "data_parallel_size=2",
              "algorithm.overrides.normalization=verl", "algorithm.verl_num_ranks=4",
              "algorithm.switch={mode: switch, gate: 1, remove_sfted_data: true}")
    steps = metrics(tmp_path)
    assert [m["step"] for m in steps] == [1, 2]
    assert all(math.isfinite(m["loss/total"]) and m["train/optimizer_steps"] >= 1 for m in steps)
    sft_prompts = round(sum(m["hpt/sft_prompt_frac"] for m in steps) * 4)
    sampler = read_trainer_extra(latest_checkpoint(tmp_path / "checkpoints"))["sampler"]
    assert sft_prompts > 0 and len(sampler["pending_removal"]) == sft_prompts and sampler["removed"] == []


def test_luffy_groups_as_its_authors_ran_them(tmp_path, demo_models):
    run_train(tmp_path, demo_models, "train.steps=1", "algorithm.preset=luffy")
    (step,) = metrics(tmp_path)
    assert step["rows/rl"] == 4 * 2  # rollout.n = 2 rows per prompt: one rollout and the demonstration
    assert step["rollout/demonstration_reward_mean"] == 1.0  # the shipped demonstrations verify
    assert math.isfinite(step["loss/total"])
