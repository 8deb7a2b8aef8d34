"""Algorithms as data: every preset is a frozen ``LossConfig`` built from another with changes.

The HPT paper (arXiv 2509.04419, Table 1) places each algorithm by its reference
denominator, advantage and stabilization mask; ``presets_table`` renders these
presets in that form, from the configs themselves (``megatron-hpt algorithms``).

Where the HPT paper's table and its public code (TsinghuaC3I/Unify-Post-Training,
``exp_scripts/*.sh`` and ``hpt/verl/verl/mix_src``) differ, the presets follow the
code, as the paper's runs did:

- HPT's RL rows use r - mean_group without std (``algorithm.grpo_use_std=False``),
  no clipping (``loss_remove_clip=True``), and the token SUM divided by a constant
  (``loss_remove_token_mean=True``: each micro-batch's sum over the padded response
  length, 8192), not a token mean; SFT rows a token mean of -log pi over the
  demonstration tokens with coefficient 1.0; entropy bonus 0.001 on all rows.
- LUFFY and SRFT, as the HPT authors ran them (``train_luffy.sh``,
  ``train_srft.sh``), use the same no-std, no-clip, token-sum / constant setting.

Normalization in that code: its actor (``mix_actor.py``, verl) computes each term per
MICRO-batch -- the policy-gradient sum over the micro-batch's RL tokens / 8192, the SFT
loss as the mean over the micro-batch's SFT tokens (skipped when it has none), the
entropy as the mean over all its tokens -- adds the micro-batches' losses without
dividing by their number (mini = micro batch size, so ``gradient_accumulation`` is 1,
while dynamic batching at 32,768 tokens per GPU makes several micro-batches), and FSDP
averages gradients over the 8 data-parallel ranks. Its effective objective therefore
depends on how the batch is split. The presets normalize each term over the whole
mini-batch (``normalization="global"``), so the gradient is the same however the batch
is split; ``normalization="verl"`` reproduces the code's weights exactly on the split it
makes (``megatron_hpt.training.verl_split``), which is what the paper recipes use.
LUFFY's and SRFT's groups are composed as the HPT authors ran them: n rows including the
demonstration, scored by the verifier (``demonstration_slot``, ``demonstration_reward``).
"""

from __future__ import annotations

from dataclasses import replace

from megatron_hpt.config.registry import Registry
from megatron_hpt.losses.config import LossConfig

PRESETS: Registry[LossConfig] = Registry("loss preset")
"""Presets by name (``PRESETS.get("hpt")``); an unknown name lists the known ones."""


def _add(cfg: LossConfig) -> LossConfig:
    return PRESETS.add(cfg.name, cfg)


SFT = _add(
    LossConfig(
        name="sft",
        sft_rows=True,
        reference="policy",
        clip="none",
        advantage="unit",
        aggregation="token_mean",
    )
)
"""Supervised fine-tuning: pi_ref = pi_theta, A = 1, token mean of -log pi (cross-entropy)."""

PPO = _add(LossConfig(name="ppo", reference="old", clip="ppo", advantage="gae", aggregation="token_mean"))
"""PPO (Schulman et al. 2017): clipped token ratio, eps 0.2. GAE needs critic values; this project
trains no critic, so ``compute_advantages`` gives PPO the group advantage unless values are passed."""

GRPO = _add(
    LossConfig(
        name="grpo",
        reference="old",
        clip="ppo",
        advantage="grpo",
        advantage_std=True,
        aggregation="seq_mean_token_mean",
    )
)
"""GRPO (Shao et al. 2024, DeepSeekMath): (r - mean) / std per group, clipped ratio, sequence mean of
token means. DeepSeekMath adds a k3 KL penalty (0.04); set ``kl_coef`` to use it."""

DR_GRPO = _add(replace(GRPO, name="dr_grpo", advantage_std=False, aggregation="token_sum_constant"))
"""Dr.GRPO (Liu et al. 2025): GRPO without the std and length normalizations; token sums over a
constant (the generation budget, ``LossNormalizers.constant_normalizer``)."""

DAPO = _add(replace(GRPO, name="dapo", clip_high=0.28, aggregation="token_mean"))
"""DAPO (Yu et al. 2025): clip-higher (0.2 / 0.28) and token-level mean. Its dynamic sampling and
overlong reward shaping act on the batch and rewards, outside the loss."""

