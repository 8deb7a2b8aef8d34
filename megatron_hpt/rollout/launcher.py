"""Starting, watching and stopping rollout server processes: the project's own server
and ``sglang.launch_server`` (TP/DP per server, several servers), each in its own
process group with its output in a log file.

Each launch is identified: it gets a fresh token (our server: ``--launch-token``,
reported by /server_info as ``launch_token``; SGLang: ``--served-model-name``, reported
there as ``served_model_name``), and a server is ready only when /server_info shows that
token and /health_generate answers 200. Anything else answering on the port
(another run's server) is refused. The port stays bound here (SO_REUSEADDR, not
listening: the server can still bind it, nobody is handed it) until the server is ready.

Servers bind ``cfg.host``; off loopback they need an API key (a random one per launch
when the config names none). On GPUs, server i gets its own ``gpus_per_server`` GPUs
(``CUDA_VISIBLE_DEVICES``) from ``cfg.base_gpu_id`` on.

Real SGLang is an optional install: on GPU machines the ``gpu`` extra, on CPU machines
``make sglang-cpu`` (a separate virtualenv, DESIGN.md §3). On CPU the server gets the
torch-native flags and ``sglang_cpu/sitecustomize.py`` on its PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import megatron_hpt
from megatron_hpt.rollout.client import auth_headers
from megatron_hpt.rollout.config import RolloutConfig, is_loopback
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

LAUNCH_VERSION = "launch"
"""The weight version launched servers start with (their --weight-version): the weights
at ``model_path``, distinct from every version the trainer pushes (its step numbers)."""

_PACKAGE_ROOT = str(Path(megatron_hpt.__file__).resolve().parent.parent)
_PARENT_WATCH = Path(__file__).resolve().with_name("parent_watch.py")


class SGLangNotInstalled(RuntimeError):
    """The configured Python has no sglang."""


class ServerStartError(RuntimeError):
    """A launched server exited or did not become healthy in time; the message has its log tail."""


class ForeignServer(ServerStartError):
    """Something else answers on a launched server's port (another run's server)."""


# -- ports ----------------------------------------------------------------------


class PortReservation:
    """A TCP port held bound (SO_REUSEADDR, not listening) so that no other process is
    given it, while the server we start can still bind and listen on it. A given port is
    taken only when a plain bind succeeds too: nobody else holds or uses it."""

    def __init__(self, host: str, port: int = 0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        if port:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((host, port))  # OSError when another reservation or server has it
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError:
            self._sock.close()
            raise
        self.port: int = self._sock.getsockname()[1]

    def release(self) -> None:
        self._sock.close()


def reserve_port(host: str = "127.0.0.1", preferred: int | None = None) -> PortReservation:
    """Holds ``preferred`` when it is free, else a free port the kernel picks."""
    if preferred:
        try:
            return PortReservation(host, preferred)
        except OSError:
            pass
    return PortReservation(host, 0)


# -- HTTP probes (standard library: used before the engine's client exists) -------


def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> tuple[int | None, object]:
    """(status, decoded JSON or None) of a GET; status None when nothing answers."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None, None
    try:
        return status, json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, None


def http_status(url: str, timeout: float = 5.0) -> int | None:
    """Status code of a GET, or None when nothing answers."""
    return http_get(url, timeout=timeout)[0]


def launch_token_of(info: object) -> str | None:
    """The launch token a /server_info reply carries (ours: launch_token; SGLang:
    served_model_name, which the launcher sets to the token)."""
    if not isinstance(info, dict):
        return None
    token = info.get("launch_token") or info.get("served_model_name")
    return token if isinstance(token, str) else None


def identify(url: str, token: str, api_key: str | None, timeout: float = 30.0) -> str | None:
    """None while nothing answers (or the server is still starting: 5xx), "ours" when
    /server_info shows ``token``, else why the answering server is not ours."""
    status, info = http_get(url + "/server_info", auth_headers(api_key), timeout=timeout)
    if status is None or status >= 500:
        return None
    if status == 200 and launch_token_of(info) == token:
        return "ours"
    if status in (401, 403):
        return f"it refused our API key ({status})"
    if status != 200:
        return f"it answered /server_info with {status}"
    return f"its launch token is {launch_token_of(info)!r}, not this launch's"


# -- placement --------------------------------------------------------------------


