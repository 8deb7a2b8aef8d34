"""A real SLURM cluster on this machine, for the launcher tests.

Starts munged, slurmctld and one slurmd per emulated node from Debian's packages
(installed by ``launchers/slurm/ci/setup_local_slurm.sh``), every file in a private
directory and every daemon on a free port, so nothing under /etc is touched and two
test runs cannot collide. All SLURM client commands find this cluster through the
``SLURM_CONF`` variable in :attr:`LocalSlurmCluster.env`.

Why each setting (all found by running SLURM 22.05 in a container with no systemd
and no cgroups):

- munged runs as the ``munge`` user on its own socket and key; SLURM reaches it
  through ``AuthInfo=socket=...``.
- ``slurmd -N NAME`` with ``NodeHostname=localhost`` and ``NodeAddr=127.0.0.1``:
  several slurmd on one host emulate several nodes, each on its own port. The
  launch scripts resolve node names through ``NodeAddr`` (as on a real cluster,
  where it is the node's hostname), so no /etc/hosts entries are needed.
- ``SlurmdParameters=config_overrides``: the configured CPUs / memory are used
  as given (several emulated nodes share two real cores); memory stays below
  what ``slurmd -C`` detects so a node never drains.
- ``AuthInfo=cred_expire=5``: a requeued job may start again once its old
  credentials expire, 120 s by default; 5 s keeps the requeue test short.
- ``proctrack/linuxproc`` and ``task/none``: no cgroups here.
- Fake GPUs: ``gres.conf`` ``File=`` entries are symlinks to /dev/null, so
  ``--gpus-per-node`` is scheduled and ``CUDA_VISIBLE_DEVICES`` set exactly as
  on a GPU node.
- The daemons are children of the test process (``-D``, foreground), which
  stops and reaps them by PID: orphans are not reaped in this sandbox.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_hpt.parallel.launch import free_port

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel")
SETUP_HINT = "run `bash launchers/slurm/ci/setup_local_slurm.sh` (as root) to install SLURM and munge"


def missing_binaries() -> list[str]:
    """The SLURM/munge programs that are not installed (empty when all are)."""
    found = []
    for name in REQUIRED_BINARIES:
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists():
            found.append(name)
    return found


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class LocalSlurmCluster:
    """``num_nodes`` emulated nodes, each with ``cpus_per_node`` CPUs and
    ``gpus_per_node`` fake GPUs, in one partition named ``debug``."""

    root: Path
    num_nodes: int = 1
    cpus_per_node: int = 4
    gpus_per_node: int = 2
    memory_mb: int = 4000
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _munge_dir: Path | None = None

    @property
    def node_names(self) -> list[str]:
        return [f"node{i + 1}" for i in range(self.num_nodes)]

    @property
    def munge_dir(self) -> Path:
        """munged's key, socket and logs: a folder of its own under /tmp, because munged
        (running as ``munge``) must traverse every parent, and pytest's temporary
        folders are private to root."""
        if self._munge_dir is None:
            self._munge_dir = Path(tempfile.mkdtemp(prefix="hpt-munge-"))
        return self._munge_dir

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- configuration -------------------------------------------------------------

    def _write_config(self) -> None:
        r = self.root
        for sub in ("state", "log", "dev"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        munge_dir = self.munge_dir
        munge_dir.mkdir(exist_ok=True)
        munge_dir.chmod(0o755)  # munged requires others to be able to reach its socket
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        munge_user = pwd.getpwnam("munge")
        for p in (munge_dir, key):
            os.chown(p, munge_user.pw_uid, munge_user.pw_gid)

        ctl_port = free_port()
        node_lines, gres_lines = [], []
        for name in self.node_names:
            (r / "spool" / name).mkdir(parents=True, exist_ok=True)
            devices = []
            for g in range(self.gpus_per_node):
                dev = r / "dev" / f"{name}-gpu{g}"
                if not dev.is_symlink():
                    dev.symlink_to("/dev/null")
                devices.append(str(dev))
            gres = f" Gres=gpu:{self.gpus_per_node}" if self.gpus_per_node else ""
            node_lines.append(
                f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
                f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb}{gres} State=UNKNOWN"
            )
            gres_lines += [f"NodeName={name} Name=gpu File={d}" for d in devices]
        (r / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=hptlocal",
                    "SlurmctldHost=localhost(127.0.0.1)",
                    f"SlurmctldPort={ctl_port}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    # cred_expire also holds a requeued job back (default 120 s): 5 s here.
                    f"AuthInfo=socket={munge_dir / 'munge.socket'},cred_expire=5",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool' / '%n'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'spool' / '%n' / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
                    "SlurmctldDebug=info",
                    "SlurmdDebug=info",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_Core",
                    "SchedulerType=sched/backfill",
                    "GresTypes=gpu",
                    "SlurmdParameters=config_overrides",
                    "AccountingStorageType=accounting_storage/none",
                    "JobCompType=jobcomp/none",
                    "JobAcctGatherType=jobacct_gather/none",
                    "MpiDefault=none",
                    "ReturnToService=2",
                    "JobRequeue=1",
                    # Scheduling reacts within a second, not the default minute.
                    "SchedulerParameters=sched_interval=1,bf_interval=1",
                    "MessageTimeout=20",
                    "KillWait=10",
                    "InactiveLimit=0",
                    "MinJobAge=600",
                    *node_lines,
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                ]
            )
            + "\n"
        )

    # --- daemons --------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], user: str | None = None) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, user=user, start_new_session=True
        )
        log.close()

    def start(self, timeout_s: float = 60.0) -> None:
        """Write the configuration, start the daemons, wait until every node is idle."""
        self._write_config()
        m = self.munge_dir
        self._spawn(
            "munged",
            [
                _binary("munged"),
                "--foreground",
                f"--socket={m / 'munge.socket'}",
                f"--key-file={m / 'munge.key'}",
                f"--pid-file={m / 'munged.pid'}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
                "--num-threads=2",
            ],
            user="munge",
        )
        self._wait_for(lambda: (m / "munge.socket").exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", [_binary("slurmctld"), "-D", "-c", "-i"])
        for name in self.node_names:
            self._spawn(f"slurmd-{name}", [_binary("slurmd"), "-D", "-N", name])

        def all_idle() -> bool:
            out = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True
            ).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return len(states) == self.num_nodes and all(s == "idle" for s in states.values())

        self._wait_for(all_idle, timeout_s, "the SLURM nodes did not become idle")

    def _wait_for(self, predicate, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"{message}: daemons exited {dead}\n{self.logs()}")
            if predicate():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{message} within {timeout_s:.0f} s\n{self.logs()}")

    def logs(self, tail: int = 40) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.munge_dir / "munged.log"]:
            if path.is_file():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job, then stop and reap the daemons (slurmd first)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--partition=debug"], env=self.env, capture_output=True)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.squeue():
                time.sleep(0.5)
        for name in [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._munge_dir is not None:
            shutil.rmtree(self._munge_dir, ignore_errors=True)

    # --- client helpers --------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster (``env`` must keep SLURM_CONF)."""
        proc = subprocess.run(list(argv), env=env or self.env, capture_output=True, text=True)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def squeue(self) -> list[str]:
        out = self.run("squeue", "-h", "-o", "%i %T", check=False).stdout
        return [line for line in out.splitlines() if line.strip()]

    def job_state(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RestartCnt, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        fields = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def wait_job(self, job_id: str, timeout_s: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")) -> dict[str, str]:
        """Poll until the job reaches one of ``until`` states; returns its fields."""
        deadline = time.monotonic() + timeout_s
        state: dict[str, str] = {}
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state.get("JobState") in until:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {until} after {timeout_s:.0f} s: {state}\n{self.logs()}")
