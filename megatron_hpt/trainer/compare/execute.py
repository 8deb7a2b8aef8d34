"""Running a comparison's jobs: ``megatron-hpt train --resume`` and ``megatron-hpt eval``
subprocesses, K at a time, each with cores/K torch threads, a job starting only after
the one it depends on (a second stage after its first) has succeeded.

Finished jobs are detected and skipped, unfinished ones resume from their newest
checkpoint (the trainer's ``--resume``), so an interrupted comparison continues where
it stopped. A run directory made with a different config is refused rather than reused.
SIGTERM / Ctrl-C are forwarded to the running trainers, which save a checkpoint and exit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import yaml

from megatron_hpt.config import config_to_dict
from megatron_hpt.trainer.compare.plan import ComparePlan, Stage, eval_argv, shell_line, train_argv
from megatron_hpt.trainer.config import RunConfig
from megatron_hpt.training.checkpoint import latest_checkpoint

# Seconds a trainer gets to write its pre-emption checkpoint after SIGTERM.
STOP_GRACE_S = 120.0
PACKAGE_ROOT = Path(__file__).resolve().parents[3]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        where = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, where + ".")
        elif va != vb:
            out.append(where)
    return out


def check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume or reuse a run directory whose resolved config differs."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    mine = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    theirs = yaml.safe_load(saved.read_text())
    diff = config_differences(mine, theirs)
    if diff:
        raise RuntimeError(
            f"{run_dir} holds a run with another config (differs in {', '.join(diff)}); "
            "use another --output-dir, or delete that run directory to retrain it"
        )


def stage_finished(stage: Stage, cfg: RunConfig) -> bool:
    """The stage's final checkpoint, HF export and (with evaluation on) eval report exist."""
    latest = latest_checkpoint(stage.run_dir / "checkpoints")
    if latest is None or latest.name != stage.final_checkpoint.name:
        return False
    if not (stage.run_dir / "final_hf" / "config.json").is_file():
        return False
    return not cfg.eval_every or (stage.run_dir / "eval" / "eval_report.json").is_file()


@dataclass
class Job:
    """One subprocess of the comparison."""

    label: str
    argv: list[str]
    """Arguments of ``megatron-hpt``."""
    log: Path
    finished: Callable[[], bool]
    """Whether the job's outputs are all there (checked before starting it, and after it exits 0)."""
    after: "Job | None" = None
    done: bool = False
    returncode: int | None = None
    seconds: float = 0.0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0

    @property
    def command(self) -> str:
        return shell_line(self.argv)


def comparison_jobs(plan: ComparePlan) -> list[Job]:
    """One training job per stage (a second stage after its first), then one pass@k
    evaluation per run after its final stage: n samples per held-out prompt, pass@1..n."""
    jobs: dict[Path, Job] = {}
    for run in plan.runs:
        for stage in run.stages:
            cfg = plan.stage_config(stage)
            check_same_config(stage.run_dir, cfg)
            label = run.label + (f" stage {run.stages.index(stage) + 1} ({stage.preset})" if len(run.stages) > 1 else "")
            jobs[stage.run_dir] = Job(
                label=label, argv=train_argv(plan.spec.recipe, stage), log=stage.run_dir / "train.log",
                finished=partial(stage_finished, stage, cfg),
                after=jobs[stage.previous.run_dir] if stage.previous else None,
            )
    evals = []
    if plan.spec.pass_k_samples and plan.base.eval.benchmarks:
        for run in plan.runs:
            out = run.final.run_dir / "pass_at_k"
            evals.append(Job(
                label=f"{run.label} pass@k",
                argv=eval_argv(plan.spec.recipe, run.final.run_dir / "final_hf", plan.pass_k_overrides(run)),
                log=out / "eval.log",
                finished=partial(pass_k_done, out, run.final.run_dir / "final_hf", plan.spec.pass_k_samples,
                                 plan.pass_k_temperature),
                after=jobs[run.final.run_dir],
            ))
    out = [*jobs.values(), *evals]
    for job in out:
        job.done = job.finished()
    return out


def pass_k_done(out_dir: Path, model_dir: Path, num_samples: int, temperature: float) -> bool:
    """A pass@k evaluation with these settings is written, after the model it evaluates."""
    report = out_dir / "eval" / "eval_report.json"
    model = model_dir / "config.json"
    if not report.is_file() or not model.is_file() or report.stat().st_mtime < model.stat().st_mtime:
        return False
    details = json.loads(report.read_text())["details"]
    results = [r for run in details.values() for r in run.values()]
    return bool(results) and all(
        r["num_samples"] == num_samples and r["settings"]["temperature"] == temperature for r in results
    )


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _Stop()


def run_jobs(jobs: list[Job], parallel: int, cwd: Path | None = None, poll_s: float = 0.5,
             program: tuple[str, ...] = (sys.executable, "-m", "megatron_hpt.cli")) -> list[Job]:
    """Run ``program + job.argv`` for the jobs not already done, ``parallel`` at a time;
    returns the failed ones (a job whose dependency failed fails without running)."""
    threads = max(1, available_cores() // parallel)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    # The children import this same package, wherever it was imported from.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    pending = [j for j in jobs if not j.done]
    for j in jobs:
        if j.done:
            print(f"[compare] {j.label}: finished earlier, skipped", flush=True)
    running: list[Job] = []
    failed: list[Job] = []
    previous_handler = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        while pending or running:
            for job in list(running):
                rc = job.proc.poll()
                if rc is None:
                    continue
                running.remove(job)
                job.returncode, job.seconds = rc, time.perf_counter() - job.started
                job.proc = None
                if rc == 0 and not job.finished():
                    rc = job.returncode = -2
                    print(f"[compare] {job.label}: exited without finishing (pre-empted?); run again to resume",
                          flush=True)
                if rc == 0:
                    job.done = True
                    print(f"[compare] {job.label}: done in {job.seconds / 60:.1f} min", flush=True)
                else:
                    failed.append(job)
                    print(f"[compare] {job.label}: FAILED (exit {rc}); log {job.log}", flush=True)
            for job in list(pending):
                if job.after is not None and job.after in failed:
                    pending.remove(job)
                    job.returncode = -1
                    failed.append(job)
                    print(f"[compare] {job.label}: not run ({job.after.label} failed)", flush=True)
                    continue
                if len(running) >= parallel or (job.after is not None and not job.after.done):
                    continue
                pending.remove(job)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                with job.log.open("a") as log:
                    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {job.command}\n")
                    log.flush()
                    job.proc = subprocess.Popen(
                        [*program, *job.argv], stdout=log, stderr=subprocess.STDOUT,
                        env=env, cwd=cwd, start_new_session=True,
                    )
                job.started = time.perf_counter()
                running.append(job)
                print(f"[compare] {job.label}: started ({threads} threads), log {job.log}", flush=True)
            if running:
                time.sleep(poll_s)
    except (KeyboardInterrupt, _Stop):
        _stop_all(running)
        raise KeyboardInterrupt("comparison interrupted; run the same command again to resume") from None
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return failed


def _stop_all(running: list[Job]) -> None:
    """SIGTERM to each trainer (it checkpoints and exits), SIGKILL to its process group after the grace."""
    for job in running:
        print(f"[compare] stopping {job.label} (pid {job.proc.pid})", flush=True)
        try:
            job.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    for job in running:
        try:
            job.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(job.proc.pid, signal.SIGKILL)  # its rollout server and reward workers
        except ProcessLookupError:
            pass
        job.proc.wait()
