"""After every step the rollout servers hold the trainer's weights: the log-probs they
report for their samples equal the trainer's recomputation to 1e-4 (one mini-batch per
step, so the trainer's forward runs on exactly the weights the rollouts came from;
GRPO, so every row is a rollout; an entropy bonus, so the weights move although the tiny
model's rewards are all 0)."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import metrics, run_train


@pytest.mark.parametrize("sync", ["disk", "distributed"])
def test_servers_sample_from_the_trained_weights(tmp_path, demo_models, sync):
    run_train(tmp_path, demo_models, "train.steps=3", "train.mini_batch_size=4", "algorithm.preset=grpo",
              "algorithm.overrides.entropy_coef=0.01", "train.step.optimizer.lr=1.0e-2", f"rollout.weight_sync={sync}")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the weights moved (so stale server weights would show up as a gap) ...
    assert all(r["train/optimizer_steps"] == r["step"] for r in rows)
    # ... and the servers sampled from the current ones at every step
    for r in rows:
        assert r["rollout/logp_gap_abs"] < 1e-4, (r["step"], r["rollout/logp_gap_abs"])
