"""Normalization ``verl`` through megatron's real training step: at DP=2 (two processes) the
finalized gradients of each mini-batch equal the official code's aggregation (its split, its
per-micro-batch losses, FSDP's average over its ranks) computed through the same model on one
rank. float32 model, so to 1e-5 (the float64 check of the loss alone is in tests/unit)."""

from __future__ import annotations

import pytest
import torch

from megatron_hpt.parallel.launch import run_ranks
from tests.multiproc.verl_fixtures import official_step_grads, verl_step_grads


@pytest.mark.parametrize(
    "verl_ranks,mini_batch_prompts,budget", [(2, 2, 48), (4, 4, 24)], ids=["verl-dp2", "verl-dp4-on-dp2"]
)
def test_dp2_step_equals_the_official_aggregation(tiny_qwen2, verl_ranks, mini_batch_prompts, budget):
    args = (str(tiny_qwen2), verl_ranks, mini_batch_prompts, budget)
    (official,) = run_ranks(official_step_grads, 1, *args)
    ranks = run_ranks(verl_step_grads, 2, *args)
    ours = ranks[0]
    assert len(ours) == len(official) >= 1
    assert max(ref["num_verl_microbatches"] for ref in official) > verl_ranks  # several per verl rank
    for m, (got, ref) in enumerate(zip(ours, official)):
        # the verl micro-batches are shared out between this run's two ranks
        assert got["num_verl_microbatches"] + ranks[1][m]["num_verl_microbatches"] == ref["num_verl_microbatches"]
        assert set(got["grads"]) == set(ref["grads"])
        assert max(g.abs().max().item() for g in ref["grads"].values()) > 1e-4
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-6, msg=name)
