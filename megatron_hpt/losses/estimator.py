"""The unified policy-gradient estimator: one loss function for every preset.

HPT paper (Lv et al., arXiv 2509.04419, Eq. 3): every post-training gradient is

    grad_uni = 1_stable * (1 / pi_ref) * A_hat * grad pi_theta
             = 1_stable * (pi_theta / pi_ref) * A_hat * grad log pi_theta

``unified_loss`` builds, per token, a surrogate whose gradient is exactly that
(with the reference, mask and advantage the ``LossConfig`` names), adds the SFT
term on SFT rows, the entropy bonus and the KL penalty, and divides by GLOBAL
normalizers, so that summing the returned contributions of all micro-batches and
data-parallel ranks gives the mini-batch objective exactly, whatever the split.

Pure torch on local tensors: no torch.distributed, no world size. The training
stage computes ``LossNormalizers`` once per mini-batch (``LossNormalizers.count``
on each micro-batch, summed, all-reduced over data-parallel ranks) and reduces the
metrics with a sum (``MAX_METRICS`` with a max). Under ``normalization="verl"`` the
terms are normalized by the counts of the verl micro-batch the rows belong to, scaled
by 1 / verl's data-parallel ranks (``term_norms``); the metrics stay mini-batch means.

Shape suffixes: B rows, T target positions (target t is the token predicted at
position t); a tensor without a suffix is a scalar.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_hpt.losses.config import Aggregation, LossConfig

MAX_METRICS = frozenset({"ratio/max", "tis/weight_max"})
"""Metric keys to reduce with max across micro-batches and ranks; every other key sums."""


@dataclass(kw_only=True)
class LossInputs:
    """One micro-batch in the padded [B, T] layout."""

    logp: torch.Tensor
    """[B, T] log pi_theta of each target token under the current policy (requires grad)."""
    mask: torch.Tensor
    """[B, T] 1 on tokens that enter the loss (response tokens of RL rows, demonstration tokens of SFT rows)."""
    advantages: torch.Tensor | None = None
    """[B] per-sequence or [B, T] per-token advantages (``compute_advantages``); needed when RL rows exist."""
    entropy: torch.Tensor | None = None
    """[B, T] entropy of pi_theta at each position (requires grad); None when no term needs it."""
    old_logp: torch.Tensor | None = None
    """[B, T] log pi_old (detached); needed by ratio-based references (on-policy: ``logp.detach()``)."""
    ref_logp: torch.Tensor | None = None
    """[B, T] log-probs of the frozen reference model (detached); needed when kl_coef > 0."""
    rollout_logp: torch.Tensor | None = None
    """[B, T] log-probs the rollout engine reported (detached); enables the gap metrics and TIS."""
    is_sft: torch.Tensor | None = None
    """[B] bool: the row is an SFT row (HPT: a demonstration of a prompt below the gate). None: no SFT rows."""
    off_policy: torch.Tensor | None = None
    """[B] bool: an RL row whose response is a demonstration, not a rollout (LUFFY/SRFT). None: none."""
    row_weight: torch.Tensor | None = None
    """[B] weight of each row's policy-gradient or SFT term (HPT's soft mixing); None: 1."""


_COUNT_FIELDS = (
    "num_tokens",
    "num_sft_tokens",
    "num_rl_tokens",
    "num_off_policy_tokens",
    "num_seqs",
    "num_sft_seqs",
    "num_rl_seqs",
    "num_off_policy_seqs",
)


@dataclass(kw_only=True, frozen=True)
class LossNormalizers:
    """Token and sequence counts of the WHOLE mini-batch (all micro-batches, all DP ranks).

    A sequence counts when it has at least one loss token. RL counts include off-policy rows;
    ``num_off_policy_*`` counts them separately (on-policy RL = rl - off_policy).
    """

    num_tokens: int
    """Loss tokens of all rows (entropy bonus, KL)."""
    num_sft_tokens: int
    """Loss tokens of SFT rows."""
    num_rl_tokens: int
    """Loss tokens of RL rows, on- and off-policy."""
    num_off_policy_tokens: int
    """Loss tokens of off-policy RL rows."""
    num_seqs: int
    """Rows with at least one loss token."""
    num_sft_seqs: int
    """SFT rows with at least one loss token."""
    num_rl_seqs: int
    """RL rows (on- and off-policy) with at least one loss token."""
    num_off_policy_seqs: int
    """Off-policy RL rows with at least one loss token."""
    constant_normalizer: float = 8192.0
    """Divisor of ``token_sum_constant`` aggregation: the maximum response length (HPT's code divides
    each micro-batch's token sum by the padded response length, 8192; Dr.GRPO by the generation budget)."""
    scale: float = 1.0
    """Factor on every term normalized by these counts: 1 for the mini-batch's own counts; under
    ``normalization="verl"``, 1 / the data-parallel ranks verl's FSDP averages gradients over."""

    def __post_init__(self) -> None:
        for f in _COUNT_FIELDS:
            if getattr(self, f) < 0:
                raise ValueError(f"LossNormalizers.{f} must be >= 0, got {getattr(self, f)}")
        if self.constant_normalizer <= 0:
            raise ValueError(f"LossNormalizers.constant_normalizer must be > 0, got {self.constant_normalizer}")
        if not self.scale > 0:
            raise ValueError(f"LossNormalizers.scale must be > 0, got {self.scale}")
        if self.num_sft_tokens + self.num_rl_tokens != self.num_tokens:
            raise ValueError(
                f"LossNormalizers: num_sft_tokens + num_rl_tokens = {self.num_sft_tokens + self.num_rl_tokens} "
                f"!= num_tokens = {self.num_tokens}"
            )
        if self.num_sft_seqs + self.num_rl_seqs != self.num_seqs:
            raise ValueError("LossNormalizers: num_sft_seqs + num_rl_seqs != num_seqs")
        if self.num_off_policy_tokens > self.num_rl_tokens or self.num_off_policy_seqs > self.num_rl_seqs:
            raise ValueError("LossNormalizers: off-policy counts exceed RL counts")

    @classmethod
    def count(cls, inputs: LossInputs, constant_normalizer: float = 8192.0) -> "LossNormalizers":
        """This micro-batch's own counts; sum them over micro-batches and DP ranks for the global ones."""
        mask_BT = inputs.mask.detach() != 0
        B = mask_BT.shape[0]
        sft_B = _row_flag(inputs.is_sft, B, mask_BT.device)
        off_B = _row_flag(inputs.off_policy, B, mask_BT.device) & ~sft_B
        tokens_B = mask_BT.sum(-1)
        has_B = tokens_B > 0
        values = torch.stack(
            [
                tokens_B.sum(),
                tokens_B[sft_B].sum(),
                tokens_B[~sft_B].sum(),
                tokens_B[off_B].sum(),
                has_B.sum(),
                (has_B & sft_B).sum(),
                (has_B & ~sft_B).sum(),
                (has_B & off_B).sum(),
            ]
        ).tolist()
        return cls(**dict(zip(_COUNT_FIELDS, (int(v) for v in values))), constant_normalizer=constant_normalizer)

    def __add__(self, other: "LossNormalizers") -> "LossNormalizers":
        if (self.constant_normalizer, self.scale) != (other.constant_normalizer, other.scale):
            raise ValueError(
                f"cannot add normalizers with different constants or scales ({self.constant_normalizer}, "
                f"{self.scale} vs {other.constant_normalizer}, {other.scale})"
            )
        sums = {f: getattr(self, f) + getattr(other, f) for f in _COUNT_FIELDS}
        return LossNormalizers(**sums, constant_normalizer=self.constant_normalizer, scale=self.scale)

    def to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The counts as an int64 tensor [8], e.g. to all-reduce (SUM) over data-parallel ranks."""
        return torch.tensor([getattr(self, f) for f in _COUNT_FIELDS], dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, counts: torch.Tensor, constant_normalizer: float = 8192.0) -> "LossNormalizers":
        """Inverse of ``to_tensor``."""
        values = counts.tolist()
        if len(values) != len(_COUNT_FIELDS):
            raise ValueError(f"expected {len(_COUNT_FIELDS)} counts ({', '.join(_COUNT_FIELDS)}), got {len(values)}")
        return cls(**dict(zip(_COUNT_FIELDS, (int(v) for v in values))), constant_normalizer=constant_normalizer)


def _row_flag(flag_B: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
    if flag_B is None:
        return torch.zeros(B, dtype=torch.bool, device=device)
    return flag_B.detach().to(device=device, dtype=torch.bool)


def _check_inputs(cfg: LossConfig, x: LossInputs) -> None:
    """Validate shapes and that the config's terms have the tensors they need."""
    if x.logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(x.logp.shape)}")
    B, T = x.logp.shape
    for name in ("mask", "entropy", "old_logp", "ref_logp", "rollout_logp"):
        t = getattr(x, name)
        if t is not None and tuple(t.shape) != (B, T):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [B, T] = {(B, T)} like logp")
    for name in ("is_sft", "off_policy", "row_weight"):
        t = getattr(x, name)
        if t is not None and tuple(t.shape) != (B,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected [B] = ({B},)")
    if x.advantages is not None and tuple(x.advantages.shape) not in ((B,), (B, T)):
        raise ValueError(f"advantages has shape {tuple(x.advantages.shape)}, expected [B] = ({B},) or [B, T] = {(B, T)}")
    if x.is_sft is not None and x.off_policy is not None:
        both = x.is_sft.bool() & x.off_policy.bool()
        if both.any():
            raise ValueError(
                f"rows {both.nonzero().flatten()[:10].tolist()} are both is_sft and off_policy: an off-policy row "
                "is an RL row holding a demonstration; an SFT row takes no advantage"
            )
    mask_BT = x.mask != 0
    _check_finite("logp", x.logp.detach(), mask_BT)
    sft_B = _row_flag(x.is_sft, B, mask_BT.device)
    if not cfg.sft_rows and bool(sft_B.any()):
        raise ValueError(
            f"{cfg.name}: the micro-batch has SFT rows (is_sft) but this preset trains none (sft_rows=False); "
            "use a hybrid preset such as 'hpt'"
        )
    if not cfg.off_policy_rows and x.off_policy is not None and bool(x.off_policy.bool().any()):
        raise ValueError(
            f"{cfg.name}: the micro-batch has off-policy rows but this preset trains none (off_policy_rows=False); "
            "use 'luffy' or 'srft'"
        )
    rl_tokens = mask_BT & ~sft_B[:, None]
    has_rl = bool(rl_tokens.any())
    off_B = _row_flag(x.off_policy, B, mask_BT.device) & ~sft_B
    on_tokens = rl_tokens & ~off_B[:, None]
    if has_rl:
        if x.advantages is None:
            raise ValueError(f"{cfg.name}: the micro-batch has RL rows but no advantages (use compute_advantages)")
        adv = x.advantages if x.advantages.dim() == 2 else x.advantages[:, None].expand(B, T)
        _check_finite("advantages", adv, rl_tokens)
    if bool(on_tokens.any()) and cfg.uses_ratio:
        if x.old_logp is None:
            raise ValueError(
                f"{cfg.name}: reference={cfg.reference!r} needs old_logp (log pi_old of the rollouts; "
                "pass logp.detach() when the update is on-policy)"
            )
        _check_finite("old_logp", x.old_logp, on_tokens)
    if cfg.kl_coef > 0:
        if x.ref_logp is None:
            raise ValueError(f"{cfg.name}: kl_coef={cfg.kl_coef} needs ref_logp from the reference model")
        _check_finite("ref_logp", x.ref_logp, mask_BT)
    if cfg.needs_entropy and x.entropy is None:
        raise ValueError(f"{cfg.name}: entropy_coef / entropy_aware_weights need per-token entropy")
    if cfg.tis_cap is not None and bool(on_tokens.any()):
        if x.rollout_logp is None:
            raise ValueError(f"{cfg.name}: tis_cap={cfg.tis_cap} needs rollout_logp from the rollout engine")
        _check_finite("rollout_logp", x.rollout_logp, on_tokens)


def _check_finite(name: str, t: torch.Tensor, where_BT: torch.Tensor) -> None:
    bad = ~torch.isfinite(t) & where_BT
    if bad.any():
        rows = bad.any(-1).nonzero().flatten()[:10].tolist()
        raise ValueError(f"{name} is NaN or inf on {int(bad.sum())} loss tokens, in rows {rows}")


def _check_counts(local: LossNormalizers, norms: LossNormalizers, scope: str) -> None:
    for f in _COUNT_FIELDS:
        if getattr(local, f) > getattr(norms, f):
            raise ValueError(
                f"LossNormalizers.{f} = {getattr(norms, f)} is smaller than this micro-batch's own count "
                f"{getattr(local, f)}: the normalizers must count {scope}"
            )


def aggregation_weights(
    aggregation: Aggregation, tokens_B: torch.Tensor, num_tokens: int, num_seqs: int, constant: float
) -> torch.Tensor:
    """[B] weight of each token of each row in an aggregate over ``num_tokens`` tokens and ``num_seqs``
    rows, where row b has ``tokens_B[b]`` of them: the aggregate of per-token values l is
    sum_b w_b * sum_t l_bt."""
    dtype = tokens_B.dtype if tokens_B.dtype.is_floating_point else torch.float64
    tokens_B = tokens_B.to(dtype)
    if aggregation == "token_mean":
        return torch.full_like(tokens_B, 1.0 / max(num_tokens, 1))
    if aggregation == "token_sum_constant":
        return torch.full_like(tokens_B, 1.0 / constant)
    if aggregation == "seq_mean_token_sum":
        return torch.full_like(tokens_B, 1.0 / max(num_seqs, 1))
    if aggregation == "seq_mean_token_mean":
        return 1.0 / (tokens_B.clamp(min=1) * max(num_seqs, 1))
    raise ValueError(f"unknown aggregation {aggregation!r}")


@dataclass(frozen=True)
class TermWeights:
    """d(objective) / d(per-token term) for each row: [B] weights, 0 on rows a term does not cover.
    They include the terms' coefficients and ``LossNormalizers.scale``, not the per-row factors that
    depend on the data (``row_weight``, SRFT's entropy-aware weights)."""

    pg: torch.Tensor
    """Policy-gradient surrogate on RL rows (on- and off-policy)."""
    sft: torch.Tensor
    """-log pi on SFT rows (``sft_weight``)."""
    off_policy_sft: torch.Tensor
    """-log pi on off-policy rows (``off_policy_sft_weight``, SRFT)."""
    entropy: torch.Tensor
    """Entropy on every row (the term is -entropy_coef * H: this is entropy_coef's side)."""
    kl: torch.Tensor
    """KL estimate on every row."""


def term_weights(
    cfg: LossConfig,
    tokens_B: torch.Tensor,
    is_sft_B: torch.Tensor,
    off_policy_B: torch.Tensor,
    norms: LossNormalizers,
) -> TermWeights:
    """Per-token weights of every term for rows with ``tokens_B`` loss tokens, normalized by ``norms``
    (the mini-batch's counts, or a verl micro-batch's with its 1 / ranks scale)."""
    sft_B = is_sft_B.to(torch.bool)
    off_B = off_policy_B.to(torch.bool) & ~sft_B
    c = norms.constant_normalizer

    def agg(aggregation: Aggregation, rows_B: torch.Tensor, num_tokens: int, num_seqs: int) -> torch.Tensor:
        w_B = aggregation_weights(aggregation, tokens_B, num_tokens, num_seqs, c) * norms.scale
        return torch.where(rows_B, w_B, torch.zeros_like(w_B))

    every_B = torch.ones_like(sft_B)
    mean_B = agg("token_mean", every_B, norms.num_tokens, norms.num_seqs)
    return TermWeights(
        pg=agg(cfg.aggregation, ~sft_B, norms.num_rl_tokens, norms.num_rl_seqs),
        sft=cfg.sft_weight * agg(cfg.sft_aggregation, sft_B, norms.num_sft_tokens, norms.num_sft_seqs),
        off_policy_sft=cfg.off_policy_sft_weight
        * agg(cfg.sft_aggregation, off_B, norms.num_off_policy_tokens, norms.num_off_policy_seqs),
        entropy=cfg.entropy_coef * mean_B,
        kl=cfg.kl_coef * mean_B,
    )


def _weighted_sum(values_BT: torch.Tensor, mask_BT: torch.Tensor, w_B: torch.Tensor) -> torch.Tensor:
    return ((values_BT * mask_BT).sum(-1) * w_B.to(values_BT.dtype)).sum()


def _kl(logp_BT: torch.Tensor, ref_BT: torch.Tensor, estimator: str) -> torch.Tensor:
    log_ratio_BT = logp_BT - ref_BT  # log(pi / ref)
    if estimator == "k1":
        return log_ratio_BT
    if estimator == "k2":
        return 0.5 * log_ratio_BT**2
    if estimator == "k3":
        return torch.exp(-log_ratio_BT) + log_ratio_BT - 1.0
    raise ValueError(f"unknown kl_estimator {estimator!r}")


def unified_loss(
    cfg: LossConfig, inputs: LossInputs, norms: LossNormalizers, term_norms: LossNormalizers | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's contribution to the mini-batch loss of the unified estimator.

    With r the token ratio pi_theta / pi_old, A the advantage, m the loss mask, w the row weight and
    sg the stop-gradient, the mini-batch objective is

        L = L_pg + L_sft - entropy_coef * mean_tokens(H) + kl_coef * mean_tokens(KL_hat)

    where L_pg aggregates (``cfg.aggregation``, over RL rows) the per-token surrogate

        l_t = -w * A_t * 1_stable,t * s_t,   grad s_t = (pi_theta / pi_ref) grad log pi_theta

    with s_t = log pi (pi_ref = pi_theta), pi / pi_old (token ratio), pi or pi / (pi + gamma)
    (pi_ref = 1, with LUFFY shaping), sg[s_seq] * pi / sg[pi] (GSPO); for CISPO,
    l_t = -w * sg(clip(r)) * A_t * log pi. TIS multiplies on-policy l_t by sg(min(pi_old / pi_rollout, cap)).
    L_sft aggregates (``cfg.sft_aggregation``, over SFT rows) -w * sft_weight * log pi. So the gradient
    is grad_uni = 1_stable * (1 / pi_ref) * A * grad pi_theta per token (HPT paper, Eq. 3), plus the
    SFT, entropy and KL terms.

    Every aggregate normalizes by ``norms``, the whole mini-batch's counts, or with
    ``cfg.normalization == "verl"`` by ``term_norms``: the counts of the verl micro-batch (of the split
    the official HPT code makes) these rows belong to, with ``scale`` = 1 / verl's data-parallel ranks,
    so that L is the sum over verl micro-batches of each one's own aggregates, averaged over ranks.

    Returns ``(loss, metrics)``: ``loss`` is a scalar whose sum over all micro-batches and
    data-parallel ranks is L; ``metrics`` maps ``area/name`` to detached scalars that are likewise
    contributions (sum them; keys in ``MAX_METRICS`` reduce with max). ``loss/*`` metrics are L's
    terms; the others (entropy, ratios, NLL) are means over the mini-batch whatever the normalization.
    """
    _check_inputs(cfg, inputs)
    local = LossNormalizers.count(inputs, norms.constant_normalizer)
    _check_counts(local, norms, "the whole mini-batch (sum of LossNormalizers.count over micro-batches, "
                  "all-reduced over data-parallel ranks)")
    if cfg.normalization == "verl":
        if term_norms is None:
            raise ValueError(
                f"{cfg.name}: normalization='verl' needs term_norms, the counts of the verl micro-batch "
                "these rows belong to (megatron_hpt.training.verl_split)"
            )
        _check_counts(local, term_norms, "the verl micro-batch these rows belong to")
    elif term_norms is not None:
        raise ValueError(f"{cfg.name}: term_norms are for normalization='verl', not {cfg.normalization!r}")
    tn = term_norms if term_norms is not None else norms

    dtype = torch.float64 if inputs.logp.dtype == torch.float64 else torch.float32
    B, T = inputs.logp.shape
    device = inputs.logp.device
    mask_BT = inputs.mask.detach().to(device=device) != 0
    # padding positions may hold anything (even -inf): select them away before any arithmetic,
    # so neither values nor gradients can pick up NaN from them
    logp_BT = torch.where(mask_BT, inputs.logp.to(dtype), 0.0)
    sft_B = _row_flag(inputs.is_sft, B, device)
    off_B = _row_flag(inputs.off_policy, B, device) & ~sft_B
    on_B = ~sft_B & ~off_B
    m_sft_BT = (mask_BT & sft_B[:, None]).to(dtype)
    m_rl_BT = (mask_BT & ~sft_B[:, None]).to(dtype)
    m_on_BT = (mask_BT & on_B[:, None]).to(dtype)
    m_off_BT = (mask_BT & off_B[:, None]).to(dtype)
    m_all_BT = mask_BT.to(dtype)
    num_on_tokens = norms.num_rl_tokens - norms.num_off_policy_tokens

    w_B = inputs.row_weight.detach().to(device=device, dtype=dtype) if inputs.row_weight is not None else None
    w_BT = w_B[:, None] if w_B is not None else torch.ones((), dtype=dtype, device=device)
    weights = term_weights(cfg, m_all_BT.sum(-1), sft_B, off_B, tn)
    zero = logp_BT.sum() * 0.0  # a graph-connected zero, so backward works on any micro-batch
    metrics: dict[str, torch.Tensor] = {}

    # SRFT's entropy-aware weights: a function of each row's mean entropy, under stop-gradient
    sft_scale_BT = rl_pos_scale_BT = None
    if cfg.entropy_aware_weights is not None:
        ent_BT = torch.where(mask_BT, inputs.entropy.detach().to(dtype), 0.0)
        row_h_B = (ent_BT * m_all_BT).sum(-1) / m_all_BT.sum(-1).clamp(min=1)
        a, b = cfg.entropy_aware_weights
        sft_scale_BT = (a * torch.exp(-row_h_B))[:, None]
        rl_pos_scale_BT = (b * torch.exp(row_h_B))[:, None]

    # ---- policy-gradient term over RL rows ---------------------------------------------------------
    pg = zero
    if bool(m_rl_BT.any()):
        adv = inputs.advantages.detach().to(device=device, dtype=dtype)
        adv_BT = adv if adv.dim() == 2 else adv[:, None].expand(B, T)
        adv_BT = torch.where(m_rl_BT > 0, adv_BT, torch.zeros((), dtype=dtype, device=device))
        loss_BT = torch.zeros_like(logp_BT)

        if bool(m_on_BT.any()):
            on_adv_BT = adv_BT
            if rl_pos_scale_BT is not None:
                on_adv_BT = torch.where(adv_BT > 0, adv_BT * rl_pos_scale_BT, adv_BT)
            on_loss_BT = _on_policy_surrogate(cfg, inputs, logp_BT, on_adv_BT, m_on_BT, num_on_tokens, dtype, metrics)
            loss_BT = loss_BT + on_loss_BT * m_on_BT

        if bool(m_off_BT.any()):
            if cfg.off_policy_reference == "one":
                prob_BT = torch.exp(logp_BT)
                surr_BT = prob_BT if cfg.off_policy_shaping is None else prob_BT / (prob_BT + cfg.off_policy_shaping)
            else:
                surr_BT = logp_BT
            loss_BT = loss_BT + (-adv_BT * surr_BT) * m_off_BT
            off_norm = max(norms.num_off_policy_tokens, 1)
            metrics["off_policy/prob_mean"] = (torch.exp(logp_BT.detach()) * m_off_BT).sum() / off_norm

        pg = _weighted_sum(loss_BT * w_BT, m_rl_BT, weights.pg)

    # ---- SFT term: -log pi on SFT rows (and SRFT's off-policy rows) ------------------------------------
    sft = zero
    nll_BT = -logp_BT
    if cfg.sft_weight > 0 and bool(m_sft_BT.any()):
        sft_BT = nll_BT * w_BT
        if sft_scale_BT is not None:
            sft_BT = sft_BT * sft_scale_BT
        sft = sft + _weighted_sum(sft_BT, m_sft_BT, weights.sft)
        metrics["actor/sft_nll"] = (nll_BT.detach() * m_sft_BT).sum() / max(norms.num_sft_tokens, 1)
    if cfg.off_policy_sft_weight > 0 and bool(m_off_BT.any()):
        sft_BT = nll_BT * w_BT
        if sft_scale_BT is not None:
            sft_BT = sft_BT * sft_scale_BT
        sft = sft + _weighted_sum(sft_BT, m_off_BT, weights.off_policy_sft)

    # ---- entropy bonus and KL penalty over all loss tokens ------------------------------------------------
    ent_term = zero
    if inputs.entropy is not None:
        ent_BT = torch.where(mask_BT, inputs.entropy.to(dtype), 0.0)
        metrics["actor/entropy"] = (ent_BT.detach() * m_all_BT).sum() / max(norms.num_tokens, 1)
        if cfg.entropy_coef > 0:
            ent_term = -_weighted_sum(ent_BT, m_all_BT, weights.entropy)
    kl_term = zero
    if inputs.ref_logp is not None:
        ref_BT = torch.where(mask_BT, inputs.ref_logp.detach().to(dtype), 0.0)
        kl_BT = _kl(logp_BT, ref_BT, cfg.kl_estimator)
        metrics["actor/kl_ref"] = (kl_BT.detach() * m_all_BT).sum() / max(norms.num_tokens, 1)
        if cfg.kl_coef > 0:
            kl_term = _weighted_sum(kl_BT, m_all_BT, weights.kl)

    loss = pg + sft + ent_term + kl_term
    # the same keys on every micro-batch and rank, whatever rows it holds, so they can be all-reduced
    for key in _metric_keys(cfg, inputs):
        metrics.setdefault(key, torch.zeros((), dtype=dtype, device=device))
    metrics["loss/pg"] = pg.detach()
    metrics["loss/sft"] = sft.detach()
    metrics["loss/entropy"] = ent_term.detach()
    metrics["loss/kl"] = kl_term.detach()
    metrics["loss/total"] = loss.detach()
    return loss, metrics


def _metric_keys(cfg: LossConfig, x: LossInputs) -> list[str]:
    """The metric keys ``unified_loss`` reports for this config and these optional inputs."""
    keys = ["loss/pg", "loss/sft", "loss/entropy", "loss/kl", "loss/total"]
    if cfg.uses_ratio:
        keys += ["ratio/mean", "ratio/max", "actor/ppo_kl"]
    if cfg.clip in ("ppo", "cispo"):
        keys += ["clip/frac_high", "clip/frac_low"]
    if cfg.clip_ratio_c is not None:
        keys.append("clip/frac_dual")
    if x.rollout_logp is not None:
        keys += ["rollout/logp_gap", "rollout/logp_gap_abs", "rollout/kl_k3"]
        if cfg.tis_cap is not None:
            keys += ["tis/weight_mean", "tis/clip_frac", "tis/weight_max"]
    if cfg.off_policy_rows:
        keys.append("off_policy/prob_mean")
    if cfg.sft_rows and cfg.sft_weight > 0:
        keys.append("actor/sft_nll")
    if x.entropy is not None:
        keys.append("actor/entropy")
    if x.ref_logp is not None:
        keys.append("actor/kl_ref")
    return keys


def _on_policy_surrogate(
    cfg: LossConfig,
    x: LossInputs,
    logp_BT: torch.Tensor,
    adv_BT: torch.Tensor,
    m_on_BT: torch.Tensor,
    num_on_tokens: int,
    dtype: torch.dtype,
    metrics: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Per-token loss l_t of on-policy RL tokens (masked by the caller)."""
    on_mask_BT = m_on_BT > 0
    norm = max(num_on_tokens, 1)
    # ratio_BT: the value of the importance ratio (detached); surr_BT: the tensor whose gradient
    # is (pi_theta / pi_ref) * grad log pi_theta.
    if cfg.reference == "policy":
        ratio_BT = torch.ones_like(logp_BT)
        surr_BT = logp_BT
    elif cfg.reference == "one":
        ratio_BT = torch.exp(logp_BT.detach())
        surr_BT = torch.exp(logp_BT)
    else:
        old_BT = x.old_logp.detach().to(dtype)
        # padding positions may hold anything; keep them out of exp()
        log_ratio_BT = torch.where(on_mask_BT, logp_BT - old_BT, 0.0)
        if cfg.reference == "old":
            surr_BT = torch.exp(log_ratio_BT)
            ratio_BT = surr_BT.detach()
        else:  # "sequence": GSPO, s = exp(mean_t log r_t) over the row's loss tokens
            n_B = m_on_BT.sum(-1).clamp(min=1)
            seq_log_ratio_B = (log_ratio_BT.detach() * m_on_BT).sum(-1) / n_B
            ratio_BT = torch.exp(seq_log_ratio_B)[:, None].expand_as(logp_BT)
            surr_BT = ratio_BT * torch.exp(logp_BT - logp_BT.detach())
        metrics["ratio/mean"] = (ratio_BT * m_on_BT).sum() / norm
        metrics["ratio/max"] = torch.where(on_mask_BT, ratio_BT, 0.0).max()
        metrics["actor/ppo_kl"] = (-log_ratio_BT.detach() * m_on_BT).sum() / norm

    if cfg.clip == "cispo":
        weight_BT = ratio_BT.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
        metrics["clip/frac_high"] = ((ratio_BT > 1.0 + cfg.clip_high).to(dtype) * m_on_BT).sum() / norm
        metrics["clip/frac_low"] = ((ratio_BT < 1.0 - cfg.clip_low).to(dtype) * m_on_BT).sum() / norm
        loss_BT = -weight_BT * adv_BT * logp_BT
    elif cfg.clip == "ppo":
        # 1_stable = 0 where the ratio left the trust region in the direction A pushes it; there the
        # loss is the constant -A * bound, which is PPO's max(-A r, -A clip(r)) (and the dual clip).
        hi = 1.0 + cfg.clip_high
        lo = 1.0 - cfg.clip_low
        clipped_hi_BT = (adv_BT > 0) & (ratio_BT > hi)
        clipped_lo_BT = (adv_BT < 0) & (ratio_BT < lo)
        bound_BT = torch.ones_like(ratio_BT).masked_fill(clipped_hi_BT, hi).masked_fill(clipped_lo_BT, lo)
        clipped_BT = clipped_hi_BT | clipped_lo_BT
        metrics["clip/frac_high"] = (clipped_hi_BT.to(dtype) * m_on_BT).sum() / norm
        metrics["clip/frac_low"] = (clipped_lo_BT.to(dtype) * m_on_BT).sum() / norm
        if cfg.clip_ratio_c is not None:
            dual_BT = (adv_BT < 0) & (ratio_BT > cfg.clip_ratio_c)
            bound_BT = bound_BT.masked_fill(dual_BT, cfg.clip_ratio_c)
            clipped_BT = clipped_BT | dual_BT
            metrics["clip/frac_dual"] = (dual_BT.to(dtype) * m_on_BT).sum() / norm
        loss_BT = torch.where(clipped_BT, -adv_BT * bound_BT, -adv_BT * surr_BT)
    else:
        loss_BT = -adv_BT * surr_BT

    if x.rollout_logp is not None:
        rollout_BT = torch.where(on_mask_BT, x.rollout_logp.detach().to(dtype), 0.0)
        gap_BT = torch.where(on_mask_BT, logp_BT.detach() - rollout_BT, 0.0)
        metrics["rollout/logp_gap"] = (gap_BT * m_on_BT).sum() / norm
        metrics["rollout/logp_gap_abs"] = (gap_BT.abs() * m_on_BT).sum() / norm
        metrics["rollout/kl_k3"] = ((torch.exp(-gap_BT) + gap_BT - 1.0) * m_on_BT).sum() / norm
        if cfg.tis_cap is not None:
            behaviour_BT = x.old_logp.detach().to(dtype) if x.old_logp is not None else logp_BT.detach()
            raw_BT = torch.exp(torch.where(on_mask_BT, behaviour_BT - rollout_BT, 0.0))
            tis_BT = raw_BT.clamp(max=cfg.tis_cap)
            metrics["tis/weight_mean"] = (tis_BT * m_on_BT).sum() / norm
            metrics["tis/clip_frac"] = ((raw_BT > cfg.tis_cap).to(dtype) * m_on_BT).sum() / norm
            metrics["tis/weight_max"] = torch.where(on_mask_BT, raw_BT, 0.0).max()
            loss_BT = loss_BT * tis_BT
    return loss_BT
