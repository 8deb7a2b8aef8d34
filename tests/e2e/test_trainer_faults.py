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
    servers = _servers_of(tmp_path)
    assert len(servers) == 1
    servers[0].kill()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4, 5]
    deadline = time.monotonic() + 15
    while _servers_of(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _servers_of(tmp_path), "the restarted server outlived the run"


def test_server_killed_in_a_distributed_sync_run_gets_the_current_weights(tmp_path, demo_models):
    """With weight_sync: distributed a restarted server boots with the launch weights and
    no disk copy of the current ones exists: it must get them by a new broadcast before
    it serves. The weights move fast (lr 1e-2 on an entropy bonus: the tiny model's rewards
    are all 0; one mini-batch per step, GRPO), so samples from stale weights would show as
    a log-prob gap (0.6 when the restarted server serves at once) and as stale versions."""
    proc = subprocess.Popen(train_cmd(tmp_path, demo_models, "train.steps=5", "rollout.weight_sync=distributed",
                                      "train.mini_batch_size=4", "algorithm.preset=grpo",
                                      "algorithm.overrides.entropy_coef=0.01", "train.step.optimizer.lr=1.0e-2",
                                      "rollout.stale_samples=count"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics_file = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    servers = _servers_of(tmp_path)
    assert len(servers) == 1
    servers[0].kill()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert r["rollout/stale_samples"] == 0, (r["step"], out[-3000:])
        assert r["rollout/logp_gap_abs"] < 1e-4, (r["step"], r["rollout/logp_gap_abs"])
    log = (tmp_path / "rollout_logs" / "server-0.log").read_text()
    assert log.count("start: ") == 2, "the killed server was not restarted"


def _servers_of(run_dir) -> list[psutil.Process]:
    """Rollout server processes launched for this run (their log dir is under it)."""
    found = []
    for p in psutil.process_iter():
        try:
            cmd = " ".join(p.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        is_server = "megatron_hpt.rollout.server" in cmd and "parent_watch" not in cmd
        if is_server and p.status() != psutil.STATUS_ZOMBIE and _launched_by(p, run_dir):
            found.append(p)
    return found


def _launched_by(p: psutil.Process, run_dir) -> bool:
    try:
        return any(str(run_dir) in f.path for f in p.open_files()) or str(run_dir) in " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return False


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
