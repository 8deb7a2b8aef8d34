"""LossConfig: one frozen record of every axis of the unified policy-gradient estimator.

The HPT paper (Lv et al., *Towards a Unified View of Large Language Model
Post-Training*, arXiv 2509.04419, Eq. 3 and Table 1) writes the gradient of every
post-training algorithm as

    grad_uni = 1_stable * (1 / pi_ref) * A_hat * grad pi_theta

This config names one choice per factor (reference denominator ``pi_ref``,
stabilization mask ``1_stable``, advantage estimator ``A_hat``) plus the token
aggregation and the extra terms (SFT, entropy bonus, KL to a reference model,
truncated importance sampling against the rollout engine). An algorithm is a
preset of this config (``megatron_hpt.losses.presets``), never a new function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_hpt.config import checks

Reference = Literal["policy", "old", "one", "sequence"]
"""The reference denominator pi_ref:

- ``policy``: pi_ref = pi_theta, so the gradient is A * grad log pi (SFT, REINFORCE, RLOO);
- ``old``: pi_ref = pi_theta_old, the token importance ratio pi_theta / pi_old (PPO, GRPO, CISPO);
- ``one``: pi_ref = 1, the gradient is A * grad pi_theta itself (LUFFY/SRFT off-policy demonstrations,
  whose behaviour policy is unknown);
- ``sequence``: GSPO's length-normalized sequence ratio s = (pi_theta(y) / pi_old(y))^(1/|y|), applied to
  every token of the sequence (its token form sg[s] * pi_theta / sg[pi_theta])."""

OffPolicyReference = Literal["one", "policy"]
"""pi_ref for off-policy rows (demonstrations inside RL groups): ``one`` (LUFFY, SRFT) or ``policy``."""

Clip = Literal["none", "ppo", "cispo"]
"""The stabilization mask 1_stable:

- ``none``: every token passes;
- ``ppo``: the gradient stops where the ratio left [1 - clip_low, 1 + clip_high] in the direction the
  advantage pushes (PPO; clip-higher when clip_high > clip_low as in DAPO; with ``clip_ratio_c`` also the
  dual clip for negative advantages). On the ``sequence`` reference this is GSPO's sequence-level clip;
- ``cispo``: no token is masked; the gradient of log pi is weighted by the clipped ratio under a
  stop-gradient, sg(clip(ratio, 1 - clip_low, 1 + clip_high)) (CISPO, MiniMax-M1)."""

AdvantageEstimator = Literal["grpo", "rloo", "reinforce", "reinforce_pp", "gae", "unit"]
"""How A_hat comes from rewards (``megatron_hpt.losses.advantages``):

- ``grpo``: r - mean_group, divided by std_group when ``advantage_std`` (GRPO; without std: Dr.GRPO, HPT);
- ``rloo``: r minus the mean of the other rollouts of the group (RLOO);
- ``reinforce``: +1 for a correct rollout (reward >= success_reward), -1 otherwise;
- ``reinforce_pp``: (r - mean_batch) / std_batch over the whole batch (REINFORCE++);
- ``gae``: generalized advantage estimation from critic values; this project trains no critic, so
  without values it uses the group estimator (``grpo`` with ``advantage_std``);
- ``unit``: A = 1 for every row (SFT)."""

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_constant"]
"""How per-token terms become one number, over the rows ``Normalization`` names (by default the GLOBAL
mini-batch, all micro-batches and data-parallel ranks, so the gradient does not depend on the split):

