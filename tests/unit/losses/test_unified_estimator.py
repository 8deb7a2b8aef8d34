"""The unified estimator against the paper's formula, per preset, and its split invariance.

The expected gradient is built independently, in probability space, from the HPT paper's
Eq. 3: grad = 1_stable * (1 / pi_ref) * A * grad pi_theta, i.e. autograd of
sum_t w_t * 1_stable,t * A_t * pi_t / sg(pi_ref,t) with pi_t = softmax(logits)[target]
(w_t the aggregation weight), plus the SFT, entropy and KL terms written explicitly.

Shape suffixes: B rows, T positions, V vocabulary.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from loss_batches import Batch, make_batch
from megatron_hpt.losses import MAX_METRICS, PRESETS, LossConfig, LossNormalizers, get_preset, unified_loss

CONSTANT = 13.0


def _project_grad(cfg: LossConfig, batch: Batch, splits: list[slice] | None = None):
    """Sum of unified_loss contributions over micro-batches; returns (loss, metrics, d loss / d logits)."""
    norms = batch.normalizers(CONSTANT)
    batch.logits_BTV.grad = None
    total = 0.0
    metrics: dict[str, float] = {}
    for rows in splits or [slice(None)]:
        loss, m = unified_loss(cfg, batch.inputs(with_entropy=True, rows=rows), norms)
        loss.backward()
        total += loss.item()
        for k, v in m.items():
            metrics[k] = max(metrics.get(k, -float("inf")), v.item()) if k in MAX_METRICS else metrics.get(k, 0.0) + v.item()
    grad = batch.logits_BTV.grad.clone()
    batch.logits_BTV.grad = None
    return total, metrics, grad


def _aggregation_weights(agg: str, m_BT: torch.Tensor) -> torch.Tensor:
    """w_t of each token under an aggregation, with the batch's own (global) counts."""
    n_tokens = m_BT.sum()
    n_B = m_BT.sum(-1)
    n_seqs = (n_B > 0).sum()
    if agg == "token_mean":
        return m_BT / n_tokens.clamp(min=1)
    if agg == "token_sum_constant":
        return m_BT / CONSTANT
    if agg == "seq_mean_token_sum":
        return m_BT / n_seqs.clamp(min=1)
    if agg == "seq_mean_token_mean":
        return m_BT / (n_B.clamp(min=1)[:, None] * n_seqs.clamp(min=1))
    raise AssertionError(agg)


