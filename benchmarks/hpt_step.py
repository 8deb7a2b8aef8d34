"""End-to-end HPT step time, phase by phase, from real training runs.

    python benchmarks/hpt_step.py [--quick]

Runs ``megatron-hpt train`` on the demo recipe (the embedded tiny model, the shipped
arithmetic data: 16 prompts x 8 rollouts of <= 64 tokens per step) for a few steps with
evaluation off, then summarizes the trainer's own ``timing/*`` metrics from
``metrics.jsonl``: rollout (own SGLang-protocol server), reward (math-verify pool),
log-probs (old/reference forward passes), train (Megatron step), sync (weights written
as HF safetensors and reloaded by the server). The first step is a warm-up and is left
out. ``run_trainer`` is also how ``peer_trl.py`` runs our side of the TRL comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.train_step import bench_env  # noqa: E402

PHASES = ("rollout", "reward", "logprobs", "train", "sync")

BENCH_RUN = [
    "eval_every=0",
    "logging.tensorboard=false",
    "logging.report=false",
    "logging.progress=false",
    "checkpoint.export_hf=false",
    "checkpoint.every=100000",
]
"""What every benchmark run turns off: evaluation, reports, exports, periodic checkpoints
(the trainer still saves once at the end, after the timed steps)."""


def run_trainer(model_dir: Path, work: Path, steps: int, overrides: list[str], *, threads: int = 2,
                timeout_s: float = 3600) -> dict:
    """Train ``steps`` steps of the demo recipe with ``overrides`` in a fresh process; returns
    per-step metrics (step 1 included; callers drop it) and the wall time of the run."""
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "megatron_hpt.cli", "train", "--recipe", "demo-cpu",
           f"output_dir={run_dir}", f"model.hf_path={model_dir}", f"train.steps={steps}", *BENCH_RUN, *overrides]
    env = bench_env(threads)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"training run failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_metrics = [r for r in rows if "timing/step" in r]
    if len(steps_metrics) != steps:
        raise RuntimeError(f"expected {steps} step records in {run_dir / 'metrics.jsonl'}, found {len(steps_metrics)}")
    return {"steps": steps_metrics, "run_wall_s": wall}


def summarize(step_metrics: list[dict]) -> dict:
    """Median phase times, their share of the step, tokens/s (prompt + response tokens of the
    step's rows over the whole step), over the given steps."""
    med = lambda key: statistics.median(m.get(key, 0.0) for m in step_metrics)  # noqa: E731
    step_s = med("timing/step")
    phases = {p: med(f"timing/{p}") for p in PHASES}
    phases["other"] = max(0.0, step_s - sum(phases.values()))
    tokens = [m["perf/tokens_per_s"] * m["timing/step"] for m in step_metrics]
    return {
        "num_steps": len(step_metrics),
        "step_s_median": step_s,
        "step_s_min": min(m["timing/step"] for m in step_metrics),
        "phase_s_median": phases,
        "phase_share": {p: v / step_s for p, v in phases.items()},
        "tokens_per_step_median": statistics.median(tokens),
        "tokens_per_s_median": statistics.median(m["perf/tokens_per_s"] for m in step_metrics),
        "tokens_per_s_all": [m["perf/tokens_per_s"] for m in step_metrics],
        "train_tokens_per_s_median": med("perf/train_tokens_per_s"),
        "response_len_mean": statistics.mean(m.get("rollout/response_len_mean", 0.0) for m in step_metrics),
        "rows_sft": med("rows/sft"),
        "rows_rl": med("rows/rl"),
    }


def run(quick: bool = False) -> dict:
    """The demo recipe's step, phase by phase: 4 steps (quick: 2), the first one left out."""
    from benchmarks.bench_models import model_dir

    steps = 2 if quick else 4
    work = Path(tempfile.mkdtemp(prefix="hpt_step_"))
    try:
        r = run_trainer(model_dir("tiny"), work, steps, [])
        out = summarize(r["steps"][1:])
        out.update({"model": "tiny", "recipe": "demo-cpu", "run_wall_s": r["run_wall_s"],
                    "workload": "16 prompts x 8 rollouts, <= 64 new tokens, T=1.0, HPT switch (gate 0)"})
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    r = run(quick=parser.parse_args().quick)
    print(f"HPT step on the demo recipe ({r['workload']}), median of {r['num_steps']} steps: "
          f"{r['step_s_median']:.2f} s, {r['tokens_per_s_median']:.1f} tok/s")
    for p, v in r["phase_s_median"].items():
        print(f"  {p:9s} {v:7.2f} s  {r['phase_share'][p]:6.1%}")
    print(json.dumps(r))


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
