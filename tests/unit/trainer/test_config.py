"""Recipes: every shipped recipe loads; unknown or conflicting keys name the key."""

from __future__ import annotations

import pytest

from megatron_hpt.config import ConfigError
from megatron_hpt.config.loading import RECIPES_DIR
from megatron_hpt.trainer.config import load_run_config


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_shipped_recipe_loads(recipe):
    cfg = load_run_config(recipe)
    assert cfg.train.steps >= 1 and cfg.algorithm.loss_config().name


def test_paper_recipe_has_the_papers_hyperparameters():
    cfg = load_run_config("hpt-qwen2.5-math-7b-8gpu")
    loss = cfg.algorithm.loss_config()
    opt = cfg.train.step.optimizer
    assert (loss.name, loss.clip, loss.advantage_std, loss.entropy_coef, loss.sft_weight) == ("hpt", "none", False, 0.001, 1.0)
    assert loss.aggregation == "token_sum_constant" and cfg.algorithm.constant_normalizer == 8192
    assert (opt.lr, opt.lr_schedule, opt.weight_decay, opt.clip_grad, opt.skip_grad_norm_above) == (5e-6, "constant", 0.01, 1.0, 80.0)
    assert (cfg.train.rollout_batch_size, cfg.train.mini_batch_size, cfg.train.steps) == (128, 64, 500)
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.max_new_tokens) == (8, 1.0, 8192)
    assert cfg.train.step.max_tokens_per_microbatch == 32768 and cfg.data.max_prompt_length == 1024
    assert (cfg.model.rope_theta, cfg.model.max_position_embeddings) == (40000, 16384)
    assert cfg.algorithm.switch.gate == 0 and cfg.eval_every == 10
    assert (cfg.eval.temperature, cfg.eval.top_p) == (0.6, 0.95)
    assert load_run_config("hpt-llama3.1-8b-8gpu").algorithm.switch.gate == 2
    assert load_run_config("hpt-qwen2.5-math-1.5b-8gpu").algorithm.loss_config().sft_weight == 0.3
    # the official run's weighting: its split over its 8 GPUs (tests/unit/trainer/test_effective_weights.py)
    assert (loss.normalization, cfg.algorithm.verl_num_ranks, cfg.minibatch_composition) == ("verl", 8, "sft_last")


def test_minibatch_composition_and_verl_normalization_agree():
    assert load_run_config("demo-cpu").minibatch_composition == "groups"
    assert load_run_config("demo-cpu", ["train.minibatch_composition=sft_last"]).minibatch_composition == "sft_last"
    with pytest.raises(ConfigError, match="minibatch_composition: groups conflicts with .*normalization: verl"):
        load_run_config("hpt-qwen2.5-math-7b-8gpu", ["train.minibatch_composition=groups"])
    with pytest.raises(ConfigError, match="verl_num_ranks must be >= 1"):
        load_run_config("demo-cpu", ["algorithm.verl_num_ranks=0"])
    with pytest.raises(ConfigError, match="gate_off and remove_sfted_data belong to the hard switch"):
        load_run_config("demo-cpu", ["algorithm.switch={mode: soft, remove_sfted_data: true}"])


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.stepz=3", "unknown key train.stepz"),
        ("algorithm.preset=nope", "unknown loss preset 'nope'"),
        ("algorithm.overrides={clip_hi: 0.3}", "unknown key algorithm.overrides.clip_hi"),
        ("train.mini_batch_size=5", "multiple of mini_batch_size"),
        ("rollout.temperature=-1", "temperature"),
    ],
)
def test_bad_keys_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_run_config("demo-cpu", [override])
