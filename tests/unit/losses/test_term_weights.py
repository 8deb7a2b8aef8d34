"""The terms' weights (``term_weights``) are the derivatives of ``unified_loss``, and the verl
normalization divides the terms, not the metrics, by verl's ranks through ``term_norms``."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from loss_batches import make_batch

from megatron_hpt.losses import LossNormalizers, get_preset, term_weights, unified_loss

CONSTANT = 13.0


@pytest.mark.parametrize("name", ["hpt", "luffy", "dapo", "grpo"])
def test_term_weights_are_the_loss_derivatives(name):
    cfg = replace(get_preset(name), entropy_coef=0.01, clip="none")
    batch = make_batch(cfg, seed=21)
    x = batch.inputs()
    logp = x.logp.detach().requires_grad_(True)
    entropy = x.entropy.detach().requires_grad_(True)
    old = logp.detach()  # ratio 1: the surrogate's slope in log pi is A (or A * f'(pi) pi with shaping)
    norms = batch.normalizers(CONSTANT)
    loss, _ = unified_loss(cfg, replace(x, logp=logp, entropy=entropy, old_logp=old), norms)
    g_logp, g_entropy = torch.autograd.grad(loss, (logp, entropy))
    w = term_weights(cfg, batch.mask_BT.sum(-1), batch.is_sft_B, batch.off_B, norms)
    m = batch.mask_BT
    torch.testing.assert_close(g_entropy, -w.entropy[:, None] * m, rtol=1e-12, atol=1e-15)
    slope = torch.ones_like(logp)
    if cfg.off_policy_shaping is not None:
        p = logp.detach().exp()
        gamma = cfg.off_policy_shaping
        slope = torch.where(batch.off_B[:, None], p * gamma / (p + gamma) ** 2, slope)
    elif cfg.off_policy_rows:
        slope = torch.where(batch.off_B[:, None], logp.detach().exp(), slope)
    expected = torch.where(batch.is_sft_B[:, None], -w.sft[:, None], -batch.adv_B[:, None] * slope * w.pg[:, None]) * m
    torch.testing.assert_close(g_logp, expected, rtol=1e-10, atol=1e-15)


def test_verl_term_norms_scale_the_terms_and_not_the_metrics():
    cfg = replace(get_preset("hpt"), entropy_coef=0.01)
    batch = make_batch(cfg, seed=22)
    norms = batch.normalizers(CONSTANT)
    whole, m_whole = unified_loss(cfg, batch.inputs(), norms)
    verl = replace(cfg, normalization="verl")
    quarter, m_quarter = unified_loss(verl, batch.inputs(), norms, replace(norms, scale=0.25))
    assert float(quarter.detach()) == pytest.approx(0.25 * float(whole.detach()), rel=1e-12)
    assert float(m_quarter["loss/sft"]) == pytest.approx(0.25 * float(m_whole["loss/sft"]), rel=1e-12)
    assert float(m_quarter["actor/entropy"]) == pytest.approx(float(m_whole["actor/entropy"]), rel=1e-12)


def test_verl_normalization_needs_the_verl_microbatch_counts():
    cfg = get_preset("hpt")
    batch = make_batch(cfg, seed=23)
    norms = batch.normalizers(CONSTANT)
    with pytest.raises(ValueError, match="normalization='verl' needs term_norms"):
        unified_loss(replace(cfg, normalization="verl"), batch.inputs(), norms)
    with pytest.raises(ValueError, match="term_norms are for normalization='verl', not 'global'"):
        unified_loss(cfg, batch.inputs(), norms, norms)
    local = LossNormalizers.count(batch.inputs(rows=slice(0, 4)), CONSTANT)
    with pytest.raises(ValueError, match="must count the verl micro-batch these rows belong to"):
        unified_loss(replace(cfg, normalization="verl"), batch.inputs(), norms, local)
    with pytest.raises(ValueError, match="scale must be > 0"):
        replace(norms, scale=0.0)
    with pytest.raises(ValueError, match="normalization must be one of"):
        replace(cfg, normalization="fsdp")
