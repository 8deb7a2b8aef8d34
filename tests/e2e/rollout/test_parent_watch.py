"""A launched server dies with the trainer that launched it, even when the trainer is
SIGKILLed and cannot stop it; otherwise the server's status is passed through."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from megatron_hpt.rollout.launcher import ServerProcess

REPO = Path(__file__).resolve().parents[3]


def _server(tmp_path: Path, code: str) -> ServerProcess:
    return ServerProcess(lambda spec: ([sys.executable, "-c", code], dict(os.environ)), host="127.0.0.1",
                         log_path=tmp_path / "server.log", name="test server")


def test_status_of_the_server_is_passed_through(tmp_path):
    s = _server(tmp_path, "import sys; sys.exit(3)")
    s.start()
    assert s.proc.wait(timeout=30) == 3 and not s.alive()


def test_server_dies_with_a_sigkilled_trainer(tmp_path):
    pid_file = tmp_path / "server.pid"
    trainer = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        from megatron_hpt.rollout.launcher import ServerProcess
        code = "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
        s = ServerProcess(lambda spec: ([sys.executable, "-c", code], dict(os.environ)), host="127.0.0.1",
                          log_path=Path({str(tmp_path / 'log')!r}), name="s")
        s.start()
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", trainer], cwd=REPO)
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    server = psutil.Process(int(pid_file.read_text()))
    assert server.is_running()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while server.is_running() and server.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, "the server outlived its trainer"
