"""The paper recipes weigh their loss terms as the official HPT runs did: on paper-like steps the
policy-gradient, SFT and entropy gradient scales of each recipe are within 10% of the official
code's, computed by differentiating the official per-micro-batch loss (``tests/official_verl.py``)
on the official split with the official scripts' settings."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from megatron_hpt.trainer.config import load_run_config
from megatron_hpt.trainer.effective_weights import TermScales, recipe_setup, sample_step, step_scales, weights_report
from tests.official_verl import hpt_microbatch_loss, luffy_microbatch_loss, official_split

# the official scripts' settings (exp_scripts/train.sh, train_llama.sh, train_luffy.sh): 8 GPUs,
# train_batch_size 128, ppo_mini_batch_size 64, n 8, ppo_max_token_len_per_gpu 32768,
# max_response_length 8192, grad_clip 1.0, entropy_coeff 0.001; max_grad_norm only in train.sh
OFFICIAL = {
    "hpt-qwen2.5-math-7b-8gpu": dict(loss="sft", sft_loss_coef=1.0, max_grad_norm=80.0, lr=5e-6, gate=0),
    "hpt-qwen2.5-math-1.5b-8gpu": dict(loss="sft", sft_loss_coef=0.3, max_grad_norm=80.0, lr=5e-6, gate=0),
    "hpt-llama3.1-8b-8gpu": dict(loss="sft", sft_loss_coef=1.0, max_grad_norm=math.inf, lr=5e-6, gate=2),
    "luffy-qwen2.5-math-7b-8gpu": dict(loss="off_policy", sft_loss_coef=0.0, max_grad_norm=math.inf, lr=1e-6, gate=None),
}
GPUS, MINI_BATCH, N, TOKEN_BUDGET, RESPONSE_LENGTH, ENTROPY = 8, 64, 8, 32768, 8192, 0.001
SHAPING = 0.1


def official_scales(rows, script: dict) -> TermScales:
    """d(official objective) / d(per-token term), summed over the step: the per-token terms are leaves
    (log-probs at 0 with the ratio's denominator detached, entropies), differentiated through the
    official micro-batch loss, FSDP's average and every mini-batch."""
    split = official_split([r.num_tokens for r in rows], [r.kind == "sft" for r in rows], world_size=GPUS,
                           ppo_mini_batch_size=MINI_BATCH * N // GPUS, ppo_max_token_len_per_gpu=TOKEN_BUDGET)
    totals = {"pg": 0.0, "sft": 0.0, "entropy": 0.0}
    for minibatch in split:
        for rank in minibatch:
            for mb in rank:
                chosen = [rows[i] for i in mb]
                mask = torch.zeros(len(chosen), RESPONSE_LENGTH)
                for b, r in enumerate(chosen):
                    mask[b, : len(r.response_ids)] = 1.0
                logp = torch.zeros_like(mask, requires_grad=True)
                entropy = torch.zeros_like(mask, requires_grad=True)
                is_demo = torch.tensor([r.kind == "sft" or r.off_policy for r in chosen])
                adv = -mask  # A = -1: the surrogate -A * ratio has slope 1 in log pi at ratio 1
                if script["loss"] == "sft":
                    loss = hpt_microbatch_loss(logp, entropy, logp.detach(), adv, mask, is_demo,
                                               sft_loss_coef=script["sft_loss_coef"], entropy_coeff=ENTROPY)
                else:
                    loss = luffy_microbatch_loss(logp, entropy, logp.detach(), adv, mask, is_demo, entropy_coeff=ENTROPY)
                g_logp, g_entropy = torch.autograd.grad(loss / GPUS, (logp, entropy))
                sft_rows = torch.tensor([r.kind == "sft" for r in chosen])
                # off-policy tokens: the surrogate is f(pi) = pi / (pi + 0.1), slope 0.1 / 1.1^2 at pi = 1
                slope = torch.where(is_demo & ~sft_rows, SHAPING / (1 + SHAPING) ** 2, 1.0)[:, None]
                totals["pg"] += float((g_logp / slope)[~sft_rows].sum())
                totals["sft"] -= float(g_logp[sft_rows].sum())
                totals["entropy"] -= float(g_entropy.sum())
    return TermScales(**totals)


@pytest.mark.parametrize("recipe", sorted(OFFICIAL))
def test_recipe_term_scales_are_the_official_ones(recipe):
    cfg = load_run_config(recipe)
    script = OFFICIAL[recipe]
    # early (many prompts below the gate) and later in training; LUFFY has no switch
    for fraction in (0.1, 0.6) if script["loss"] == "sft" else (0.0,):
        rows = sample_step(cfg, sft_fraction=fraction, seed=1)
        ours, official = step_scales(cfg, rows, recipe_setup(cfg)), official_scales(rows, script)
        assert official.pg > 0 and official.entropy > 0
        assert ours.pg == pytest.approx(official.pg, rel=0.1)
        assert ours.entropy == pytest.approx(official.entropy, rel=0.1)
        assert ours.sft == pytest.approx(official.sft, rel=0.1, abs=1e-12)
        if script["loss"] == "sft":
            assert official.sft > 0
    opt = cfg.train.step.optimizer
    assert (opt.clip_grad, opt.skip_grad_norm_above, opt.lr) == (1.0, script["max_grad_norm"], script["lr"])
    assert (cfg.train.rollout_batch_size, cfg.train.mini_batch_size, cfg.rollout.n) == (128, MINI_BATCH, N)
    assert cfg.train.step.max_tokens_per_microbatch == TOKEN_BUDGET and cfg.rollout.max_new_tokens == RESPONSE_LENGTH
    if script["gate"] is not None:
        assert cfg.algorithm.switch.gate == script["gate"]


def test_the_previous_recipe_weighting_is_caught():
    """The 7B recipe as shipped before (global normalization, token sum / 8192 on 4 ranks) is 8x off
    in PG scale, and no constant fixes SFT and entropy at once."""
    cfg = load_run_config("hpt-qwen2.5-math-7b-8gpu", ["algorithm.overrides.normalization=global"])
    rows = sample_step(cfg, sft_fraction=0.3, seed=1)
    ours, official = step_scales(cfg, rows, recipe_setup(cfg)), official_scales(rows, OFFICIAL[cfg.name + "-8gpu"])
    assert ours.pg / official.pg == pytest.approx(8.0, rel=1e-5)
    matched = replace(recipe_setup(cfg), constant=8192.0 * 8)
    rescaled = step_scales(cfg, rows, matched)
    assert rescaled.pg == pytest.approx(official.pg, rel=1e-5)
    assert abs(rescaled.sft / official.sft - 1) > 0.1 and abs(rescaled.entropy / official.entropy - 1) > 0.1


def test_report_prints_the_ratios():
    text = weights_report(load_run_config("hpt-qwen2.5-math-7b-8gpu", ["algorithm.overrides.normalization=global"]),
                          "hpt-qwen2.5-math-7b-8gpu")
    assert "| 30% |" in text and "8.000x" in text
    assert "like clip 0.125 and skip 10 on the official code's scale" in text
    exact = weights_report(load_run_config("hpt-qwen2.5-math-7b-8gpu"), "hpt-qwen2.5-math-7b-8gpu")
    assert "verl normalization over 8 ranks" in exact and "8.000x" not in exact
    assert "like clip 1 and skip 80 on the official code's scale" in exact


def test_algorithms_cli_prints_a_recipes_weights(capsys):
    from megatron_hpt.cli import main

    assert main(["algorithms", "--recipe", "hpt-qwen2.5-math-1.5b-8gpu", "algorithm.overrides.normalization=global"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("## hpt-qwen2.5-math-1.5b-8gpu: hpt") and "SFT token_mean x 0.3" in out
    assert out.count("| 8.000x |") == 3  # the PG ratio on every sample step
