"""Chunked log-probs and entropy on one rank against a naive full-vocabulary log_softmax."""

from __future__ import annotations

import pytest
import torch

from megatron_hpt.training.logprobs import vocab_parallel_logprobs


def _naive(logits, targets, temperature=1.0, ignore_index=-100):
    ls = torch.log_softmax(logits.double() / temperature, dim=-1)
    valid = targets != ignore_index
    logp = ls.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1) * valid
    ent = -(ls.exp() * ls).sum(-1)
    return logp, ent


def _grads(fn, logits, targets, g_logp, g_ent, **kw):
    x = logits.detach().clone().requires_grad_(True)
    logp, ent = fn(x, targets, **kw)
    loss = (logp.double() * g_logp).sum() + ((ent.double() * g_ent).sum() if g_ent is not None else 0.0)
    loss.backward()
    return logp.detach().double(), ent.detach().double(), x.grad.double()


def _case(seed=0, shape=(3, 9), V=50, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(*shape, V, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, V, shape, generator=g)
    targets[0, 2] = -100
    g_logp = torch.randn(shape, generator=g, dtype=torch.float64)
    g_ent = torch.randn(shape, generator=g, dtype=torch.float64)
    return logits, targets, g_logp, g_ent


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_values_and_gradients_match_naive_fp64(temperature, chunk_rows):
    logits, targets, g_logp, g_ent = _case()
    got = _grads(vocab_parallel_logprobs, logits, targets, g_logp, g_ent, temperature=temperature, chunk_rows=chunk_rows)
    want = _grads(_naive, logits, targets, g_logp, g_ent, temperature=temperature)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert got[0][0, 2] == 0 and got[2][0, 2].abs().sum() > 0  # ignored target: logp 0, entropy still counts


def test_only_logp_used_gives_the_cross_entropy_gradient():
    logits, targets, g_logp, _ = _case(seed=1)
    got = _grads(vocab_parallel_logprobs, logits, targets, g_logp, None, chunk_rows=2)
    want = _grads(_naive, logits, targets, g_logp, None)
    torch.testing.assert_close(got[2], want[2], atol=1e-12, rtol=1e-10)


def test_chunking_gives_the_same_result_as_no_chunking():
    logits, targets, g_logp, g_ent = _case(seed=2, shape=(5, 7), V=301, dtype=torch.float32)
    whole = _grads(vocab_parallel_logprobs, logits, targets, g_logp, g_ent, chunk_rows=35)
    for rows in (1, 3, 8):
        part = _grads(vocab_parallel_logprobs, logits, targets, g_logp, g_ent, chunk_rows=rows)
        for a, b in zip(part, whole):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_low_precision_logits_accumulate_in_fp32():
    """bf16 logits: values equal fp64 math on the same bf16 numbers to fp32 accuracy."""
    logits, targets, g_logp, g_ent = _case(seed=3, V=4000, dtype=torch.bfloat16)
    logp, ent, grad = _grads(vocab_parallel_logprobs, logits, targets, g_logp, g_ent)
    want = _grads(_naive, logits.double(), targets, g_logp, g_ent)
    torch.testing.assert_close(logp, want[0], atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(ent, want[1], atol=2e-5, rtol=1e-6)
    # the gradient comes back in bf16: one rounding of the fp32 value
    torch.testing.assert_close(grad, want[2], atol=1e-2 * want[2].abs().max().item(), rtol=1e-2)
    x = logits.clone().requires_grad_(True)
    lp, h = vocab_parallel_logprobs(x, targets)
    assert lp.dtype == torch.float32 and h.dtype == torch.float32
    (lp.sum() + h.sum()).backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.detach(), logits)  # the input is not modified


def test_bad_input_raises():
    logits, targets, _, _ = _case()
    with pytest.raises(ValueError, match="targets shape"):
        vocab_parallel_logprobs(logits, targets[:, :4])
    bad = targets.clone()
    bad[1, 1] = 50
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 50\)"):
        vocab_parallel_logprobs(logits, bad)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        vocab_parallel_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="integer token ids"):
        vocab_parallel_logprobs(logits, targets.double())