def _paper_grad(cfg: LossConfig, batch: Batch) -> torch.Tensor:
    """d/d logits of the loss whose gradient is the paper's formula, written per token."""
    logits = batch.logits_BTV
    probs_BTV = torch.softmax(logits, dim=-1)
    pi_BT = probs_BTV.gather(-1, batch.targets_BT[..., None]).squeeze(-1)
    pi_d = pi_BT.detach()
    m_BT = batch.mask_BT
    sft_B, off_B = batch.is_sft_B, batch.off_B
    on_B = ~sft_B & ~off_B
    w_B = batch.row_weight_B if batch.row_weight_B is not None else torch.ones_like(batch.adv_B)
    A_BT = batch.adv_B[:, None].expand_as(pi_d).clone()
    entropy_BT = -(probs_BTV * torch.log(probs_BTV)).sum(-1)
    row_h_B = (entropy_BT.detach() * m_BT).sum(-1) / m_BT.sum(-1).clamp(min=1)

    J = torch.zeros((), dtype=torch.float64)
    # --- RL rows: sum_t w_t * 1_stable * A * pi / sg(pi_ref)
    m_rl = m_BT * (~sft_B)[:, None]
    m_on = m_BT * on_B[:, None]
    m_off = m_BT * off_B[:, None]
    w_rl = _aggregation_weights(cfg.aggregation, m_rl)
    if m_on.any():
        A_on = A_BT.clone()
        if cfg.entropy_aware_weights is not None:
            A_on = torch.where(A_on > 0, A_on * cfg.entropy_aware_weights[1] * torch.exp(row_h_B)[:, None], A_on)
        old_BT = torch.nan_to_num(batch.old_BT, nan=0.0)
        r_BT = torch.exp(torch.log(pi_d) - old_BT)  # token ratio pi / pi_old
        if cfg.reference == "policy":
            pi_ref, ratio = pi_d, torch.ones_like(pi_d)
        elif cfg.reference == "old":
            pi_ref, ratio = torch.exp(old_BT), r_BT
        elif cfg.reference == "sequence":
            s_B = torch.exp((torch.log(r_BT) * m_on).sum(-1) / m_on.sum(-1).clamp(min=1))
            ratio = s_B[:, None].expand_as(pi_d)
            pi_ref = pi_d / ratio  # so that pi / pi_ref = s for every token of the sequence
        else:
            raise AssertionError(cfg.reference)
        stable = torch.ones_like(pi_d)
        if cfg.clip == "ppo":
            out = ((A_on > 0) & (ratio > 1 + cfg.clip_high)) | ((A_on < 0) & (ratio < 1 - cfg.clip_low))
            if cfg.clip_ratio_c is not None:
                out |= (A_on < 0) & (ratio > cfg.clip_ratio_c)
            stable = (~out).to(torch.float64)
        elif cfg.clip == "cispo":
            # no mask; the IS weight is the clipped ratio, so 1 / pi_ref = clip(r) / pi_theta
            pi_ref = pi_d / ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
        tis = torch.ones_like(pi_d)
        if cfg.tis_cap is not None:
            tis = torch.exp(old_BT - torch.nan_to_num(batch.rollout_BT, posinf=0.0)).clamp(max=cfg.tis_cap)
        coef = w_rl * m_on * w_B[:, None] * stable * A_on * tis
        J = J + (coef * pi_BT / pi_ref).sum()
    if m_off.any():
        if cfg.off_policy_reference == "one":
            inv_ref = torch.ones_like(pi_d)
            if cfg.off_policy_shaping is not None:
                g = cfg.off_policy_shaping
                inv_ref = g / (pi_d + g) ** 2  # d f(pi) / d pi for f(pi) = pi / (pi + g)
        else:
            inv_ref = 1 / pi_d
        J = J + (w_rl * m_off * w_B[:, None] * A_BT * inv_ref * pi_BT).sum()
    # --- SFT: pi_ref = pi_theta, A = 1
    sft_scale_B = torch.ones_like(row_h_B)
    if cfg.entropy_aware_weights is not None:
        sft_scale_B = cfg.entropy_aware_weights[0] * torch.exp(-row_h_B)
    m_sft = m_BT * sft_B[:, None]
    if m_sft.any():
        w_sft = _aggregation_weights(cfg.sft_aggregation, m_sft)
        J = J + (cfg.sft_weight * w_sft * (w_B * sft_scale_B)[:, None] * pi_BT / pi_d).sum()
    if cfg.off_policy_sft_weight > 0 and m_off.any():
        w_osft = _aggregation_weights(cfg.sft_aggregation, m_off)
        J = J + (cfg.off_policy_sft_weight * w_osft * (w_B * sft_scale_B)[:, None] * pi_BT / pi_d).sum()

    loss = -J
    n_all = m_BT.sum()
    if cfg.entropy_coef > 0:
        loss = loss - cfg.entropy_coef * (entropy_BT * m_BT).sum() / n_all
    if cfg.kl_coef > 0:
        lr = torch.log(pi_BT) - batch.ref_BT  # log(pi / ref)
        kl = {"k1": lr, "k2": 0.5 * lr**2, "k3": torch.exp(-lr) + lr - 1}[cfg.kl_estimator]
        loss = loss + cfg.kl_coef * (kl * m_BT).sum() / n_all
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


VARIANTS = {name: PRESETS.get(name) for name in PRESETS.names()}
VARIANTS["grpo+dual_clip"] = replace(get_preset("grpo"), clip_ratio_c=1.3)
VARIANTS["grpo+kl_k1"] = replace(get_preset("grpo"), kl_coef=0.1, kl_estimator="k1")
VARIANTS["grpo+kl_k2"] = replace(get_preset("grpo"), kl_coef=0.1, kl_estimator="k2")
VARIANTS["dapo+kl_k3+tis"] = replace(get_preset("dapo"), kl_coef=0.1, kl_estimator="k3", tis_cap=1.5)
VARIANTS["cispo+tis"] = replace(get_preset("cispo"), tis_cap=2.0)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_gradient_equals_paper_formula(name):
    cfg = VARIANTS[name]
    for seed in range(2):
        batch = make_batch(cfg, seed, row_weights=(name == "hpt" and seed == 1))
        _, metrics, grad = _project_grad(cfg, batch)
        expected = _paper_grad(cfg, batch)
        assert grad.abs().max() > 1e-4  # the batch produces a real gradient
        torch.testing.assert_close(grad, expected, atol=1e-10, rtol=1e-8)
    if cfg.clip == "ppo":  # the random inputs clip on both sides
        assert metrics["clip/frac_high"] > 0 and metrics["clip/frac_low"] > 0
        if cfg.clip_ratio_c is not None:
            assert metrics["clip/frac_dual"] > 0
    if cfg.clip == "cispo":  # the IS weight is clipped above on some tokens
        assert metrics["clip/frac_high"] > 0


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_split_invariance(name):
    """Sum of per-micro-batch contributions == whole batch, for loss, gradient and metrics."""
    cfg = VARIANTS[name]
    batch = make_batch(cfg, seed=3)
    loss, metrics, grad = _project_grad(cfg, batch)
    splits = [slice(0, 5), slice(5, 6), slice(6, 12)]
    loss_s, metrics_s, grad_s = _project_grad(cfg, batch, splits)
    # every micro-batch reports the same keys (rank-wise all-reduce needs that), even one without RL rows
    norms = batch.normalizers(CONSTANT)
    keys = {tuple(sorted(unified_loss(cfg, batch.inputs(rows=r), norms)[1])) for r in splits + [slice(6, 7)]}
    assert len(keys) == 1
    assert loss_s == pytest.approx(loss, rel=1e-12, abs=1e-12)
    torch.testing.assert_close(grad_s, grad, atol=1e-12, rtol=1e-10)
    assert metrics_s.keys() == metrics.keys()
    for k in metrics:
        assert metrics_s[k] == pytest.approx(metrics[k], rel=1e-10, abs=1e-12), k