- ``token_mean``: sum over tokens / number of tokens (DAPO, LUFFY's paper, CISPO);
- ``seq_mean_token_mean``: mean over sequences of each sequence's token mean (GRPO, GSPO);
- ``seq_mean_token_sum``: sum over tokens / number of sequences (REINFORCE, RLOO: the sequence is the action);
- ``token_sum_constant``: sum over tokens / a constant (HPT's code: 8192, the maximum response length;
  Dr.GRPO's constant normalizer)."""

Normalization = Literal["global", "verl"]
"""Over which rows the terms' token and sequence counts are taken:

- ``global``: the whole mini-batch (every micro-batch, every data-parallel rank), so the gradient is
  the same however the mini-batch is split;
- ``verl``: each micro-batch of the split the official HPT code (TsinghuaC3I/Unify-Post-Training, on
  verl) makes, averaged over its data-parallel ranks: each micro-batch's loss is its own aggregate (the
  policy-gradient token sum / constant, the SFT token mean over its SFT rows, the entropy mean over its
  tokens), a rank sums its micro-batches and FSDP averages the ranks. The paper's runs trained with these
  weights; ``megatron_hpt.training.verl_split`` replays that split."""

DemonstrationReward = Literal["verifier", "success"]
"""Reward of a demonstration inside an RL group (off-policy rows): ``verifier`` scores it like a rollout
(the HPT authors' LUFFY and SRFT runs: a demonstration whose answer does not verify gets 0); ``success``
fixes it at ``success_reward``."""

DemonstrationSlot = Literal["replaces_rollout", "extra"]
"""Where a group's demonstration comes from: ``replaces_rollout`` makes it one of the n rows of the group
(n - 1 rollouts are sampled; the HPT authors' LUFFY and SRFT runs: n = 8 with one full-demonstration
prefix sample); ``extra`` adds it to n rollouts (n + 1 rows)."""

KLEstimator = Literal["k1", "k2", "k3"]
"""Per-token estimate of KL(pi_theta || pi_ref_model) from samples of pi_theta (Schulman, 2020):
k1 = log(pi/ref), k2 = log(pi/ref)^2 / 2, k3 = ref/pi - log(ref/pi) - 1."""


@dataclass(kw_only=True, frozen=True)
class LossConfig:
    """One point in the space of the unified estimator; presets are instances of it."""

    name: str = "custom"
    """Name shown in tables and metrics."""
    sft_rows: bool = False
    """The algorithm trains SFT rows (pure SFT, HPT's switch); otherwise SFT rows are an input error."""
    off_policy_rows: bool = False
    """The algorithm mixes demonstrations into RL groups as off-policy rows (LUFFY, SRFT); otherwise
    off-policy rows are an input error."""

    # --- reference denominator -------------------------------------------------------------
    reference: Reference = "old"
    """pi_ref for on-policy RL rows (see ``Reference``)."""
    off_policy_reference: OffPolicyReference = "one"
    """pi_ref for off-policy RL rows, demonstrations mixed into RL groups (LUFFY, SRFT)."""
    demonstration_reward: DemonstrationReward = "verifier"
    """Reward of the off-policy demonstration row of a group (see ``DemonstrationReward``)."""
    demonstration_slot: DemonstrationSlot = "replaces_rollout"
    """Group composition with off-policy rows (see ``DemonstrationSlot``)."""
    off_policy_shaping: float | None = None
    """LUFFY's policy shaping on off-policy tokens: pi is replaced by f(pi) = pi / (pi + gamma), whose
    gradient up-weights low-probability tokens; the value is gamma (0.1 in LUFFY). None: no shaping."""

    # --- stabilization mask ------------------------------------------------------------------
    clip: Clip = "ppo"
    """Stabilization mask for on-policy RL rows (see ``Clip``); off-policy rows are never clipped."""
    clip_low: float = 0.2
    """Lower clip width: the ratio's lower bound is 1 - clip_low (CISPO: 1.0, i.e. no lower bound)."""
    clip_high: float = 0.2
    """Upper clip width: the ratio's upper bound is 1 + clip_high (DAPO's clip-higher: 0.28)."""
    clip_ratio_c: float | None = None
    """Dual clip (Ye et al. 2020): for negative advantages the gradient also stops where the ratio
    exceeds this constant (verl uses 3.0). None: off. Must be > 1 + clip_high."""

    # --- advantage -----------------------------------------------------------------------------
    advantage: AdvantageEstimator = "grpo"
    """Advantage estimator for on-policy rows (see ``AdvantageEstimator``)."""
    off_policy_advantage: AdvantageEstimator | None = None
    """Advantage estimator for off-policy rows; None: the same as ``advantage``. (SRFT as run in the
    HPT code: +1/-1 on rollouts, group mean over on- and off-policy rows on demonstrations.)"""
    advantage_std: bool = True
    """Divide group-relative advantages by the group's (unbiased) standard deviation."""
    advantage_eps: float = 1e-6
    """Added to the standard deviation before dividing (GRPO)."""
    advantage_off_policy_in_group: bool = True
    """Group statistics include off-policy rows of the group (LUFFY/SRFT normalize over on- and
    off-policy rollouts together); False: on-policy rows only."""
    success_reward: float = 1.0
    """A rollout with reward >= this counts as correct (REINFORCE +/-1, SRFT's positive samples)."""
    gae_gamma: float = 1.0
    """GAE discount (only with critic values)."""
    gae_lambda: float = 0.95
    """GAE lambda (only with critic values)."""

    # --- aggregation -----------------------------------------------------------------------------
    aggregation: Aggregation = "token_mean"
    """Aggregation of the policy-gradient term over RL rows (on- and off-policy)."""

    normalization: Normalization = "global"
    """Over which rows every term is normalized: the whole mini-batch, or verl's micro-batches and ranks as
    the official HPT code (see ``Normalization``)."""

    # --- SFT ---------------------------------------------------------------------------------------
    sft_weight: float = 1.0
    """Coefficient of the SFT term -log pi on SFT rows (HPT: 1.0; 0.3 for Qwen2.5-Math-1.5B)."""
    sft_aggregation: Aggregation = "token_mean"
    """Aggregation of the SFT term over SFT rows (HPT's code: token mean over demonstration tokens)."""
    off_policy_sft_weight: float = 0.0
    """Coefficient of an SFT term on off-policy rows, in addition to their policy-gradient term (SRFT
    trains demonstrations with both); aggregated like ``sft_aggregation`` over off-policy tokens."""
    entropy_aware_weights: tuple[float, float] | None = None
    """SRFT's entropy-aware weights (a, b): SFT terms get a * exp(-H) and on-policy rows with positive
    advantage get b * exp(H), H the row's mean token entropy under stop-gradient. SRFT: (0.5, 0.1)."""

    # --- regularizers ------------------------------------------------------------------------------
    entropy_coef: float = 0.0
    """Entropy bonus: the loss adds -entropy_coef * token-mean entropy over all loss tokens (HPT: 0.001)."""
    kl_coef: float = 0.0
    """KL penalty to the reference model: the loss adds kl_coef * token-mean KL estimate over all loss
    tokens (needs ref_logp). HPT: 0. DeepSeekMath's GRPO used 0.04 with k3."""
    kl_estimator: KLEstimator = "k3"
    """Which per-token KL estimate (see ``KLEstimator``)."""
    tis_cap: float | None = None
    """Truncated importance sampling against the rollout engine (needs rollout_logp): on-policy RL tokens
    are weighted by min(pi_old / pi_rollout, tis_cap) under stop-gradient. None: off."""

    def __post_init__(self) -> None:
        checks.finite_floats(self)
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError(f"{self.name}: clip_low and clip_high must be >= 0, got {self.clip_low}, {self.clip_high}")
        if self.clip_low > 1:
            raise ValueError(f"{self.name}: clip_low must be <= 1 (the ratio is positive), got {self.clip_low}")
        if self.clip_ratio_c is not None:
            if self.clip != "ppo":
                raise ValueError(f"{self.name}: clip_ratio_c (dual clip) needs clip='ppo', got clip={self.clip!r}")
            if self.clip_ratio_c <= 1 + self.clip_high:
                raise ValueError(
                    f"{self.name}: clip_ratio_c must be > 1 + clip_high = {1 + self.clip_high}, got {self.clip_ratio_c}"
                )
        if self.reference in ("policy", "one") and self.clip != "none":
            raise ValueError(
                f"{self.name}: reference={self.reference!r} has no importance ratio to clip; use clip='none'"
            )
        if self.off_policy_shaping is not None:
            if self.off_policy_shaping <= 0:
                raise ValueError(f"{self.name}: off_policy_shaping must be > 0, got {self.off_policy_shaping}")
            if self.off_policy_reference != "one":
                raise ValueError(f"{self.name}: off_policy_shaping needs off_policy_reference='one'")
        if self.advantage_eps < 0:
            raise ValueError(f"{self.name}: advantage_eps must be >= 0, got {self.advantage_eps}")
        if not 0 <= self.gae_gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            raise ValueError(f"{self.name}: gae_gamma and gae_lambda must be in [0, 1]")
        for field in ("sft_weight", "off_policy_sft_weight", "entropy_coef", "kl_coef"):
            if getattr(self, field) < 0:
                raise ValueError(f"{self.name}: {field} must be >= 0, got {getattr(self, field)}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"{self.name}: tis_cap must be > 0, got {self.tis_cap}")
        for field, allowed in (
            ("normalization", ("global", "verl")),
            ("demonstration_reward", ("verifier", "success")),
            ("demonstration_slot", ("replaces_rollout", "extra")),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{self.name}: {field} must be one of {allowed}, got {getattr(self, field)!r}")
        if self.entropy_aware_weights is not None:
            if len(self.entropy_aware_weights) != 2 or min(self.entropy_aware_weights) < 0:
                raise ValueError(
                    f"{self.name}: entropy_aware_weights must be two non-negative numbers (sft_scale, rl_scale), "
                    f"got {self.entropy_aware_weights}"
                )

    @property
    def uses_ratio(self) -> bool:
        """True when on-policy rows need pi_old (token or sequence ratio, or CISPO's weight)."""
        return self.reference in ("old", "sequence")

    @property
    def needs_entropy(self) -> bool:
        """True when the loss needs per-token entropies."""
        return self.entropy_coef > 0 or self.entropy_aware_weights is not None