REINFORCE = _add(
    LossConfig(
        name="reinforce", reference="policy", clip="none", advantage="reinforce", aggregation="seq_mean_token_sum"
    )
)
"""REINFORCE with +1 / -1 rewards: pi_ref = pi_theta, the sequence log-likelihood is the action."""

RLOO = _add(replace(REINFORCE, name="rloo", advantage="rloo"))
"""RLOO (Ahmadian et al. 2024): REINFORCE with the leave-one-out group baseline."""

REINFORCE_PP = _add(replace(GRPO, name="reinforce_pp", advantage="reinforce_pp", aggregation="token_mean"))
"""REINFORCE++ (Hu 2025): batch-normalized advantages without groups, PPO clip, token mean."""

CISPO = _add(replace(GRPO, name="cispo", clip="cispo", clip_low=1.0, clip_high=0.2, aggregation="token_mean"))
"""CISPO (MiniMax-M1, 2025): every token keeps its gradient, weighted by the stop-gradient ratio
clipped above (1 + 0.2; no lower bound), token mean."""

GSPO = _add(
    replace(GRPO, name="gspo", reference="sequence", clip_low=3e-4, clip_high=4e-4, aggregation="seq_mean_token_mean")
)
"""GSPO (Zheng et al. 2025): length-normalized sequence ratio, sequence-level clip (3e-4 / 4e-4)."""

LUFFY = _add(
    replace(
        DR_GRPO,
        name="luffy",
        off_policy_rows=True,
        clip="none",
        off_policy_reference="one",
        off_policy_shaping=0.1,
        entropy_coef=0.001,
    )
)
"""LUFFY (Yan et al. 2025): demonstrations join the rollout groups as off-policy rows with pi_ref = 1 and
policy shaping f(pi) = pi / (pi + 0.1); advantages over on- and off-policy rows together. Settings as the
HPT authors ran it: groups of n rows with the demonstration as one of them, scored by the verifier; no std,
no clip, token sum / constant, entropy 0.001."""

SRFT = _add(
    replace(
        LUFFY,
        name="srft",
        reference="policy",
        advantage="reinforce",
        off_policy_advantage="grpo",
        entropy_aware_weights=(0.5, 0.1),
        off_policy_sft_weight=1.0,
    )
)
"""SRFT (Fu et al. 2025) as the HPT authors ran it (``offline_loss_type=srft``, ``srft_type=paper``):
rollouts take REINFORCE +1 / -1 on log pi, positives weighted 0.1 * exp(H); demonstrations take the
off-policy term (pi_ref = 1, shaping 0.1, group advantage) plus SFT weighted 0.5 * exp(-H)."""

HPT = _add(replace(DR_GRPO, name="hpt", sft_rows=True, clip="none", entropy_coef=0.001, sft_weight=1.0))
"""HPT (Lv et al. 2025) as run in its public code: per prompt, SFT rows (token mean of -log pi over the
demonstration, coefficient 1.0) or RL rows (ratio to pi_old, no clip, r - mean_group without std,
token sum / 8192); entropy bonus 0.001 on all rows; no KL. The switch is ``hpt_switch``."""


def get_preset(name: str) -> LossConfig:
    """A preset by name; the error for an unknown name lists the known ones."""
    return PRESETS.get(name)


def _fmt(x: float) -> str:
    return f"{x:g}"


def _reference(cfg: LossConfig) -> str:
    ref = {
        "policy": "pi_theta",
        "old": "pi_old (token ratio)",
        "one": "1",
        "sequence": "sequence ratio (pi_theta/pi_old)^(1/len(y))",
    }[cfg.reference]
    if cfg.off_policy_rows:
        off = "1" if cfg.off_policy_reference == "one" else "pi_theta"
        if cfg.off_policy_shaping is not None:
            off += f", shaping f(pi)=pi/(pi+{_fmt(cfg.off_policy_shaping)})"
        ref = f"rollouts: {ref}; demos: {off}"
    if cfg.sft_rows and cfg.advantage != "unit":
        ref = f"SFT rows: pi_theta; RL rows: {ref}"
    return ref


