"""Fixtures of the end-to-end trainer tests: the demo recipe shrunk to seconds per step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# The demo recipe shrunk: 4 prompts x 2 rollouts of <= 12 tokens per step, no evaluation.
SMALL_RUN = [
    "train.rollout_batch_size=4",
    "train.mini_batch_size=2",
    "rollout.n=2",
    "rollout.max_new_tokens=12",
    "eval_every=0",
    "logging.tensorboard=false",
    "logging.report=false",
    "checkpoint.export_hf=false",
    "train.step.optimizer.warmup_steps=0",
    "train.epochs=1",
]

# Metrics that depend only on the seeds and the weights (not on timing).
DETERMINISTIC = ("loss/total", "loss/sft", "loss/pg", "train/grad_norm", "rollout/reward_mean",
                 "rollout/response_len_mean", "hpt/sft_prompt_frac", "actor/entropy")


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory, tiny_qwen2):
    """The tiny HF model and its verified Megatron conversion."""
    from megatron_hpt.models.conversion import convert_hf_to_megatron

    out = tmp_path_factory.mktemp("demo_models")
    megatron_dir = out / "megatron"
    convert_hf_to_megatron(tiny_qwen2, megatron_dir)
    return tiny_qwen2, megatron_dir


def run_args(run_dir: Path, models, *extra: str) -> list[str]:
    hf_dir, megatron_dir = models
    return [f"output_dir={run_dir}", f"model.hf_path={hf_dir}", f"checkpoint.init_megatron={megatron_dir}",
            *SMALL_RUN, *extra]


def train_cmd(run_dir: Path, models, *extra: str, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "megatron_hpt.cli", "train", "--recipe", "demo-cpu",
            *(["--resume"] if resume else []), *run_args(run_dir, models, *extra)]


def run_train(run_dir: Path, models, *extra: str, resume: bool = False, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(run_dir, models, *extra, resume=resume), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


RESUME_RUN = ["train.steps=6", "checkpoint.every=3", "checkpoint.export_hf=true"]


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory, demo_models):
    """6 uninterrupted steps of the small run (the reference of the resume and layout tests)."""
    run_dir = tmp_path_factory.mktemp("straight")
    run_train(run_dir, demo_models, *RESUME_RUN)
    return run_dir
