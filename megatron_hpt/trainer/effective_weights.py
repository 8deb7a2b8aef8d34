"""The effective weights of a recipe's loss terms, next to the official HPT code's
(``megatron-hpt algorithms --recipe R``).

The gradient of each term is a weighted sum of per-token gradients; the weights come
from the normalization (``LossNormalizers``, ``term_weights``). A term's *scale* in a
step is the sum of its weights over the step's tokens: for the policy gradient with
token sum / 8192 it is (RL tokens) / 8192, for a token mean it is 1 per mean taken.
The ratio of two scales is the ratio of the gradients the term gives on the same
tokens, and grad clipping and the skip threshold act on the total.

"Official" is what the official code (TsinghuaC3I/Unify-Post-Training on verl) would
weight with the recipe's coefficients: verl normalization over ``OFFICIAL_NUM_GPUS``
ranks (or the recipe's ``algorithm.verl_num_ranks``), the recipe's micro-batch budget as
``ppo_max_token_len_per_gpu`` and its response budget as the token-sum constant (the
official code divides by the padded response length). The sample steps have
paper-like lengths relative to the recipe's budgets (see ``sample_step``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch

from megatron_hpt.data.types import TrainRow
from megatron_hpt.losses import LossConfig, term_weights
from megatron_hpt.trainer.config import RunConfig
from megatron_hpt.trainer.rows import group_plan, row_policy_for
from megatron_hpt.training.minibatch_plan import plan_minibatches
from megatron_hpt.training.policy import normalizers_for, verl_normalizers_for

OFFICIAL_NUM_GPUS = 8
"""The official scripts (``exp_scripts/train*.sh``) train on one node of 8 GPUs, FSDP over all 8."""

SAMPLE_SFT_FRACTIONS = (0.1, 0.3, 0.6)
"""Shares of prompts below the gate in the printed sample steps (early HPT training on Qwen2.5-Math-7B
switches many prompts to SFT; later few)."""


@dataclass(frozen=True)
class TermScales:
    """Sum of each term's per-token weights over one rollout step (all its mini-batches)."""

    pg: float
    sft: float
    entropy: float


@dataclass(frozen=True)
class WeightingSetup:
    """Everything that decides the weights: the loss and how the step is split."""

    loss: LossConfig
    constant: float
    composition: str
    verl_num_ranks: int | None
    max_tokens: int


def recipe_setup(cfg: RunConfig) -> WeightingSetup:
    """How the recipe weights its terms."""
    loss = cfg.algorithm.loss_config()
    ranks = (cfg.algorithm.verl_num_ranks or cfg.data_parallel_size) if loss.normalization == "verl" else None
    return WeightingSetup(loss=loss, constant=cfg.algorithm.constant_normalizer, composition=cfg.minibatch_composition,
                          verl_num_ranks=ranks, max_tokens=cfg.train.step.max_tokens_per_microbatch)


def official_setup(cfg: RunConfig) -> WeightingSetup:
    """How the official code would weight the recipe's terms (see the module docstring)."""
    return WeightingSetup(
        loss=replace(cfg.algorithm.loss_config(), normalization="verl"),
        constant=float(cfg.rollout.max_new_tokens),
        composition="sft_last",
        verl_num_ranks=cfg.algorithm.verl_num_ranks or OFFICIAL_NUM_GPUS,
        max_tokens=cfg.train.step.max_tokens_per_microbatch,
    )


def step_scales(cfg: RunConfig, rows: list[TrainRow], setup: WeightingSetup) -> TermScales:
    """The term scales of one rollout step's rows under ``setup``."""
    policy = row_policy_for(setup.loss, cfg.algorithm.rows)
    plans = plan_minibatches(
        rows,
        mini_batch_size=cfg.train.mini_batch_size,
        rows_per_prompt=group_plan(setup.loss, policy, cfg.rollout.n).rows_per_prompt,
        num_minibatches=cfg.train.rollout_batch_size // cfg.train.mini_batch_size,
        epochs=1,
        dp_size=1,
        dp_rank=0,
        composition=setup.composition,
        verl_num_ranks=setup.verl_num_ranks,
        max_tokens=setup.max_tokens,
    )
    totals = {"pg": 0.0, "sft": 0.0, "entropy": 0.0}
    for plan in plans:
        if plan.verl is None:
            groups = [(plan.rows, normalizers_for(rows, plan.rows, setup.constant))]
        else:
            groups = [(list(mine), verl_normalizers_for(rows, whole, setup.constant, plan.verl.num_ranks))
                      for mine, whole in plan.verl.pieces]
        for indices, norms in groups:
            chosen = [rows[i] for i in indices]
            tokens = torch.tensor([len(r.response_ids) for r in chosen], dtype=torch.float64)
            w = term_weights(
                setup.loss, tokens, torch.tensor([r.kind == "sft" for r in chosen]),
                torch.tensor([r.off_policy for r in chosen]), norms,
            )
            totals["pg"] += float((w.pg * tokens).sum())
            totals["sft"] += float(((w.sft + w.off_policy_sft) * tokens).sum())
            totals["entropy"] += float((w.entropy * tokens).sum())
    return TermScales(**totals)


