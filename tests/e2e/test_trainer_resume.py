"""Resume: 6 steps straight equal 3 steps, SIGKILL, resume, 3 more (weights and metrics)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.e2e.conftest import DETERMINISTIC, REPO, metrics, run_train, train_cmd

RESUME_RUN = ["train.steps=6", "checkpoint.every=3", "checkpoint.export_hf=true"]


def _final_weights(run_dir):
    out = {}
    for f in sorted((run_dir / "final_hf").glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_kill_and_resume_matches_a_straight_run(tmp_path, demo_models):
    straight = tmp_path / "straight"
    run_train(straight, demo_models, *RESUME_RUN)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, demo_models, *RESUME_RUN), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not (latest.is_file() and latest.read_text().strip() == "step_000003"):
        assert proc.poll() is None, "the run ended before its step-3 checkpoint"
        assert time.monotonic() < deadline, "no step-3 checkpoint within 300 s"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its rollout server, no chance to clean up
    proc.wait()
    assert not (killed / "final_hf").exists()

    resumed = run_train(killed, demo_models, *RESUME_RUN, resume=True)
    assert "resumed from" in resumed.stdout and "step_000003" in resumed.stdout

    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in DETERMINISTIC:
            assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["step"], key)
    wa, wb = _final_weights(straight), _final_weights(killed)
    assert set(wa) == set(wb)
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    # and training changed them
    init = load_file(next(demo_models[0].glob("*.safetensors")))
    assert any(not torch.equal(wa[n], init[n]) for n in wa)