def on_gpu(cfg: RolloutConfig) -> bool:
    """Whether launched servers run on GPUs."""
    if cfg.device == "auto":
        import torch

        return torch.cuda.is_available()
    return cfg.device == "cuda"


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as CUDA_VISIBLE_DEVICES entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g for g in listed.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def server_gpus(cfg: RolloutConfig, index: int, visible: list[str]) -> tuple[str, ...]:
    """The GPUs of server ``index``: ``gpus_per_server`` of ``visible`` from
    base_gpu_id + index x gpus_per_server."""
    first = cfg.base_gpu_id + index * cfg.gpus_per_server
    last = cfg.base_gpu_id + cfg.num_servers * cfg.gpus_per_server
    if last > len(visible):
        raise ValueError(
            f"{cfg.num_servers} servers x {cfg.gpus_per_server} GPUs from rollout.base_gpu_id={cfg.base_gpu_id} "
            f"need {last} GPUs, but {len(visible)} are visible ({','.join(visible) or 'none'})"
        )
    return tuple(visible[first : first + cfg.gpus_per_server])


# -- commands ---------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchSpec:
    """What one start of one server gets."""

    port: int
    launch_token: str
    api_key: str | None
    weight_version: str
    gpus: tuple[str, ...] = ()
    """Its CUDA_VISIBLE_DEVICES; () on CPU."""


CommandBuilder = Callable[[LaunchSpec], "tuple[list[str], dict[str, str]]"]


def own_server_limit_args(cfg: RolloutConfig) -> list[str]:
    """The own server's request-deadline and weight-directory flags (one place, so their
    names follow the server's)."""
    args = ["--request-deadline-s", f"{cfg.request_timeout_s:g}"]
    if cfg.weight_dir is not None:
        args += ["--weight-dir", str(cfg.weight_dir)]
    return args


def _identity_args(spec: LaunchSpec, token_flag: str) -> list[str]:
    args = [token_flag, spec.launch_token, "--weight-version", spec.weight_version]
    if spec.api_key:
        args += ["--api-key", spec.api_key]
    return args


def _env_for(spec: LaunchSpec, pythonpath_first: str, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath_first, env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    if spec.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.gpus)
    return env


def own_server_command(cfg: RolloutConfig, model_path: str, spec: LaunchSpec) -> tuple[list[str], dict[str, str]]:
    cmd = [
        sys.executable, "-m", "megatron_hpt.rollout.server",
        "--model-path", str(model_path),
        "--host", cfg.host,
        "--port", str(spec.port),
        "--device", "cuda" if spec.gpus else cfg.device,
        "--dtype", cfg.dtype,
        "--threads", str(cfg.server_threads),
        "--max-batch-size", str(cfg.max_batch_size),
        *_identity_args(spec, "--launch-token"),
        *own_server_limit_args(cfg),
    ]  # fmt: skip
    return cmd, _env_for(spec, _PACKAGE_ROOT, cfg.server_threads)


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


def sglang_server_command(
    cfg: RolloutConfig, model_path: str, spec: LaunchSpec, *, python: str, gpu: bool
) -> tuple[list[str], dict[str, str]]:
    cmd = [
        python, "-m", "sglang.launch_server",
        "--model-path", str(model_path),
        "--host", cfg.host,
        "--port", str(spec.port),
        "--tp-size", str(cfg.tp_size),
        "--dp-size", str(cfg.dp_size),
        "--dtype", cfg.dtype,
        *_identity_args(spec, "--served-model-name"),
    ]  # fmt: skip
    if gpu:
        cmd += ["--base-gpu-id", "0"]  # its CUDA_VISIBLE_DEVICES holds exactly its GPUs
        if cfg.mem_fraction_static is not None:
            cmd += ["--mem-fraction-static", f"{cfg.mem_fraction_static:g}"]
        if cfg.colocated:
            cmd.append("--enable-memory-saver")
        if cfg.sglang_deterministic:
            cmd.append("--enable-deterministic-inference")
        env = _env_for(spec, "", cfg.server_threads)
    else:
        cmd += list(SGLANG_CPU_ARGS)
        env = _env_for(spec, str(STUBS_DIR), cfg.server_threads)
    cmd += list(cfg.sglang_extra_args)
    return cmd, env


def redacted(cmd: list[str]) -> list[str]:
    """The command with the value of --api-key hidden (for logs)."""
    return [("***" if i > 0 and cmd[i - 1] == "--api-key" else word) for i, word in enumerate(cmd)]


# -- processes --------------------------------------------------------------------


