"""Starting, watching and stopping rollout server processes: the project's own server
and ``sglang.launch_server`` (TP/DP per server, several servers), each in its own
process group with its output in a log file, ready once /health_generate answers 200.

Real SGLang is an optional install: on GPU machines the ``gpu`` extra, on CPU machines
``make sglang-cpu`` (a separate virtualenv, DESIGN.md §3). On CPU the server gets the
torch-native flags and ``sglang_cpu/sitecustomize.py`` on its PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import megatron_hpt
from megatron_hpt.rollout.config import RolloutConfig
from megatron_hpt.rollout.sglang_cpu import STUBS_DIR

SGLANG_CPU_ARGS = (
    "--device", "cpu",
    "--attention-backend", "torch_native",
    "--sampling-backend", "pytorch",
    "--disable-cuda-graph",
    "--grammar-backend", "none",
    "--skip-server-warmup",
    "--max-total-tokens", "4096",
)  # fmt: skip
"""Flags that make SGLang 0.5.23 run on a CPU-only machine (its generic torch path)."""

_PACKAGE_ROOT = str(Path(megatron_hpt.__file__).resolve().parent.parent)
_PARENT_WATCH = Path(__file__).resolve().with_name("parent_watch.py")


class SGLangNotInstalled(RuntimeError):
    """The configured Python has no sglang."""


class ServerStartError(RuntimeError):
    """A launched server exited or did not become healthy in time; the message has its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_status(url: str, timeout: float = 5.0) -> int | None:
    """Status code of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class ServerProcess:
    """One launched server: its command, its URL, its log, its life."""

    def __init__(self, cmd: list[str], env: dict[str, str], host: str, port: int, log_path: Path, name: str):
        self.cmd, self.env, self.host, self.port = cmd, env, host, port
        self.log_path, self.name = log_path, name
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"\n==== {time.strftime('%H:%M:%S')} start: {' '.join(self.cmd)}\n".encode())
        log.flush()
        # Through parent_watch, so that a trainer killed outright takes its servers with it.
        # (run as a script: it needs only the standard library, whatever env the server gets).
        watched = [sys.executable, str(_PARENT_WATCH), str(os.getpid()), "--", *self.cmd]
        self.proc = subprocess.Popen(
            watched, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise ServerStartError(f"{self.name} exited with code {code} while starting; log {self.log_path}:\n{self.log_tail()}")
            if http_status(self.url + "/health_generate", timeout=30) == 200:
                return
            time.sleep(0.25)
        raise ServerStartError(f"{self.name} did not answer /health_generate within {timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}")

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the server and everything it started (tests use it to simulate a crash)."""
        self._signal_group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # Children (SGLang's scheduler and detokenizer) may outlive the parent.
        self._signal_group(signal.SIGKILL)
        self.proc.wait()

    def restart(self, timeout_s: float) -> None:
        self.stop(grace_s=2.0)
        self.restarts += 1
        self.start()
        self.wait_ready(timeout_s)


def own_server_command(cfg: RolloutConfig, model_path: str, port: int) -> tuple[list[str], dict[str, str]]:
    cmd = [
        sys.executable, "-m", "megatron_hpt.rollout.server",
        "--model-path", str(model_path),
        "--host", cfg.host,
        "--port", str(port),
        "--device", cfg.device,
        "--dtype", cfg.dtype,
        "--threads", str(cfg.server_threads),
        "--max-batch-size", str(cfg.max_batch_size),
    ]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(cfg.server_threads))
    return cmd, env


def sglang_python(cfg: RolloutConfig) -> str:
    """The configured Python, checked to have sglang (SGLangNotInstalled otherwise)."""
    python = cfg.sglang_python
    hint = (
        "real SGLang is optional: on a CPU machine run `make sglang-cpu` (builds .venv-sglang), "
        "on a GPU machine install the gpu extra (pip install 'megatron-hpt[gpu]') and set "
        "rollout.sglang_python to that environment's python"
    )
    if not Path(python).exists() and not Path(python).is_absolute():
        candidate = Path(_PACKAGE_ROOT) / python
        python = str(candidate) if candidate.exists() else python
    if not Path(python).exists():
        raise SGLangNotInstalled(f"sglang_python {cfg.sglang_python!r} does not exist; {hint}")
    probe = subprocess.run([python, "-c", "import importlib.util,sys; sys.exit(importlib.util.find_spec('sglang') is None)"], capture_output=True)
    if probe.returncode != 0:
        raise SGLangNotInstalled(f"{python} has no sglang package; {hint}")
    return python


def sglang_server_command(cfg: RolloutConfig, model_path: str, port: int) -> tuple[list[str], dict[str, str]]:
    python = sglang_python(cfg)
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not _cuda_available())
    cmd = [
        python, "-m", "sglang.launch_server",
        "--model-path", str(model_path),
        "--host", cfg.host,
        "--port", str(port),
        "--tp-size", str(cfg.tp_size),
        "--dp-size", str(cfg.dp_size),
        "--dtype", cfg.dtype,
    ]  # fmt: skip
    env = dict(os.environ)
    if on_cpu:
        cmd += list(SGLANG_CPU_ARGS)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STUBS_DIR), env.get("PYTHONPATH", "")) if p)
        env.setdefault("OMP_NUM_THREADS", str(cfg.server_threads))
    elif cfg.sglang_deterministic:
        cmd.append("--enable-deterministic-inference")
    cmd += list(cfg.sglang_extra_args)
    return cmd, env


def launch_servers(cfg: RolloutConfig, model_path: str) -> list[ServerProcess]:
    """Starts ``cfg.num_servers`` servers of ``cfg.engine`` and waits until all are healthy
    (on failure, stops the ones started and raises ServerStartError with the log tail)."""
    if cfg.engine not in ("own", "sglang"):
        raise ValueError(f"launch_servers needs engine 'own' or 'sglang', got {cfg.engine!r}")
    if not Path(model_path, "config.json").is_file():
        raise FileNotFoundError(f"model path {str(model_path)!r} has no config.json: pass an HF checkpoint folder")
    log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(tempfile.mkdtemp(prefix="rollout-servers-"))
    build = own_server_command if cfg.engine == "own" else sglang_server_command
    servers = []
    for i in range(cfg.num_servers):
        port = free_port(cfg.host)
        cmd, env = build(cfg, model_path, port)
        servers.append(ServerProcess(cmd, env, cfg.host, port, log_dir / f"server-{i}.log", name=f"{cfg.engine} server {i} (port {port})"))
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready(cfg.startup_timeout_s)
    except BaseException:
        for s in servers:
            s.stop(grace_s=2.0)
        raise
    return servers
