"""Vocab-parallel log-probs and entropy at TP=2 (real processes, Megatron's TP group) == TP=1."""

from __future__ import annotations

import torch

from megatron_hpt.parallel.launch import run_ranks
from megatron_hpt.training.logprobs import vocab_parallel_logprobs

V = 96  # split 48 + 48 over two ranks
CASES = [
    # (dtype, temperature, chunk_rows)
    (torch.float64, 1.0, None),
    (torch.float64, 0.7, 1),
    (torch.float64, 0.7, 5),
    (torch.float32, 1.3, 4),
]


def _data(dtype):
    g = torch.Generator().manual_seed(1)
    logits = (5 * torch.randn(4, 6, V, generator=g, dtype=torch.float64)).to(dtype)
    targets = torch.randint(0, V, (4, 6), generator=g)
    targets[1, 3] = -100
    targets[0, :3] = torch.tensor([0, 47, 48])  # shard edges
    g_logp = torch.randn(4, 6, generator=g, dtype=torch.float64)
    g_ent = torch.randn(4, 6, generator=g, dtype=torch.float64)
    return logits, targets, g_logp, g_ent


def _run(logits, targets, g_logp, g_ent, **kw):
    x = logits.clone().requires_grad_(True)
    logp, ent = vocab_parallel_logprobs(x, targets, **kw)
    ((logp.double() * g_logp).sum() + (ent.double() * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), x.grad


def _tp_rank():
    from megatron_hpt.parallel import ParallelConfig, init_parallel

    state = init_parallel(ParallelConfig(tensor_model_parallel_size=2))
    shard = V // state.tp_size
    out = []
    for dtype, temperature, chunk_rows in CASES:
        logits, targets, g_logp, g_ent = _data(dtype)
        mine = logits[..., state.tp_rank * shard : (state.tp_rank + 1) * shard].contiguous()
        out.append(_run(mine, targets, g_logp, g_ent, tp_group=state.tp_group, temperature=temperature, chunk_rows=chunk_rows))
    return out


def test_tp2_equals_tp1_values_and_gradients():
    per_rank = run_ranks(_tp_rank, 2, timeout_s=120, threads_per_rank=1)
    for i, (dtype, temperature, chunk_rows) in enumerate(CASES):
        logits, targets, g_logp, g_ent = _data(dtype)
        logp1, ent1, grad1 = _run(logits, targets, g_logp, g_ent, temperature=temperature)
        tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-6)
        for rank in range(2):
            logp2, ent2, _ = per_rank[rank][i]
            torch.testing.assert_close(logp2, logp1, **tol)
            torch.testing.assert_close(ent2, ent1, **tol)
        grad2 = torch.cat([per_rank[0][i][2], per_rank[1][i][2]], dim=-1)
        torch.testing.assert_close(grad2, grad1, **tol)
        assert grad1.abs().max() > 0.1
