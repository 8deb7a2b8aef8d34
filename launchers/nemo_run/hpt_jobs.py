"""NeMo-Run configurations for megatron-hpt jobs: training (one or several nodes, the
rollout engine owned by the trainer or SGLang servers on dedicated nodes), checkpoint
conversion and the demo. Each job is a ``run.Script`` around the ``megatron-hpt`` CLI;
the executor (``LocalExecutor`` or ``SlurmExecutor``) is chosen on the command line.

    python launchers/nemo_run/hpt_jobs.py train --executor slurm --account ACCT --partition batch \\
        --nodes 2 --gpus-per-node 8 --image IMAGE --mount /lustre:/lustre \\
        --recipe hpt-qwen2.5-math-7b-8gpu --output-dir /lustre/runs/hpt1 --dryrun
    python launchers/nemo_run/hpt_jobs.py train --executor slurm ... --rollout-nodes 1 --rollout-model /lustre/Qwen2.5-Math-7B
    python launchers/nemo_run/hpt_jobs.py convert --direction hf-to-megatron --src HF --dest OUT --tp 2 ...
    python launchers/nemo_run/hpt_jobs.py demo --executor local

``--dryrun`` prints the sbatch script (Slurm) or the command (local) and submits nothing.
Recipe overrides go after ``--``: ``... train ... -- train.steps=100 rollout.n=8``.

Pre-emption and requeue (Slurm): the job gets ``--signal=TERM@<grace>``, so SLURM sends
TERM to the trainer's step before the time limit; torchrun passes it to the ranks, which
write a checkpoint and exit; the non-zero torchrun status makes NeMo-Run's script
``scontrol requeue`` the job (up to ``--max-requeues`` times), and the requeued job
runs the same ``train --resume`` command, which continues from that checkpoint.

This module imports nemo_run (the ``launch`` extra, installed in ``.venv-launch`` by
``make launch-env``) and, of megatron-hpt, only the YAML recipe loader (to size
data parallelism); jobs run the CLI in the job's environment.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nemo_run as run

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "launchers"))
from recipe_layout import data_parallel_override  # noqa: E402  (reads the recipe YAML only)
IMAGE_REPO_ROOT = "/opt/megatron-hpt"
"""Where the Dockerfile puts this repository inside the image."""
ROLLOUT_SERVER_SCRIPT = "launchers/slurm/rollout_server.sh"
TRAINER_RDZV_PORT = 29500


@dataclass(kw_only=True)
class ClusterSettings:
    """Where and how a job runs: the executor's settings from the command line."""

    executor: str = "local"
    """local | slurm."""
    account: str | None = None
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 8
    """Accelerators per node; a trainer rank or 1/rollout_tp of a server each."""
    ranks_per_node: int | None = None
    """Trainer ranks per node (default: gpus_per_node). On CPU (local) the rank count."""
    time: str = "04:00:00"
    image: str | None = None
    """Container image (pyxis); the one built from the repository's Dockerfile."""
    mounts: list[str] = field(default_factory=list)
    job_dir: str = str(Path.home() / ".nemo_run" / "slurm-jobs")
    """Folder for NeMo-Run's job files and logs; on Slurm it must be on a shared file system."""
    python: str = "python"
    """Python that runs the CLI in the job (the image's, or a venv's)."""
    code_dir: str | None = None
    """A source checkout to put on PYTHONPATH when megatron-hpt is not installed there."""
    checkpoint_grace_s: int = 120
    """Seconds between SLURM's TERM and the time limit: the ranks write their checkpoint."""
    max_requeues: int = 10

    def repo_root(self) -> str:
        """This repository's path as the job sees it."""
        if self.code_dir:
            return self.code_dir
        return IMAGE_REPO_ROOT if self.image else str(REPO_ROOT)

    def trainer_ranks(self) -> int:
        return self.ranks_per_node or self.gpus_per_node

    def env(self) -> dict[str, str]:
        env = {
            "PYTHONUNBUFFERED": "1",
            # torchrun waits this long for the ranks' pre-emption checkpoint before SIGKILL.
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(max(self.checkpoint_grace_s - 20, 30)),
        }
        if self.code_dir:
            env["PYTHONPATH"] = self.code_dir
        return env


# --- executors ------------------------------------------------------------------------


