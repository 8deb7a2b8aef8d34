"""The trainer drives any RolloutEngine through the interface alone (a stand-in that
implements only it, tests/e2e/standin_engine.py): the calls of each step in order, with
colocated servers' memory released before training and resumed before the weight
update, and samples of another weight version refused or counted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.e2e.conftest import REPO, metrics, run_args


def _run(tmp_path, demo_models, *extra: str, stale_at: int = -1) -> tuple[subprocess.CompletedProcess, list[list]]:
    calls = tmp_path / "calls.json"
    cmd = [sys.executable, "-m", "tests.e2e.standin_engine", str(calls), str(stale_at), "--",
           *run_args(tmp_path / "run", demo_models, "train.steps=2", *extra)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    return proc, json.loads(calls.read_text()) if calls.is_file() else []


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


DISK_STEP = [["generate", 4, 2], ["update_weights_from_disk", "{v}"]]
DIST_STEP = [["generate", 4, 2], ["begin_weight_update"], ["send", "{v}", 51], ["end_weight_update", "{v}"]]
MEMORY = [["release_memory"], ["resume_memory"]]


def _expected(step_calls: list[list], colocated: bool, init: list[list], end: list[list]) -> list[list]:
    out = [[w.format(v="0") if isinstance(w, str) else w for w in c] for c in init]
    for v in ("1", "2"):
        calls = [c[:1] + [w.format(v=v) if isinstance(w, str) else w for w in c[1:]] for c in step_calls]
        out += calls[:1] + (MEMORY if colocated else []) + calls[1:]
    return out + end


@pytest.mark.parametrize("colocated", [True, False], ids=["colocated", "separate"])
def test_disk_sync_calls_in_order(tmp_path, demo_models, colocated):
    proc, calls = _run(tmp_path, demo_models, f"rollout.colocated={str(colocated).lower()}")
    _ok(proc)
    # init_megatron: the servers first get the policy's starting weights (version 0)
    assert calls == _expected(DISK_STEP, colocated, [["update_weights_from_disk", "{v}"]], [["close"]])


def test_distributed_sync_calls_in_order(tmp_path, demo_models):
    proc, calls = _run(tmp_path, demo_models, "rollout.colocated=true", "rollout.weight_sync=distributed")
    _ok(proc)
    init = [["begin_weight_update"], ["open_sender", 0, 1], ["send", "{v}", 51], ["end_weight_update", "{v}"]]
    assert calls == _expected(DIST_STEP, True, init, [["close_sender"], ["close"]])


def test_stale_samples_are_refused(tmp_path, demo_models):
    proc, _ = _run(tmp_path, demo_models, stale_at=1)
    assert proc.returncode != 0
    assert ("StaleSamples: 8 of 8 samples were not generated with weight version '1': "
            "standin://0 served version 'someone-else'") in proc.stderr


def test_stale_samples_are_counted(tmp_path, demo_models):
    proc, _ = _run(tmp_path, demo_models, "rollout.stale_samples=count", stale_at=1)
    _ok(proc)
    assert [r["rollout/stale_samples"] for r in metrics(tmp_path / "run")] == [0.0, 8.0]
