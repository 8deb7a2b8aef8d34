"""The NeMo-Run configurations (launchers/nemo_run/hpt_jobs.py), run in the launch
environment (.venv-launch, `make launch-env`): Slurm dry runs produce the sbatch
scripts asserted here (torchrun arguments, node counts, container settings, the
pre-emption signal and requeue, the heterogeneous rollout+trainer job). The Local
executor's real training run is in tests/e2e/test_nemo_run.py."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
JOBS = REPO / "launchers" / "nemo_run" / "hpt_jobs.py"
LAUNCH_PYTHON = Path(os.environ.get("HPT_LAUNCH_PYTHON", REPO / ".venv-launch" / "bin" / "python"))

if not LAUNCH_PYTHON.exists():
    pytest.fail(f"{LAUNCH_PYTHON} is missing: `make launch-env` builds the NeMo-Run environment", pytrace=False)


def _jobs(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path / "nemo_run_home"), "COLUMNS": "200"}
    proc = subprocess.run(
        [str(LAUNCH_PYTHON), str(JOBS), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _dryrun(tmp_path: Path, *args: str) -> dict[str, str]:
    """The files a dry run prints, by name (``# ---- NAME ----`` separators)."""
    if "--" in args:
        cut = args.index("--")
        args = (*args[:cut], "--dryrun", "--job-dir", str(tmp_path / "jobs"), *args[cut:])
    else:
        args = (*args, "--dryrun", "--job-dir", str(tmp_path / "jobs"))
    out = _jobs(tmp_path, *args).stdout
    parts = re.split(r"^# ---- (\S+) ----$", out, flags=re.M)
    return dict(zip(parts[1::2], (p.strip("\n") for p in parts[2::2])))


def _sbatch_flags(script: str) -> list[str]:
    return [line[len("#SBATCH ") :] for line in script.splitlines() if line.startswith("#SBATCH ")]


def _srun_lines(script: str) -> list[list[str]]:
    lines = [line for line in script.splitlines() if line.startswith("srun ") and "--output" in line]
    return [shlex.split(line.split(" & pids")[0]) for line in lines]


def _has(argv: list[str], *expected: str) -> bool:
    n = len(expected)
    return any(argv[i : i + n] == list(expected) for i in range(len(argv) - n + 1))


def _run_task_script(tmp_path: Path, text: str, **env: str) -> list[str]:
    """Run a generated task script with stand-ins for scontrol (two-node allocation
    answers) and for the job's Python (records its argv); returns that argv. The
    script must have been generated with ``--python python``."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\n'
        'case "$1 $2" in\n'
        '  "show hostnames") tr , "\\n" <<<"$3" ;;\n'
        '  "show node") echo "NodeName=$3 Arch=x86_64 NodeAddr=addr-$3 NodeHostName=$3" ;;\n'
        '  *) exit 1 ;;\n'
        'esac\n'
    )
    (bin_dir / "python").write_text(
        '#!/usr/bin/env bash\n[[ $1 == -c ]] && exit 0\nprintf "%s\\n" "$@" >"$ARGV_OUT"\n'
    )
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    script = tmp_path / "task.sh"
    script.write_text(text)
    out = tmp_path / "argv.txt"
    run_env = {**os.environ, **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "ARGV_OUT": str(out)}
    proc = subprocess.run(["bash", str(script)], env=run_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    shellcheck = subprocess.run(
        [str(Path(sys.executable).parent / "shellcheck"), "-s", "bash", str(script)], capture_output=True, text=True
    )
    assert shellcheck.returncode == 0, shellcheck.stdout
    return out.read_text().splitlines()


SLURM = ["--executor", "slurm", "--account", "acct", "--partition", "batch", "--gpus-per-node", "8",
         "--image", "nvcr.io/acme/megatron-hpt:0.1.0", "--mount", "/lustre:/lustre", "--time", "02:00:00"]


def test_slurm_training_job_sbatch_script(tmp_path):
    files = _dryrun(tmp_path, "train", *SLURM, "--nodes", "2", "--output-dir", "/lustre/runs/hpt7b", "--", "train.steps=10")
    (script,) = files.values()
    flags = _sbatch_flags(script)
    for flag in ["--account=acct", "--partition=batch", "--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1",
                 "--exclusive", "--time=02:00:00", "--signal=TERM@120"]:
        assert flag in flags, (flag, flags)
    # Pre-empted or failed: the script requeues the job (up to 10 times); --resume continues.
    assert "export TORCHX_MAX_RETRIES=10" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=100" in script
    (srun,) = _srun_lines(script)
    assert _has(srun, "--container-image", "nvcr.io/acme/megatron-hpt:0.1.0")
    mounts = srun[srun.index("--container-mounts") + 1].split(",")
    assert "/lustre:/lustre" in mounts
    torchrun = srun[srun.index("torchrun") :]
    assert _has(torchrun, "--nnodes", "2") and _has(torchrun, "--nproc-per-node", "8")
    assert _has(torchrun, "--rdzv-backend", "c10d") and _has(torchrun, "--rdzv-endpoint", "$head_node_ip:29500")
    assert _has(torchrun, "--node-rank", "$SLURM_NODEID")
    # 16 ranks at the recipe's TP=2 -> data_parallel_size 8.
    assert torchrun[torchrun.index("-m") :] == [
        "-m", "megatron_hpt.cli", "train", "--recipe", "hpt-qwen2.5-math-7b-8gpu", "--resume",
        "output_dir=/lustre/runs/hpt7b", "data_parallel_size=8", "train.steps=10",
    ]


def test_heterogeneous_job_rollout_nodes_and_trainer(tmp_path):
    files = _dryrun(
        tmp_path, "train", *SLURM, "--nodes", "2", "--rollout-nodes", "1", "--rollout-model", "/lustre/Qwen2.5-Math-7B",
        "--rollout-tp", "2", "--output-dir", str(tmp_path / "hpt7b"),
    )
    script = files["hpt-train-mn.sbatch"]
    flags = _sbatch_flags(script)
    cut = flags.index("hetjob")
    servers, trainer = flags[:cut], flags[cut + 1 :]
    assert "--nodes=1" in servers and "--ntasks-per-node=4" in servers  # 8 GPUs / TP 2
    assert "--nodes=2" in trainer and "--ntasks-per-node=1" in trainer
    assert all("--gpus-per-node=8" in group and "--signal=TERM@120" in group for group in (servers, trainer))
    srun_servers, srun_trainer = _srun_lines(script)
    assert srun_servers[1] == "--het-group=0" and srun_trainer[1] == "--het-group=1"
    assert srun_servers[-2:] == ["bash", "/opt/megatron-hpt/launchers/slurm/rollout_server.sh"]
    for line in ("export ROLLOUT_SERVER=sglang", "export ROLLOUT_MODEL=/lustre/Qwen2.5-Math-7B", "export ROLLOUT_TP=2",
                 "export SGLANG_PYTHON=/opt/sglang/bin/python"):
        assert line in script.splitlines()
    assert all(_has(s, "--container-image", "nvcr.io/acme/megatron-hpt:0.1.0") for s in (srun_servers, srun_trainer))
    # The trainer's own script: server URLs from het group 0, torchrun over het group 1.
    argv = _run_task_script(
        tmp_path, files["hpt-train-mn-1.sh"],
        SLURM_JOB_NODELIST_HET_GROUP_0="gpu-r1", SLURM_JOB_NODELIST_HET_GROUP_1="gpu-t1,gpu-t2", SLURM_JOB_ID="77",
    )
    assert argv == [
        "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=addr-gpu-t1:29500", "--rdzv-id=hpt-77", "-m", "megatron_hpt.cli", "train",
        "--recipe", "hpt-qwen2.5-math-7b-8gpu", "--resume", f"output_dir={tmp_path / 'hpt7b'}", "data_parallel_size=8",
        "rollout.engine=attach",
        "rollout.urls=[http://addr-gpu-r1:30000,http://addr-gpu-r1:30001,http://addr-gpu-r1:30002,http://addr-gpu-r1:30003]",
        "rollout.colocated=false", f"rollout.api_key=file:{tmp_path / 'hpt7b' / '.rollout-api-key'}",
    ]
    # The servers listen beyond loopback with the key the trainer task writes there.
    for line in ("export ROLLOUT_HOST=0.0.0.0", f"export ROLLOUT_API_KEY_FILE={tmp_path / 'hpt7b' / '.rollout-api-key'}"):
        assert line in script.splitlines()
    key_file = tmp_path / "hpt7b" / ".rollout-api-key"
    assert len(key_file.read_text()) == 64 and key_file.stat().st_mode & 0o077 == 0


def test_overrides_that_need_quoting_reach_the_cli_intact(tmp_path):
    """NeMo-Run's torchrun launcher quotes arguments twice; such overrides go through
    a torchrun script of our own instead, quoted once."""
    files = _dryrun(tmp_path, "train", *SLURM, "--nodes", "2", "--", "rollout.urls=[http://a:1,http://b:2]", "note=two words")
    script = files["hpt-train.sbatch"]
    assert "--ntasks-per-node=1" in _sbatch_flags(script)  # one torchrun per node
    (srun,) = _srun_lines(script)
    assert srun[-2] == "bash" and srun[-1].endswith("/scripts/hpt-train.sh")
    argv = _run_task_script(tmp_path, files["hpt-train.sh"], SLURM_JOB_NODELIST="gpu-t1,gpu-t2", SLURM_JOB_ID="78")
    assert argv[:7] == [
        "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8", "--rdzv-backend=c10d",
        "--rdzv-endpoint=addr-gpu-t1:29500", "--rdzv-id=hpt-78",
    ]
    assert argv[-3:] == ["data_parallel_size=8", "rollout.urls=[http://a:1,http://b:2]", "note=two words"]


def test_conversion_job_is_one_task_without_requeue(tmp_path):
    files = _dryrun(
        tmp_path, "convert", *SLURM, "--direction", "hf-to-megatron", "--src", "/lustre/Qwen2.5-Math-7B",
        "--dest", "/lustre/qwen-tp2", "--tp", "2",
    )
    (script,) = files.values()
    flags = _sbatch_flags(script)
    assert "--nodes=1" in flags and "--ntasks-per-node=1" in flags
    assert not any(f.startswith("--signal") for f in flags) and "export TORCHX_MAX_RETRIES=0" in script
    (srun,) = _srun_lines(script)
    assert "torchrun" not in srun
    assert srun[srun.index("python") :] == [
        "python", "-m", "megatron_hpt.cli", "convert", "hf-to-megatron", "/lustre/Qwen2.5-Math-7B", "/lustre/qwen-tp2",
        "--tp", "2", "--pp", "1",
    ]


def test_bad_layout_is_refused_before_submitting(tmp_path):
    env = {**os.environ, "NEMORUN_HOME": str(tmp_path)}
    proc = subprocess.run(
        [str(LAUNCH_PYTHON), str(JOBS), "train", *SLURM, "--nodes", "1", "--ranks-per-node", "3", "--dryrun"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "3 trainer ranks do not divide into tensor x pipeline parallel groups of 2" in proc.stderr

