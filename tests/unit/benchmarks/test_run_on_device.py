"""The GPU machine's command (benchmarks/gpu/run_on_device.sh run) without a GPU: a stand-in for
Python records what each stage is asked to run. The stages run in order (the tiny smoke run
first, then 1.5B, then 7B), each into its own folder of $OUT, with the output in $OUT/run.log;
stages past the time budget are not started, and a stage past the hard limit is stopped, the
earlier stages' results kept. The script passes shellcheck."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run_on_device.sh"

STAND_IN = """#!/bin/bash
# records its arguments, writes a results file into --out like gpu_validation.py, and sleeps
# $SLEEP_FOR_<shape> seconds (dots and dashes dropped) when asked to
echo "python $*" >> "$CALLS"
out=""; shape=""
while [ $# -gt 0 ]; do
  case "$1" in --out) out=$2; shift ;; --shape) shape=$2; shift ;; esac; shift
done
mkdir -p "$out" && echo '{}' > "$out/results.json"
var="SLEEP_FOR_${shape//[.-]/}"
sleep "${!var:-0}"
"""


def run(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    calls = tmp_path / "calls"
    out = tmp_path / "OUT"
    full_env = {**os.environ, "OUT": str(out), "CALLS": str(calls), "GPU_VALIDATION_PYTHON": str(stand_in),
                "GPU_VALIDATION_SKIP_INSTALL": "1", "PATH": os.environ["PATH"], **env}
    proc = subprocess.run(["bash", str(SCRIPT), "run"], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=120)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return proc, [line.split()[1:] for line in lines]


def _arg(call: list[str], name: str) -> str:
    return call[call.index(name) + 1]


def test_stages_run_in_order_each_into_its_own_folder(tmp_path):
    proc, calls = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "OUT"
    assert [_arg(c, "--out") for c in calls] == [str(out / s) for s in ("smoke", "qwen2.5-1.5b", "qwen2.5-7b")]
    assert [(_arg(c, "--shape"), _arg(c, "--parts")) for c in calls] == [
        ("tiny", "smoke"), ("qwen2.5-1.5b", "step0,logprobs,train,sync"), ("qwen2.5-7b", "logprobs")]
    assert all(c[0] == "benchmarks/gpu/gpu_validation.py" for c in calls)
    assert all(0 < int(_arg(c, "--budget-s")) <= 480 for c in calls)
    for stage in ("smoke", "qwen2.5-1.5b", "qwen2.5-7b"):
        assert (out / stage / "results.json").is_file()
    log = (out / "run.log").read_text()
    assert log.index("== smoke") < log.index("== qwen2.5-1.5b") < log.index("== qwen2.5-7b")
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8  # what one call brings back


def test_nothing_starts_past_the_budget(tmp_path):
    proc, calls = run(tmp_path, GPU_VALIDATION_BUDGET_S="0")
    assert proc.returncode == 0 and calls == []
    log = (tmp_path / "OUT" / "run.log").read_text()
    assert log.count("not started (time budget") == 3


def test_a_stage_past_the_hard_limit_is_stopped_and_later_ones_are_not_started(tmp_path):
    proc, calls = run(tmp_path, GPU_VALIDATION_HARD_S="15", SLEEP_FOR_qwen2515b="600")
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "OUT" / "run.log").read_text()
    assert "== qwen2.5-1.5b: exit status 124" in log  # timeout's status: stopped at the hard limit
    # the 7B stage comes after the hard limit: not started; the smoke stage's results are kept
    assert "== qwen2.5-7b: not started" in log
    assert [_arg(c, "--shape") for c in calls] == ["tiny", "qwen2.5-1.5b"]
    assert (tmp_path / "OUT" / "smoke" / "results.json").is_file()


def test_script_passes_shellcheck():
    shellcheck = Path(sys.executable).parent / "shellcheck"
    proc = subprocess.run([str(shellcheck), "-x", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
