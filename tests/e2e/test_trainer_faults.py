"""Faults during a run: a rollout server that dies is restarted and the run goes on;
a diverged model (NaN log-probs, exploding grads) skips steps instead of crashing."""

from __future__ import annotations

import subprocess
import time

import psutil

from tests.e2e.conftest import REPO, metrics, run_train, train_cmd


def test_dead_rollout_server_is_restarted(tmp_path, demo_models):
    proc = subprocess.Popen(train_cmd(tmp_path, demo_models, "train.steps=5"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_file = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    servers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if "megatron_hpt.rollout.server" in " ".join(p.cmdline())]
    assert len(servers) == 1
    servers[0].kill()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]
    restarted = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not restarted, "the restarted server outlived the run"


def test_exploding_model_skips_steps_and_finishes(tmp_path, demo_models):
    # lr 1e4 without clipping blows the weights up after one update: later steps see
    # NaN/inf log-probs or grad norms and must be skipped and counted, not crash.
    run_train(tmp_path, demo_models, "train.steps=4", "train.step.optimizer.lr=1.0e4",
              "train.step.optimizer.clip_grad=0.0", "train.step.optimizer.skip_grad_norm_above=1.0e30")
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    skipped = sum(r["train/skipped_minibatches"] for r in rows)
    assert skipped >= 1
    assert rows[-1]["train/skipped_steps_total"] == skipped


def test_grad_norm_threshold_skips_every_update(tmp_path, demo_models):
    run_train(tmp_path, demo_models, "train.steps=2", "train.step.optimizer.skip_grad_norm_above=1.0e-9")
    rows = metrics(tmp_path)
    assert all(r["train/skipped_minibatches"] == 2 for r in rows)  # 2 mini-batches per step, both skipped
    assert rows[-1]["train/optimizer_steps"] == 0
