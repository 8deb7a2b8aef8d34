"""Run directories through the CLI: a second run started in the first run's
output_dir without --resume is refused (exit 2, one message, no traceback) and the
first run's checkpoints and metrics are left exactly as they were; --overwrite moves
the first run aside whole and the new run starts clean beside nothing of it."""

from __future__ import annotations

import json
import subprocess

from tests.e2e.conftest import REPO, metrics, run_train, train_cmd

RUN = ["train.steps=2", "checkpoint.every=1", "checkpoint.keep_last=5"]


def _run_state(run_dir) -> dict[str, bytes]:
    """Everything of a run that a second run could destroy."""
    files = [run_dir / "metrics.jsonl", run_dir / "config.yaml", run_dir / "run.json"]
    files += [p for p in (run_dir / "checkpoints").rglob("*") if p.is_file()]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(files)}


def test_a_second_run_in_a_used_output_dir_is_refused_and_the_first_is_intact(tmp_path, demo_models):
    run_dir = tmp_path / "run"
    run_train(run_dir, demo_models, *RUN)
    first = _run_state(run_dir)
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000002"
    assert {"checkpoints/step_000001/trainer_state.pt", "checkpoints/step_000002/trainer_state.pt"} <= set(first)
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]

    second = subprocess.run(train_cmd(run_dir, demo_models, *RUN), cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    (line,) = [x for x in second.stderr.splitlines() if x.startswith("megatron-hpt train: error:")]
    assert f"output_dir={str(run_dir)!r} already holds files" in line and "--resume" in line
    assert _run_state(run_dir) == first

    overwrite = train_cmd(run_dir, demo_models, "train.steps=1", "checkpoint.every=1")
    overwrite.insert(overwrite.index("train") + 1, "--overwrite")
    subprocess.run(overwrite, cwd=REPO, capture_output=True, text=True, timeout=600, check=True)
    (moved,) = tmp_path.glob("run.replaced-*")
    assert _run_state(moved) == first
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_000001"]
    assert [r["step"] for r in metrics(run_dir)] == [1]
    first_id = json.loads(first["run.json"])["run_id"]
    assert json.loads((run_dir / "run.json").read_text())["run_id"] != first_id