def slurm_executor(
    cluster: ClusterSettings, *, nodes: int, launcher: str | None, requeue: bool, heterogeneous: bool = False
) -> run.SlurmExecutor:
    """A SlurmExecutor submitting from this machine (a login node: LocalTunnel)."""
    if not cluster.account:
        raise SystemExit("--account is required with --executor slurm")
    executor = run.SlurmExecutor(
        account=cluster.account,
        partition=cluster.partition,
        job_name_prefix="megatron-hpt.",
        nodes=nodes,
        ntasks_per_node=cluster.trainer_ranks() if launcher == "torchrun" else 1,
        gpus_per_node=cluster.gpus_per_node or None,
        time=cluster.time,
        exclusive=True,
        container_image=cluster.image,
        container_mounts=list(cluster.mounts),
        env_vars=cluster.env(),
        tunnel=run.LocalTunnel(job_dir=cluster.job_dir),
        # The image holds the package: nothing to copy to the cluster.
        packager=run.Packager(),
        launcher=launcher,
        heterogeneous=heterogeneous,
        retries=cluster.max_requeues if requeue else 0,
        signal=f"TERM@{cluster.checkpoint_grace_s}" if requeue else None,
    )
    if launcher == "torchrun":
        executor.launcher = run.Torchrun(rdzv_port=TRAINER_RDZV_PORT)
    return executor


def local_executor(cluster: ClusterSettings, *, launcher: str | None) -> run.LocalExecutor:
    env = cluster.env()
    if os.sep in cluster.python:
        # torchrun comes from the same environment as the job's Python.
        env["PATH"] = f"{Path(cluster.python).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return run.LocalExecutor(
        ntasks_per_node=cluster.trainer_ranks() if launcher == "torchrun" else 1,
        launcher=launcher,
        env_vars=env,
    )


# --- tasks ----------------------------------------------------------------------------


def cli_task(cluster: ClusterSettings, *args: str) -> run.Script:
    """``python -m megatron_hpt.cli ARGS`` (under torchrun when the executor has the
    torchrun launcher)."""
    return run.Script(path="megatron_hpt.cli", entrypoint=cluster.python, m=True, args=list(args))


def launcher_safe(args: list[str]) -> bool:
    """Whether NeMo-Run's torchrun launcher passes ``args`` through intact. It
    shell-quotes each argument and the Slurm script quotes the command line again,
    so an argument that needs quoting (``rollout.urls=[http://h:30000]``,
    ``eval.benchmarks=[]``) would reach the CLI with literal quotes; the local
    scheduler, which runs no shell, would keep them too."""
    return all(shlex.quote(arg) == arg for arg in args)


def torchrun_script_task(cluster: ClusterSettings, cli_args: list[str], *, nodes_var: str | None, prelude: str = "") -> run.Script:
    """torchrun as a bash script of our own (our quoting, one level): on Slurm, one
    agent per node of ``$nodes_var`` with c10d rendezvous at the first node's address;
    locally (``nodes_var`` None), ``--standalone``. ``prelude`` runs first and may
    append to the bash array ``extra`` (more CLI arguments)."""
    ranks = cluster.trainer_ranks()
    cli = shlex.join(cli_args)
    if nodes_var is None:
        torchrun = f'{cluster.python} -m torch.distributed.run --standalone --nproc-per-node={ranks} -m megatron_hpt.cli {cli} "${{extra[@]}}"'
        where = ""
    else:
        where = f"""head=$(scontrol show hostnames "${nodes_var}" | head -n1)
master=$(scontrol show node "$head" -o | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')
nnodes=$(scontrol show hostnames "${nodes_var}" | wc -l)
"""
        torchrun = (
            f'{cluster.python} -m torch.distributed.run --nnodes="$nnodes" --nproc-per-node={ranks} '
            f'--rdzv-backend=c10d --rdzv-endpoint="${{master:-$head}}:{TRAINER_RDZV_PORT}" --rdzv-id="hpt-$SLURM_JOB_ID" '
            f'-m megatron_hpt.cli {cli} "${{extra[@]}}"'
        )
    return run.Script(inline=f"set -euo pipefail\nextra=()\n{prelude}{where}exec {torchrun}\n", entrypoint="bash")


