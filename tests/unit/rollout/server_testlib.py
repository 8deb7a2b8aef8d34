"""Helpers of the own-server tests: the server as a process started with chosen flags,
or in this process (its state reachable, its HTTP app on a thread)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from rollout_testlib import get

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m megatron_hpt.rollout.server`` with the given flags, ready on /health_generate."""

    def __init__(self, model_dir, *flags: str, log_path: Path, threads: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "megatron_hpt.rollout.server", "--model-path", str(model_dir), "--port", str(self.port), "--threads", str(threads), *flags]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p), "OMP_NUM_THREADS": str(threads)}
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if get(self.url, "/health_generate", timeout=10)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout_s} s:\n{self.log_path.read_text()[-3000:]}")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS line")

    def terminate_and_wait(self, timeout_s: float) -> int | None:
        """SIGTERM, then the exit code, or None if it still runs after timeout_s."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


class InProcessServer:
    """A ServerState served from a thread of this process (tests reach into the state)."""

    def __init__(self, model_dir, **options):
        from aiohttp import web

        from megatron_hpt.rollout.server.routes import build_app
        from megatron_hpt.rollout.server.state import ServerOptions, ServerState

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.state = ServerState(ServerOptions(model_path=str(model_dir), port=port, device="cpu", **options))
        self.loop = asyncio.new_event_loop()
        self.runner = web.AppRunner(build_app(self.state), access_log=None, shutdown_timeout=1.0)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", port).start())
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.state.scheduler.close()
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.state.scheduler.worker.join(timeout=30)


def wait_until(predicate, what: str, timeout_s: float = 120.0, poll_s: float = 0.05):
    """Polls until predicate() is truthy; fails the test naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


def in_thread(fn, *args, **kwargs):
    """Starts fn(*args) on a thread; returns (thread, list that receives its result, or
    the exception it raised)."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn(*args, **kwargs))
        except Exception as e:  # the test looks at it
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out
