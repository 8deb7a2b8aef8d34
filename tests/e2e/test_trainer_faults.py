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
