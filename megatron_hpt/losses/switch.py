"""The HPT switch: per prompt, train on the demonstration (SFT) or on the rollouts (RL).

HPT paper (arXiv 2509.04419, Sec. 4, Algorithm 1): for a prompt q with n rollouts,
P = number of correct rollouts, and the loss is

    L = alpha(P) * L_RL + beta(P) * L_SFT

with the hard switch alpha = 1[P > gate], beta = 1[P <= gate] (gate 0 for the
Qwen models, 2 for LLaMA-3.1-8B in the paper's scripts ``exp_scripts/train*.sh``).
Below the gate the rollouts are dropped and the demonstration becomes an SFT row.

The official switch (``mix_trainer.py``, ``select_on_off_ada_balance``) has a second
threshold, ``switch_gate_off``: a prompt with gate < P <= gate_off also drops its
rollouts and adds its demonstration, flagged ``whether_off``, which only the
``off_sft`` loss type reads (as an off-policy RL row); with HPT's loss type ``sft``
it trains as an SFT row like those below the gate. The paper's scripts set it equal
to the gate, where it changes nothing. ``remove_sfted_data`` takes every prompt that
became a demonstration out of the sampling from the next epoch on (the official
trainer removes them from the dataset when an epoch starts).

The soft variant: the paper's code (``mix_trainer.py``, ``trainer.unify_strategy=soft``,
``soft_type=0``) computes per-prompt coefficients from the number of correct samples,
(on-policy RL, off-policy RL, SFT), in a group of 8 that counts the demonstration
itself; but its actor never reads them (only the hard switch reaches the loss in the
released code). Here the soft variant returns those coefficients re-indexed by the
number of correct ROLLOUTS k, as weights for the prompt's RL rows and its SFT row
(``LossInputs.row_weight``):

    k:            0     1      2     3      >=4
    RL weight     0     0.125  0.25  0.5    1
    SFT weight    1     0.5    0.25  0.125  0

(the code's off-policy RL column is left out: HPT trains demonstrations with SFT).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from megatron_hpt.config import checks

DEFAULT_SOFT_WEIGHTS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (0.125, 0.5), (0.25, 0.25), (0.5, 0.125))
"""(RL weight, SFT weight) for k = 0, 1, 2, 3 correct rollouts; k beyond the table gives (1, 0)."""


@dataclass(kw_only=True, frozen=True)
class SwitchConfig:
    """How HPT chooses between SFT and RL per prompt."""

    mode: Literal["switch", "soft"] = "switch"
    """"switch": the paper's hard gate (alpha, beta in {0, 1}); "soft": weights from ``soft_weights``."""
    gate: int = 0
    """A prompt with at most this many correct rollouts trains on its demonstration (paper: 0 for Qwen2.5,
    2 for LLaMA-3.1-8B)."""
    gate_off: int | None = None
    """The official ``switch_gate_off``: a prompt with gate < correct rollouts <= gate_off also trains on
    its demonstration as an SFT row instead of its rollouts (HPT's ``offline_loss_type=sft``). The paper's
    scripts set it to the gate (no effect); None: no second band."""
    remove_sfted_data: bool = False
    """The official ``remove_sfted_data``: every prompt that trained on its demonstration is never sampled
    again from the next epoch on (the state is kept in checkpoints). The paper's scripts leave it off."""
    success_reward: float = 1.0
    """A rollout with reward >= this counts as correct (rewards are 0/1 in the paper)."""
    soft_weights: tuple[tuple[float, float], ...] = DEFAULT_SOFT_WEIGHTS
    """Soft mode: (RL weight, SFT weight) indexed by the number of correct rollouts; (1, 0) beyond."""

    def __post_init__(self) -> None:
        checks.finite_floats(self)
        if self.mode not in ("switch", "soft"):
            raise ValueError(f"SwitchConfig.mode must be 'switch' or 'soft', got {self.mode!r}")
        if self.gate < 0:
            raise ValueError(f"SwitchConfig.gate must be >= 0, got {self.gate}")
        if self.gate_off is not None and self.gate_off < 0:
            raise ValueError(f"SwitchConfig.gate_off must be >= 0 or None, got {self.gate_off}")
        if self.mode != "switch" and (self.gate_off is not None or self.remove_sfted_data):
            raise ValueError(
                "SwitchConfig.gate_off and remove_sfted_data belong to the hard switch (mode: switch), "
                f"got mode={self.mode!r}"
            )
        for k, pair in enumerate(self.soft_weights):
            if len(pair) != 2 or min(pair) < 0:
                raise ValueError(f"SwitchConfig.soft_weights[{k}] must be two non-negative weights, got {pair}")