class ServerProcess:
    """One launched server: its command, its URL, its log, its life. Every start holds a
    port, makes a new launch token, and is ready only when the server shows that token."""

    def __init__(
        self,
        build: CommandBuilder,
        *,
        host: str,
        log_path: Path,
        name: str,
        api_key: str | None = None,
        weight_version: str = LAUNCH_VERSION,
        gpus: tuple[str, ...] = (),
    ):
        self.build, self.host, self.log_path, self.name = build, host, log_path, name
        self.api_key, self.weight_version, self.gpus = api_key, weight_version, gpus
        self.port: int | None = None
        self.spec: LaunchSpec | None = None
        self.cmd: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._reservation: PortReservation | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("[::1]" if self.host == "::" else self.host)
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._reservation = reserve_port(self.host if self.host not in ("0.0.0.0", "::") else "", self.port)
        self.port = self._reservation.port
        self.spec = LaunchSpec(port=self.port, launch_token=secrets.token_hex(16), api_key=self.api_key,
                               weight_version=self.weight_version, gpus=self.gpus)
        self.cmd, env = self.build(self.spec)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        log.write(f"\n==== {time.strftime('%H:%M:%S')} start: {' '.join(redacted(self.cmd))}\n".encode())
        log.flush()
        # Through parent_watch, so that a trainer killed outright takes its servers with it.
        # (run as a script: it needs only the standard library, whatever env the server gets).
        watched = [sys.executable, str(_PARENT_WATCH), str(os.getpid()), "--", *self.cmd]
        self.proc = subprocess.Popen(
            watched, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()

    def _release_port(self) -> None:
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, timeout_s: float) -> None:
        """Until the server shows this launch's token and /health_generate answers 200;
        ForeignServer at once when something else answers on the port."""
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop(grace_s=2.0)
            raise
        finally:
            self._release_port()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise ServerStartError(f"{self.name} exited with code {code} while starting; log {self.log_path}:\n{self.log_tail()}")
            who = identify(self.url, self.spec.launch_token, self.api_key)
            if who is not None and who != "ours":
                raise ForeignServer(
                    f"{self.name}: another server answers at {self.url}, not the one launched here ({who}); "
                    f"refusing it (rollouts and weight updates would go to it). Log {self.log_path}"
                )
            if who == "ours" and http_status(self.url + "/health_generate", timeout=30) == 200:
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
        self._release_port()
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
        """Stop, start again (the same port when it is free, a new token), wait until ready."""
        self.stop(grace_s=2.0)
        self.restarts += 1
        self.start()
        self.wait_ready(timeout_s)


def launch_api_key(cfg: RolloutConfig) -> str | None:
    """The key launched servers get: the configured one, else a random one when they
    listen beyond loopback, else none."""
    key = cfg.resolve_api_key()
    if key is None and not is_loopback(cfg.host):
        key = secrets.token_urlsafe(32)
    return key


def launch_servers(
    cfg: RolloutConfig,
    model_path: str,
    *,
    api_key: str | None = None,
    weight_version: str = LAUNCH_VERSION,
    visible: list[str] | None = None,
) -> list[ServerProcess]:
    """Starts ``cfg.num_servers`` servers of ``cfg.engine`` and waits until all are ready
    (on failure, stops the ones started and raises ServerStartError with the log tail).
    ``visible``: the GPUs to place them on (default: the ones this process sees)."""
    if cfg.engine not in ("own", "sglang"):
        raise ValueError(f"launch_servers needs engine 'own' or 'sglang', got {cfg.engine!r}")
    if not Path(model_path, "config.json").is_file():
        raise FileNotFoundError(f"model path {str(model_path)!r} has no config.json: pass an HF checkpoint folder")
    if api_key is None and not is_loopback(cfg.host):
        raise ValueError(f"servers listening on {cfg.host} (beyond loopback) need an API key")
    gpu = on_gpu(cfg)
    if gpu and visible is None:
        visible = visible_gpus()
    log_dir = Path(cfg.log_dir) if cfg.log_dir else Path(tempfile.mkdtemp(prefix="rollout-servers-"))
    if cfg.engine == "own":
        def build(spec: LaunchSpec):
            return own_server_command(cfg, model_path, spec)
    else:
        python = sglang_python(cfg)

        def build(spec: LaunchSpec):
            return sglang_server_command(cfg, model_path, spec, python=python, gpu=gpu)

    servers = [
        ServerProcess(build, host=cfg.host, log_path=log_dir / f"server-{i}.log", name=f"{cfg.engine} server {i}",
                      api_key=api_key, weight_version=weight_version,
                      gpus=server_gpus(cfg, i, visible) if gpu else ())
        for i in range(cfg.num_servers)
    ]
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
