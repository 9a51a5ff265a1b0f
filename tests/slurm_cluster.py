"""The local Slurm cluster (slurm/cluster.sh) as a pytest fixture, and small Slurm helpers."""

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


def slurm_installed() -> bool:
    path = os.environ.get("PATH", "") + ":/usr/sbin"
    return all(shutil.which(tool, path=path) for tool in ("slurmctld", "slurmd", "munged", "sbatch"))


def cluster_env():
    """Start the cluster once (or reuse a running one); yields the environment for Slurm clients."""
    if not slurm_installed():
        message = "Slurm/munge not installed (apt-get install slurmctld slurmd slurm-client munge)"
        if REQUIRE:
            pytest.fail(message + " but MAPANYTHING_EXT_REQUIRE_SLURM=1")
        pytest.skip(message)
    was_running = subprocess.run(["bash", str(CLUSTER), "status"], capture_output=True, text=True).stdout
    out = subprocess.run(["bash", str(CLUSTER), "start"], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        pytest.fail(f"slurm/cluster.sh start failed: {out.stderr}")
    conf = re.search(r"export SLURM_CONF=(\S+)", out.stdout).group(1)
    env = {**os.environ, "SLURM_CONF": conf, "PATH": os.environ.get("PATH", "") + ":/usr/sbin"}
    yield env
    if "slurmctld: running" not in was_running:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, timeout=60)


def slurm(env: dict, *args: str) -> str:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=60).stdout.strip()


def job_state(env: dict, job_id: str) -> tuple[str, str]:
    """(state, reason) from squeue; ('', '') once the job has left the queue."""
    line = slurm(env, "squeue", "-h", "-j", job_id, "-o", "%T|%r")
    return tuple(line.split("|", 1)) if "|" in line else ("", "")


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


def kill_job_tasks(env: dict, job_id: str) -> None:
    """SIGKILL every process of the job's tasks (the cluster is this machine): no handler can run."""
    lines = slurm(env, "scontrol", "listpids", job_id).splitlines()[1:]
    pids = {int(line.split()[0]) for line in lines if line.split() and line.split()[0].isdigit()}
    pids = {pid for pid in pids if "python" in _cmdline(pid)}
    assert pids, f"no python task of job {job_id} found by scontrol listpids"
    for pid in pids:
        os.kill(pid, 9)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
