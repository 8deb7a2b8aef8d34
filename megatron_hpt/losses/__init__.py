"""The unified policy-gradient estimator (HPT paper, arXiv 2509.04419), its presets and the HPT switch.

Pure torch on local tensors: never torch.distributed, never a world size. The
training stage passes per-token tensors (``LossInputs``) and GLOBAL counts
(``LossNormalizers``); ``unified_loss`` returns this micro-batch's contribution to
the mini-batch objective, so sums over micro-batches and ranks are exact. With
``LossConfig.normalization="verl"`` the terms take the counts of the official HPT
code's micro-batches instead (``term_norms``), reproducing its weights.

- ``config``: ``LossConfig``, one field per axis (reference, clip, advantage, aggregation, terms);
- ``advantages``: ``compute_advantages`` from rewards per prompt group;
- ``estimator``: ``LossInputs``, ``LossNormalizers``, ``unified_loss``, ``term_weights`` (each term's
  per-token weight under given normalizers);
- ``presets``: ``PRESETS`` (sft, ppo, grpo, dr_grpo, dapo, rloo, reinforce, reinforce_pp, cispo, gspo,
  srft, luffy, hpt) and ``presets_table``;
- ``switch``: ``hpt_switch`` (SFT or RL per prompt, hard gate or soft weights).
"""

from megatron_hpt.losses.advantages import compute_advantages
from megatron_hpt.losses.config import LossConfig
from megatron_hpt.losses.estimator import (
    MAX_METRICS,
    LossInputs,
    LossNormalizers,
    TermWeights,
    term_weights,
    unified_loss,
)
from megatron_hpt.losses.presets import PRESETS, get_preset, presets_table
from megatron_hpt.losses.switch import SwitchConfig, SwitchDecision, hpt_switch

__all__ = [
    "MAX_METRICS",
    "PRESETS",
    "LossConfig",
    "LossInputs",
    "LossNormalizers",
    "SwitchConfig",
    "SwitchDecision",
    "TermWeights",
    "compute_advantages",
    "get_preset",
    "hpt_switch",
    "presets_table",
    "term_weights",
    "unified_loss",
]
