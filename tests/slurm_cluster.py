"""The local Slurm cluster (slurm/cluster.sh, two simulated nodes) as a pytest fixture, and small helpers.

The nodes live in network namespaces of their own; Slurm clients (sbatch, squeue, our launchers)
reach the controller only from inside its namespace, so every client command goes through
`client_command`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "cluster.sh"
REQUIRE = os.environ.get("MAPANYTHING_EXT_REQUIRE_SLURM") == "1"
NODES = 2


def slurm_installed() -> bool:
    path = os.environ.get("PATH", "") + ":/usr/sbin"
    return all(shutil.which(tool, path=path) for tool in ("slurmctld", "slurmd", "munged", "sbatch", "ip", "nsenter",
                                                          "slurmdbd", "mariadbd"))


def cluster_env(state_dir: Path):
    """Start a 2-node cluster with accounting for this test session; yields the environment for Slurm clients."""
    if not slurm_installed():
        message = ("Slurm/munge/MariaDB/iproute2 not installed (apt-get install slurmctld slurmd slurm-client slurmdbd "
                   "mariadb-server munge iproute2)")
        if REQUIRE:
            pytest.fail(message + " but MAPANYTHING_EXT_REQUIRE_SLURM=1")
        pytest.skip(message)
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs as root (network namespaces, slurmd)")
    env = {**os.environ, "MAPANYTHING_EXT_SLURM_DIR": str(state_dir), "PATH": os.environ.get("PATH", "") + ":/usr/sbin"}
    started = time.monotonic()
    out = subprocess.run(["bash", str(CLUSTER), "start", "--nodes", str(NODES)], capture_output=True, text=True,
                         timeout=180, env=env)
    if out.returncode != 0:
        pytest.fail(f"slurm/cluster.sh start failed: {out.stdout}\n{out.stderr}")
    print(f"\n[slurm] {NODES}-node cluster with accounting up in {time.monotonic() - started:.1f}s")
    env["SLURM_CONF"] = re.search(r"export SLURM_CONF=(\S+)", out.stdout).group(1)
    env["SLURM_NETNS"] = re.search(r"export SLURM_NETNS=(\S+)", out.stdout).group(1)
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=120, env=env)


def client_command(env: dict, args: list[str]) -> list[str]:
    """args run where the controller is reachable (inside its network namespace)."""
    return ["nsenter", f"--net=/var/run/netns/{env['SLURM_NETNS']}", *args]


# A busy controller answers a client with these now and then; the client is then simply asked again.
TRANSIENT = ("timed out", "Unable to contact slurm controller", "Connection refused")


def slurm(env: dict, *args: str) -> str:
    """stdout of a Slurm client command, asked again (up to 5 times) while the controller is briefly unreachable:
    an empty answer must mean "no such job", never "the controller was busy"."""
    for _ in range(5):
        out = subprocess.run(client_command(env, list(args)), env=env, capture_output=True, text=True, timeout=60)
        if out.returncode == 0 or not any(text in out.stderr for text in TRANSIENT):
            return out.stdout.strip()
        time.sleep(1)
    raise RuntimeError(f"Slurm controller unreachable for {' '.join(args)}: {out.stderr.strip()}")


def node_names(env: dict) -> list[str]:
    return slurm(env, "sinfo", "-h", "-N", "-o", "%N").split()


def job_state(env: dict, job_id: str) -> tuple[str, str]:
    """(state, reason) from squeue; ('', '') once the job has left the queue."""
    line = slurm(env, "squeue", "-h", "-j", job_id, "-o", "%T|%r")
    return tuple(line.split("|", 1)) if "|" in line else ("", "")


def job_field(env: dict, job_id: str, name: str) -> str:
    """One field of `scontrol show job` (e.g. JobState, ExitCode, Restarts)."""
    match = re.search(rf"\b{name}=(\S+)", slurm(env, "scontrol", "show", "job", job_id))
    return match.group(1) if match else ""


def sacct_states(env: dict, job_id: str, timeout: float = 60) -> list[str]:
    """Every state the job went through as accounting recorded it (one per allocation, oldest first),
    once accounting has recorded its end (slurmdbd lags the controller by a moment)."""
    deadline = time.time() + timeout
    while True:
        lines = slurm(env, "sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State").splitlines()
        states = [line.split()[0] for line in lines if line.strip()]
        if (states and states[-1] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED")) or time.time() > deadline:
            return states
        time.sleep(0.5)


def final_state(env: dict, job_id: str, timeout: float = 60) -> str:
    """JobState once the job has ended (submitit's launcher may return while Slurm still completes it)."""
    deadline = time.time() + timeout
    while (state := job_field(env, job_id, "JobState")) in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING") \
            and time.time() < deadline:
        time.sleep(0.3)
    return state


def release_requeued(env: dict, job_id: str) -> None:
    """A requeued job waits ~2 minutes for its BeginTime; start it now."""
    state, reason = job_state(env, job_id)
    if state == "PENDING" and "BeginTime" in reason:
        slurm(env, "scontrol", "update", f"jobid={job_id}", "StartTime=now")


def wait_for_job_id(output_dir: Path, timeout: float = 120, not_in: tuple = ()) -> str:
    """Id of the newest job submitted for output_dir (ignoring the ids in not_in)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        folder = output_dir / ".submitit"
        ids = [p.name for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
        ids = [i for i in ids if i not in not_in]
        if ids:
            return sorted(ids, key=int)[-1]
        time.sleep(0.2)
    raise TimeoutError(f"no Slurm job appeared under {output_dir / '.submitit'}")


def task_pids(job_id: str) -> dict[int, int]:
    """{global rank: pid} of the job's python tasks (every simulated node is a process on this machine)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace")
                           .split("\0") if "=" in item)
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if environ.get("SLURM_JOB_ID") == job_id and "SLURM_PROCID" in environ and "python" in cmdline \
                and "submitit" in cmdline:
            found[int(environ["SLURM_PROCID"])] = int(proc.name)
    return found


def kill_job_tasks(job_id: str, ranks=None) -> dict[int, int]:
    """SIGKILL the job's tasks (all, or the given ranks): no handler can run. Returns {rank: pid} killed."""
    pids = task_pids(job_id)
    assert pids, f"no python task of job {job_id} found"
    chosen = {r: p for r, p in pids.items() if ranks is None or r in ranks}
    for pid in chosen.values():
        os.kill(pid, 9)
    return chosen