def test_sft_gradient_equals_cross_entropy():
    cfg = get_preset("sft")
    batch = make_batch(cfg, seed=5, all_sft=True)
    loss, _, grad = _project_grad(cfg, batch)
    logits = batch.logits_BTV
    sel = batch.mask_BT > 0
    ce = torch.nn.functional.cross_entropy(logits[sel], batch.targets_BT[sel])
    (ce_grad,) = torch.autograd.grad(ce, logits)
    assert loss == pytest.approx(ce.item(), rel=1e-12)
    torch.testing.assert_close(grad, ce_grad, atol=1e-12, rtol=1e-10)


def test_grpo_with_ratio_one_equals_reinforce():
    grpo = get_preset("grpo")
    batch = make_batch(grpo, seed=6)
    with torch.no_grad():  # on-policy: pi_old = pi_theta, every ratio is 1 and nothing clips
        logp = torch.log_softmax(batch.logits_BTV, -1).gather(-1, batch.targets_BT[..., None]).squeeze(-1)
        batch.old_BT = logp.clone()
    _, _, g_grpo = _project_grad(grpo, batch)
    reinforce = replace(get_preset("reinforce"), aggregation=grpo.aggregation)
    _, _, g_reinforce = _project_grad(reinforce, batch)
    assert g_grpo.abs().max() > 1e-4
    torch.testing.assert_close(g_grpo, g_reinforce, atol=1e-12, rtol=1e-10)


def test_hpt_on_all_sft_batch_equals_sft():
    hpt = get_preset("hpt")
    batch = make_batch(hpt, seed=7, all_sft=True)
    loss_h, _, g_h = _project_grad(hpt, batch)
    # HPT's entropy bonus (0.001) applies to SFT rows too
    loss_s, _, g_s = _project_grad(replace(get_preset("sft"), entropy_coef=hpt.entropy_coef), batch)
    assert loss_h == pytest.approx(loss_s, rel=1e-12)
    torch.testing.assert_close(g_h, g_s, atol=1e-12, rtol=1e-10)
    _, _, g_plain = _project_grad(get_preset("sft"), batch)
    assert not torch.allclose(g_h, g_plain)  # the entropy term is really there


def test_hpt_on_all_rl_batch_equals_its_rl_preset():
    hpt = get_preset("hpt")
    rl = replace(get_preset("dr_grpo"), clip="none", entropy_coef=0.001)  # HPT's RL rows
    batch = make_batch(hpt, seed=8, all_rl=True)
    loss_h, _, g_h = _project_grad(hpt, batch)
    loss_r, _, g_r = _project_grad(rl, batch)
    assert loss_h == pytest.approx(loss_r, rel=1e-12)
    torch.testing.assert_close(g_h, g_r, atol=1e-12, rtol=1e-10)
    # and its value is the paper code's: -sum(A * ratio) / C - 0.001 * token-mean entropy
    x = batch.inputs()
    m = batch.mask_BT
    ratio = torch.exp(torch.where(m > 0, x.logp - torch.nan_to_num(batch.old_BT), 0.0))
    expected = -(batch.adv_B[:, None] * ratio * m).sum() / CONSTANT - 0.001 * (x.entropy * m).sum() / m.sum()
    assert loss_h == pytest.approx(expected.item(), rel=1e-12)


