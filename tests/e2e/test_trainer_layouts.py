"""The same loop at TP=2 and PP=2 gives the first-step loss of TP=1."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import metrics, run_train


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_first_step_loss_matches_tp1(tmp_path, demo_models, straight_run, tp, pp):
    reference = metrics(straight_run)[0]
    run_train(tmp_path, demo_models, "train.steps=1",
              f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}")
    first = metrics(tmp_path)[0]
    assert first["step"] == 1 == reference["step"]
    assert first["rollout/reward_mean"] == reference["rollout/reward_mean"]
    assert first["rollout/response_len_mean"] == reference["rollout/response_len_mean"]
    for key in ("loss/total", "loss/sft", "train/grad_norm"):
        assert first[key] == pytest.approx(reference[key], rel=1e-4, abs=1e-6), key
