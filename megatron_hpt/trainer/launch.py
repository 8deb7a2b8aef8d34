"""Starting a run's ranks: in this process (one rank, or under torchrun), or by
re-executing under torchrun with the ranks the config asks for.

Before any rank starts, the run's inputs are checked (model, data, initial
checkpoints: a missing one is an error naming the key and the path) and its
output directory is prepared once (``run_dir.prepare_run_dir``: a fresh run
refuses a directory that holds an earlier run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megatron_hpt.config import InputNotFoundError
from megatron_hpt.trainer.config import RunConfig, load_run_config
from megatron_hpt.trainer.run_dir import StartMode, prepare_run_dir


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def start_mode(resume: bool, overwrite: bool) -> StartMode:
    if resume and overwrite:
        raise ValueError("--resume continues the run in output_dir and --overwrite moves it aside: give one")
    return "resume" if resume else "overwrite" if overwrite else "fresh"


def launch_training(recipe: str, overrides: list[str], resume: bool = False, overwrite: bool = False) -> int:
    """Run a training job: SPMD under torchrun, or spawn ``cfg.world_size`` local ranks."""
    mode = start_mode(resume, overwrite)
    cfg = load_run_config(recipe, overrides)
    if not under_torchrun() or os.environ["RANK"] == "0":
        # Once per run, before any rank writes: under torchrun the other ranks wait for
        # rank 0 at the process-group rendezvous before they touch output_dir.
        check_run_inputs(cfg)
        prepare_run_dir(cfg.output_dir, mode)
    if under_torchrun() or cfg.world_size == 1:
        return _run_here(cfg, resume)
    # The directory is prepared: the ranks continue that (new or resumed) run.
    return _respawn_under_torchrun(cfg.world_size, ["train", "--recipe", recipe, "--resume", *overrides])


def check_run_inputs(cfg: RunConfig) -> None:
    """Every local input the run reads exists, before any rank starts (each error names
    the config key, the path and what was expected there)."""
    from megatron_hpt.data.sources import check_data_path
    from megatron_hpt.models import load_hf_config

    load_hf_config(cfg.model.hf_path, key="model.hf_path")
    check_data_path(cfg.data.path, key="data.path")
    for i, bench in enumerate(cfg.eval.benchmarks):
        check_data_path(bench.path, key=f"eval.benchmarks[{i}].path ({bench.name})")
    for key, path, expected in (
        ("checkpoint.init_megatron", cfg.checkpoint.init_megatron, "a Megatron checkpoint directory"),
        ("checkpoint.init_data_from", cfg.checkpoint.init_data_from, "a training checkpoint (checkpoints/step_*)"),
    ):
        if path and not Path(path).is_dir():
            raise InputNotFoundError(f"{key}={path!r} does not exist; expected {expected}")


def _run_here(cfg: RunConfig, resume: bool) -> int:
    from megatron_hpt.parallel.launch import free_port
    from megatron_hpt.trainer.loop import run_training

    if not under_torchrun():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    run_training(cfg, resume=resume)
    return 0


def _respawn_under_torchrun(world_size: int, argv: list[str]) -> int:
    """torchrun forwards SIGTERM to every rank, so pre-emption still saves a checkpoint."""
    from megatron_hpt.parallel.launch import free_port

    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={world_size}", "--nnodes=1",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        "-m", "megatron_hpt.cli", *argv,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // world_size))))
    return subprocess.call(cmd, env=env)


def launch_eval(recipe: str, model_dir: str, overrides: list[str]) -> int:
    """Evaluate an HF checkpoint on the recipe's held-out sets through the rollout engine."""
    from megatron_hpt.trainer.world import evaluate_checkpoint

    from megatron_hpt.models import load_hf_config

    cfg = load_run_config(recipe, overrides)
    load_hf_config(model_dir, key="--model")
    evaluate_checkpoint(cfg, model_dir)
    return 0
