"""Starting a run's ranks: in this process (one rank, or under torchrun), or by
re-executing under torchrun with the ranks the config asks for."""

from __future__ import annotations

import os
import subprocess
import sys

from megatron_hpt.trainer.config import RunConfig, load_run_config


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_training(recipe: str, overrides: list[str], resume: bool = False) -> int:
    """Run a training job: SPMD under torchrun, or spawn ``cfg.world_size`` local ranks."""
    cfg = load_run_config(recipe, overrides)
    if under_torchrun() or cfg.world_size == 1:
        return _run_here(cfg, resume)
    return _respawn_under_torchrun(cfg.world_size, ["train", "--recipe", recipe, *(["--resume"] if resume else []), *overrides])


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

    cfg = load_run_config(recipe, overrides)
    evaluate_checkpoint(cfg, model_dir)
    return 0