def train_args(recipe: str, output_dir: str, overrides: list[str], world_size: int) -> list[str]:
    """``train --resume`` with the run's output_dir and the data-parallel size that
    makes ``world_size`` ranks fit the recipe's TP x PP."""
    return [
        "train", "--recipe", recipe, "--resume", f"output_dir={output_dir}",
        data_parallel_override(recipe, world_size, overrides), *overrides,
    ]


def rollout_servers_task(
    cluster: ClusterSettings, *, model: str, server: str, tp: int, base_port: int, key_file: str, weight_dir: str
) -> run.Script:
    """One rollout server per task, the same per-task script the sbatch launchers use; they
    listen on every interface with the API key the trainer task writes to ``key_file``, and
    load new weights only from ``weight_dir`` (where the trainer writes its disk syncs)."""
    return run.Script(
        path=f"{cluster.repo_root()}/{ROLLOUT_SERVER_SCRIPT}",
        entrypoint="bash",
        env={
            "ROLLOUT_SERVER": server,
            "ROLLOUT_MODEL": model,
            "ROLLOUT_TP": str(tp),
            "ROLLOUT_BASE_PORT": str(base_port),
            "ROLLOUT_DEVICE": "cuda" if cluster.gpus_per_node else "cpu",
            "ROLLOUT_HOST": "0.0.0.0",
            "ROLLOUT_API_KEY_FILE": key_file,
            "ROLLOUT_WEIGHT_DIR": weight_dir,
            "GPUS_PER_NODE": str(cluster.gpus_per_node),
            "HPT_PYTHON": cluster.python,
            "SGLANG_PYTHON": "/opt/sglang/bin/python" if cluster.image else cluster.python,
        },
    )


def trainer_with_servers_task(
    cluster: ClusterSettings,
    cli_args: list[str],
    *,
    servers_per_node: int,
    base_port: int,
    key_file: str,
    startup_timeout_s: int = 900,
) -> run.Script:
    """The trainer in het group 1 of a heterogeneous job whose group 0 runs rollout
    servers: it writes the servers' API key (once per run, readable by its owner only),
    derives their URLs from group 0's nodes, waits for their /health, then starts
    torchrun over its own nodes, attached to the servers."""
    prelude = f"""key_file={key_file}
if [[ ! -s $key_file ]]; then
  mkdir -p "$(dirname "$key_file")"
  (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' >"$key_file.tmp" && mv "$key_file.tmp" "$key_file")
fi
urls=()
for node in $(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_0"); do
  addr=$(scontrol show node "$node" -o | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')
  for ((i = 0; i < {servers_per_node}; i++)); do urls+=("http://${{addr:-$node}}:$(({base_port} + i))"); done
done
deadline=$((SECONDS + {startup_timeout_s}))
for url in "${{urls[@]}}"; do
  until {cluster.python} -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=5)' "$url" 2>/dev/null; do
    ((SECONDS < deadline)) || {{ echo "rollout server $url not healthy after {startup_timeout_s} s" >&2; exit 1; }}
    sleep 5
  done
done
extra+=(rollout.engine=attach "rollout.urls=[$(IFS=,; echo "${{urls[*]}}")]" rollout.colocated=false "rollout.api_key=file:$key_file")
"""
    return torchrun_script_task(cluster, cli_args, nodes_var="SLURM_JOB_NODELIST_HET_GROUP_1", prelude=prelude)


# --- jobs -----------------------------------------------------------------------------


@dataclass(kw_only=True)
class Job:
    """A named experiment: its tasks and one executor per task."""

    name: str
    tasks: list[run.Script]
    executors: list[run.Executor]


