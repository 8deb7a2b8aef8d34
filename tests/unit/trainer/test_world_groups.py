"""Rank 0's rollout stage composes groups as the algorithm asks: LUFFY as its authors ran it samples
n - 1 rollouts and scores the demonstration with the verifier; ``remove_sfted_data`` takes the
step's SFT prompts out of the sampler."""

from __future__ import annotations

import types

from megatron_hpt.data import PromptSampler, SamplerConfig
from megatron_hpt.data.types import Prompt
from megatron_hpt.rewards.scoring import RewardResult
from megatron_hpt.rollout.engine import Completion
from megatron_hpt.trainer.config import load_run_config
from megatron_hpt.trainer.loop import Timer
from megatron_hpt.trainer.rows import build_rows, group_plan
from megatron_hpt.trainer.world import OutsideWorld


class _Engine:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, n, params, seed):
        self.calls.append(n)
        return [[Completion(output_ids=[7, j], output_logprobs=[-1.0, -1.0], finish_reason="stop",
                            meta={"weight_version": "0"}) for j in range(n)]
                for _ in prompts]


class _Rewards:
    """A verifier stand-in: correct when the response text holds the ground truth."""

    def score_batch(self, items):
        return [RewardResult(score=float(i.ground_truth in i.response), reason="" if i.ground_truth in i.response
                             else "wrong") for i in items]


def _world(recipe_overrides):
    cfg = load_run_config("demo-cpu", ["rollout.n=4", "train.rollout_batch_size=2", "train.mini_batch_size=2",
                                       *recipe_overrides])
    world = object.__new__(OutsideWorld)
    world.cfg = cfg
    # prompt 1's demonstration does not verify
    world.dataset = [Prompt(uid=f"p{i}", messages=[], prompt_ids=[1, 2], ground_truth=str(i), demonstration_ids=[5, 2],
                            demonstration=f"the answer is {i if i != 1 else 'x'}") for i in range(4)]
    world.sampler = PromptSampler(4, SamplerConfig(batch_size=2, seed=0))
    world.engine = _Engine()
    world.rewards = _Rewards()
    world.tokenizer = types.SimpleNamespace(decode=lambda ids, skip_special_tokens=True: "no")
    world.group_plan = group_plan(cfg.algorithm.loss_config(), cfg.algorithm.rows, cfg.rollout.n)
    return cfg, world


def test_luffy_groups_have_n_rows_with_a_verified_demonstration():
    cfg, world = _world(["algorithm.preset=luffy"])
    samples, metrics = world.rollout_and_score(0, Timer(), "0")
    assert world.engine.calls == [3]  # n - 1 rollouts
    assert [[s.source for s in g] for g in samples] == [["rollout"] * 3 + ["demonstration"]] * 2
    by_prompt = {g[0].prompt.uid: g[-1].reward for g in samples}
    assert by_prompt == {p: (0.0 if p == "p1" else 1.0) for p in by_prompt}
    assert metrics["rollout/accuracy"] == 0.0  # rollouts only: the demonstrations are not rollouts
    rows = build_rows(samples, cfg.algorithm.loss_config(), cfg.algorithm.switch, "auto").batch.rows
    assert len(rows) == 2 * cfg.rollout.n and sum(r.off_policy for r in rows) == 2


def test_removed_sft_prompts_reach_the_sampler():
    cfg, world = _world(["algorithm.switch={mode: switch, gate: 0, remove_sfted_data: true}"])
    samples, _ = world.rollout_and_score(0, Timer(), "0")
    assert world.engine.calls == [4] and all(len(g) == 4 for g in samples)
    rows = build_rows(samples, cfg.algorithm.loss_config(), cfg.algorithm.switch, "auto")
    assert rows.sft_groups == [0, 1]  # every rollout is wrong
    step_prompts = [g[0].prompt.uid for g in samples]
    world.remove_prompts(rows.sft_groups)
    assert {f"p{i}" for i in world.sampler.state_dict()["pending_removal"]} == set(step_prompts)
