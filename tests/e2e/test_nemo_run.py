"""A NeMo-Run job really trains: LocalExecutor + torchrun launcher, the demo recipe for 2
steps on 1 CPU rank, in the launch environment (.venv-launch, `make launch-env`)."""

from __future__ import annotations

import json
import sys

from tests.unit.launchers.test_nemo_run import REPO, _jobs


def test_local_executor_runs_a_short_training_job(tmp_path, tiny_qwen2):
    run_dir = tmp_path / "run"
    proc = _jobs(
        tmp_path, "train", "--executor", "local", "--ranks-per-node", "1", "--recipe", "demo-cpu",
        "--python", sys.executable, "--code-dir", str(REPO), "--output-dir", str(run_dir), "--",
        f"model.hf_path={tiny_qwen2}", f"data.path={REPO / 'data' / 'arithmetic' / 'train.parquet'}",
        "train.steps=2", "train.rollout_batch_size=4", "train.mini_batch_size=4", "rollout.n=2",
        "rollout.max_new_tokens=8", "eval_every=0", "eval.benchmarks=[]", "checkpoint.export_hf=false",
        "logging.tensorboard=false", "logging.report=false",
        timeout=240,
    )
    assert proc.stdout.rstrip().endswith("hpt-train: SUCCEEDED"), proc.stdout[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"