def sample_step(cfg: RunConfig, *, sft_fraction: float, seed: int) -> list[TrainRow]:
    """A rollout step's rows with paper-like lengths (token ids all 0; only lengths matter here).

    Relative to the recipe's budgets, as in HPT's Qwen2.5-Math-7B runs on OpenR1 data: prompts of
    1/16 to 1/4 of max_prompt_length; rollouts log-normal around a fifth of max_new_tokens (median 1638
    of 8192), capped there; demonstrations (reasoning traces) uniform in 15-100% of
    max_demonstration_length. ``sft_fraction`` of the prompts (chosen at random) are below the gate."""
    rng = random.Random(seed)
    n = cfg.rollout.n
    max_response = cfg.rollout.max_new_tokens
    max_demo = cfg.data.max_demonstration_length or max_response
    loss = cfg.algorithm.loss_config()
    policy = row_policy_for(loss, cfg.algorithm.rows)
    plan = group_plan(loss, policy, n)
    num_prompts = cfg.train.rollout_batch_size
    below = set(rng.sample(range(num_prompts), round(sft_fraction * num_prompts)))

    def response() -> list[int]:
        length = rng.lognormvariate(math.log(0.2 * max_response), 0.7)
        return [0] * max(1, min(max_response, int(length)))

    def demonstration() -> list[int]:
        return [0] * max(1, int(rng.uniform(0.15, 1.0) * max_demo))

    rows = []
    for g in range(num_prompts):
        prompt = [0] * rng.randint(max(1, cfg.data.max_prompt_length // 16), max(1, cfg.data.max_prompt_length // 4))
        sft = policy == "sft" or (policy == "switch" and g in below)
        if sft:
            rows.append(TrainRow(prompt_ids=prompt, response_ids=demonstration(), kind="sft", group=g))
            continue
        if policy == "off_policy":
            rows.append(TrainRow(prompt_ids=prompt, response_ids=demonstration(), kind="rl", group=g, off_policy=True))
        rows += [TrainRow(prompt_ids=prompt, response_ids=response(), kind="rl", group=g)
                 for _ in range(plan.num_rollouts)]
    return rows


def _describe(setup: WeightingSetup) -> str:
    loss = setup.loss
    split = (f"verl normalization over {setup.verl_num_ranks} ranks, micro-batch budget {setup.max_tokens} tokens"
             if setup.verl_num_ranks is not None else f"global normalization, mini-batches by {setup.composition}")
    return (f"{split}; PG {loss.aggregation} (constant {setup.constant:g}), SFT {loss.sft_aggregation} "
            f"x {loss.sft_weight:g}, entropy x {loss.entropy_coef:g}")


def weights_report(cfg: RunConfig, name: str, seed: int = 0) -> str:
    """The recipe's term scales on sample steps next to the official code's, as Markdown."""
    ours_setup, official = recipe_setup(cfg), official_setup(cfg)
    opt = cfg.train.step.optimizer
    lines = [
        f"## {name}: {ours_setup.loss.name}",
        "",
        f"- ours: {_describe(ours_setup)}",
        f"- official code: {_describe(official)}",
        f"- sample steps: {cfg.train.rollout_batch_size} prompts x {cfg.rollout.n}, mini-batches of "
        f"{cfg.train.mini_batch_size} prompts, paper-like lengths (`sample_step`)",
        "",
        "| prompts below the gate | PG ours | PG official | PG ours/official | SFT ours/official "
        "| entropy ours/official | SFT:PG ours | SFT:PG official |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pg_ratios = []
    for fraction in SAMPLE_SFT_FRACTIONS:
        rows = sample_step(cfg, sft_fraction=fraction, seed=seed)
        a, b = step_scales(cfg, rows, ours_setup), step_scales(cfg, rows, official)
        pg_ratios.append(_ratio(a.pg, b.pg))
        lines.append(
            f"| {fraction:.0%} | {a.pg:.4g} | {b.pg:.4g} | {_fmt(_ratio(a.pg, b.pg))} | {_fmt(_ratio(a.sft, b.sft))} "
            f"| {_fmt(_ratio(a.entropy, b.entropy))} | {a.sft / a.pg if a.pg else math.inf:.4g} "
            f"| {b.sft / b.pg if b.pg else math.inf:.4g} |"
        )
    finite = [r for r in pg_ratios if math.isfinite(r) and r > 0]
    if finite:
        lo, hi = opt.clip_grad / max(finite), opt.clip_grad / min(finite)
        skip_lo, skip_hi = opt.skip_grad_norm_above / max(finite), opt.skip_grad_norm_above / min(finite)
        lines += [
            "",
            f"Grad clip {opt.clip_grad:g} and skip above {opt.skip_grad_norm_above:g} act on the policy gradient "
            f"like clip {_span(lo, hi)} and skip {_span(skip_lo, skip_hi)} on the official code's scale.",
        ]
    return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def _fmt(x: float) -> str:
    return f"{x:.3f}x" if math.isfinite(x) else "-"


def _span(lo: float, hi: float) -> str:
    return f"{lo:.3g}" if math.isclose(lo, hi, rel_tol=1e-3) else f"{lo:.3g}-{hi:.3g}"
