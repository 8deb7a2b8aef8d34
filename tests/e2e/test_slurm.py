"""The sbatch launchers on a real SLURM cluster started here (3 emulated nodes with
fake GPUs, CPU profile): single-node training that is pre-empted, checkpoints, requeues
itself and resumes; multi-node training with a dedicated rollout-server node; the GPU
profile's commands (dry run in a real allocation); HF -> Megatron -> HF conversion jobs.

Needs Debian's slurmctld, slurmd, slurm-client and munge
(``bash launchers/slurm/ci/setup_local_slurm.sh``, run by .ci/run). Without them the
module is skipped on a developer machine and fails under CI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest

from megatron_hpt.parallel.launch import free_port
from tests.e2e.slurm_cluster import SETUP_HINT, LocalSlurmCluster, missing_binaries

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "launchers" / "slurm"

_missing = missing_binaries()
if _missing:
    if os.environ.get("CI"):
        raise RuntimeError(f"SLURM is not installed ({', '.join(_missing)} missing): {SETUP_HINT}")
    pytest.skip(f"SLURM is not installed ({', '.join(_missing)} missing): {SETUP_HINT}", allow_module_level=True)

# A demo-sized run: the embedded tiny model, the shipped arithmetic data, short rollouts.
TRAIN_OVERRIDES = [
    f"data.path={REPO / 'data' / 'arithmetic' / 'train.parquet'}",
    "train.rollout_batch_size=4",
    "train.mini_batch_size=4",
    "train.epochs=1",
    "rollout.n=2",
    "rollout.max_new_tokens=8",
    "eval_every=0",
    "eval.benchmarks=[]",
    "checkpoint.every=1",
    "checkpoint.export_hf=false",
    "logging.tensorboard=false",
    "logging.report=false",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), num_nodes=3, cpus_per_node=4, gpus_per_node=2)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def _env(cluster: LocalSlurmCluster, **extra: str) -> dict[str, str]:
    return {
        **cluster.env,
        "HPT_PROFILE": "cpu",
        "HPT_PYTHON": sys.executable,
        "HPT_SRC": str(REPO),
        "MASTER_PORT": str(free_port()),
        **extra,
    }


def _submit(cluster, script: str, workdir: Path, env: dict[str, str], *sbatch_args: str) -> str:
    out = cluster.run(
        "sbatch", "--parsable", f"--chdir={workdir}", "--output=job-%j.out", *sbatch_args, str(SLURM_DIR / script),
        env=env,
    )
    return out.stdout.strip().split(";")[0]


def _log(workdir: Path, job: str) -> str:
    path = workdir / f"job-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def _command(log: str, step_name: str) -> list[str]:
    """The srun command the script printed (shell-quoted) for the step named ``step_name``."""
    for line in log.splitlines():
        if line.startswith("+ srun") and f"--job-name={step_name}" in line:
            return shlex.split(line[2:])
    raise AssertionError(f"no srun for step {step_name} in the log:\n{log}")


def _has(argv: list[str], *expected: str) -> bool:
    """``expected`` appears in ``argv`` as consecutive arguments."""
    n = len(expected)
    return any(argv[i : i + n] == list(expected) for i in range(len(argv) - n + 1))


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _wait_job(cluster, job: str, workdir: Path, timeout_s: float) -> dict[str, str]:
    try:
        state = cluster.wait_job(job, timeout_s)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n--- job log\n{_log(workdir, job)}") from None
    assert state["JobState"] == "COMPLETED", f"job {job}: {state.get('JobState')} {state.get('ExitCode')}\n{_log(workdir, job)}"
    return state


def test_single_node_training_is_preempted_requeued_and_resumes(cluster, tiny_qwen2, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@120 sends before the time limit):
    the trainer checkpoints and exits, the job requeues itself, and the requeued job's
    `train --resume` continues from that checkpoint to the last step."""
    run_dir, steps = tmp_path / "run", 20
    env = _env(
        cluster,
        RECIPE="demo-cpu",
        OUTPUT_DIR=str(run_dir),
        GPUS_PER_NODE="1",
        OVERRIDES=" ".join([f"model.hf_path={tiny_qwen2}", f"train.steps={steps}", *TRAIN_OVERRIDES]),
    )
    job = _submit(cluster, "train_single_node.sbatch", tmp_path, env, "--gpus-per-node=0", "--time=10")

    # Generous bounds: on 2 shared cores a run's start-up alone can take a minute.
    deadline = time.monotonic() + 180
    while len(_steps(run_dir)) < 2:
        state = cluster.job_state(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state}\n{_log(tmp_path, job)}"
        assert time.monotonic() < deadline, f"no training steps after 180 s\n{_log(tmp_path, job)}"
        time.sleep(0.3)
    cluster.run("scancel", "--batch", "--signal=USR1", job)

    state = _wait_job(cluster, job, tmp_path, timeout_s=300)
    log = _log(tmp_path, job)
    assert state["Restarts"] == "1", log
    assert state["ExitCode"] == "0:0"
    saved = re.search(r"signal 15: checkpoint saved at step (\d+), exiting", log)
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", log)
    assert saved and resumed, log
    k = int(saved.group(1))
    assert 2 <= k < steps, log
    assert int(resumed.group(1)) == int(resumed.group(2)) == k
    assert "requeueing job" in log and "job %s (restart 1)" % job in log
    # Only torchrun got the TERM (its ranks' helper processes kept running to the save).
    assert re.search(r"signal_trainer: TERM to torchrun \d+ on node1", log), log
    # Every step exactly once: the requeued job did not restart from scratch.
    assert _steps(run_dir) == list(range(1, steps + 1))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:06d}"