def _advantage_text(cfg: LossConfig, estimator: str) -> str:
    if estimator in ("grpo", "gae"):
        text = "(r - mean_group) / std_group" if cfg.advantage_std else "r - mean_group"
        if estimator == "gae":
            text = f"GAE with a critic, else {text}"
        if cfg.off_policy_rows and cfg.advantage_off_policy_in_group:
            text += " (on+off-policy group)"
        return text
    return {
        "rloo": "r - mean of the other rollouts",
        "reinforce": "+1 / -1",
        "reinforce_pp": "(r - mean_batch) / std_batch",
        "unit": "1",
    }[estimator]


def _advantage(cfg: LossConfig) -> str:
    text = _advantage_text(cfg, cfg.advantage)
    if cfg.entropy_aware_weights is not None:
        text += f", positives x {_fmt(cfg.entropy_aware_weights[1])}*exp(H)"
    off = cfg.off_policy_advantage
    if cfg.off_policy_rows and off is not None and off != cfg.advantage:
        text = f"rollouts: {text}; demos: {_advantage_text(cfg, off)}"
    if cfg.sft_rows and cfg.advantage != "unit":
        text = f"SFT rows: 1; RL rows: {text}"
    return text


def _mask(cfg: LossConfig) -> str:
    if cfg.clip == "none":
        text = "none"
    elif cfg.clip == "cispo":
        lo = "-" if cfg.clip_low >= 1 else _fmt(1 - cfg.clip_low)
        text = f"clipped IS weight sg(clip(r, {lo}, {_fmt(1 + cfg.clip_high)})), stop-gradient"
    else:
        var = "s" if cfg.reference == "sequence" else "r"
        level = "sequence-level clip" if cfg.reference == "sequence" else "clip"
        text = f"{level}({var}, 1-{_fmt(cfg.clip_low)}, 1+{_fmt(cfg.clip_high)})"
        if cfg.clip_high > cfg.clip_low and cfg.reference != "sequence":
            text += " (clip-higher)"
        if cfg.clip_ratio_c is not None:
            text += f", dual clip {_fmt(cfg.clip_ratio_c)}"
    if cfg.tis_cap is not None:
        text += f"; TIS cap {_fmt(cfg.tis_cap)}"
    return text


_AGGREGATION_TEXT = {
    "token_mean": "token mean",
    "seq_mean_token_mean": "sequence mean of token means",
    "seq_mean_token_sum": "token sum / #sequences",
    "token_sum_constant": "token sum / constant (max response length)",
}


def _aggregation(cfg: LossConfig) -> str:
    text = _AGGREGATION_TEXT[cfg.aggregation]
    if cfg.sft_rows and cfg.advantage != "unit":
        text = f"RL: {text}; SFT: {_AGGREGATION_TEXT[cfg.sft_aggregation]}"
    return text


def _extras(cfg: LossConfig) -> str:
    parts = []
    if cfg.sft_rows and cfg.advantage != "unit":
        parts.append(f"SFT weight {_fmt(cfg.sft_weight)}")
    if cfg.off_policy_sft_weight > 0:
        sft = f"SFT on demos {_fmt(cfg.off_policy_sft_weight)}"
        if cfg.entropy_aware_weights is not None:
            sft += f" x {_fmt(cfg.entropy_aware_weights[0])}*exp(-H)"
        parts.append(sft)
    if cfg.entropy_coef > 0:
        parts.append(f"entropy {_fmt(cfg.entropy_coef)}")
    if cfg.kl_coef > 0:
        parts.append(f"KL {cfg.kl_estimator} {_fmt(cfg.kl_coef)}")
    return ", ".join(parts) or "-"


def presets_table(names: list[str] | None = None) -> str:
    """The presets as a Markdown table in the paper's form (Table 1 of arXiv 2509.04419):
    reference denominator pi_ref, advantage A_hat, stabilization mask, plus aggregation and other terms."""
    header = ["algorithm", "reference denominator pi_ref", "advantage A_hat", "stabilization mask", "aggregation", "other terms"]
    rows = []
    for name in names if names is not None else PRESETS.names():
        cfg = PRESETS.get(name)
        rows.append([cfg.name, _reference(cfg), _advantage(cfg), _mask(cfg), _aggregation(cfg), _extras(cfg)])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