def train_job(cluster: ClusterSettings, args: argparse.Namespace) -> Job:
    output_dir = args.output_dir or "runs/hpt-train"
    if args.rollout_nodes == 0:
        world_size = (cluster.nodes if cluster.executor == "slurm" else 1) * cluster.trainer_ranks()
        cli_args = train_args(args.recipe, output_dir, args.overrides, world_size)
        if launcher_safe(cli_args):  # NeMo-Run's torchrun launcher
            task, launcher = cli_task(cluster, *cli_args), "torchrun"
        else:
            nodes_var = "SLURM_JOB_NODELIST" if cluster.executor == "slurm" else None
            task, launcher = torchrun_script_task(cluster, cli_args, nodes_var=nodes_var), None
        if cluster.executor == "local":
            executor = local_executor(cluster, launcher=launcher)
        else:
            executor = slurm_executor(cluster, nodes=cluster.nodes, launcher=launcher, requeue=True)
        return Job(name="hpt-train", tasks=[task], executors=[executor])

    if cluster.executor != "slurm":
        raise SystemExit("--rollout-nodes needs --executor slurm (dedicated rollout nodes are a heterogeneous job)")
    if not args.rollout_model:
        raise SystemExit("--rollout-nodes needs --rollout-model (the HF checkpoint the servers load)")
    if cluster.gpus_per_node % args.rollout_tp:
        raise SystemExit(f"--gpus-per-node {cluster.gpus_per_node} is not a multiple of --rollout-tp {args.rollout_tp}")
    servers_per_node = cluster.gpus_per_node // args.rollout_tp
    servers = slurm_executor(cluster, nodes=args.rollout_nodes, launcher=None, requeue=True, heterogeneous=True)
    servers.ntasks_per_node = servers_per_node
    trainer = slurm_executor(cluster, nodes=cluster.nodes, launcher=None, requeue=True, heterogeneous=True)
    cli_args = train_args(args.recipe, output_dir, args.overrides, cluster.nodes * cluster.trainer_ranks())
    key_file = f"{output_dir}/.rollout-api-key"
    return Job(
        name="hpt-train-mn",
        tasks=[
            rollout_servers_task(cluster, model=args.rollout_model, server=args.rollout_server, tp=args.rollout_tp,
                                 base_port=args.rollout_base_port, key_file=key_file,
                                 weight_dir=f"{output_dir}/weights_sync"),
            trainer_with_servers_task(cluster, cli_args, servers_per_node=servers_per_node, base_port=args.rollout_base_port,
                                      key_file=key_file),
        ],
        executors=[servers, trainer],
    )


def convert_job(cluster: ClusterSettings, args: argparse.Namespace) -> Job:
    if args.direction == "hf-to-megatron":
        cli = ["convert", "hf-to-megatron", args.src, args.dest, "--tp", str(args.tp), "--pp", str(args.pp)]
    else:  # a model checkpoint: a conversion's output, or a training checkpoint's weights/
        cli = ["convert", "megatron-to-hf", args.src, args.dest]
    task = cli_task(cluster, *cli, *args.overrides)
    if cluster.executor == "local":
        return Job(name="hpt-convert", tasks=[task], executors=[local_executor(cluster, launcher=None)])
    return Job(name="hpt-convert", tasks=[task], executors=[slurm_executor(cluster, nodes=1, launcher=None, requeue=False)])


def demo_job(cluster: ClusterSettings, args: argparse.Namespace) -> Job:
    task = cli_task(cluster, "demo", *(["--output-dir", args.output_dir] if args.output_dir else []), *args.overrides)
    if cluster.executor == "local":
        return Job(name="hpt-demo", tasks=[task], executors=[local_executor(cluster, launcher=None)])
    return Job(name="hpt-demo", tasks=[task], executors=[slurm_executor(cluster, nodes=1, launcher=None, requeue=False)])


JOBS = {"train": train_job, "convert": convert_job, "demo": demo_job}


# --- running --------------------------------------------------------------------------


def add_job(exp: run.Experiment, job: Job) -> None:
    if len(job.tasks) == 1:
        exp.add(job.tasks[0], executor=job.executors[0], name=job.name)
    else:  # a heterogeneous Slurm job: one het group per task
        exp.add(job.tasks, executor=job.executors, name=job.name)


def dryrun_scripts(job: Job) -> dict[str, str]:
    """What ``job`` would submit, submitting nothing: the full sbatch script of a Slurm
    job (or the command line of a local one), plus the inline task scripts it runs,
    by name."""
    scripts: dict[str, str] = {}
    with run.Experiment(job.name, log_level="WARN") as exp:
        add_job(exp, job)
        exp.dryrun(log=False, delete_exp_dir=False)
        try:
            for launched in exp.jobs:
                infos = [launched._dryrun_info] if hasattr(launched, "_dryrun_info") else list(launched._dryrun_infos)
                for i, info in enumerate(infos):
                    request = info.request
                    text = request.materialize() if hasattr(request, "materialize") else shlex.join(_local_command(request))
                    scripts[f"{launched.id}.sbatch" if hasattr(request, "materialize") else f"{launched.id}.{i}.cmd"] = text
            for inline in sorted(Path(exp._exp_dir).glob("**/scripts/*.sh")):
                scripts[inline.name] = inline.read_text()
        finally:
            shutil.rmtree(exp._exp_dir, ignore_errors=True)
    return scripts