def test_metrics_report_rollout_gap_and_tis():
    cfg = VARIANTS["dapo+kl_k3+tis"]
    batch = make_batch(cfg, seed=9)
    _, metrics, _ = _project_grad(cfg, batch)
    x = batch.inputs()
    on = (batch.mask_BT > 0) & (~batch.is_sft_B & ~batch.off_B)[:, None]
    gap = (x.logp - batch.rollout_BT)[on]
    assert metrics["rollout/logp_gap_abs"] == pytest.approx(gap.abs().mean().item(), rel=1e-12)
    raw = torch.exp(batch.old_BT - batch.rollout_BT)[on]
    assert metrics["tis/weight_mean"] == pytest.approx(raw.clamp(max=1.5).mean().item(), rel=1e-12)
    assert metrics["tis/weight_max"] == pytest.approx(raw.max().item(), rel=1e-12)
    assert 0 < metrics["tis/clip_frac"] < 1


def _inputs(cfg, seed=11):
    batch = make_batch(cfg, seed)
    return batch, batch.inputs(), batch.normalizers(CONSTANT)


def test_bad_shapes_name_the_tensor():
    cfg = get_preset("grpo")
    _, x, norms = _inputs(cfg)
    with pytest.raises(ValueError, match=r"old_logp has shape \(12, 6\), expected \[B, T\]"):
        unified_loss(cfg, replace(x, old_logp=x.old_logp[:, :6]), norms)
    with pytest.raises(ValueError, match=r"advantages has shape \(11,\)"):
        unified_loss(cfg, replace(x, advantages=x.advantages[:11]), norms)
    with pytest.raises(ValueError, match=r"is_sft has shape"):
        unified_loss(cfg, replace(x, is_sft=torch.zeros(3, dtype=torch.bool)), norms)


def test_bad_values_and_missing_tensors_are_explained():
    cfg = get_preset("grpo")
    _, x, norms = _inputs(cfg)
    adv = x.advantages.clone()
    adv[2] = float("nan")
    with pytest.raises(ValueError, match=r"advantages is NaN or inf .* rows \[2\]"):
        unified_loss(cfg, replace(x, advantages=adv), norms)
    with pytest.raises(ValueError, match="needs old_logp"):
        unified_loss(cfg, replace(x, old_logp=None), norms)
    with pytest.raises(ValueError, match="needs ref_logp"):
        unified_loss(replace(cfg, kl_coef=0.1), replace(x, ref_logp=None), norms)
    with pytest.raises(ValueError, match="needs rollout_logp"):
        unified_loss(replace(cfg, tis_cap=2.0), replace(x, rollout_logp=None), norms)
    with pytest.raises(ValueError, match="need per-token entropy"):
        unified_loss(get_preset("hpt"), replace(x, entropy=None), norms)
    with pytest.raises(ValueError, match="SFT rows .* but this preset trains none"):
        unified_loss(cfg, replace(x, is_sft=torch.ones(12, dtype=torch.bool)), norms)
    with pytest.raises(ValueError, match="off-policy rows but this preset trains none"):
        unified_loss(cfg, replace(x, off_policy=torch.ones(12, dtype=torch.bool)), norms)


def test_local_normalizers_are_rejected():
    """Passing one micro-batch's own counts for a bigger batch is the classic scaling bug."""
    cfg = get_preset("dapo")
    batch = make_batch(cfg, seed=12)
    local = LossNormalizers.count(batch.inputs(rows=slice(0, 4)))
    with pytest.raises(ValueError, match="smaller than this micro-batch's own count"):
        unified_loss(cfg, batch.inputs(), local)


def test_normalizers_sum_and_round_trip():
    batch = make_batch(get_preset("hpt"), seed=13)
    whole = batch.normalizers(CONSTANT)
    parts = [LossNormalizers.count(batch.inputs(rows=r), CONSTANT) for r in (slice(0, 7), slice(7, 12))]
    assert parts[0] + parts[1] == whole
    assert LossNormalizers.from_tensor(whole.to_tensor(), CONSTANT) == whole
    assert whole.num_sft_seqs == 4 and whole.num_rl_seqs == 7  # the empty row (6) counts nowhere
    assert whole.num_tokens == int(batch.mask_BT.sum())


def test_config_rejects_inconsistent_axes():
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1 \\+ clip_high"):
        replace(get_preset("grpo"), clip_ratio_c=1.1)
    with pytest.raises(ValueError, match="has no importance ratio to clip"):
        replace(get_preset("grpo"), reference="policy")
    with pytest.raises(ValueError, match="off_policy_shaping needs off_policy_reference='one'"):
        replace(get_preset("luffy"), off_policy_reference="policy")