@dataclass(frozen=True)
class SwitchDecision:
    """What each prompt trains on. Shapes [P], one entry per prompt."""

    num_correct: torch.Tensor
    """Correct rollouts of each prompt (int64)."""
    is_sft: torch.Tensor
    """True: the prompt contributes its demonstration as an SFT row."""
    keep_rl: torch.Tensor
    """True: the prompt's rollouts stay as RL rows (False: they are dropped)."""
    above_gate: torch.Tensor
    """True: the prompt is SFT only through ``gate_off`` (gate < correct <= gate_off)."""
    rl_weight: torch.Tensor
    """Weight of the prompt's RL rows (``LossInputs.row_weight``); 1 or 0 with the hard switch."""
    sft_weight: torch.Tensor
    """Weight of the prompt's SFT row; 1 or 0 with the hard switch."""

    def metrics(self) -> dict[str, float]:
        n = max(self.num_correct.numel(), 1)
        return {
            "hpt/sft_prompt_frac": float(self.is_sft.sum()) / n,
            "hpt/rl_prompt_frac": float(self.keep_rl.sum()) / n,
            "hpt/num_correct_mean": float(self.num_correct.float().mean()) if self.num_correct.numel() else 0.0,
            "hpt/gate_off_prompt_frac": float(self.above_gate.sum()) / n,
        }


def _num_correct(rewards: torch.Tensor | Sequence[Sequence[float]], success_reward: float) -> torch.Tensor:
    if isinstance(rewards, torch.Tensor):
        if rewards.dim() != 2:
            raise ValueError(f"rewards must be [P, n] (n rollouts per prompt), got shape {tuple(rewards.shape)}")
        if rewards.shape[1] == 0:
            raise ValueError("rewards has n = 0 rollouts per prompt: every prompt needs at least one rollout")
        bad = ~torch.isfinite(rewards.float())
        if bad.any():
            prompts = bad.any(-1).nonzero().flatten()[:10].tolist()
            raise ValueError(f"rewards has NaN or inf values, for prompts {prompts}; a failed verification scores 0")
        return (rewards >= success_reward).sum(-1).to(torch.int64)
    counts = []
    for p, group in enumerate(rewards):
        group = list(group)
        if not group:
            raise ValueError(f"prompt {p} has no rollouts (an empty group): every prompt needs at least one")
        if any(not torch.isfinite(torch.tensor(float(r))) for r in group):
            raise ValueError(f"prompt {p} has a NaN or inf reward: {group}")
        counts.append(sum(float(r) >= success_reward for r in group))
    return torch.tensor(counts, dtype=torch.int64)


def hpt_switch(
    rewards: torch.Tensor | Sequence[Sequence[float]],
    cfg: SwitchConfig = SwitchConfig(),
    has_demonstration: torch.Tensor | None = None,
) -> SwitchDecision:
    """Decide SFT vs RL for each prompt from the rewards of its n rollouts.

    Args:
        rewards: [P, n] tensor, or one list of rewards per prompt (groups may differ in size).
        cfg: the gate and the mode (hard switch or soft weights).
        has_demonstration: [P] bool; a prompt without a demonstration cannot become SFT and keeps
            its rollouts (None: every prompt has one).

    Hard switch (paper): P = #correct; P <= gate (or <= gate_off) -> SFT row only, else RL rows only.
    Soft: weights (RL, SFT) = soft_weights[P] (see the module docstring).
    """
    num_correct = _num_correct(rewards, cfg.success_reward)
    if has_demonstration is not None and has_demonstration.shape != num_correct.shape:
        raise ValueError(
            f"has_demonstration shape {tuple(has_demonstration.shape)} does not match the {num_correct.numel()} prompts"
        )
    demo = has_demonstration.bool() if has_demonstration is not None else torch.ones_like(num_correct, dtype=torch.bool)
    above_gate = torch.zeros_like(num_correct, dtype=torch.bool)
    if cfg.mode == "switch":
        gate = cfg.gate if cfg.gate_off is None else max(cfg.gate, cfg.gate_off)
        is_sft = (num_correct <= gate) & demo
        above_gate = is_sft & (num_correct > cfg.gate)
        keep_rl = ~is_sft
        rl_weight = keep_rl.to(torch.float32)
        sft_weight = is_sft.to(torch.float32)
    else:
        table = torch.tensor(list(cfg.soft_weights) + [(1.0, 0.0)], dtype=torch.float32)
        idx = num_correct.clamp(max=len(cfg.soft_weights))
        rl_weight = table[idx, 0]
        sft_weight = torch.where(demo, table[idx, 1], 0.0)
        # without a demonstration the prompt can only learn from its rollouts
        rl_weight = torch.where(demo, rl_weight, 1.0)
        is_sft = sft_weight > 0
        keep_rl = rl_weight > 0
    return SwitchDecision(
        num_correct=num_correct,
        is_sft=is_sft,
        keep_rl=keep_rl,
        above_gate=above_gate,
        rl_weight=rl_weight,
        sft_weight=sft_weight,
    )