def _local_command(request) -> list[str]:
    # torchx's local scheduler request: {role: [replica params]}.
    for replicas in request.role_params.values():
        for replica in replicas:
            return [replica.cmd[0], *replica.cmd[1:]] if hasattr(replica, "cmd") else list(replica.args)
    return []


def parse_args(argv: list[str] | None = None) -> tuple[ClusterSettings, argparse.Namespace]:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]

    parser = argparse.ArgumentParser(prog="python launchers/nemo_run/hpt_jobs.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("job", choices=sorted(JOBS))
    where = parser.add_argument_group("executor")
    where.add_argument("--executor", choices=["local", "slurm"], default="local")
    where.add_argument("--account")
    where.add_argument("--partition")
    where.add_argument("--nodes", type=int, default=1, help="trainer nodes")
    where.add_argument("--gpus-per-node", type=int, default=8)
    where.add_argument("--ranks-per-node", type=int, help="trainer ranks per node (default: --gpus-per-node)")
    where.add_argument("--time", default="04:00:00")
    where.add_argument("--image", help="container image (the Dockerfile's); pyxis runs the steps in it")
    where.add_argument("--mount", action="append", default=[], dest="mounts", help="container mount SRC:DST (repeatable)")
    where.add_argument("--job-dir", default=ClusterSettings().job_dir)
    where.add_argument("--python", default="python", help="Python that runs the CLI in the job")
    where.add_argument("--code-dir", help="source checkout to put on PYTHONPATH in the job")
    where.add_argument("--checkpoint-grace-s", type=int, default=120)
    where.add_argument("--max-requeues", type=int, default=10)
    train = parser.add_argument_group("train")
    train.add_argument("--recipe", default="hpt-qwen2.5-math-7b-8gpu")
    train.add_argument(
        "--output-dir", help="the run's output_dir (train: default runs/hpt-train, fixed across requeues; demo: its folder)"
    )
    train.add_argument("--rollout-nodes", type=int, default=0, help="nodes for SGLang servers (0: the trainer owns its engine)")
    train.add_argument("--rollout-model", help="HF checkpoint the rollout servers load")
    train.add_argument("--rollout-server", choices=["sglang", "own"], default="sglang")
    train.add_argument("--rollout-tp", type=int, default=1)
    train.add_argument("--rollout-base-port", type=int, default=30000)
    convert = parser.add_argument_group("convert")
    convert.add_argument("--direction", choices=["hf-to-megatron", "megatron-to-hf"], default="hf-to-megatron")
    convert.add_argument("--src")
    convert.add_argument("--dest")
    convert.add_argument("--tp", type=int, default=1)
    convert.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dryrun", action="store_true", help="print what would be submitted; submit nothing")
    parser.add_argument("--detach", action="store_true", help="submit and return (Slurm); default: follow the logs")
    args = parser.parse_args(argv)
    args.overrides = overrides
    if args.job == "convert" and not (args.src and args.dest):
        parser.error("convert needs --src and --dest")
    cluster = ClusterSettings(
        executor=args.executor,
        account=args.account,
        partition=args.partition,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        ranks_per_node=args.ranks_per_node,
        time=args.time,
        image=args.image,
        mounts=args.mounts,
        job_dir=args.job_dir,
        python=args.python,
        code_dir=args.code_dir,
        checkpoint_grace_s=args.checkpoint_grace_s,
        max_requeues=args.max_requeues,
    )
    return cluster, args


def main(argv: list[str] | None = None) -> int:
    cluster, args = parse_args(argv)
    job = JOBS[args.job](cluster, args)
    if args.dryrun:
        for name, text in dryrun_scripts(job).items():
            print(f"# ---- {name} ----")
            print(text)
        return 0
    with run.Experiment(job.name, log_level="WARN") as exp:
        add_job(exp, job)
        exp.run(detach=args.detach, tail_logs=not args.detach)
    # Leaving the experiment waits for its jobs (unless detached) and records their states.
    states = [launched.state.name for launched in exp.jobs]
    print(f"{job.name}: {', '.join(states)}")
    return 0 if args.detach or all(state == "SUCCEEDED" for state in states) else 1


if __name__ == "__main__":
    sys.exit(main())