def test_multi_node_training_with_a_dedicated_rollout_node(cluster, tiny_qwen2, tmp_path):
    """2 trainer nodes (one rank each, torchrun c10d rendezvous across them, DP=2) and
    the project's own rollout server on the third node, attached by URL."""
    run_dir, port = tmp_path / "run", free_port()
    env = _env(
        cluster,
        RECIPE="demo-cpu",
        OUTPUT_DIR=str(run_dir),
        GPUS_PER_NODE="1",
        NUM_ROLLOUT_NODES="1",
        ROLLOUT_MODEL=str(tiny_qwen2),
        ROLLOUT_BASE_PORT=str(port),
        OVERRIDES=" ".join([f"model.hf_path={tiny_qwen2}", "train.steps=2", *TRAIN_OVERRIDES]),
    )
    job = _submit(cluster, "train_multi_node.sbatch", tmp_path, env, "--nodes=3", "--gpus-per-node=0", "--time=10")
    _wait_job(cluster, job, tmp_path, timeout_s=300)
    log = _log(tmp_path, job)
    assert "nodes node1 node2 node3" in log
    servers = _command(log, "hpt-rollout")
    assert _has(servers, "--nodes=1", "--ntasks=1", "--nodelist=node3", "--ntasks-per-node=1")
    assert "rollout servers are up" in log
    trainer = _command(log, "hpt-trainer")
    assert _has(trainer, "--nodes=2", "--ntasks=2", "--nodelist=node1,node2", "--ntasks-per-node=1")
    assert _has(trainer, "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d")
    # The server listens beyond loopback (the trainer is on other nodes) with a key made for the job.
    assert _has(trainer, "data_parallel_size=2", "rollout.engine=attach", f"rollout.urls=[http://127.0.0.1:{port}]",
                "rollout.colocated=false", "rollout.api_key=env:HPT_ROLLOUT_API_KEY")
    weight_dir = re.escape(str(run_dir / "weights_sync"))
    assert re.search(rf"--host 0\.0\.0\.0 --port {port} --device cpu --weight-dir {weight_dir} --weight-version launch --api-key \\\*\\\*\\\* --launch-token [0-9a-f]{{64}}", log), log
    assert _steps(run_dir) == [1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000002"


def test_gpu_profile_commands_in_a_real_allocation(cluster, tmp_path):
    """The GPU profile (SGLang servers, torchrun over GPUs, pyxis container flags), as a
    dry run inside a real 3-node allocation with fake GPUs: the scripts read the
    allocation and print the commands they would run."""
    env = _env(
        cluster,
        HPT_PROFILE="gpu",
        HPT_DRY_RUN="1",
        RECIPE="hpt-qwen2.5-math-7b-8gpu",
        OUTPUT_DIR="/lustre/runs/hpt7b",
        NUM_ROLLOUT_NODES="1",
        ROLLOUT_TP="2",
        ROLLOUT_MODEL="/lustre/Qwen2.5-Math-7B",
        CONTAINER_IMAGE="/lustre/images/megatron-hpt.sqsh",
        CONTAINER_MOUNTS="/lustre:/lustre",
        MASTER_PORT="29555",
        OVERRIDES="train.steps=10",
    )
    job = _submit(cluster, "train_multi_node.sbatch", tmp_path, env, "--nodes=3", "--gpus-per-node=2", "--time=5")
    _wait_job(cluster, job, tmp_path, timeout_s=60)
    log = _log(tmp_path, job)
    container = ["--container-image=/lustre/images/megatron-hpt.sqsh", "--no-container-mount-home", "--container-mounts=/lustre:/lustre"]
    servers = _command(log, "hpt-rollout")
    # 2 GPUs per node / TP 2 = one SGLang server per rollout node.
    assert _has(servers, "--nodes=1", "--ntasks=1", "--nodelist=node3", "--ntasks-per-node=1")
    assert _has(servers, *container)
    assert servers[-2:] == ["bash", "/opt/megatron-hpt/launchers/slurm/rollout_server.sh"]
    trainer = _command(log, "hpt-trainer")
    assert _has(trainer, "--nodes=2", "--ntasks=2", "--nodelist=node1,node2", "--ntasks-per-node=1") and _has(trainer, *container)
    torchrun = trainer[trainer.index("-m") - 1 :]
    assert torchrun[:9] == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=2", "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:29555", f"--rdzv-id=hpt-{job}", "-m",
    ]
    # 4 ranks at the recipe's TP=2 -> DP 2; the server URL from node3's NodeAddr.
    assert torchrun[9:] == [
        "megatron_hpt.cli", "train", "--recipe", "hpt-qwen2.5-math-7b-8gpu", "--resume", "output_dir=/lustre/runs/hpt7b",
        "data_parallel_size=2", "rollout.engine=attach", "rollout.urls=[http://127.0.0.1:30000]",
        "rollout.colocated=false", "rollout.api_key=env:HPT_ROLLOUT_API_KEY", "train.steps=10",
    ]


def test_conversion_jobs_hf_to_megatron_and_back(cluster, tiny_qwen2, tmp_path):
    """HF -> Megatron, then (a dependent job) Megatron -> HF: the weights come back exactly."""
    from safetensors.torch import load_file

    megatron_dir, hf_dir = tmp_path / "megatron", tmp_path / "hf"
    env = _env(cluster, DIRECTION="hf-to-megatron", SRC=str(tiny_qwen2), DEST=str(megatron_dir))
    first = _submit(cluster, "convert.sbatch", tmp_path, env, "--time=5")
    env = _env(cluster, DIRECTION="megatron-to-hf", SRC=str(megatron_dir), DEST=str(hf_dir))
    second = _submit(cluster, "convert.sbatch", tmp_path, env, "--time=5", f"--dependency=afterok:{first}")
    _wait_job(cluster, first, tmp_path, timeout_s=240)
    _wait_job(cluster, second, tmp_path, timeout_s=240)
    assert f"converted {tiny_qwen2} -> {megatron_dir}" in _log(tmp_path, first)
    original, back = load_file(tiny_qwen2 / "model.safetensors"), load_file(hf_dir / "model.safetensors")
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].equal(tensor), name
