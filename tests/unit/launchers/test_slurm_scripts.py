"""The SLURM launcher scripts without a cluster: shellcheck on every script, the
rollout-server commands each task builds, the recipe layout helper, and the
pre-emption forwarder that signals torchrun agents and nothing else. (They run on a
real cluster in tests/e2e/test_slurm.py.)"""

from __future__ import annotations

import http.server
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SLURM_DIR = REPO / "launchers" / "slurm"
SHELLCHECK = Path(sys.executable).parent / "shellcheck"


def shell_scripts() -> list[Path]:
    found = sorted(
        p for p in (REPO / "launchers").rglob("*") if p.suffix in (".sh", ".sbatch") and p.is_file()
    )
    return found + [REPO / ".ci" / "run"]


def test_every_shell_script_passes_shellcheck():
    scripts = shell_scripts()
    assert {p.name for p in scripts} >= {
        "common.sh", "train_single_node.sbatch", "train_multi_node.sbatch", "convert.sbatch", "rollout_server.sh",
        "signal_trainer.sh", "gpu.sh", "cpu.sh", "setup_local_slurm.sh", "run",
    }
    # -x follows `source` (common.sh, profiles) from the repository root.
    proc = subprocess.run(
        [str(SHELLCHECK), "-x", "-s", "bash", *map(str, scripts)], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _server_command(**env: str) -> tuple[int, list[str], str]:
    """(status, argv, stderr) of one rollout-server task; argv starts with its
    CUDA_VISIBLE_DEVICES ("" when it has none)."""
    base = {"PATH": os.environ["PATH"], "HPT_DRY_RUN": "1", "HPT_PYTHON": "/venv/bin/python", "ROLLOUT_MODEL": "/ckpt/m",
            "ROLLOUT_TP": "1", "ROLLOUT_BASE_PORT": "30000", "SLURMD_NODENAME": "gpu7", "OUTPUT_DIR": "/runs/r"}
    proc = subprocess.run(["bash", str(SLURM_DIR / "rollout_server.sh")], env={**base, **env}, capture_output=True, text=True)
    if proc.returncode != 0:
        return proc.returncode, [], proc.stderr
    prefix, line = proc.stdout.strip().split("] ", 1)
    gpus = prefix.split(" gpus ")[1] if " gpus " in prefix else ""
    return proc.returncode, [gpus, *shlex.split(line)], proc.stderr


def test_sglang_server_task_takes_its_port_and_gpus_from_its_local_id():
    # Task 1 on a node whose first 4 GPUs train: TP 2 -> GPUs 6, 7 (its CUDA_VISIBLE_DEVICES); port base + 1.
    rc, argv, _ = _server_command(ROLLOUT_SERVER="sglang", ROLLOUT_TP="2", SLURM_LOCALID="1", HPT_ROLLOUT_GPU_OFFSET="4",
                                  GPUS_PER_NODE="8", SGLANG_PYTHON="/opt/sglang/bin/python", ROLLOUT_MEM_FRACTION="0.7",
                                  HPT_ROLLOUT_LAUNCH_TOKEN="tok")
    assert rc == 0
    assert argv == ["6,7", "/opt/sglang/bin/python", "-m", "sglang.launch_server", "--model-path", "/ckpt/m",
                    "--tp-size", "2", "--base-gpu-id", "0", "--mem-fraction-static", "0.7", "--host", "127.0.0.1",
                    "--port", "30001", "--weight-version", "launch", "--served-model-name", "tok"]
    # The GPUs are counted in the ones the step sees.
    rc, argv, _ = _server_command(ROLLOUT_SERVER="sglang", SLURM_LOCALID="1", HPT_ROLLOUT_GPU_OFFSET="2",
                                  CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert argv[0] == "7"
    rc, _, err = _server_command(ROLLOUT_SERVER="sglang", ROLLOUT_TP="2", SLURM_LOCALID="2", GPUS_PER_NODE="4")
    assert rc == 2 and "task 2 needs GPUs 4..5 of 4" in err


def test_own_server_task_on_cpu_and_on_a_gpu():
    rc, argv, _ = _server_command(ROLLOUT_SERVER="own", ROLLOUT_DEVICE="cpu", SLURM_LOCALID="0", HPT_ROLLOUT_LAUNCH_TOKEN="tok")
    assert rc == 0
    assert argv == ["", "/venv/bin/python", "-m", "megatron_hpt.rollout.server", "--model-path", "/ckpt/m",
                    "--host", "127.0.0.1", "--port", "30000", "--device", "cpu", "--weight-dir", "/runs/r/weights_sync",
                    "--weight-version", "launch", "--launch-token", "tok"]
    rc, argv, _ = _server_command(ROLLOUT_SERVER="own", ROLLOUT_DEVICE="cuda", SLURM_LOCALID="3", HPT_ROLLOUT_GPU_OFFSET="2")
    assert argv[0] == "5" and argv[argv.index("--device") + 1] == "cuda" and argv[argv.index("--port") + 1] == "30003"


def test_own_server_loads_weights_only_from_the_runs_sync_folder():
    rc, argv, _ = _server_command(ROLLOUT_SERVER="own", ROLLOUT_WEIGHT_DIR="/shared/sync")
    assert rc == 0 and argv[argv.index("--weight-dir") + 1] == "/shared/sync"
    rc, _, err = _server_command(ROLLOUT_SERVER="own", OUTPUT_DIR="")
    assert rc != 0 and "set OUTPUT_DIR or ROLLOUT_WEIGHT_DIR" in err


def test_servers_for_other_nodes_need_a_key_and_never_print_it():
    rc, _, err = _server_command(ROLLOUT_SERVER="own", ROLLOUT_HOST="0.0.0.0")
    assert rc == 2 and "ROLLOUT_HOST=0.0.0.0 reaches beyond this node: set HPT_ROLLOUT_API_KEY or ROLLOUT_API_KEY_FILE" in err
    rc, argv, _ = _server_command(ROLLOUT_SERVER="own", ROLLOUT_HOST="0.0.0.0", HPT_ROLLOUT_API_KEY="s3cret")
    assert rc == 0 and argv[argv.index("--api-key") + 1] == "***" and "s3cret" not in " ".join(argv)


def test_the_key_can_come_from_a_file_written_by_another_job_component(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-the-trainer\n")
    rc, argv, _ = _server_command(ROLLOUT_SERVER="own", ROLLOUT_HOST="0.0.0.0", ROLLOUT_API_KEY_FILE=str(key_file))
    assert rc == 0 and argv[argv.index("--api-key") + 1] == "***"


def test_unknown_server_kind_is_refused():
    rc, _, err = _server_command(ROLLOUT_SERVER="vllm")
    assert rc == 2 and "ROLLOUT_SERVER must be sglang or own, got 'vllm'" in err


def _layout(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launchers" / "recipe_layout.py"), *args],
                          capture_output=True, text=True)


def test_recipe_layout_sizes_data_parallelism_from_the_recipe():
    # The 7B recipe has TP=2: 16 ranks -> DP 8; with TP overridden to 4 -> DP 4.
    assert _layout("hpt-qwen2.5-math-7b-8gpu", "16").stdout.strip() == "data_parallel_size=8"
    assert _layout("hpt-qwen2.5-math-7b-8gpu", "16", "parallel.tensor_model_parallel_size=4").stdout.strip() == (
        "data_parallel_size=4"
    )
    assert _layout("demo-cpu", "2").stdout.strip() == "data_parallel_size=2"
    bad = _layout("hpt-qwen2.5-math-7b-8gpu", "3")
    assert bad.returncode == 2 and "3 trainer ranks do not divide into tensor x pipeline parallel groups of 2" in bad.stderr
    unknown = _layout("no-such-recipe", "8")
    assert unknown.returncode == 2 and "no-such-recipe" in unknown.stderr


def _sleeper(env: dict[str, str], *argv: str) -> subprocess.Popen:
    """A process with the given SLURM environment and extra command-line words."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv],
                            env={**os.environ, **env}, start_new_session=True)


def test_signal_trainer_terms_only_this_steps_torchrun_on_this_node():
    job = str(900000 + os.getpid() % 10000)
    mine = {"SLURM_JOB_ID": job, "SLURM_STEP_ID": "3", "SLURMD_NODENAME": "nodeA"}
    torchrun = _sleeper(mine, "-m", "torch.distributed.run", "--nnodes=1")
    rank = _sleeper(mine, "-m", "megatron_hpt.cli", "train")  # a rank: same step, not torchrun
    other_step = _sleeper({**mine, "SLURM_STEP_ID": "4"}, "-m", "torch.distributed.run")
    other_node = _sleeper({**mine, "SLURMD_NODENAME": "nodeB"}, "-m", "torch.distributed.run")
    procs = [torchrun, rank, other_step, other_node]
    try:
        time.sleep(0.3)
        out = subprocess.run(
            ["bash", str(SLURM_DIR / "signal_trainer.sh")],
            env={**os.environ, "HPT_TRAINER_STEP": f"{job}.3", "SLURMD_NODENAME": "nodeA"},
            capture_output=True, text=True, timeout=30,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"TERM to torchrun {torchrun.pid} on nodeA (step {job}.3)" in out.stdout
        assert torchrun.wait(timeout=10) == -signal.SIGTERM
        assert all(p.poll() is None for p in (rank, other_step, other_node))
        # Nothing left to signal: it says so and fails (common.sh then signals the step).
        again = subprocess.run(
            ["bash", str(SLURM_DIR / "signal_trainer.sh")],
            env={**os.environ, "HPT_TRAINER_STEP": f"{job}.3", "SLURMD_NODENAME": "nodeA"},
            capture_output=True, text=True, timeout=30,
        )
        assert again.returncode == 1 and "(none found)" in again.stdout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.parametrize("script", ["train_single_node.sbatch", "train_multi_node.sbatch"])
def test_training_scripts_refuse_to_run_outside_a_job(script, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SLURM_DIR / script)], cwd=tmp_path, env={**env, "HPT_PROFILE": "cpu"},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not inside a SLURM job: submit with sbatch" in proc.stderr


class _InfoServer(http.server.ThreadingHTTPServer):
    """Answers /server_info (with ``token`` in it, 401 without the key) and /health_generate."""

    def __init__(self, token: str, key: str):
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/server_info" and self.headers.get("Authorization") != f"Bearer {key}":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"launch_token": outer.token}).encode() if self.path == "/server_info" else b""
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.token = token
        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _server_state(url: str, **env: str) -> str:
    script = f'HPT_LAUNCH_DIR={SLURM_DIR}; source {SLURM_DIR}/common.sh; hpt_server_state "$1"'
    proc = subprocess.run(["bash", "-c", script, "state", url], env={"PATH": os.environ["PATH"], **env},
                          capture_output=True, text=True, timeout=60)
    return proc.stdout.strip()


def test_the_batch_script_tells_its_servers_from_foreign_ones():
    server = _InfoServer("this-job", key="k3y")
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert _server_state(url, HPT_ROLLOUT_LAUNCH_TOKEN="this-job", HPT_ROLLOUT_API_KEY="k3y") == "ready"
        assert _server_state(url, HPT_ROLLOUT_LAUNCH_TOKEN="other-job", HPT_ROLLOUT_API_KEY="k3y") == "foreign"
        assert _server_state(url, HPT_ROLLOUT_LAUNCH_TOKEN="this-job", HPT_ROLLOUT_API_KEY="wrong") == "foreign"
    finally:
        server.shutdown()
        server.server_close()
    assert _server_state(url, HPT_ROLLOUT_LAUNCH_TOKEN="this-job") == "starting"  # nothing answers
