"""Random micro-batches for the loss tests: logits -> log-probs, row kinds, advantages, ratios.

Shape suffixes: B rows, T positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_hpt.losses import LossConfig, LossInputs, LossNormalizers, compute_advantages


@dataclass
class Batch:
    logits_BTV: torch.Tensor  # leaf, requires grad
    targets_BT: torch.Tensor
    mask_BT: torch.Tensor
    is_sft_B: torch.Tensor
    off_B: torch.Tensor
    adv_B: torch.Tensor
    old_BT: torch.Tensor
    ref_BT: torch.Tensor
    rollout_BT: torch.Tensor
    row_weight_B: torch.Tensor | None
    group_B: torch.Tensor
    rewards_B: torch.Tensor

    def inputs(self, with_entropy: bool = True, rows: slice | torch.Tensor | None = None) -> LossInputs:
        """LossInputs computed from the logits (plain log_softmax), optionally for some rows only."""
        logits = self.logits_BTV if rows is None else self.logits_BTV[rows]
        sel = (lambda t: t) if rows is None else (lambda t: t[rows])
        logsm = torch.log_softmax(logits, dim=-1)
        logp_BT = logsm.gather(-1, sel(self.targets_BT)[..., None]).squeeze(-1)
        entropy_BT = -(logsm.exp() * logsm).sum(-1) if with_entropy else None
        return LossInputs(
            logp=logp_BT,
            mask=sel(self.mask_BT),
            advantages=sel(self.adv_B),
            entropy=entropy_BT,
            old_logp=sel(self.old_BT),
            ref_logp=sel(self.ref_BT),
            rollout_logp=sel(self.rollout_BT),
            is_sft=sel(self.is_sft_B),
            off_policy=sel(self.off_B),
            row_weight=None if self.row_weight_B is None else sel(self.row_weight_B),
        )

    def normalizers(self, constant: float = 13.0) -> LossNormalizers:
        return LossNormalizers.count(self.inputs(with_entropy=False), constant_normalizer=constant)


def make_batch(
    cfg: LossConfig,
    seed: int,
    B: int = 12,
    T: int = 7,
    V: int = 11,
    all_sft: bool = False,
    all_rl: bool = False,
    row_weights: bool = False,
) -> Batch:
    g = torch.Generator().manual_seed(seed)
    logits_BTV = (2.0 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).requires_grad_(True)
    targets_BT = torch.randint(0, V, (B, T), generator=g)
    lengths_B = torch.randint(1, T + 1, (B,), generator=g)
    lengths_B[B // 2] = 0  # a row without loss tokens (all padding)
    mask_BT = (torch.arange(T)[None, :] < lengths_B[:, None]).to(torch.float64)
    group_B = torch.arange(B) // 4  # prompts of 4 rows each

    is_sft_B = torch.zeros(B, dtype=torch.bool)
    if cfg.sft_rows and not all_rl:
        is_sft_B = torch.ones(B, dtype=torch.bool) if all_sft else group_B == 0
    off_B = torch.zeros(B, dtype=torch.bool)
    if cfg.off_policy_rows:
        off_B = (torch.arange(B) % 4 == 3) & ~is_sft_B  # one demonstration per RL group

    rewards_B = torch.randint(0, 2, (B,), generator=g).to(torch.float64)
    rewards_B[off_B] = 1.0  # demonstrations are correct
    rewards_B[torch.arange(B) % 4 == 0] = 1.0  # every group has a correct and (likely) a wrong rollout
    rewards_B[torch.arange(B) % 4 == 1] = 0.0
    adv_B = torch.zeros(B, dtype=torch.float64)
    rl_B = ~is_sft_B
    if rl_B.any():
        adv_B[rl_B] = compute_advantages(cfg, rewards_B[rl_B], group_B[rl_B], off_B[rl_B])

    with torch.no_grad():
        logp_BT = torch.log_softmax(logits_BTV, -1).gather(-1, targets_BT[..., None]).squeeze(-1)
        noise_BT = torch.randn(B, T, generator=g, dtype=torch.float64)
        if cfg.reference == "sequence":
            # token noise with zero mean over each row's loss tokens, plus a row offset c: the
            # sequence ratio is exactly exp(c), on both sides of GSPO's tiny clip range
            n_B = mask_BT.sum(-1).clamp(min=1)
            noise_BT = 0.3 * (noise_BT - ((noise_BT * mask_BT).sum(-1) / n_B)[:, None])
            c_B = torch.tensor([0.0, 1e-3, -1e-3, 2e-4, -2e-4, 5e-4] * (B // 6 + 1), dtype=torch.float64)[:B]
            old_BT = logp_BT - c_B[:, None] - noise_BT
        else:
            old_BT = logp_BT - 0.4 * noise_BT  # ratios ~ exp(+-0.4): clipped on both sides at 0.2
        ref_BT = logp_BT + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
        rollout_BT = old_BT + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
        # padding holds garbage the loss must ignore
        pad_BT = mask_BT == 0
        old_BT[pad_BT] = float("nan")
        rollout_BT[pad_BT] = float("inf")
    row_weight_B = None
    if row_weights:
        row_weight_B = torch.rand(B, generator=g, dtype=torch.float64)
    return Batch(
        logits_BTV, targets_BT, mask_BT, is_sft_B, off_B, adv_B, old_BT, ref_BT, rollout_BT, row_weight_B, group_B, rewards_B
    )
