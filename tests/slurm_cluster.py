"""A real one-node Slurm cluster for the tests: Debian's slurmctld and slurmd, with a munge daemon of its own, started
from a private slurm.conf in a temporary folder (its own ports, state and spool folders, munge key and socket) and
stopped afterwards. Nothing of the machine's own Slurm or munge (if any) is used or touched.

The cluster has no accounting database (slurmdbd), so Slurm's `sacct` has nothing to read; submitit asks sacct for
the state of jobs that ended without a result (cancelled ones), so `tests/slurm/sacct`, first on the PATH the
cluster's clients see, answers that query from slurmctld's job table (`scontrol show job`).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
PACKAGES = "slurmctld slurmd slurm-client munge"
SHIM = Path(__file__).parent / "slurm"
PARTITION = "t2vz"
NODE = "t2vznode"


def missing_reason() -> str | None:
    """Why a cluster cannot be started here (None: it can)."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"no {', '.join(missing)}: install Debian's {PACKAGES} (.ci/run does where apt-get exists)"
    if os.geteuid() != 0:
        return "slurmd runs jobs as their user and needs root; run the Slurm tests as root"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def daemon(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    """A running one-node cluster: `env` is what its clients (sbatch, submitit, Hydra) need in their environment."""

    root: Path
    env: dict

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command (`squeue`, `scontrol`, `scancel`) against this cluster."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld knows (running, pending and recently ended), as `scontrol show job` fields."""
        out = self.run("scontrol", "show", "job", "-o", check=False).stdout
        return [dict(item.split("=", 1) for item in line.split() if "=" in item)
                for line in out.splitlines() if line.startswith("JobId=")]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*.log")))


def start_cluster(root: Path, cpus: int = 2, memory_mb: int = 4000) -> SlurmCluster:
    """munged, slurmctld and slurmd under `root`, waiting (at most 30 s) for the node to be idle."""
    for sub in ("state", "spool", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = root / "munge" / "munge.socket"
    subprocess.run([daemon("munged"), "--force", f"--socket={sock}", f"--key-file={key}",
                    f"--log-file={root / 'log' / 'munged.log'}", f"--pid-file={root / 'munge' / 'munged.pid'}",
                    f"--seed-file={root / 'munge' / 'munged.seed'}"], check=True, timeout=30)
    host, user = socket.gethostname(), "root"
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        f"ClusterName=t2vz{os.getpid()}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}",
        "AuthType=auth/munge", f"AuthInfo=socket={sock},cred_expire=10", "CredType=cred/munge",
        f"SlurmUser={user}", f"SlurmdUser={user}",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/pgid", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "MpiDefault=none",
        "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
        "ReturnToService=2", "JobRequeue=1", "KillWait=2", "MinJobAge=600", "SchedulerParameters=sched_interval=1",
        f"NodeName={NODE} NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
    ]) + "\n")
    env = {**os.environ, "SLURM_CONF": str(conf), "PATH": f"{SHIM}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("slurmctld", "slurmd"):
        args = [daemon(name), "-f", str(conf)] + (["-N", NODE] if name == "slurmd" else [])
        subprocess.run(args, env=env, check=True, timeout=30)
    cluster = SlurmCluster(root, env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
        if state == "idle":
            return cluster
        time.sleep(0.5)
    logs = cluster.logs()
    stop_cluster(cluster)
    raise RuntimeError(f"the test Slurm cluster did not come up (node state {state!r}):\n{logs}")


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel every job, shut slurmctld and slurmd down, stop munged; kill what is left after 10 s."""
    cluster.run("scancel", "--full", f"--partition={PARTITION}", check=False)
    cluster.run("scontrol", "shutdown", check=False)
    pids = [cluster.root / "slurmctld.pid", cluster.root / "slurmd.pid", cluster.root / "munge" / "munged.pid"]
    deadline = time.monotonic() + 10
    munged = pids[-1]
    if munged.is_file():
        _signal(munged, 15)
    for pid_file in pids:
        while pid_file.is_file() and _alive(pid_file) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_file.is_file() and _alive(pid_file):
            _signal(pid_file, 9)


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def _signal(pid_file: Path, sig: int) -> None:
    try:
        os.kill(int(pid_file.read_text().split()[0]), sig)
    except (OSError, ValueError, IndexError):
        pass
