"""The training step inside megatron's schedule: one mixed SFT + RL mini-batch gives the
same loss and gradients at every TP/PP/DP layout and micro-batch split."""

from __future__ import annotations

import pytest
import torch

from megatron_hpt.parallel.launch import run_ranks
from tests.multiproc.training_fixtures import hpt_grads, skip_step, step0_ratio

BIG = 4096  # one micro-batch
SMALL = 48  # forces several micro-batches for these row lengths


def _merge(results):
    metrics = results[0]["metrics"]
    grads = {}
    for r in results:
        grads.update(r["grads"])
    return metrics, grads


@pytest.fixture(scope="module")
def reference(tiny_qwen2):
    return _merge(run_ranks(hpt_grads, 1, str(tiny_qwen2), 1, 1, BIG))


def _assert_same(ref, got):
    ref_metrics, ref_grads = ref
    metrics, grads = got
    assert abs(metrics["loss/total"] - ref_metrics["loss/total"]) <= 1e-5
    assert abs(metrics["loss/sft"] - ref_metrics["loss/sft"]) <= 1e-5
    assert set(grads) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5, msg=name)


def test_reference_batch_is_mixed_and_has_gradients(reference):
    metrics, grads = reference
    assert metrics["loss/sft"] > 0 and metrics["loss/pg"] != 0
    assert max(g.abs().max().item() for g in grads.values()) > 1e-4


@pytest.mark.parametrize(
    "tp,pp,dp,budget",
    [(2, 1, 1, BIG), (1, 2, 1, SMALL), (2, 2, 1, SMALL), (1, 1, 2, BIG)],
    ids=["tp2", "pp2-microbatches", "tp2pp2-microbatches", "dp2"],
)
def test_layouts_match_single_rank(tiny_qwen2, reference, tp, pp, dp, budget):
    results = run_ranks(hpt_grads, tp * pp * dp, str(tiny_qwen2), tp, pp, budget)
    _assert_same(reference, _merge(results))


@pytest.mark.parametrize("budget", [96, SMALL], ids=["2-microbatches", "4+-microbatches"])
def test_microbatch_split_does_not_change_gradients(tiny_qwen2, reference, budget):
    _assert_same(reference, _merge(run_ranks(hpt_grads, 1, str(tiny_qwen2), 1, 1, budget)))


def test_step0_ratio_is_exactly_one(tiny_qwen2):
    (metrics,) = run_ranks(step0_ratio, 1, str(tiny_qwen2))
    assert metrics["ratio/max"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-6)
    assert abs(metrics["actor/ppo_kl"]) < 1e-7


def test_grad_norm_above_threshold_skips_the_update(tiny_qwen2):
    (skipped,) = run_ranks(skip_step, 1, str(tiny_qwen2), 1e-6)
    assert skipped["result"].skipped_reason == "grad_norm_above_threshold"
    assert not skipped["changed"] and skipped["skipped_steps"] == 1
    assert skipped["metrics"]["train/skipped"] == 1.0
    (normal,) = run_ranks(skip_step, 1, str(tiny_qwen2), 80.0)
    assert normal["result"].updated and normal["changed"] and normal["metrics"]["train/skipped"] == 0.0


def test_checkpoint_killed_mid_write_leaves_the_previous_one_loadable(tiny_qwen2, tmp_path):
    from tests.multiproc.training_fixtures import checkpoint_survives_a_failed_save

    (r,) = run_ranks(checkpoint_survives_a_failed_save, 1, str(tiny_qwen2), str(tmp_path / "ckpt"))
    assert r["died"] and r["moved"]
    assert r["latest"] == "step_000001"
    assert r["state"]["step"] == 1 and r["state"]["extra"] == {"sampler": {"position": 1}}
    assert r["restored"]
    assert r["after"] == ["latest", "step_000001", "step_000003"]
