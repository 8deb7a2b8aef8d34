"""The same loop at TP=2 and PP=2 gives the first-step loss of TP=1."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import metrics, run_train


@pytest.fixture(scope="module")
def tp1_first_step(tmp_path_factory, demo_models):
    run_dir = tmp_path_factory.mktemp("tp1")
    run_train(run_dir, demo_models, "train.steps=1")
    return metrics(run_dir)[0]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_first_step_loss_matches_tp1(tmp_path, demo_models, tp1_first_step, tp, pp):
    run_train(tmp_path, demo_models, "train.steps=1",
              f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}")
    first = metrics(tmp_path)[0]
    assert first["step"] == 1
    assert first["rollout/reward_mean"] == tp1_first_step["rollout/reward_mean"]
    for key in ("loss/total", "loss/sft", "train/grad_norm"):
        assert first[key] == pytest.approx(tp1_first_step[key], rel=1e-4, abs=1e-6), key
