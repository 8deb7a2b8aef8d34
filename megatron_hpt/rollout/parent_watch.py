"""Runs a rollout server so that it dies with the trainer that launched it.

    python megatron_hpt/rollout/parent_watch.py PARENT_PID -- COMMAND ...

A trainer killed with SIGKILL (the OOM killer, a lost node, a test) cannot stop its
servers, and an orphaned SGLang server keeps its GPU and port. This process starts
COMMAND in its own process group (the launcher made it a session leader), exits with
COMMAND's status when COMMAND ends, and when PARENT_PID is gone it kills the whole
group, COMMAND's children included.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5
GRACE_S = 5.0


def parent_alive(pid: int) -> bool:
    # A process whose parent exits is reparented (to init or a subreaper), so this holds
    # even if the launcher's pid is reused.
    return os.getppid() == pid


def watch(parent_pid: int, cmd: list[str]) -> int:
    child = subprocess.Popen(cmd)
    while True:
        code = child.poll()
        if code is not None:
            return code if code >= 0 else 128 - code
        if not parent_alive(parent_pid):
            break
        time.sleep(POLL_S)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal below must not stop us first
    os.killpg(0, signal.SIGTERM)
    try:
        child.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python parent_watch.py PARENT_PID -- COMMAND ...", file=sys.stderr)
        return 2
    return watch(int(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main())
